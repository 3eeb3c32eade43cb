r"""Evaluate a VLM under every reduction method at three budgets.

  python eval.py                      # the shipped model on the bundled test split, all methods
  python eval.py --checkpoint=/path/to/llava-1.5-7b-hf --task=pope --data=/path/to/POPE --methods=fastv,visionzip
  python eval.py --import=my_methods --methods=my_method --num_examples=50
  python eval.py --methods=fastv,visionzip --budgets=0.25 --num_examples=700
  python eval.py --checkpoint=/path/to/hf_llava_dir --dataset=/path/to/local_vqa --columns=answer=fullAnswer
  python eval.py --mesh=2,1,4         # data x fsdp x tensor over every device

Prints a table and writes results.json, results.csv and accuracy_vs_flops.png to --outdir.
Several processes: as train.py (--coordinator, --num_processes, --process_id; docs/multihost.md).
"""

import os

from absl import app, flags, logging

from vtr_jax import evaluation, sharding
from vtr_jax.errors import user_errors

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory (default: the shipped model).")
_DATASET = flags.DEFINE_string("dataset", "bundled", "'bundled' or a local dataset directory / file.")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split.")
_COLUMNS = flags.DEFINE_string("columns", "", "Column mapping for local data: name=column,... (e.g. answer=fullAnswer).")
_NUM = flags.DEFINE_integer("num_examples", 490, "Examples to evaluate (0: the whole split).")
_METHODS = flags.DEFINE_list("methods", [], "Methods to evaluate (default: every registered method).")
_BUDGETS = flags.DEFINE_list("budgets", ["0.5", "0.25", "0.125"], "Fractions of the visual tokens to keep.")
_BATCH = flags.DEFINE_integer("batch_size", 70, "Batch size (one compiled shape; rounded up to the data devices).")
_OUTDIR = flags.DEFINE_string("outdir", "outputs/eval", "Where results.json/.csv and the plot go.")
_MESH = flags.DEFINE_list("mesh", ["-1", "1", "1"], "Mesh shape data,fsdp,tensor (-1: the devices left).")
_TASK = flags.DEFINE_string("task", None, "A benchmark task (vtr_jax.tasks.known(): pope, gqa, textvqa, vqav2, mme, "
                            "scienceqa_img, mmbench, seedbench, ...): generated answers and its official metric.")
_DATA = flags.DEFINE_string("data", None, "With --task: the task's dataset, a local directory in its Hub layout.")
_TEMPLATE = flags.DEFINE_string("chat_template", None, "With --task: the fallback chat template when the checkpoint "
                                "has none ('llava-1.5'; 'none' refuses to guess). LLaVA-1.5 checkpoints default to it.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "With --task: override the task's answer length.")
_IMPORT = flags.DEFINE_list("import", [], "Modules to import first: user methods registered with "
                            "vtr_jax.reduce.register become available to --methods.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  columns = dict(kv.split("=", 1) for kv in _COLUMNS.value.split(",") if kv) if _COLUMNS.value else None
  with user_errors("eval.py"):
    try:
      budgets = [float(b) for b in _BUDGETS.value]
      mesh = tuple(int(s) for s in _MESH.value)
    except ValueError as e:
      raise evaluation.EvalError(f"--budgets {_BUDGETS.value} and --mesh {_MESH.value} must be numbers ({e})") from None
    evaluation.main(checkpoint=_CHECKPOINT.value, dataset=_DATASET.value, split=_SPLIT.value, columns=columns,
                    num_examples=_NUM.value, methods=_METHODS.value or None, budgets=budgets,
                    batch_size=_BATCH.value, outdir=os.path.abspath(_OUTDIR.value), mesh_shape=mesh,
                    task=_TASK.value, data=_DATA.value, imports=_IMPORT.value, max_new_tokens=_MAX_NEW.value,
                    chat_template=_TEMPLATE.value)


if __name__ == "__main__":
  app.run(main)
