"""Architectures: decoder output shapes, classifier identity, weight sharing."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from defendpp_jax import nn as models
from defendpp_jax.nn import conv as conv_lib
from defendpp_jax.runs import config as config_lib
from defendpp_jax.training import recipes

def _shapes(model, shape, batch=2):
  x = jnp.zeros((batch, *shape))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  (logits, recs), _ = jax.eval_shape(
      lambda v: model.apply(v, x, train=True, mutable=['batch_stats']), variables)
  return variables, logits, recs


# Every arch x decoder on MNIST-sized inputs; every arch with the paper's decoder on CIFAR-sized.
@pytest.mark.parametrize('arch', models.ARCHS)
@pytest.mark.parametrize('shape,decoder',
                         [((28, 28, 1), d) for d in models.DECODERS] + [((32, 32, 3), 'pyramid')])
def test_decoder_shapes_at_every_scale(arch, shape, decoder):
  model = models.DefendPP(arch=arch, image_shape=shape, width=4, shared_blocks=2,
                          decoder=decoder, num_classes=7)
  variables, logits, recs = _shapes(model, shape)
  chex.assert_shape(logits, (2, 7))
  if decoder == 'none':
    assert recs == [] and set(variables['params']) == {'classifier'}
    return
  # 28 -> 28, 14, 7; 32 -> 32, 16, 8: no output below 7x7.
  assert len(recs) == 3
  for m, r in enumerate(recs):
    chex.assert_shape(r, (2, shape[0] // 2**m, shape[1] // 2**m, shape[2]))
  num_blocks = 5 if arch == 'vgg16' else 4
  owned = {f'ae_E{k}' for k in range(2, num_blocks)}
  assert owned <= set(variables['params'])


def test_imagenet_stem_shapes():
  model = models.DefendPP(arch='resnet18', image_shape=(64, 64, 3), width=4, decoder='pyramid')
  variables, logits, recs = _shapes(model, (64, 64, 3))
  stem = variables['params']['classifier']['E0']['stem']['kernel']
  assert stem.shape[:2] == (7, 7)  # > 32 px: the ImageNet stem
  assert [r.shape[1] for r in recs] == [64, 32, 16, 8]


@pytest.mark.parametrize('arch', ['resnet18', 'vgg16'])
def test_classify_is_the_plain_classifier(arch):
  shape = (28, 28, 1)
  model = models.DefendPP(arch=arch, image_shape=shape, width=4, shared_blocks=1)
  x = jax.random.uniform(jax.random.key(1), (3, *shape))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  plain = models.Classifier(arch, 10, width=4, image_size=28)
  sub = {'params': variables['params']['classifier'],
         'batch_stats': variables['batch_stats']['classifier']}
  expected = jax.jit(plain.apply)(sub, x)
  classify = jax.jit(functools.partial(model.apply, method='classify'))
  chex.assert_trees_all_close(classify(variables, x), expected, atol=1e-5)
  logits, _ = jax.jit(model.apply)(variables, x)
  chex.assert_trees_all_close(logits, expected, atol=1e-5)
  # The no-defence model has exactly the classifier's parameters.
  baseline = models.DefendPP(arch=arch, image_shape=shape, width=4, decoder='none')
  b_vars = jax.eval_shape(baseline.init, jax.random.key(0), x)
  chex.assert_trees_all_equal_shapes(b_vars['params']['classifier'], sub['params'])


def _config(shared_blocks, weight_decay=0.0):
  config = config_lib.get_base_config()
  config.model.update(arch='resnet18', width=4, shared_blocks=shared_blocks, decoder='pyramid')
  config.train.update(learning_rate=0.1, lr_decay_epochs=(), weight_decay=weight_decay,
                      num_epochs=1)
  return config


_DS = type('DS', (), {'image_shape': (28, 28, 1), 'num_classes': 10, 'mean': (0.5,),
                      'std': (0.5,)})()


@pytest.mark.parametrize('shared_blocks', [1, 3])
def test_shared_blocks_are_one_set_of_weights(shared_blocks):
  config = _config(shared_blocks)
  recipe = recipes.make_recipe(config, _DS, 1)
  state = jax.jit(recipe.init)(jax.random.key(0))
  # AE-owned copies start equal to the classifier's blocks, but are separate parameters.
  for k in range(shared_blocks, 4):
    chex.assert_trees_all_equal(state.params[f'ae_E{k}'], state.params['classifier'][f'E{k}'])
  for k in range(shared_blocks):
    assert f'ae_E{k}' not in state.params
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  y = jnp.arange(4) % 10
  step = jax.jit(functools.partial(recipes.train_step, recipe=recipe))
  before = state.params
  # Reconstruction loss only (weights = (w_ce, w_rec) = (0, 1)).
  after, _ = step(state, x, y, jnp.asarray([0.0, 1.0]), jax.random.key(2))
  changed = lambda a, b: any(not np.allclose(u, v) for u, v in
                             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
  cls_before, cls_after = before['classifier'], after.params['classifier']
  for k in range(4):
    assert changed(cls_before[f'E{k}'], cls_after[f'E{k}']) == (k < shared_blocks), k
  assert not changed(cls_before['head'], cls_after['head'])
  for k in range(shared_blocks, 4):
    assert changed(before[f'ae_E{k}'], after.params[f'ae_E{k}'])
  # Classification loss only: the decoder and AE-owned blocks do not move.
  after, _ = step(state, x, y, jnp.asarray([1.0, 0.0]), jax.random.key(2))
  assert not changed(before['dec'], after.params['dec'])
  assert changed(cls_before['head'], after.params['classifier']['head'])


def test_gaussian_noise_only_in_training():
  model = models.DefendPP(image_shape=(28, 28, 1), width=4, noise_std=1.0)
  x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
  v = jax.jit(model.init)({'params': jax.random.key(0), 'noise': jax.random.key(0)}, x)
  train_apply = jax.jit(lambda v, k: model.apply(v, x, train=True, mutable=['batch_stats'],
                                                 rngs={'noise': k})[0])
  (l1, r1), (l2, r2) = train_apply(v, jax.random.key(1)), train_apply(v, jax.random.key(2))
  assert not np.allclose(r1[0], r2[0])
  chex.assert_trees_all_close(l1, l2)  # the classifier never sees the noise
  eval_apply = jax.jit(lambda v: model.apply(v, x, train=False))
  chex.assert_trees_all_close(eval_apply(v), eval_apply(v))  # no noise at inference


def test_bad_model_settings_raise():
  x = jnp.zeros((1, 28, 28, 1))
  with pytest.raises(ValueError, match='shared_blocks'):
    models.DefendPP(image_shape=(28, 28, 1), width=4, shared_blocks=5).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='decoder'):
    models.DefendPP(image_shape=(28, 28, 1), width=4, decoder='unet').init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='arch'):
    models.DefendPP(arch='resnet101', image_shape=(28, 28, 1)).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='shape'):
    models.DefendPP(image_shape=(32, 32, 3), width=4).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='config.model.padding'):
    models.DefendPP(image_shape=(28, 28, 1), width=4, padding='valid').init(jax.random.key(0), x)


@pytest.mark.parametrize('size', [28, 14, 7])
def test_strided_windows_sit_on_the_projection_pixels_with_torch_padding(size):
  # A 3x3 stride-2 conv whose kernel is 1 at its centre reads one pixel per output: with PyTorch's
  # padding the very pixels the 1x1 stride-2 projection reads (0, 2, 4...); with XLA's 'SAME' on
  # an even size, the ones after them (1, 3, 5...).
  x = jax.random.uniform(jax.random.key(0), (2, size, size, 1))
  centre = {'params': {'kernel': jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0)}}
  proj = x[:, ::2, ::2]
  for padding, expected in (('torch', proj), ('same', x[:, 1::2, 1::2] if size % 2 == 0 else proj)):
    conv = conv_lib.make_conv(conv_lib.Conv, 1, 3, 2, padding=padding)
    chex.assert_trees_all_close(conv.apply(centre, x), expected)
  one = {'params': {'kernel': jnp.ones((1, 1, 1, 1))}}
  proj_conv = conv_lib.make_conv(conv_lib.Conv, 1, 1, 2, padding='torch')
  chex.assert_trees_all_close(proj_conv.apply(one, x), proj)


def test_a_config_saved_before_the_padding_field_builds_the_same_padding_model():
  cfg = ml_collections.ConfigDict({'arch': 'resnet18', 'width': 4, 'shared_blocks': 1,
                                   'decoder': 'none'})
  assert models.build_model(cfg, 10, (28, 28, 1)).padding == 'same'
  cfg.padding = 'torch'
  assert models.build_model(cfg, 10, (28, 28, 1)).padding == 'torch'


@pytest.mark.parametrize('kernel,strides,padding', [(3, 1, 'SAME'), (3, 2, 'SAME'),
                                                    (1, 2, 'SAME'), (3, 2, 'VALID'),
                                                    (7, 2, ((3, 3), (3, 3)))])
def test_conv_gradients_equal_lax(kernel, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 10, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 5)), jnp.float32)
  dn = ('NHWC', 'HWIO', 'NHWC')

  def loss(conv, x, w):
    return jnp.sum(jnp.sin(conv(x, w, (strides, strides), padding, dimension_numbers=dn)))

  ref = jax.jit(jax.grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1)))(x, w)
  got = jax.jit(jax.grad(functools.partial(loss, models.conv_general_dilated), (0, 1)))(x, w)
  chex.assert_trees_all_close(got, ref, atol=1e-4, rtol=1e-4)
  # Also inside a loop, where the layout of the gradient convolution matters.
  body = lambda i, xa: xa + 0.01 * jax.grad(functools.partial(
      loss, models.conv_general_dilated), 0)(xa, w)
  body_ref = lambda i, xa: xa + 0.01 * jax.grad(functools.partial(
      loss, jax.lax.conv_general_dilated), 0)(xa, w)
  chex.assert_trees_all_close(jax.jit(lambda x: jax.lax.fori_loop(0, 3, body, x))(x),
                              jax.jit(lambda x: jax.lax.fori_loop(0, 3, body_ref, x))(x),
                              atol=1e-4, rtol=1e-4)
