"""A differentiable JPEG in JAX that equals libjpeg(-turbo)'s pixels (Pillow's defaults).

Usage:
  y = jpeg_jax(x, quality=75)                   # the same pixels as Pillow, with a gradient
  y = jpeg_jax(x, quality=75, rounding='smooth')  # Shin & Song's cubic rounding
  luma, chroma = quantisation_tables(75)
`jpeg_jax` follows libjpeg(-turbo) step by step with the default settings of Pillow: fixed-point
RGB -> YCbCr (JFIF, full range), 2x2 chroma averaging with libjpeg's alternating rounding bias,
edge replication to whole blocks (and MCUs), the integer 'islow' forward DCT, quantisation with
the IJG tables scaled as `jpeg_quality_scaling`, the integer 'islow' inverse DCT, the decoder's
"fancy" (triangular, 3/4-1/4) chroma upsampling and its fixed-point YCbCr -> RGB. Each integer
step has an exact forward value (so with rounding='ste' the pixels are libjpeg's) and the
derivative of its real-valued counterpart: the orthonormal DCT (times libjpeg's scale), division
by the quantiser step, the linear colour maps and filters; every rounding passes the gradient
straight through. Clipping to [0, 255] keeps its true derivative (zero outside the range).
So for grey images the straight-through Jacobian is the identity wherever no sample is clipped
(the DCT, the division by 8 q and the multiplication by q cancel); for RGB it passes the
luminance and low-passes the chrominance (2x2 averaging, then triangular upsampling).
rounding='smooth' replaces the quantiser's rounding by round(v) + (v - round(v))^3 (Shin & Song
2017), whose own derivative 3 (v - round(v))^2 is used; its values then differ from libjpeg's
(and the inverse DCT is the orthonormal one in floating point).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


ROUNDINGS = ('ste', 'smooth')

# The IJG's standard quantisation tables (JPEG standard, Annex K), natural (row-major) order.
LUMINANCE_TABLE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99]], np.int32)
CHROMINANCE_TABLE = np.array([
    [17, 18, 24, 47, 99, 99, 99, 99],
    [18, 21, 26, 66, 99, 99, 99, 99],
    [24, 26, 56, 99, 99, 99, 99, 99],
    [47, 66, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99]], np.int32)

# libjpeg's fixed-point colour conversion: constants x 2^16 (jccolor.c, jdcolor.c).
_ONE_HALF = 1 << 15
_SCALE = float(1 << 16)
_RGB_TO_Y = (19595, 38470, 7471)        # 0.299, 0.587, 0.114
_RGB_TO_CB = (-11059, -21709, 32768)    # -0.16874, -0.33126, 0.5
_RGB_TO_CR = (32768, -27439, -5329)     # 0.5, -0.41869, -0.08131
_CR_TO_R, _CB_TO_B = 91881, 116130      # 1.402, 1.772
_CB_TO_G, _CR_TO_G = -22554, -46802     # -0.34414, -0.71414

# The 'islow' integer DCT (jfdctint.c, jidctint.c): 13-bit constants, 2 extra bits after pass 1.
_CONST_BITS, _PASS1_BITS = 13, 2
_F0298, _F0390, _F0541, _F0765 = 2446, 3196, 4433, 6270
_F0899, _F1175, _F1501, _F1847 = 7373, 9633, 12299, 15137
_F1961, _F2053, _F2562, _F3072 = 16069, 16819, 20995, 25172


def _dct_matrix() -> np.ndarray:
  """The 8x8 orthonormal type-II DCT: coefficients = D @ block @ D.T."""
  k = np.arange(8)[:, None]
  n = np.arange(8)[None, :]
  d = np.cos((2 * n + 1) * k * np.pi / 16) * np.sqrt(2 / 8)
  d[0] /= np.sqrt(2)
  return d.astype(np.float32)


_DCT = _dct_matrix()


def check_image(x: jax.Array) -> None:
  if x.ndim < 3 or x.shape[-1] not in (1, 3):
    raise ValueError(f'JPEG takes (..., H, W, C) images with C in {{1, 3}}, got {x.shape}')


def check_quality(quality: Any) -> int:
  """`quality` as an int in [1, 100], or a ValueError naming config.defense.jpeg.quality."""
  if (not isinstance(quality, (int, np.integer)) or isinstance(quality, bool)
      or not 1 <= quality <= 100):
    raise ValueError(f'config.defense.jpeg.quality must be an integer in [1, 100], '
                     f'got {quality!r}')
  return int(quality)


def quality_scaling(quality: int) -> int:
  """libjpeg's `jpeg_quality_scaling`: the percentage the base tables are scaled by."""
  quality = check_quality(quality)
  return 5000 // quality if quality < 50 else 200 - 2 * quality


def quantisation_tables(quality: int) -> tuple[np.ndarray, np.ndarray]:
  """(luminance, chrominance) 8x8 int tables at `quality`, as libjpeg's `jpeg_set_quality`
  with force_baseline (Pillow): (base * scale + 50) // 100 clipped to [1, 255]."""
  scale = quality_scaling(quality)
  return tuple(np.clip((t * scale + 50) // 100, 1, 255).astype(np.int32)
               for t in (LUMINANCE_TABLE, CHROMINANCE_TABLE))


# ------------------------------------------------------------------------------------------
# Integer steps with an exact forward value and the derivative of their real counterpart.


@jax.custom_jvp
def _round_ste(v: jax.Array) -> jax.Array:
  return jnp.round(v)


_round_ste.defjvps(lambda t, ans, v: t)


@jax.custom_jvp
def _floor_ste(v: jax.Array) -> jax.Array:
  return jnp.floor(v)


_floor_ste.defjvps(lambda t, ans, v: t)


def _quantise_int(c: jax.Array, divisor: jax.Array) -> jax.Array:
  """libjpeg's quantiser: |c| / divisor rounded half up, with c's sign (integers)."""
  c = jnp.round(c).astype(jnp.int32)
  d = divisor.astype(jnp.int32)
  q = (jnp.abs(c) + d // 2) // d
  return jnp.where(c < 0, -q, q).astype(jnp.float32)


@jax.custom_jvp
def _quantise_ste(c: jax.Array, divisor: jax.Array) -> jax.Array:
  return _quantise_int(c, divisor)


@_quantise_ste.defjvp
def _quantise_ste_jvp(primals, tangents):
  c, divisor = primals
  return _quantise_ste(c, divisor), tangents[0] / divisor


def _quantise_smooth(c: jax.Array, divisor: jax.Array) -> jax.Array:
  """Shin & Song's round(v) + (v - round(v))^3 of v = c / divisor (a non-zero derivative)."""
  v = c / divisor
  r = jax.lax.stop_gradient(_quantise_int(c, divisor))
  return r + (v - r) ** 3


def _descale(x: jax.Array, n: int) -> jax.Array:
  return (x + (1 << (n - 1))) >> n


def _odd_part(a: jax.Array, b: jax.Array, c: jax.Array,
              d: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The odd half of libjpeg's LL&M butterfly, shared by the forward and the inverse DCT."""
  z1, z2, z3, z4 = a + d, b + c, a + c, b + d
  z5 = (z3 + z4) * _F1175
  z1, z2 = z1 * -_F0899, z2 * -_F2562
  z3, z4 = z3 * -_F1961 + z5, z4 * -_F0390 + z5
  return (a * _F0298 + z1 + z3, b * _F2053 + z2 + z4, c * _F3072 + z2 + z3,
          d * _F1501 + z1 + z4)


def _fdct_pass(x: jax.Array, axis: int, first: bool) -> jax.Array:
  """One 1-D pass of jpeg_fdct_islow along `axis` (int32)."""
  d = [jnp.take(x, i, axis=axis) for i in range(8)]
  tmp0, tmp7 = d[0] + d[7], d[0] - d[7]
  tmp1, tmp6 = d[1] + d[6], d[1] - d[6]
  tmp2, tmp5 = d[2] + d[5], d[2] - d[5]
  tmp3, tmp4 = d[3] + d[4], d[3] - d[4]
  tmp10, tmp13, tmp11, tmp12 = tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2
  shift = _CONST_BITS - _PASS1_BITS if first else _CONST_BITS + _PASS1_BITS
  out = [None] * 8
  if first:
    out[0], out[4] = (tmp10 + tmp11) << _PASS1_BITS, (tmp10 - tmp11) << _PASS1_BITS
  else:
    out[0], out[4] = _descale(tmp10 + tmp11, _PASS1_BITS), _descale(tmp10 - tmp11, _PASS1_BITS)
  z1 = (tmp12 + tmp13) * _F0541
  out[2] = _descale(z1 + tmp13 * _F0765, shift)
  out[6] = _descale(z1 - tmp12 * _F1847, shift)
  o7, o5, o3, o1 = _odd_part(tmp4, tmp5, tmp6, tmp7)
  out[7], out[5], out[3], out[1] = (_descale(o, shift) for o in (o7, o5, o3, o1))
  return jnp.stack(out, axis=axis)


def _idct_pass(x: jax.Array, axis: int, first: bool) -> jax.Array:
  """One 1-D pass of jpeg_idct_islow along `axis` (int32; the second adds the 128 offset)."""
  w = [jnp.take(x, i, axis=axis) for i in range(8)]
  z1 = (w[2] + w[6]) * _F0541
  tmp2, tmp3 = z1 - w[6] * _F1847, z1 + w[2] * _F0765
  tmp0, tmp1 = (w[0] + w[4]) << _CONST_BITS, (w[0] - w[4]) << _CONST_BITS
  tmp10, tmp13, tmp11, tmp12 = tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2
  o0, o1, o2, o3 = _odd_part(w[7], w[5], w[3], w[1])
  shift = _CONST_BITS - _PASS1_BITS if first else _CONST_BITS + _PASS1_BITS + 3
  out = [tmp10 + o3, tmp11 + o2, tmp12 + o1, tmp13 + o0,
         tmp13 - o0, tmp12 - o1, tmp11 - o2, tmp10 - o3]
  out = [_descale(o, shift) + (0 if first else 128) for o in out]
  return jnp.stack(out, axis=axis)


def _dct2(blocks: jax.Array) -> jax.Array:
  """The orthonormal 2-D DCT of (..., 8, 8) blocks."""
  d = jnp.asarray(_DCT)
  return jnp.einsum('ij,...jk,lk->...il', d, blocks, d, precision=jax.lax.Precision.HIGHEST)


def _idct2(coefs: jax.Array) -> jax.Array:
  """The orthonormal 2-D inverse DCT of (..., 8, 8) coefficients."""
  d = jnp.asarray(_DCT)
  return jnp.einsum('ji,...jk,kl->...il', d, coefs, d, precision=jax.lax.Precision.HIGHEST)


@jax.custom_jvp
def _fdct_islow(samples: jax.Array) -> jax.Array:
  """libjpeg's integer forward DCT of level-shifted (..., 8, 8) blocks: 8 x the orthonormal."""
  x = jnp.round(samples).astype(jnp.int32)
  x = _fdct_pass(x, axis=-1, first=True)   # rows
  x = _fdct_pass(x, axis=-2, first=False)  # columns
  return x.astype(jnp.float32)


_fdct_islow.defjvps(lambda t, ans, samples: 8.0 * _dct2(t))


@jax.custom_jvp
def _idct_islow(coefs: jax.Array) -> jax.Array:
  """libjpeg's integer inverse DCT of dequantised (..., 8, 8) blocks, + 128 (not clipped)."""
  x = jnp.round(coefs).astype(jnp.int32)
  x = _idct_pass(x, axis=-2, first=True)   # columns
  x = _idct_pass(x, axis=-1, first=False)  # rows
  return x.astype(jnp.float32)


_idct_islow.defjvps(lambda t, ans, coefs: _idct2(t))


# ------------------------------------------------------------------------------------------
# The differentiable codec.


def _pad_to(x: jax.Array, height: int, width: int) -> jax.Array:
  """(..., h, w) edge-replicated at the bottom and the right to (..., height, width)."""
  pads = [(0, 0)] * (x.ndim - 2) + [(0, height - x.shape[-2]), (0, width - x.shape[-1])]
  return jnp.pad(x, pads, mode='edge')


def _ceil(n: int, m: int) -> int:
  return -(-n // m) * m


def _clip_ste(x: jax.Array) -> jax.Array:
  """x clipped to [0, 1] with the identity's gradient."""
  return x + jax.lax.stop_gradient(jnp.clip(x, 0.0, 1.0) - x)


def _clip_255(v: jax.Array) -> jax.Array:
  """v clipped to [0, 255]; gradient 1 on the closed interval (a sample exactly at 0 or 255
  still moves the output one way), 0 outside."""
  return jnp.where((v >= 0.0) & (v <= 255.0), v, jnp.clip(v, 0.0, 255.0))


def _code_plane(plane: jax.Array, table: jax.Array, rounding: str) -> jax.Array:
  """(..., 8h, 8w) samples in [0, 255] -> DCT, quantise, dequantise, inverse DCT -> samples."""
  *lead, height, width = plane.shape
  blocks = plane.reshape(*lead, height // 8, 8, width // 8, 8)
  blocks = jnp.swapaxes(blocks, -3, -2)  # (..., rows of blocks, columns, 8, 8)
  coefs = _fdct_islow(blocks - 128.0)
  step = jnp.asarray(table, jnp.float32)
  if rounding == 'ste':
    levels = _quantise_ste(coefs, 8.0 * step)
    samples = _idct_islow(levels * step)
  else:
    levels = _quantise_smooth(coefs, 8.0 * step)
    samples = _floor_ste(_idct2(levels * step) + 128.5)
  samples = _clip_255(samples)
  return jnp.swapaxes(samples, -3, -2).reshape(*lead, height, width)


def _downsample(plane: jax.Array) -> jax.Array:
  """libjpeg's h2v2 downsampling: 2x2 sums + 1, 2, 1, 2, ... along a row, // 4."""
  *lead, height, width = plane.shape
  sums = plane.reshape(*lead, height // 2, 2, width // 2, 2).sum(axis=(-3, -1))
  bias = jnp.asarray(1.0 + np.arange(width // 2) % 2, jnp.float32)
  return _floor_ste((sums + bias) / 4.0)


def _upsample(plane: jax.Array) -> jax.Array:
  """libjpeg's decoder default for 2x2 chroma: 'fancy' triangular upsampling (3/4, 1/4 in
  each direction, edges replicated), or plain replication for planes 2 or fewer wide."""
  if plane.shape[-1] <= 2:
    return jnp.repeat(jnp.repeat(plane, 2, axis=-2), 2, axis=-1)
  padded = jnp.pad(plane, [(0, 0)] * (plane.ndim - 2) + [(1, 1), (0, 0)], mode='edge')
  above, below = padded[..., :-2, :], padded[..., 2:, :]
  rows = jnp.stack([3.0 * plane + above, 3.0 * plane + below], axis=-2)  # nearer rows x 3
  rows = rows.reshape(*plane.shape[:-2], 2 * plane.shape[-2], plane.shape[-1])
  padded = jnp.pad(rows, [(0, 0)] * (rows.ndim - 1) + [(1, 1)], mode='edge')
  left, right = padded[..., :-2], padded[..., 2:]
  even = _floor_ste((3.0 * rows + left + 8.0) / 16.0)
  odd = _floor_ste((3.0 * rows + right + 7.0) / 16.0)
  return jnp.stack([even, odd], axis=-1).reshape(*rows.shape[:-1], 2 * rows.shape[-1])


def _fixed_point(weights: tuple[int, ...], channels: tuple[jax.Array, ...],
                 offset: int) -> jax.Array:
  """floor((sum_i w_i c_i + offset) / 2^16), exact in float32 for 8-bit channels."""
  total = float(offset)
  for w, c in zip(weights, channels):
    total = total + float(w) * c
  return _floor_ste(total / _SCALE)


def jpeg_jax(x: jax.Array, quality: int = 75, rounding: str = 'ste') -> jax.Array:
  """A differentiable JPEG round trip of x (..., H, W, C) in [0, 1], C in {1, 3}.

  rounding='ste': libjpeg's integer arithmetic in the forward pass (Pillow's output), each
  rounding's gradient straight through. rounding='smooth': the quantiser rounds with
  round(v) + (v - round(v))^3 (its own gradient); other roundings as 'ste'.
  """
  quality = check_quality(quality)
  if rounding not in ROUNDINGS:
    raise ValueError(f'rounding must be one of {ROUNDINGS}, got {rounding!r}')
  x = jnp.asarray(x, jnp.float32)
  check_image(x)
  tables = (jnp.asarray(t, jnp.float32) for t in quantisation_tables(quality))
  return _codec(x, *tables, rounding=rounding)


@functools.partial(jax.jit, static_argnames='rounding')
def _codec(x: jax.Array, luma_table: jax.Array, chroma_table: jax.Array,
           rounding: str) -> jax.Array:
  """jpeg_jax with the quantisation tables as arguments (one compilation for all qualities)."""
  height, width, channels = x.shape[-3:]
  # Clipping to [0, 1] passes the gradient straight through (the input is already in range).
  pixels = _round_ste(_clip_ste(x) * 255.0)
  if channels == 1:
    plane = _pad_to(pixels[..., 0], _ceil(height, 8), _ceil(width, 8))
    plane = _code_plane(plane, luma_table, rounding)
    return plane[..., :height, :width, None] / 255.0
  r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
  y = _fixed_point(_RGB_TO_Y, (r, g, b), _ONE_HALF)
  cb = _fixed_point(_RGB_TO_CB, (r, g, b), (128 << 16) + _ONE_HALF - 1)
  cr = _fixed_point(_RGB_TO_CR, (r, g, b), (128 << 16) + _ONE_HALF - 1)
  # Luminance: edge-replicated to whole blocks. Chrominance (jcsample.c, jcprepct.c): the
  # columns replicated to twice the downsampled blocks' width, the rows to an even count;
  # averaged 2x2; the downsampled rows then replicated to whole blocks.
  y = _code_plane(_pad_to(y, _ceil(height, 8), _ceil(width, 8)), luma_table, rounding)
  small_h, small_w = -(-height // 2), -(-width // 2)
  chroma = jnp.stack([cb, cr], axis=-3)
  chroma = _pad_to(chroma, 2 * small_h, 2 * _ceil(small_w, 8))
  chroma = _pad_to(_downsample(chroma), _ceil(small_h, 8), _ceil(small_w, 8))
  chroma = _code_plane(chroma, chroma_table, rounding)
  chroma = _upsample(chroma[..., :small_h, :small_w])[..., :height, :width]
  y = y[..., :height, :width]
  cb, cr = chroma[..., 0, :, :] - 128.0, chroma[..., 1, :, :] - 128.0
  red = y + _fixed_point((_CR_TO_R,), (cr,), _ONE_HALF)
  green = y + _fixed_point((_CB_TO_G, _CR_TO_G), (cb, cr), _ONE_HALF)
  blue = y + _fixed_point((_CB_TO_B,), (cb,), _ONE_HALF)
  rgb = _clip_255(jnp.stack([red, green, blue], axis=-1))
  return rgb / 255.0
