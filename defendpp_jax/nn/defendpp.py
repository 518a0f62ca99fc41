"""Defend++ (paper Sec. 3.3): a classifier and an auto-encoder sharing its first encoding blocks.

Usage:
  model = build_model(config.model, num_classes=10, image_shape=(28, 28, 1))
  variables = model.init({'params': key}, images)
  logits, reconstructions = model.apply(variables, images, train=False)
  logits = model.apply(variables, images, method='classify')   # inference: classifier only

`DefendPP` runs the unchanged classifier and, when `decoder != 'none'`, an auto-encoder whose
first `shared_blocks` encoding blocks ARE the classifier's (same parameters, same activations),
followed by AE-owned copies of the remaining blocks and a decoder (paper Sec. 3.3, Figs. 3-4).
With decoder='none' it is the plain classifier (the "no defence" baseline and the adversarially
trained nets).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

from defendpp_jax import frequency
from defendpp_jax.nn import bayes
from defendpp_jax.nn.classifiers import Classifier
from defendpp_jax.nn.classifiers import PADDING_BEFORE_FIELD
from defendpp_jax.nn.classifiers import encoder_blocks
from defendpp_jax.nn.conv import CONV_BEFORE_FIELD
from defendpp_jax.nn.conv import conv_module
from defendpp_jax.nn.decoders import HourglassDecoder
from defendpp_jax.nn.decoders import PyramidDecoder

DECODERS = ('pyramid', 'hourglass', 'hourglass_sc', 'hourglass_sa', 'none')


class DefendPP(nn.Module):
  """Classifier + auto-encoder sharing the first `shared_blocks` encoding blocks.

  `__call__` returns (logits, [I~0, ..., I~{M-1}]) (an empty list for decoder='none');
  `classify` runs the classifier alone, which is all that inference ever uses.
  """
  arch: str = 'resnet18'
  num_classes: int = 10
  image_shape: tuple[int, int, int] = (28, 28, 1)
  width: int = 64
  shared_blocks: int = 4
  decoder: str = 'pyramid'
  num_levels: int = 0  # 0: as many as keep the coarsest level >= 7x7 (paper Sec. 3.4)
  noise_std: float = 0.0
  stem: str = 'auto'
  mean: Sequence[float] = (0.5,)
  std: Sequence[float] = (0.5,)
  conv: str = 'auto'  # nn.conv.CONV_BACKENDS: which kernels run the convolutions
  padding: str = 'torch'  # classifiers.PADDINGS: of the strided convolutions
  residual: str = 'sum'   # classifiers.RESIDUALS ('convex': Parseval networks)
  bayes_prior: float = 0.0  # > 0: Bayes-by-backprop layers with this prior std (Adv-BNN)

  def setup(self):
    h, w, _ = self.image_shape
    conv, dense = conv_module(self.conv), nn.Dense
    if self.bayes_prior > 0:
      conv = bayes.bayes_conv_module(prior_sigma=self.bayes_prior, backend=self.conv)
      dense = functools.partial(bayes.BayesDense, prior_sigma=self.bayes_prior)
    self.blocks = encoder_blocks(self.arch, self.width, min(h, w), self.stem, self.padding, conv,
                                 self.residual)
    if self.decoder not in DECODERS:
      raise ValueError(f'config.model.decoder={self.decoder!r} is not one of {DECODERS}')
    if not 1 <= self.shared_blocks <= len(self.blocks):
      raise ValueError(f'config.model.shared_blocks={self.shared_blocks} must be in '
                       f'[1, {len(self.blocks)}] for {self.arch}')
    self.classifier = Classifier(self.arch, self.num_classes, self.width, min(h, w), self.stem,
                                 tuple(self.mean), tuple(self.std), self.padding, conv,
                                 self.residual, dense)
    if self.decoder == 'none':
      return
    for k in range(self.shared_blocks, len(self.blocks)):
      setattr(self, f'ae_E{k}', self.blocks[k]())  # AE-owned copy of E_k, named ae_E{k}
    sizes = tuple(frequency.level_sizes(h, w, self.levels))
    if self.decoder == 'pyramid':
      self.dec = PyramidDecoder(sizes, self.image_shape[-1], conv)
    else:
      skip = {'hourglass': None, 'hourglass_sc': 'concat', 'hourglass_sa': 'add'}[self.decoder]
      self.dec = HourglassDecoder(sizes, self.image_shape[-1], skip, conv)

  @property
  def levels(self) -> int:
    h, w, _ = self.image_shape
    auto = frequency.max_levels(h, w)
    if self.num_levels < 0 or self.num_levels > auto:
      raise ValueError(f'config.model.num_levels={self.num_levels} must be in [0, {auto}] for '
                       f'{h}x{w} images (0 = auto; no level below 7x7)')
    return self.num_levels or auto

  def __call__(self, x, train: bool = False):
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.image_shape):
      raise ValueError(f'expected images of shape (N, {", ".join(map(str, self.image_shape))}), '
                       f'got {x.shape}')
    logits, features = self.classifier(x, train=train, return_features=True)
    if self.decoder == 'none':
      return logits, []
    # The shared blocks are the classifier's own blocks on the same input: their activations are
    # reused as they are, so the AE and the classifier see one set of weights and one forward.
    ae_features = list(features[:self.shared_blocks])
    h = ae_features[-1][-1][1]
    for k in range(self.shared_blocks, len(self.blocks)):
      h, taps = getattr(self, f'ae_E{k}')(h, train)
      ae_features.append(taps)
    if train and self.noise_std > 0:
      # "ours + GN": Gaussian noise on the AE's bottleneck code during training (as ComDefend).
      h = h + self.noise_std * jax.random.normal(self.make_rng('noise'), h.shape, h.dtype)
    return logits, self.dec(h, ae_features, train)

  def classify(self, x, train: bool = False):
    """The classifier alone; inference (train=False) uses BatchNorm's stored statistics."""
    return self.classifier(x, train=train)


def build_model(model_config: Any, num_classes: int, image_shape: Sequence[int],
                mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                noise_std: float = 0.0, residual: str = 'sum',
                bayes_prior: float = 0.0) -> DefendPP:
  """Builds a `DefendPP` from `config.model` (fields arch, width, shared_blocks, decoder...)."""
  return DefendPP(
      arch=model_config.arch, num_classes=num_classes, image_shape=tuple(image_shape),
      width=model_config.width, shared_blocks=model_config.shared_blocks,
      decoder=model_config.decoder, num_levels=model_config.get('num_levels', 0),
      noise_std=noise_std, stem=model_config.get('stem', 'auto'), mean=tuple(mean), std=tuple(std),
      conv=model_config.get('conv', CONV_BEFORE_FIELD),
      padding=model_config.get('padding', PADDING_BEFORE_FIELD), residual=residual,
      bayes_prior=bayes_prior)


def classify_apply(model: DefendPP) -> Callable[[Any, jax.Array], jax.Array]:
  """A pure `(variables, images) -> logits` of the inference-mode classifier."""
  return functools.partial(model.apply, method='classify')
