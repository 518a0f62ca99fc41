"""Defend++ on CIFAR-10 with the paper's hyper-parameters (Sec. 4.1): ResNet-18, 3 shared blocks.

  python -m launch.train --config=configs/cifar10.py --workdir=runs/cifar10 \
      --config.data.data_dir=../shared/data/cifar10-jpeg

(`../shared/data/cifar10-jpeg` is CIFAR-10 re-encoded as JPEG, read by the same loader as the
official `cifar-10-batches-py` files; say so next to any number obtained on it.)
`--config=configs/cifar10.py:smoke` shrinks everything to a seconds-long run (tests).
"""

from defendpp_jax.runs import config as presets


def get_config(arg: str | None = None):
  return presets.apply_arg(presets.dataset_config('cifar10'), arg)
