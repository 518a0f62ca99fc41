"""Defend++ on CIFAR-10 with the paper's hyper-parameters (Sec. 4.1): ResNet-18, 3 shared blocks.

  python -m launch.train --config=configs/cifar10.py --workdir=runs/cifar10 \
      --config.data.data_dir=../shared/data/cifar10-jpeg

(`../shared/data/cifar10-jpeg` is CIFAR-10 re-encoded as JPEG, read by the same loader as the
official `cifar-10-batches-py` files; say so next to any number obtained on it.)
`--config=configs/cifar10.py:smoke` shrinks everything to a seconds-long run (tests).
"""

from configs import base


def get_config(arg: str | None = None):
  config = base.get_base_config()
  config.data.name = 'cifar10'
  config.model.shared_blocks = 3
  config.train.num_epochs = 300
  config.train.learning_rate = 0.1        # decayed x0.1 every 100 epochs until 300
  config.train.lr_decay_epochs = (100, 200)
  config.train.lr_schedule_epochs = 0     # >0: rescale the decay epochs to num_epochs
  return base.apply_arg(config, arg)
