"""Quickstart: Defend++ on the 1,797 scikit-learn digits (28x28), narrow ResNet-18, CPU minutes.

Needs no download. `make run` trains this config and its plain baseline (decoder=none):

  python -m launch.train --config=configs/quickstart.py --workdir=runs/quickstart/defendpp
  python -m launch.train --config=configs/quickstart.py --workdir=runs/quickstart/plain \
      --config.model.decoder=none

`--config=configs/quickstart.py:smoke` shrinks it further for tests.
"""

from defendpp_jax.runs import config as presets


def get_config(arg: str | None = None):
  return presets.apply_arg(presets.dataset_config('digits'), arg)
