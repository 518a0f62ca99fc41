"""ComDefend (Jia et al. 2019): a compression reformer in front of a fixed classifier.

Usage:
  reformer = ComDefend(channels=1, width=16, conv=conv_module('auto'))
  rec, code = reformer.apply(variables, x, train=True, rngs={'noise': key})    # training
  rec = reformer.apply(variables, x)                                             # test: binary code
  rec = reformer.apply(variables, x, straight_through=True)   # same values, BPDA gradient

ComCNN compresses the image into a 12-channel code; in training, Gaussian noise (std 20) is
subtracted from the code before a sigmoid, which pushes the code away from 0 so that it survives
binarisation; at test time the code is binarised (round(sigmoid(code)) = [code > 0]) and ResCNN
reconstructs the image from the bits. Loss: MSE(reconstruction, x) + 1e-4 mean(code^2).

The binarisation has no gradient; its BPDA stand-in is the identity (a straight-through
estimator), so a white-box attack differentiates the whole pipeline.

Differences from the authors' `Train_comdefend_Torch.py`, which also subtracts the noise at test
time (a randomised defence that then needs EOT to attack): we binarise the noiseless code at test,
as the ComDefend paper describes, so the defence is deterministic. `width` scales the channel
counts (16 = the published 16-32-64-128-256-128-64-32 stack) so that CPU runs can use narrow nets.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from defendpp_jax.defences import base
from defendpp_jax.nn.conv import Conv
from defendpp_jax.nn.conv import ModuleDef
from defendpp_jax.nn.conv import conv_module
from defendpp_jax.nn.conv import torch_init

# The non-differentiable step and its BPDA stand-in.
STAND_INS = (('binarisation of the code (round)', 'identity (straight-through)'),)
_MULTIPLIERS = (1, 2, 4, 8, 16, 8, 4, 2)  # x width: ComCNN's hidden channels (16 ... 256 ... 32)


def binarize(z: jax.Array, straight_through: bool = False) -> jax.Array:
  """round(z) for z in [0, 1]; with straight_through, the gradient is the identity's (BPDA)."""
  hard = jnp.round(z)
  return base.straight_through(hard, z) if straight_through else hard


def _conv(conv: ModuleDef, features: int, name: str) -> nn.Conv:
  return conv(features, (3, 3), padding='SAME', kernel_init=torch_init, name=name)


class ComCNN(nn.Module):
  """9 ELU conv layers down to `code_channels` (no activation on the last)."""
  width: int = 16
  code_channels: int = 12
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, x):
    for i, m in enumerate(_MULTIPLIERS):
      x = nn.elu(_conv(self.conv, self.width * m, f'conv{i}')(x))
    return _conv(self.conv, self.code_channels, 'code')(x)


class ResCNN(nn.Module):
  """9 ELU conv layers from the code back to an image, sigmoid output in [0, 1]."""
  width: int = 16
  channels: int = 3
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, code):
    h = code
    for i, m in enumerate(_MULTIPLIERS[1:] + (1,)):  # 32 64 128 256 128 64 32 16 (x width / 16)
      h = nn.elu(_conv(self.conv, self.width * m, f'conv{i}')(h))
    return nn.sigmoid(_conv(self.conv, self.channels, 'out')(h))


class ComDefend(nn.Module):
  """The ComDefend reformer: ComCNN -> (noise, sigmoid, binarisation) -> ResCNN.

  `__call__(x, train=True)` returns (reconstruction, code after the sigmoid), for the loss;
  otherwise it returns the reconstruction from the binary code only.
  """
  channels: int = 3
  width: int = 16
  code_channels: int = 12
  noise_std: float = 20.0
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, x, train: bool = False, straight_through: bool = False):
    linear = ComCNN(self.width, self.code_channels, self.conv, name='com')(x)
    dec = ResCNN(self.width, self.channels, self.conv, name='res')
    if train:
      noisy = linear - self.noise_std * jax.random.normal(self.make_rng('noise'), linear.shape,
                                                          linear.dtype)
      code = nn.sigmoid(noisy)
      return dec(code), code
    return dec(binarize(nn.sigmoid(linear), straight_through))


def build_reformer(cd_config: Any, image_shape) -> ComDefend:
  """A `ComDefend` from `config.defense.comdefend` (width, code_channels, noise_std, conv)."""
  return ComDefend(channels=image_shape[-1], width=cd_config.width,
                   code_channels=cd_config.code_channels, noise_std=cd_config.noise_std,
                   conv=conv_module(cd_config.get('conv', 'xla')))


def preprocessor(reformer: ComDefend, params: Any) -> base.Preprocessor:
  """The trained reformer as a deployed pre-processor (binary code; BPDA: straight-through)."""
  def apply(variables, x, key, bpda):
    del key
    return reformer.apply({'params': variables}, x, straight_through=bpda)
  return base.Preprocessor(f'comdefend-w{reformer.width}', apply, params,
                           stand_ins=STAND_INS)


def reformer_loss(reconstruction: jax.Array, code: jax.Array, images: jax.Array,
                  code_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ComDefend's training loss: MSE(reconstruction, x) + code_weight * mean(code^2)."""
  rec = jnp.mean(jnp.square(reconstruction - images))
  code_pen = jnp.mean(jnp.square(code))
  return rec + code_weight * code_pen, {'rec_full': rec, 'code_penalty': code_pen}
