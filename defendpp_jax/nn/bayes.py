"""Bayes-by-backprop layers of Adv-BNN (Liu et al. 2019): Gaussian weights, KL to a Gaussian prior.

Usage (the layers drop into the classifiers as their injected `conv`):

  cls = Classifier('resnet18', num_classes=10, width=16, image_size=28,
                   conv=bayes_conv_module(prior_sigma=0.1))     # project kernels, backend 'auto'
  variables = cls.init({'params': k_init, 'noise': k_noise}, images)
  logits, mutated = cls.apply(variables, x_adv, train=True, rngs={'noise': k},
                              mutable=['batch_stats', 'losses'])
  loss = cross_entropy(logits, labels) + alpha / num_train * collected_kl(mutated)
  # test time: average the softmax over 50 weight samples (one 'noise' key each)
  probs = jax.vmap(lambda k: jax.nn.softmax(cls.apply(variables, x, rngs={'noise': k})))(
      jax.random.split(key, 50)).mean(0)

Each weight entry has a posterior N(mu, sigma^2) with parameters `*_mu` and `*_log_sigma`
(log sigma). Every call draws eps ~ N(0, 1) from the flax rng stream 'noise', once for the whole
batch (as Bayes-by-backprop: one weight sample per forward pass, not one per example), and uses
w = mu + exp(log_sigma) * eps. The layer records KL(q || p) to the prior p = N(0, prior_sigma^2),
in closed form and summed over its entries, as `losses/.../kl`; `collected_kl` sums them.

Defaults of the reference code (github xuanqing94/BayesianDefense, `models/layers/conv2d.py`
`RandConv2d`, `models/layers/linear.py` `RandLinear`, README "Run our method"):
  - prior N(0, sigma_0^2) with sigma_0 = 0.1 (`prior_sigma`);
  - log sigma initialised to the constant log(init_s), init_s = 0.1 (`init_sigma`);
  - mu initialised U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. `torch_init` (the default here);
  - eps drawn afresh on every forward pass, one draw per weight entry for the whole batch;
  - KL per entry log(sigma_0) - log(sigma) + (sigma^2 + mu^2) / (2 sigma_0^2) - 1/2, summed;
  - loss = CE + beta * KL with beta = alpha / N (N = training-set size; README alpha 0.02);
  - prediction = argmax of the softmax summed over 50 forward passes (`acc_under_attack.sh`).
The reference's bias mu is initialised U(-1/sqrt(fan_in), ...); here `bias_init` defaults to zeros,
as the library's plain `nn.Dense` head. Facts about the reference beyond these layers: its
`RandBatchNorm2d` makes the BatchNorm scale / offset Gaussian too (not provided here); its
`models/vgg_vi.py` returns only the head's KL from `forward` (it sums `kl_sum` but returns `kl`),
while `models/aaron_vi.py` returns the sum over all layers, as `collected_kl` does.

The KL of a layer depends on its parameters only, so the layer stores it by overwriting (not
appending to) its 'kl' entry: a layer called twice in one pass, or variables from `init` that
still hold a 'losses' collection, count each layer's KL once.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from defendpp_jax.nn import conv as conv_lib
from defendpp_jax.nn.conv import torch_init

Initializer = Callable[..., jax.Array]

# Reference defaults (xuanqing94/BayesianDefense README, "Run our method").
PRIOR_SIGMA = 0.1   # sigma_0: the prior N(0, sigma_0^2) of every weight
INIT_SIGMA = 0.1    # init_s: every posterior standard deviation at initialisation
NOISE_RNG = 'noise'  # the flax rng stream the weight samples are drawn from
LOSSES = 'losses'    # the collection the layers' KL terms are sown into


def gaussian_kl_sum(mu: jax.Array, log_sigma: jax.Array, prior_sigma: float) -> jax.Array:
  """sum_i KL(N(mu_i, exp(log_sigma_i)^2) || N(0, prior_sigma^2)), in closed form: per entry
  log(prior_sigma / sigma) + (sigma^2 + mu^2) / (2 prior_sigma^2) - 1/2, as the reference's
  RandLinear / RandConv2d (xuanqing94/BayesianDefense, which parametrise log sigma). Its loss
  scales it: batch-mean cross-entropy + KL / (number of training examples)."""
  var_ratio = (jnp.exp(2.0 * log_sigma) + jnp.square(mu)) / (2.0 * prior_sigma**2)
  return jnp.sum(math.log(prior_sigma) - log_sigma + var_ratio - 0.5)


def _keep_last(_, value):
  """`sow` reduction that keeps only the newest value (a layer's KL, recorded once)."""
  return value


def collected_kl(mutated_vars: Any) -> jax.Array:
  """The sum of every 'kl' entry of the 'losses' collection of `mutated_vars` (the variables
  returned by `apply(..., mutable=[..., 'losses'])`); 0 when there is none."""
  losses = mutated_vars.get(LOSSES, {}) if hasattr(mutated_vars, 'get') else {}
  total = jnp.zeros((), jnp.float32)
  if not losses:
    return total
  for path, value in traverse_util.flatten_dict(dict(losses)).items():
    if path[-1] == 'kl':
      for leaf in jax.tree_util.tree_leaves(value):
        total = total + jnp.sum(leaf)
  return total


def _sample(key: jax.Array, mu: jax.Array, log_sigma: jax.Array) -> jax.Array:
  """One reparameterised draw mu + sigma * eps, eps ~ N(0, 1) of the shape of mu."""
  eps = jax.random.normal(key, mu.shape, mu.dtype)
  return mu + jnp.exp(log_sigma) * eps


def _tuple(value: int | Sequence[int] | None, rank: int, name: str) -> tuple[int, ...]:
  if value is None:
    return (1,) * rank
  if isinstance(value, int):
    return (value,) * rank
  value = tuple(int(v) for v in value)
  if len(value) != rank:
    raise ValueError(f'{name}={value} has {len(value)} entries for a rank-{rank} convolution')
  return value


def _lax_padding(padding: Any, rank: int) -> str | tuple[tuple[int, int], ...]:
  """`padding` as lax takes it: 'SAME' / 'VALID', or one (low, high) pair per spatial axis."""
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      raise ValueError(f'BayesConv padding {padding!r} is not supported (SAME, VALID or pairs)')
    return padding.upper()
  if isinstance(padding, int):
    return ((padding, padding),) * rank
  pads = tuple((p, p) if isinstance(p, int) else tuple(int(q) for q in p) for p in padding)
  if len(pads) != rank or any(len(p) != 2 for p in pads):
    raise ValueError(f'padding {padding!r} needs one int or (low, high) pair per spatial axis')
  return pads


class _Gaussian(nn.Module):
  """Shared parameter creation of the Bayesian layers (no call of its own)."""

  def _gaussian(self, prefix: str, init: Initializer, shape: tuple[int, ...]):
    """(mu, log_sigma) parameters `{prefix}_mu`, `{prefix}_log_sigma` of shape `shape`."""
    mu = self.param(f'{prefix}_mu', init, shape, self.param_dtype)
    log_sigma = self.param(f'{prefix}_log_sigma', nn.initializers.constant(
        math.log(self.init_sigma)), shape, self.param_dtype)
    return mu, log_sigma

  def _draw(self, kernel_shape: tuple[int, ...]) -> list[jax.Array]:
    """One sample of the kernel (and, with `use_bias`, of the bias); sows their KL."""
    named = [self._gaussian('kernel', self.kernel_init, kernel_shape)]
    if self.use_bias:
      named.append(self._gaussian('bias', self.bias_init, (self.features,)))
    return self._weights(named)

  def _weights(self, named: Sequence[tuple[jax.Array, jax.Array]]) -> list[jax.Array]:
    """One sample of each (mu, log_sigma) pair; sows their summed KL."""
    keys = jax.random.split(self.make_rng(NOISE_RNG), len(named))
    kl = sum(gaussian_kl_sum(mu, ls, self.prior_sigma) for mu, ls in named)
    self.sow(LOSSES, 'kl', kl, reduce_fn=_keep_last)
    return [_sample(k, mu, ls) for k, (mu, ls) in zip(keys, named)]


class BayesConv(_Gaussian):
  """A convolution with a Gaussian kernel (and bias): a drop-in for `nn.Conv` in the classifiers.

  Parameters `kernel_mu` (`kernel_init`), `kernel_log_sigma` (log `init_sigma`), and with
  `use_bias` `bias_mu` (`bias_init`), `bias_log_sigma`. Inputs are channels-last, kernels
  (*kernel_size, in / groups, features), as `nn.Conv`. `conv_general_dilated` (signature of
  `lax.conv_general_dilated`; None = lax's) runs the convolution, e.g. the project's kernels.
  """
  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] | None = 1
  padding: Any = 'SAME'
  kernel_dilation: int | Sequence[int] | None = 1
  feature_group_count: int = 1
  use_bias: bool = True
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = torch_init
  bias_init: Initializer = nn.initializers.zeros_init()
  prior_sigma: float = PRIOR_SIGMA
  init_sigma: float = INIT_SIGMA
  conv_general_dilated: Callable[..., jax.Array] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if isinstance(self.kernel_size, int):
      raise TypeError('BayesConv kernel_size must be a sequence of ints, as nn.Conv')
    rank = len(self.kernel_size)
    if x.ndim < rank + 1:
      raise ValueError(f'input of shape {x.shape} for a rank-{rank} convolution')
    in_features = x.shape[-1]
    if in_features % self.feature_group_count:
      raise ValueError(f'{in_features} input features, not divisible into '
                       f'{self.feature_group_count} groups')
    sampled = self._draw(
        (*self.kernel_size, in_features // self.feature_group_count, self.features))

    batch_shape = x.shape[:-(rank + 1)]
    y = x.reshape((-1, *x.shape[-(rank + 1):]))  # one batch axis (none or several -> one)
    dtype = jnp.result_type(y, sampled[0])
    spatial = tuple(range(1, rank + 1))
    dn = jax.lax.ConvDimensionNumbers(lhs_spec=(0, rank + 1, *spatial),
                                      rhs_spec=(rank + 1, rank, *range(rank)),
                                      out_spec=(0, rank + 1, *spatial))
    conv = self.conv_general_dilated or jax.lax.conv_general_dilated
    y = conv(y.astype(dtype), sampled[0].astype(dtype), _tuple(self.strides, rank, 'strides'),
             _lax_padding(self.padding, rank), lhs_dilation=None,
             rhs_dilation=_tuple(self.kernel_dilation, rank, 'kernel_dilation'),
             dimension_numbers=dn, feature_group_count=self.feature_group_count)
    if self.use_bias:
      y = y + sampled[1].astype(dtype)
    return y.reshape((*batch_shape, *y.shape[1:]))


class BayesDense(_Gaussian):
  """A dense layer with a Gaussian kernel (in, features) and bias: a drop-in for `nn.Dense`.

  Parameters `kernel_mu` (`kernel_init`), `kernel_log_sigma` (log `init_sigma`), and with
  `use_bias` `bias_mu` (`bias_init`), `bias_log_sigma`.
  """
  features: int
  use_bias: bool = True
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = torch_init
  bias_init: Initializer = nn.initializers.zeros_init()
  prior_sigma: float = PRIOR_SIGMA
  init_sigma: float = INIT_SIGMA

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    sampled = self._draw((x.shape[-1], self.features))
    dtype = jnp.result_type(x, sampled[0])
    y = jax.lax.dot_general(x.astype(dtype), sampled[0].astype(dtype),
                            (((x.ndim - 1,), (0,)), ((), ())))
    if self.use_bias:
      y = y + sampled[1].astype(dtype)
    return y


@functools.cache
def bayes_conv_module(conv_general_dilated: Callable[..., jax.Array] | None = None,
                      prior_sigma: float = PRIOR_SIGMA, init_sigma: float = INIT_SIGMA,
                      backend: str = 'auto') -> Callable[..., BayesConv]:
  """`BayesConv` with these fields bound, for the classifiers' `conv` argument.

  `conv_general_dilated` runs the convolutions; None = the project's
  `nn.conv.conv_general_dilated` on `backend` (one of `CONV_BACKENDS`, as `conv_module`).
  Cached, so that equal arguments give one object (modules built with it compare equal).
  """
  if prior_sigma <= 0 or init_sigma <= 0:
    raise ValueError(f'prior_sigma={prior_sigma} and init_sigma={init_sigma} must be > 0')
  if conv_general_dilated is None:
    if backend not in conv_lib.CONV_BACKENDS:
      raise ValueError(f'backend={backend!r} is not one of {conv_lib.CONV_BACKENDS}')
    conv_general_dilated = functools.partial(conv_lib.conv_general_dilated, backend=backend)
  return functools.partial(BayesConv, prior_sigma=prior_sigma, init_sigma=init_sigma,
                           conv_general_dilated=conv_general_dilated)
