"""Trains a Defend++ model (or a baseline) and writes WORKDIR/train_summary.json.

  python -m launch.train --config=configs/mnist.py --workdir=runs/mnist \
      [--config.model.width=16 --config.train.num_epochs=1 ...]

Restarting the same command resumes from the latest checkpoint in WORKDIR.
"""

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

from defendpp_jax import training

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and summaries.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
