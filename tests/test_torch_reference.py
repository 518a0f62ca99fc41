"""The PyTorch reference network (launch/torch_resnet.py) computes our classifier's function.

Needs PyTorch, an optional dependency (requirements-bench.txt): skipped without it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defendpp_jax import nn as models

torch = pytest.importorskip('torch')
from launch import torch_resnet  # pylint: disable=g-import-not-at-top,wrong-import-position


def _random_variables(model, x):
  """Initial weights with every parameter and BatchNorm statistic perturbed (none trivial)."""
  variables = model.init(jax.random.key(0), x)
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [leaf + 0.1 * jax.random.uniform(k, leaf.shape) for k, leaf in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.mark.parametrize('shape', [(28, 28, 1), (32, 32, 3)])
def test_torch_resnet18_is_our_classifier_with_either_padding(shape):
  mean, std = (0.2,) * shape[-1], (0.4,) * shape[-1]
  x = jax.random.uniform(jax.random.key(2), (3, *shape))
  tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  logits = {}
  for padding in models.PADDINGS:
    model = models.Classifier('resnet18', 10, width=4, image_size=shape[0], mean=mean, std=std,
                              padding=padding)
    variables = _random_variables(model, x)  # same shapes and draws for both paddings
    logits[padding] = np.asarray(model.apply(variables, x, train=False))
    net = torch_resnet.resnet18(4, shape[-1], 10, mean, std, padding=padding).eval()
    torch_resnet.load_jax_variables(net, variables)
    with torch.no_grad():
      np.testing.assert_allclose(net(tx).numpy(), logits[padding], rtol=1e-4, atol=1e-4)
  # The two paddings are two functions of the same weights: where the stride-2 windows sit.
  assert np.abs(logits['torch'] - logits['same']).max() > 1e-3


def test_torch_weights_load_from_a_runs_nested_variables_and_refuse_another_width():
  """A run's variables hold the classifier one level down ({'params': {'classifier': ...}});
  a net of another width is refused by name, not loaded half-way."""
  model = models.Classifier('resnet18', 10, width=4, image_size=28)
  x = jax.random.uniform(jax.random.key(3), (2, 28, 28, 1))
  variables = _random_variables(model, x)
  nested = {c: {'classifier': variables[c]} for c in ('params', 'batch_stats')}
  net = torch_resnet.resnet18(4, 1, 10).eval()
  torch_resnet.load_jax_variables(net, nested)
  with torch.no_grad():
    out = net(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(out, np.asarray(model.apply(variables, x)), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='another width'):
    torch_resnet.load_jax_variables(torch_resnet.resnet18(8, 1, 10), nested)
  with pytest.raises(ValueError, match='no ResNet classifier'):
    torch_resnet.load_jax_variables(net, {'params': {'x': {}}, 'batch_stats': {}})


def test_the_torch_wrapper_of_a_jax_model_has_its_logits_and_input_gradients():
  """launch.torch_autoattack's module: torch's forward and backward are the JAX function's
  (batches of any size, padded inside)."""
  from launch import torch_autoattack  # pylint: disable=g-import-not-at-top
  w = jax.random.normal(jax.random.key(0), (4 * 4 * 2, 3))
  fn = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w)
  net = torch_autoattack.torch_module(fn, max_batch=8)
  x = np.asarray(jax.random.uniform(jax.random.key(1), (5, 4, 4, 2)))
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
  out = net(xt)
  np.testing.assert_allclose(out.detach().numpy(), np.asarray(fn(jnp.asarray(x))), atol=1e-5)
  ct = np.arange(15, dtype=np.float32).reshape(5, 3) / 15
  out.backward(torch.from_numpy(ct))
  want = jax.vjp(fn, jnp.asarray(x))[1](jnp.asarray(ct))[0]
  np.testing.assert_allclose(xt.grad.numpy(), np.asarray(want).transpose(0, 3, 1, 2),
                             atol=1e-5)


def test_the_randomised_torch_wrapper_differentiates_the_draw_of_its_forward_pass():
  """With a key: each forward call draws anew, and its backward pass is the VJP of that very
  draw (one EOT sample of the published APGD = one forward + one backward)."""
  from launch import torch_autoattack  # pylint: disable=g-import-not-at-top
  w = jax.random.normal(jax.random.key(0), (4 * 4 * 2, 3))

  def fn(x, k):  # random multiplicative mask: the gradient depends on the draw
    m = jax.random.bernoulli(k, 0.5, x.shape).astype(x.dtype)
    return jnp.tanh((m * x).reshape(x.shape[0], -1) @ w)

  key = jax.random.key(7)
  net = torch_autoattack.torch_module(fn, max_batch=8, key=key)
  x = np.asarray(jax.random.uniform(jax.random.key(1), (5, 4, 4, 2)))
  outs, grads = [], []
  for call in (1, 2):
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    out = net(xt)
    out.sum().backward()
    k = jax.random.fold_in(key, call)
    xp = np.concatenate([x, np.zeros((3, 4, 4, 2), np.float32)])  # padded to 8 inside
    np.testing.assert_allclose(out.detach().numpy(), np.asarray(fn(jnp.asarray(xp), k))[:5],
                               atol=1e-5)
    want = jax.grad(lambda z: fn(z, k).sum())(jnp.asarray(xp))[:5]
    np.testing.assert_allclose(xt.grad.numpy(), np.asarray(want).transpose(0, 3, 1, 2),
                               atol=1e-5)
    outs.append(out.detach().numpy())
  assert np.abs(outs[0] - outs[1]).max() > 1e-3  # two calls, two draws
