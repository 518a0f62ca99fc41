"""Quickstart: Defend++ on the 1,797 scikit-learn digits (28x28), narrow ResNet-18, CPU minutes.

Needs no download. `make run` trains this config and its plain baseline (decoder=none):

  python -m launch.train --config=configs/quickstart.py --workdir=runs/quickstart/defendpp
  python -m launch.train --config=configs/quickstart.py --workdir=runs/quickstart/plain \
      --config.model.decoder=none

`--config=configs/quickstart.py:smoke` shrinks it further for tests.
"""

from configs import base


def get_config(arg: str | None = None):
  config = base.get_base_config()
  config.data.name = 'digits'
  config.model.width = 8
  config.model.shared_blocks = 4
  config.train.num_epochs = 15
  config.train.batch_size = 64
  config.train.learning_rate = 0.05
  config.train.lr_decay_epochs = (10,)
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 200
  if arg == 'smoke':
    base.apply_smoke(config)
  elif arg:
    raise ValueError(f'unknown config argument {arg!r} (expected "smoke")')
  return config
