"""Defences: the `Defence` interface, its attacker views, and every deployable defence.

  from defendpp_jax import defences
  net = defences.from_flax(module, variables)                 # any Flax classifier
  noisy = defences.preprocess(defences.gaussian_noise(0.1), net)
  jpeg = defences.preprocess(defences.jpeg.jpeg(quality=75), net)   # BPDA: a JAX JPEG
  tv = defences.preprocess(defences.tv_min.tv_min(keep_prob=0.5), net)
  sap = defences.sap(module, variables, 'my-net', method=None)
  defence = defences.registry.build(config, workdir, ds)      # a trained run (e.g. HGD)
  both = defences.ensemble([defence, other])                  # averaged logits

Every name of config.defense.name: docs/DEFENCES.md. (The modules jpeg, quilting and tv_min
are named as their defences: `defences.jpeg.jpeg`, `defences.quilting.quilting`, ...)
"""

from defendpp_jax.defences import registry
from defendpp_jax.defences.base import VIEWS
from defendpp_jax.defences.base import Defence
from defendpp_jax.defences.base import Preprocessor
from defendpp_jax.defences.base import averaged
from defendpp_jax.defences.base import ensemble
from defendpp_jax.defences.base import preprocess
from defendpp_jax.defences.base import straight_through
from defendpp_jax.defences.classifier import classifier_defence
from defendpp_jax.defences import hgd
from defendpp_jax.defences import jpeg
from defendpp_jax.defences import quilting
from defendpp_jax.defences import tv_min
from defendpp_jax.defences.noisy_layers import rse
from defendpp_jax.defences.noisy_layers import sap
from defendpp_jax.defences.randomized import gaussian_noise
from defendpp_jax.defences.randomized import resize_pad
from defendpp_jax.defences.squeezing import bit_depth
from defendpp_jax.defences.squeezing import median
from defendpp_jax.defences.squeezing import squeezing_detector
from defendpp_jax.defences.wrap import from_flax
from defendpp_jax.defences.wrap import from_logits_fn
