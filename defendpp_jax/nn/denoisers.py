"""The denoisers of HGD (Liao et al., CVPR 2018): DUNET and its lateral-free baseline DAE.

Usage:
  den = build_denoiser('dunet', channels=1, widths=(64, 128, 256, 256, 256), conv='auto')
  variables = den.init(jax.random.key(0), x)                    # x: NHWC pixels in [0, 1]
  clean = den.apply(variables, x)                                # inference: D(x), x's shape
  clean, state = den.apply(variables, x, train=True, mutable=['batch_stats'])   # training

  up = resize_bilinear_align_corners(h, 7, 7)   # PyTorch's bilinear, align_corners=True

HGD's denoising U-net ("DUNET", Fig. 3 of the paper; `Denoise` in the authors'
`Exps/sample/inception.py`) predicts minus the adversarial noise and adds it to its input:
D(x) = x + final(feedback), with

  C   = 3x3 conv (no bias) + BatchNorm + ReLU,     Ck = k consecutive C
  feedforward  fwd0 .. fwd4: widths w1 .. w5 (default 64 128 256 256 256), C2 C3 C3 C3 C3; the
               first conv of fwd1 .. fwd4 has stride 2 (28 -> 14 -> 7 -> 4 -> 2, 32 -> ... -> 2);
  feedback     back3 .. back0 (coarse to fine; back_i works at fwd_i's resolution): upsample
               the feedback map (first: fwd4's output) bilinearly to the exact size of the
               lateral map fwd_i, concatenate [upsampled, lateral] on channels, then a Ck:
               back3 w4 / C3, back2 w3 / C3, back1 w2 / C3, back0 w1 / C2 (default 256 256
               128 64);
  final        1x1 conv (no bias) from back0's w1 channels to the image channels.

DAE (the paper's Table 2 baseline) is the same encoder-decoder without the lateral
connections: each feedback block upsamples the feedback map to the size the lateral map has and
runs its Ck on it alone (no concatenation); the output is still x + final(feedback).

Pixels in [0, 1] come in and D(x) goes out unclipped: the classifier behind the denoiser
receives D(x) as is, as in the authors' code (which does not clip either). The convolutions run
the injected project convolution (`conv`, `nn.conv.conv_module`), BatchNorm is
`classifiers.bn` (momentum 0.9 = PyTorch's 0.1, eps 1e-5, running statistics in
`batch_stats`), and the kernels start from PyTorch's default initialisation (`torch_init`), as
the authors' denoiser did (their Inception's truncated-normal re-initialisation runs before the
denoiser is attached, so it leaves the denoiser's weights at PyTorch's default).

Differences from the reference:
  - the authors' upsampling targets are precomputed ceil-halved sizes of a 299x299 input; here
    each feedback map is resized to the lateral map's actual size, which is the same thing for
    the 3x3 stride-2 / padding-1 convolutions used here (n -> ceil(n / 2));
  - PyTorch 0.2's `nn.Upsample(mode='bilinear')` aligned corners; `jax.image.resize` does not
    (half-pixel centres), so the upsampling is `resize_bilinear_align_corners`, PyTorch's
    align_corners=True formula as two interpolation matrices;
  - `widths` scales the channel counts (the backward widths are forward widths 1-4) so that CPU
    runs can use narrow nets; `zero_init_last` (off by default, as the reference) zeroes the
    final 1x1 kernel so that D(x) = x exactly at initialisation.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from defendpp_jax.nn.classifiers import bn
from defendpp_jax.nn.conv import CONV_BACKENDS
from defendpp_jax.nn.conv import Conv
from defendpp_jax.nn.conv import ModuleDef
from defendpp_jax.nn.conv import conv_module
from defendpp_jax.nn.conv import make_conv
from defendpp_jax.nn.conv import torch_init

ARCHS = ('dunet', 'dae')
DEFAULT_WIDTHS = (64, 128, 256, 256, 256)
# Number of C layers per block: the feedforward blocks fwd0 .. fwd4, the feedback blocks
# back0 .. back3 (listed fine to coarse; back3 runs first, on fwd4's output).
FWD_CONVS = (2, 3, 3, 3, 3)
BACK_CONVS = (2, 3, 3, 3)


def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of PyTorch's 1-D linear interpolation with align_corners=True:
  output i reads the input at i (n_in - 1) / (n_out - 1) (0 when n_out == 1)."""
  m = np.zeros((n_out, n_in), np.float64)
  if n_in == 1:
    m[:, 0] = 1.0
    return m
  scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  src = np.arange(n_out, dtype=np.float64) * scale
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 2)
  frac = src - lo
  rows = np.arange(n_out)
  m[rows, lo] += 1.0 - frac
  m[rows, lo + 1] += frac
  return m


def resize_bilinear_align_corners(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of NHWC `x` to (height, width), PyTorch's align_corners=True.

  The corner pixels map onto each other exactly; the interpolation is separable, so it is two
  constant matrices applied by einsum (differentiable, jit-able with `height` / `width` static
  ints, any float dtype). Down-sizing uses the same formula (two-tap interpolation, no
  anti-aliasing), as PyTorch does.
  """
  if x.ndim != 4:
    raise ValueError(f'resize_bilinear_align_corners wants an NHWC array, got shape {x.shape}')
  h, w = x.shape[1:3]
  if (h, w) == (height, width):
    return x
  mh = jnp.asarray(_interpolation_matrix(h, height), x.dtype)
  mw = jnp.asarray(_interpolation_matrix(w, width), x.dtype)
  hi = jax.lax.Precision.HIGHEST
  y = jnp.einsum('oh,nhwc->nowc', mh, x, precision=hi)
  return jnp.einsum('pw,nowc->nopc', mw, y, precision=hi)


def check_widths(widths) -> tuple[int, ...]:
  """`widths` as a tuple of 5 positive ints (a clear error naming the config field if not)."""
  try:
    ws = tuple(widths)
  except TypeError:
    ws = None
  if (ws is None or len(ws) != 5
      or any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1 for w in ws)):
    raise ValueError(f'config.defense.hgd.widths must be 5 positive ints (the feedforward '
                     f'widths, e.g. {DEFAULT_WIDTHS}), got {widths!r}')
  return tuple(int(w) for w in ws)


class ConvBlock(nn.Module):
  """Ck: `num_convs` x (3x3 conv without bias, BatchNorm, ReLU); the first conv has `strides`."""
  features: int
  num_convs: int
  strides: int = 1
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, x, train: bool):
    for j in range(self.num_convs):
      x = make_conv(self.conv, self.features, 3, self.strides if j == 0 else 1,
                    name=f'conv{j}')(x)
      x = nn.relu(bn(train, name=f'bn{j}')(x))
    return x


class HGDDenoiser(nn.Module):
  """The HGD encoder-decoder; `DUNET` (with lateral connections) and `DAE` (without) fix
  `lateral`. __call__(x, train) returns D(x) = x + final(feedback), unclipped, x's shape.

  Sub-modules: fwd0 .. fwd4, back0 .. back3 (`ConvBlock`s; back_i works at fwd_i's resolution)
  and `final` (the 1x1 convolution).
  """
  channels: int                       # image channels (1 MNIST, 3 CIFAR-10)
  widths: Sequence[int] = DEFAULT_WIDTHS
  conv: ModuleDef = Conv
  zero_init_last: bool = False        # final 1x1 kernel = 0: D(x) = x exactly at init
  lateral: ClassVar[bool] = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    widths = check_widths(self.widths)
    if x.ndim != 4 or x.shape[-1] != self.channels:
      raise ValueError(f'{type(self).__name__} wants NHWC images with {self.channels} '
                       f'channel(s), got shape {x.shape}')
    h = x
    laterals = []
    for i, (w, k) in enumerate(zip(widths, FWD_CONVS)):
      h = ConvBlock(w, k, 1 if i == 0 else 2, self.conv, name=f'fwd{i}')(h, train)
      laterals.append(h)
    for i in reversed(range(len(BACK_CONVS))):
      lat = laterals[i]
      h = resize_bilinear_align_corners(h, lat.shape[1], lat.shape[2])
      if self.lateral:
        h = jnp.concatenate([h, lat], axis=-1)
      h = ConvBlock(widths[i], BACK_CONVS[i], 1, self.conv, name=f'back{i}')(h, train)
    init = nn.initializers.zeros_init() if self.zero_init_last else torch_init
    residual = self.conv(self.channels, (1, 1), padding='VALID', use_bias=False,
                         kernel_init=init, name='final')(h)
    return x + residual


class DUNET(HGDDenoiser):
  """HGD's denoising U-net: feedback blocks read [upsampled feedback, lateral feature map]."""
  lateral: ClassVar[bool] = True


class DAE(HGDDenoiser):
  """The denoising autoencoder baseline: DUNET without the lateral connections."""
  lateral: ClassVar[bool] = False


def build_denoiser(arch: str, channels: int, widths=DEFAULT_WIDTHS, conv: str = 'auto',
                   zero_init_last: bool = False) -> HGDDenoiser:
  """A `DUNET` ('dunet') or `DAE` ('dae') for `channels`-channel images; `conv` is the
  convolution backend (`nn.conv.CONV_BACKENDS`)."""
  if arch not in ARCHS:
    raise ValueError(f'config.defense.hgd.arch={arch!r} is not one of {ARCHS}')
  widths = check_widths(widths)
  if conv not in CONV_BACKENDS:
    raise ValueError(f'config.defense.hgd.conv={conv!r} is not one of {CONV_BACKENDS}')
  cls = DUNET if arch == 'dunet' else DAE
  return cls(channels=channels, widths=widths, conv=conv_module(conv),
             zero_init_last=zero_init_last)
