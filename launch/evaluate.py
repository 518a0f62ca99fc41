"""Attacks the latest checkpoint of WORKDIR; writes robustness.json, robustness.md and figures.

  python -m launch.evaluate --config=configs/mnist.py --workdir=runs/mnist \
      [--config.eval.num_examples=1000 --config.eval.attacks="('fgsm','pgd')"]

Several evaluations of one run side by side (threat models, budgets): --out_dir=DIR writes the
report there instead of WORKDIR, e.g. an HGD run's oblivious and white-box reports:
  python -m launch.evaluate --config=configs/mnist.py --workdir=runs/hgd \
      --config.defense.name=hgd --config.defense.classifier_workdir=runs/mnist_plain \
      --config.eval.threat_model=oblivious --out_dir=runs/hgd/oblivious

Transfer (adversarials crafted on another trained run, evaluated on this one):
  python -m launch.evaluate --config=configs/mnist.py --workdir=runs/mnist \
      --config.eval.source_workdir=runs/mnist_plain
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from defendpp_jax import evaluation
from defendpp_jax.runs import config as config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run directory (with checkpoints).')
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where the report goes (default: --workdir).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  evaluation.evaluate(_CONFIG.value, _WORKDIR.value, out_dir=_OUT_DIR.value)


if __name__ == '__main__':
  sys.argv = config_lib.migrate_argv(sys.argv)  # flags of fields that moved keep working
  app.run(main)
