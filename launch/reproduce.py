"""Reproduces one of the paper's tables: trains (or reuses) its models, evaluates every row.

  python -m launch.reproduce --table=2 --workdir=runs/repro --budget=cpu \
      --mnist_dir=../shared/data/mnist --cifar10_dir=../shared/data/cifar10-jpeg

Tables 1, 2, 3, 5, 6, 7, 8 and `fig6`. `--budget=cpu` is the reduced budget documented in
defendpp_jax/reproduce.py (CPU_BUDGET) and docs/REPRODUCTION.md; `--budget=paper` the paper's
(the configs' epochs and widths, the whole test set). `--strong` evaluates the same models with
PGD-100 x 5 restarts, APGD-CE and APGD-DLR at the paper's eps, C&W and DDN. Models are shared
between tables (same WORKDIR): Table 1 reuses Table 2's "ours". Results go to
RESULTS_DIR/table<N>[_strong].json and .md.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from defendpp_jax import reproduce

_TABLE = flags.DEFINE_enum('table', None, list(reproduce.TABLES), 'Which table.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Root directory of the models and evaluations.')
_BUDGET = flags.DEFINE_enum('budget', 'cpu', list(reproduce.BUDGETS), 'Training budget.')
_STRONG = flags.DEFINE_bool('strong', False, 'Strong evaluation (PGD restarts, APGD).')
_RESULTS = flags.DEFINE_string('results_dir', 'results', 'Where table<N>.json / .md go.')
_MNIST = flags.DEFINE_string('mnist_dir', '', 'MNIST raw files ("" = tfds).')
_CIFAR = flags.DEFINE_string('cifar10_dir', '', 'CIFAR-10 python batches ("" = tfds).')
_SEED = flags.DEFINE_integer('seed', 0, 'Training seed of every model.')
flags.mark_flags_as_required(['table', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    reproduce.run_table(_TABLE.value, _WORKDIR.value, _BUDGET.value,
                        {'mnist': _MNIST.value, 'cifar10': _CIFAR.value}, strong=_STRONG.value,
                        results_dir=_RESULTS.value, seed=_SEED.value)
  except reproduce.Preempted as e:
    print(f'stopped: {e}', flush=True)
    sys.exit(143)  # the conventional status of a process ended by SIGTERM


if __name__ == '__main__':
  app.run(main)
