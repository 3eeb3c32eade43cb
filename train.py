r"""Train a vtr_jax VLM.

  python train.py --config=configs/shapes_tiny.py --workdir=$HOME/runs/shapes_tiny
  python train.py --config=configs/shapes_tiny.py:test --workdir=/tmp/shapes_test
  python train.py --config=configs/shapes_tiny.py:test --config.mesh.shape="(2,2,2)" --workdir=/tmp/mesh_test

Re-running with the same --workdir resumes from the last checkpoint (on any
mesh shape). Several processes (hosts): run the same command in each with
--coordinator=HOST:PORT --num_processes=N --process_id=I (or the VTR_*
variables, or VTR_DISTRIBUTED=1 where JAX finds the cluster itself: Cloud
TPU, SLURM); see docs/multihost.md.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from vtr_jax import sharding, training
from vtr_jax.errors import user_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/<name>.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the exported model.")
_STOP_AT = flags.DEFINE_integer("stop_at", None, "End (and export) at this global step; the schedule stays that "
                                "of config.train.steps, so this is a snapshot of the full run.")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False, "Resume even though the optimiser or schedule "
                                  "differs from the run that wrote the checkpoints (the model must not).")
_FALLBACK = flags.DEFINE_bool("fallback_checkpoint", False, "When the latest checkpoint cannot be read, delete it "
                              "and resume from the previous kept step.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  with user_errors("train.py", training.TrainingError):
    training.train(_CONFIG.value, _WORKDIR.value, stop_at=_STOP_AT.value, allow_config_change=_ALLOW_CHANGE.value,
                   fallback_checkpoint=_FALLBACK.value)


if __name__ == "__main__":
  app.run(main)
