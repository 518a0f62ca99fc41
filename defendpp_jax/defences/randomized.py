"""Randomised pre-processors: additive Gaussian noise, random resize & pad (Xie et al. 2018).

Usage:
  noisy = preprocess(gaussian_noise(std=0.1), classifier)   # randomised: attack it with EOT
  rp = averaged(preprocess(resize_pad(331 / 299), classifier), passes=1)

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


def canvas_size(image_size: int, max_scale: float) -> int:
  """The padded size of random resize & pad: round(max_scale x the image size) (Xie et al.:
  299 -> 331, max_scale = 331 / 299)."""
  return int(round(max_scale * image_size))


def resize_pad_images(x: jax.Array, key: jax.Array, max_scale: float) -> jax.Array:
  """Each image resized (nearest neighbour) to a random size r in [s, S), then placed at a
  random offset of an S x S zero canvas (S = canvas_size(s, max_scale)); per example."""
  n, h, w, _ = x.shape
  if h != w:
    raise ValueError(f'resize_pad expects square images, got {h}x{w}')
  size = canvas_size(h, max_scale)
  k_size, k_top, k_left = jax.random.split(key, 3)
  r = jax.random.randint(k_size, (n,), h, size)            # in [s, S)
  top = jax.random.randint(k_top, (n,), 0, size - r + 1)   # in [0, S - r]
  left = jax.random.randint(k_left, (n,), 0, size - r + 1)
  grid = jnp.arange(size)

  def source(offset):  # (N, S): source index of each canvas row / column, and whether inside
    rel = grid[None, :] - offset[:, None]
    inside = (rel >= 0) & (rel < r[:, None])
    return jnp.clip((rel * h) // r[:, None], 0, h - 1), inside

  rows, in_rows = source(top)
  cols, in_cols = source(left)
  out = x[jnp.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  inside = (in_rows[:, :, None] & in_cols[:, None, :])[..., None]
  return jnp.where(inside, out, 0.0)


def resize_pad(max_scale: float = 331 / 299) -> base.Preprocessor:
  """Random resize & pad (Xie et al. 2018), a fresh draw per call; differentiable: EOT."""
  if not 1.0 < max_scale <= 2.0:
    raise ValueError(f'config.defense.resize_pad.max_scale must be in (1, 2], got {max_scale}')

  def apply(variables, x, key, bpda):
    del variables, bpda
    if key is None:
      raise ValueError('resize_pad is randomised: its logits need a key')
    return resize_pad_images(x, key, max_scale)

  return base.Preprocessor(f'resize_pad(max_scale={max_scale:.3g})', apply, randomised=True)
