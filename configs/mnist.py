"""Defend++ on MNIST with the paper's hyper-parameters (Sec. 4.1): ResNet-18, 4 shared blocks.

  python -m launch.train --config=configs/mnist.py --workdir=runs/mnist \
      --config.data.data_dir=../shared/data/mnist

A short CPU run (one epoch, width 16; measured: 98.76% clean test accuracy at seed 0,
98.52-98.82% over seeds 0-4, the plain net 98.56-98.79%; see docs/REPRODUCTION.md "Other
measurements"):

  python -m launch.train --config=configs/mnist.py --workdir=runs/mnist_w16 \
      --config.data.data_dir=../shared/data/mnist --config.model.width=16 \
      --config.train.num_epochs=1

The plain baseline: --config.model.decoder=none. `--config=configs/mnist.py:smoke` shrinks
everything to a seconds-long run (tests).
"""

from defendpp_jax.runs import config as presets


def get_config(arg: str | None = None):
  return presets.apply_arg(presets.dataset_config('mnist'), arg)
