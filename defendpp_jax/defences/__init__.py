"""Defences: the `Defence` interface, its attacker views, and every deployable defence.

  from defendpp_jax import defences
  net = defences.from_flax(module, variables)                 # any Flax classifier
  noisy = defences.preprocess(defences.gaussian_noise(0.1), net)
  defence = defences.registry.build(config, workdir, ds)      # a trained run
"""

from defendpp_jax.defences import registry
from defendpp_jax.defences.base import VIEWS
from defendpp_jax.defences.base import Defence
from defendpp_jax.defences.base import Preprocessor
from defendpp_jax.defences.base import preprocess
from defendpp_jax.defences.base import straight_through
from defendpp_jax.defences.classifier import classifier_defence
from defendpp_jax.defences.randomized import gaussian_noise
from defendpp_jax.defences.wrap import from_flax
from defendpp_jax.defences.wrap import from_logits_fn
