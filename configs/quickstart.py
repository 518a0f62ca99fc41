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
  config.train.lr_schedule_epochs = 0
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 200
  # Shorter attacks than the paper's (100 steps; C&W 5 x 20 kept) so that `make run` stays a few
  # minutes on 2 CPU cores; every reported number states the steps it used.
  config.eval.num_examples = 360      # the whole digits test split
  config.eval.bim_steps = 20
  config.eval.pgd_steps = 20
  config.eval.apgd_steps = 20
  config.eval.cw_binary_steps = 5
  config.eval.cw_steps = 20
  config.eval.ddn_steps = 50
  config.eval.eps_grid = (0.05, 0.1, 0.2, 0.3, 0.5)
  config.eval.sweep_pgd_steps = 10
  config.eval.sweep_examples = 200
  return base.apply_arg(config, arg)
