"""The Defend++ decoders (paper Sec. 3.3, Figs. 3-4): the Laplacian pyramid and the hourglasses.

Usage:
  dec = PyramidDecoder(level_sizes=((28, 28), (14, 14)), channels=1, conv=conv_module('auto'))
  reconstructions = dec(bottleneck, encoder_features, train)   # [I~0, ..., I~{M-1}]

Both read the encoder's taps (`classifiers.Features`) at the resolutions they need. Their 3x3
convolutions followed by BatchNorm run the injected project convolution (`conv`); the image
outputs and skip projections are flax's own `nn.Conv` / `nn.ConvTranspose`, as the models
recorded in docs/REPRODUCTION.md were trained with.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from defendpp_jax.nn.classifiers import Features
from defendpp_jax.nn.classifiers import bn
from defendpp_jax.nn.conv import Conv
from defendpp_jax.nn.conv import ModuleDef
from defendpp_jax.nn.conv import make_conv
from defendpp_jax.nn.conv import torch_init



def _match_size(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Crops (e.g. 8x8 -> 7x7 after a stride-2 deconv of 4x4) or resizes to `size`."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  if h >= size[0] and w >= size[1]:
    return x[:, :size[0], :size[1], :]
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method='nearest')


class UpBlock(nn.Module):
  """A naive decoding block: a mirrored encoding block whose last conv is a stride-2 deconv."""
  features: int
  out_features: int
  final: bool = False  # final: the deconv outputs an image (no BN / ReLU after it)
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, x, size: tuple[int, int], train: bool):
    x = nn.relu(bn(train)(make_conv(self.conv, self.features, 3)(x)))
    x = nn.ConvTranspose(self.out_features, (3, 3), strides=(2, 2), padding='SAME',
                         use_bias=self.final, kernel_init=torch_init)(x)
    x = _match_size(x, size)
    return x if self.final else nn.relu(bn(train)(x))


class HighFreqBlock(nn.Module):
  """H: a 2-layer 3x3 residual block with a 1x1 skip conv, from encoder features to an image."""
  features: int
  out_features: int
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.relu(bn(train)(make_conv(self.conv, self.features, 3)(x)))
    y = nn.Conv(self.out_features, (3, 3), padding='SAME', kernel_init=torch_init,
                name='conv_out')(y)
    skip = nn.Conv(self.out_features, (1, 1), kernel_init=torch_init, name='skip')(x)
    return y + skip


def _tap_for(features: list[Features], size: tuple[int, int]) -> jax.Array:
  """The deepest encoder feature with spatial size `size` (else the closest larger one, resized)."""
  flat = [t for block in features for _, t in block]
  exact = [t for t in flat if tuple(t.shape[1:3]) == tuple(size)]
  if exact:
    return exact[-1]
  larger = [t for t in flat if t.shape[1] >= size[0] and t.shape[2] >= size[1]]
  src = larger[-1] if larger else flat[0]
  return jax.image.resize(src, (src.shape[0], *size, src.shape[-1]), method='linear')


def _bottleneck_path(bottleneck: jax.Array, features: list[Features],
                     size: tuple[int, int]) -> list[tuple[tuple[int, int], int]]:
  """(size, channels) of each stride-2 step from the bottleneck up to `size` (mirrors E_{M-1})."""
  h = bottleneck.shape[1]
  steps = max(0, math.ceil(math.log2(size[0] / h))) if h < size[0] else 0
  path = []
  for j in range(steps, 0, -1):
    s = (-(-size[0] // 2**(j - 1)), -(-size[1] // 2**(j - 1)))
    if j == 1:
      s = tuple(size)
    path.append((s, _tap_for(features, s).shape[-1]))
  return path


class PyramidDecoder(nn.Module):
  """The Laplacian-pyramid decoder of Fig. 4: I~m = U(I~m+1) + H(E_m).

  H reads, for level m, the deepest encoder feature at level m's resolution: for a CIFAR-style
  ResNet that is the output of E_m itself (E_0 keeps the full resolution, E_m halves it m times).
  We tap the block's output rather than its input so that the high-frequency band the decoder
  must predict at level m is carried by E_m's own weights, and by the very tensor the classifier
  consumes next: the reconstruction objective then shapes the representation that is classified.
  For VGG the deepest feature at a level's resolution is the block's pre-pooling activation.
  """
  level_sizes: Sequence[tuple[int, int]]
  channels: int
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, bottleneck, features: list[Features], train: bool):
    num_levels = len(self.level_sizes)
    coarsest = tuple(self.level_sizes[-1])
    # D_{M-1}: a stack of decoding blocks bringing the bottleneck up to the coarsest level; the
    # last deconvolution outputs the image (3 or 1 channels) only once the feature map has
    # reached that size (paper: upsample to ~7x7 before reducing the channels).
    h = bottleneck
    path = _bottleneck_path(bottleneck, features, coarsest)
    for j, (size, ch) in enumerate(path):
      final = j == len(path) - 1
      h = UpBlock(h.shape[-1], self.channels if final else ch, final=final, conv=self.conv,
                  name=f'D{num_levels - 1}_up{j}')(h, size, train)
    if not path:
      h = nn.Conv(self.channels, (3, 3), padding='SAME', kernel_init=torch_init,
                  name=f'D{num_levels - 1}_out')(
          _match_size(h, coarsest))
    outputs = [h]
    for m in range(num_levels - 2, -1, -1):
      size = tuple(self.level_sizes[m])
      tap = _tap_for(features, size)
      up = UpBlock(tap.shape[-1], self.channels, final=True, conv=self.conv,
                   name=f'U{m}')(outputs[0], size, train)
      high = HighFreqBlock(tap.shape[-1], self.channels, conv=self.conv, name=f'H{m}')(tap, train)
      outputs.insert(0, up + high)
    return outputs


class HourglassDecoder(nn.Module):
  """The hourglass decoder of Fig. 3 (mirrored encoder) with an image output at every level.

  skip: None (plain hourglass), 'concat' (U-Net style, "Hourglass+SC") or 'add' ("Hourglass+SA"):
  the decoder features at level m are combined with the encoder features at the same resolution.
  """
  level_sizes: Sequence[tuple[int, int]]
  channels: int
  skip: str | None = None
  conv: ModuleDef = Conv

  def _combine(self, h, features, size, name, train):
    if self.skip is None:
      return h
    tap = _tap_for(features, size)
    if self.skip == 'add':
      if tap.shape[-1] != h.shape[-1]:
        tap = nn.Conv(h.shape[-1], (1, 1), kernel_init=torch_init, name=f'{name}_skip_proj')(tap)
      return h + tap
    h = jnp.concatenate([h, tap], axis=-1)
    return nn.relu(bn(train, name=f'{name}_skip_bn')(
        make_conv(self.conv, tap.shape[-1], 3, name=f'{name}_skip_conv')(h)))

  @nn.compact
  def __call__(self, bottleneck, features: list[Features], train: bool):
    num_levels = len(self.level_sizes)
    coarsest = tuple(self.level_sizes[-1])
    h = bottleneck
    for j, (size, ch) in enumerate(_bottleneck_path(bottleneck, features, coarsest)):
      h = UpBlock(h.shape[-1], ch, conv=self.conv, name=f'D{num_levels - 1}_up{j}')(
          h, size, train)
    h = _match_size(h, coarsest)
    outputs = []
    for m in range(num_levels - 1, -1, -1):
      size = tuple(self.level_sizes[m])
      if m < num_levels - 1:
        ch = _tap_for(features, size).shape[-1]
        h = UpBlock(h.shape[-1], ch, conv=self.conv, name=f'D{m}')(h, size, train)
      h = self._combine(h, features, size, f'D{m}', train)
      outputs.insert(0, nn.Conv(self.channels, (3, 3), padding='SAME', kernel_init=torch_init,
                                name=f'out{m}')(h))
    return outputs


# ---------------------------------------------------------------------------------------------
