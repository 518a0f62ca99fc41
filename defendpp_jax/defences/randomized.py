"""Randomised pre-processors: additive Gaussian noise at test time.

Usage:
  noisy = preprocess(gaussian_noise(std=0.1), classifier)   # randomised: attack it with EOT

The simplest randomised defence: every call draws fresh noise, so one forward pass (and one
gradient) is one sample of a random function. Attacking it without EOT under-estimates the
attack; `config.eval.view='auto'` averages gradients over `config.eval.eot_samples` draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from defendpp_jax.defences import base


def gaussian_noise(std: float) -> base.Preprocessor:
  """x + N(0, std^2), clipped to [0, 1]; a fresh draw per call (per example and pixel)."""
  if not std >= 0:
    raise ValueError(f'config.defense.gaussian_noise.std must be >= 0, got {std}')

  def apply(variables, x, key, bpda):
    del variables, bpda
    if key is None:
      raise ValueError('gaussian_noise is randomised: its logits need a key')
    return jnp.clip(x + std * jax.random.normal(key, x.shape, x.dtype), 0.0, 1.0)

  return base.Preprocessor(f'gaussian_noise(std={std:g})', apply, None, randomised=True)
