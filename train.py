r"""Train a vtr_jax VLM.

  python train.py --config=configs/shapes_tiny.py --workdir=$HOME/runs/shapes_tiny
  python train.py --config=configs/shapes_tiny.py:test --workdir=/tmp/shapes_test

Re-running with the same --workdir resumes from the last checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from vtr_jax import training

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/<name>.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the exported model.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
  training.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
