"""Multi-scale low-pass targets for the Defend++ decoder (paper Sec. 3.3).

Usage:
  targets = lowpass_pyramid(images, num_levels=3)   # [I^0 (= images), I^1, I^2]

Level m keeps the top-left (H / 2^m) x (W / 2^m) block of the orthonormal 2-D DCT of each channel
and inverts it at that size (`kind='dct'`, the paper's MS-LP targets), or downsamples bilinearly
(`kind='linear'`, the "MS-LI" ablation).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

TARGET_KINDS = ('dct', 'linear')


def level_sizes(height: int, width: int, num_levels: int) -> list[tuple[int, int]]:
  """Spatial size (H_m, W_m) = (H // 2^m, W // 2^m) of each pyramid level."""
  return [(height // 2**m, width // 2**m) for m in range(num_levels)]


def max_levels(height: int, width: int, min_size: int = 7) -> int:
  """Number of levels whose smaller side stays >= `min_size` (paper: no loss below 7x7)."""
  m = 1
  while min(height, width) // 2**m >= min_size:
    m += 1
  return m


def _dct_lowpass(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  h, w = images.shape[1:3]
  kh, kw = size
  coeffs = jax.scipy.fft.dctn(images, type=2, axes=(1, 2), norm='ortho')
  low = jax.scipy.fft.idctn(coeffs[:, :kh, :kw, :], type=2, axes=(1, 2), norm='ortho')
  # An orthonormal DCT of size N puts sum(x) / sqrt(N) in its DC term per axis; inverting only the
  # top-left K coefficients with a size-K orthonormal IDCT therefore scales a constant image by
  # sqrt(N / K) per axis, i.e. by sqrt(H W / (kh kw)) = N / K overall for a 2^m reduction on both
  # axes. Undo that, so that every I^m stays on the [0, 1] intensity scale of the input image and
  # the decoder's outputs at all scales live in the same range.
  return low * jnp.sqrt((kh * kw) / (h * w)).astype(images.dtype)


def _linear_downsample(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  # Plain bilinear interpolation at the new pixel centres; for a 2^m reduction this averages
  # each 2^m x 2^m block's central pixels (a 2x2 box for m = 1), with no extra blur.
  n, _, _, c = images.shape
  return jax.image.resize(images, (n, *size, c), method='linear', antialias=False)


@functools.partial(jax.jit, static_argnames=('num_levels', 'kind'))
def lowpass_pyramid(images: jax.Array, num_levels: int,
                    kind: Literal['dct', 'linear'] = 'dct') -> list[jax.Array]:
  """Returns [I^0, ..., I^{M-1}] for an NHWC batch; I^0 is `images` itself.

  Args:
    images: float array (N, H, W, C), pixels in [0, 1].
    num_levels: M >= 1, the number of scales.
    kind: 'dct' (low-pass DCT, the paper) or 'linear' (bilinear downsampling, "MS-LI").

  Returns:
    A list of M arrays, level m of shape (N, H // 2^m, W // 2^m, C).
  """
  if images.ndim != 4:
    raise ValueError(f'lowpass_pyramid expects NHWC images, got shape {images.shape}')
  if kind not in TARGET_KINDS:
    raise ValueError(f'kind={kind!r} is not one of {TARGET_KINDS}')
  if num_levels < 1:
    raise ValueError(f'num_levels must be >= 1, got {num_levels}')
  h, w = images.shape[1:3]
  sizes = level_sizes(h, w, num_levels)
  if min(sizes[-1]) < 1:
    raise ValueError(f'{num_levels} levels are too many for {h}x{w} images')
  down = _dct_lowpass if kind == 'dct' else _linear_downsample
  return [images] + [down(images, s) for s in sizes[1:]]
