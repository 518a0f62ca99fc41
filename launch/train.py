"""Trains a Defend++ model (or a baseline) and writes WORKDIR/train_summary.json.

  python -m launch.train --config=configs/mnist.py --workdir=runs/mnist \
      [--config.model.width=16 --config.train.num_epochs=1 ...]

Restarting the same command resumes from the latest checkpoint in WORKDIR (also after a SIGTERM,
which saves a checkpoint and exits cleanly, or a SIGKILL, which loses the steps since the last one).

Several hosts (a TPU pod slice, a multi-node GPU job): run the same command on every host with
--distributed (or with JAX_COORDINATOR_ADDRESS / a SLURM or Open MPI environment set), which calls
jax.distributed.initialize() before anything else; every host then reads its shard of each batch.
"""

import os
import sys

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

from defendpp_jax import training
from defendpp_jax.runs import config as config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and summaries.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (multi-host). Implied when '
    'JAX_COORDINATOR_ADDRESS is set.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  if _DISTRIBUTED.value or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  sys.argv = config_lib.migrate_argv(sys.argv)  # flags of fields that moved keep working
  app.run(main)
