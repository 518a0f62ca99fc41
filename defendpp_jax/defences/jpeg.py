"""JPEG compression as an input transformation (Guo et al. 2018), and a differentiable JPEG.

Usage:
  pre = jpeg(quality=75)                        # forward: Pillow's codec; BPDA: jpeg_jax
  defended = preprocess(pre, classifier)        # config.eval.view='auto' -> 'bpda'
  y = pillow_jpeg(x, quality=75)                # the real codec, jit- and vmap-able
  y = jpeg_jax(x, quality=75)                   # the same pixels in JAX, with a gradient
  y = jpeg_jax(x, quality=75, rounding='smooth')  # Shin & Song's cubic rounding
  stats = agreement(images, quality=75)         # how close jpeg_jax is to Pillow

The deployed defence runs Pillow (libjpeg) through `jax.pure_callback`: x in [0, 1] is rounded
to 8 bits, encoded at `quality` with Pillow's defaults (4:2:0 chroma subsampling for RGB, one
grey component for C=1), decoded and divided by 255. Its output takes 256 grey levels, so its
true derivative is zero almost everywhere; the exact view sees that zero gradient. Athalye et
al. (2018) break the defence with BPDA: the forward pass stays the real codec and the backward
pass differentiates a stand-in, here `jpeg_jax` (default) or the identity.

`jpeg_jax` (defences/jpeg_codec.py) follows libjpeg step by step: with rounding='ste' its pixels
are libjpeg's, and its gradient is that of the real-valued codec.
"""

from __future__ import annotations

import functools
import io
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from defendpp_jax.defences import base
from defendpp_jax.defences.jpeg_codec import CHROMINANCE_TABLE
from defendpp_jax.defences.jpeg_codec import LUMINANCE_TABLE
from defendpp_jax.defences.jpeg_codec import ROUNDINGS
from defendpp_jax.defences.jpeg_codec import check_image
from defendpp_jax.defences.jpeg_codec import check_quality
from defendpp_jax.defences.jpeg_codec import jpeg_jax
from defendpp_jax.defences.jpeg_codec import quality_scaling
from defendpp_jax.defences.jpeg_codec import quantisation_tables

STAND_INS = ('differentiable', 'identity')
__all__ = ['CHROMINANCE_TABLE', 'LUMINANCE_TABLE', 'ROUNDINGS', 'STAND_INS', 'agreement',
           'check_quality', 'jpeg', 'jpeg_jax', 'pillow_jpeg', 'quality_scaling',
           'quantisation_tables']

# ------------------------------------------------------------------------------------------
# The real codec.


def _pillow_numpy(x: np.ndarray, quality: int) -> np.ndarray:
  """Pillow JPEG round trip of (..., H, W, C) float pixels in [0, 1] (C in {1, 3})."""
  x = np.asarray(x, np.float32)
  flat = x.reshape((-1,) + x.shape[-3:])
  out = np.empty(flat.shape, np.float32)
  for i, image in enumerate(flat):
    pixels = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
        buffer, format='JPEG', quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    out[i] = decoded.reshape(image.shape).astype(np.float32) / 255.0
  return out.reshape(x.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _pillow(x: jax.Array, quality: int) -> jax.Array:
  shape = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  return jax.pure_callback(functools.partial(_pillow_numpy, quality=quality), shape, x,
                           vmap_method='expand_dims')


@_pillow.defjvp
def _pillow_jvp(quality, primals, tangents):
  del tangents  # the codec's output is quantised to grey levels: derivative zero a.e.
  y = _pillow(primals[0], quality)
  return y, jnp.zeros_like(y)


def pillow_jpeg(x: jax.Array, quality: int = 75) -> jax.Array:
  """Pillow's JPEG encode + decode of x (..., H, W, C) in [0, 1]; jit- and vmap-able.

  Pixels are round(x * 255) as uint8; the output is the decoded uint8 image / 255. The
  derivative is zero (the output is piecewise constant in x).
  """
  quality = check_quality(quality)
  x = jnp.asarray(x, jnp.float32)
  check_image(x)
  return _pillow(x, quality)


# ------------------------------------------------------------------------------------------
# The defence.


def jpeg(quality: int = 75, stand_in: str = 'differentiable') -> base.Preprocessor:
  """JPEG at `quality` in front of a classifier: Pillow forward; BPDA stand-in `stand_in`
  ('differentiable': jpeg_jax with straight-through rounding; 'identity')."""
  quality = check_quality(quality)
  if stand_in not in STAND_INS:
    raise ValueError(f'config.defense.jpeg.stand_in must be one of {STAND_INS}, '
                     f'got {stand_in!r}')
  soft: Callable[[jax.Array], jax.Array]
  if stand_in == 'differentiable':
    soft = functools.partial(jpeg_jax, quality=quality, rounding='ste')
    described = 'differentiable JPEG (JAX, straight-through rounding)'
  else:
    soft = lambda x: x  # noqa: E731
    described = 'identity'

  def apply(variables, x, key, bpda):
    del variables, key
    hard = pillow_jpeg(x, quality)
    if not bpda:
      return hard
    return base.straight_through(hard, soft(jnp.asarray(x, jnp.float32)))

  return base.Preprocessor(f'jpeg(q={quality})', apply, None, randomised=False,
                           stand_ins=((f'jpeg(quality={quality})', described),))


def agreement(images: Any, quality: int, rounding: str = 'ste') -> dict[str, Any]:
  """How close jpeg_jax is to Pillow on `images` ((N, H, W, C), uint8 or float in [0, 1]).

  Returns {'quality', 'rounding', 'within_1' (fraction of pixel values differing by <= 1 grey
  level), 'exact' (fraction equal), 'max_diff' (grey levels)}.
  """
  images = np.asarray(images)
  if np.issubdtype(images.dtype, np.integer):
    images = images.astype(np.float32) / 255.0
  images = jnp.asarray(images, jnp.float32)
  ours = jpeg_jax(images, quality, rounding)
  ref = pillow_jpeg(images, quality)
  diff = np.abs(np.rint(np.asarray(ours) * 255.0) - np.rint(np.asarray(ref) * 255.0))
  return {'quality': int(quality), 'rounding': rounding,
          'within_1': float(np.mean(diff <= 1)), 'exact': float(np.mean(diff == 0)),
          'max_diff': int(diff.max())}
