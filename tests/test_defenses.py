"""ComDefend: binarised code at test time, straight-through gradient, training, evaluation."""

import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from defendpp_jax import evaluation
from defendpp_jax import training
from defendpp_jax import validate
from defendpp_jax.defences import comdefend as defenses
from defendpp_jax.training import recipes


def _reformer(width=2):
  model = defenses.ComDefend(channels=1, width=width, code_channels=12)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 12, 12, 1)), jnp.float32)
  variables = model.init({'params': jax.random.key(0), 'noise': jax.random.key(1)}, x,
                         train=True)
  return model, variables, x


def test_test_time_reconstruction_reads_only_the_binary_code():
  model, variables, x = _reformer()
  params = variables['params']
  rec = model.apply(variables, x)
  chex.assert_shape(rec, x.shape)
  assert float(rec.min()) >= 0.0 and float(rec.max()) <= 1.0
  linear = defenses.ComCNN(2, 12).apply({'params': params['com']}, x)
  bits = (linear > 0).astype(jnp.float32)
  expected = defenses.ResCNN(2, 1).apply({'params': params['res']}, bits)
  chex.assert_trees_all_close(rec, expected, atol=1e-6)
  # The straight-through version has the same values.
  chex.assert_trees_all_close(model.apply(variables, x, straight_through=True), rec, atol=1e-6)
  # Training adds noise (std 20) before the sigmoid: the code is then not binary.
  _, code = model.apply(variables, x, train=True, rngs={'noise': jax.random.key(2)})
  assert float(jnp.mean((code > 0.01) & (code < 0.99))) > 0.0


def test_white_box_gradient_through_binarisation_is_non_zero():
  model, variables, x = _reformer()
  w = jax.random.normal(jax.random.key(3), (12 * 12, 10))

  def loss(x, straight_through):
    rec = model.apply(variables, x, straight_through=straight_through)
    return jnp.sum(jnp.tanh(rec.reshape(len(x), -1) @ w))

  hard = jax.grad(functools.partial(loss, straight_through=False))(x)
  bpda = jax.grad(functools.partial(loss, straight_through=True))(x)
  assert float(jnp.max(jnp.abs(hard))) == 0.0  # round() has a zero gradient everywhere
  assert float(jnp.max(jnp.abs(bpda))) > 0.0
  assert bool(jnp.all(jnp.isfinite(bpda)))


def test_reformer_train_step_fits_a_batch():
  config = quickstart.get_config('smoke')
  config.defense.name = 'comdefend'
  config.defense.comdefend.learning_rate = 1e-3
  config.defense.comdefend.width = 4
  ds = type('DS', (), {'image_shape': (12, 12, 1), 'num_classes': 10, 'name': 'digits'})()
  recipe = recipes.make_recipe(config, ds, 1)
  state = jax.jit(recipe.init)(jax.random.key(0))
  assert state.batch_stats == {}
  step = jax.jit(functools.partial(recipes.train_step, recipe=recipe))
  weights = jnp.asarray(recipe.phase(0)[0])
  # Eight flat grey images of different intensities: 1 bit of code per pixel is enough.
  levels = np.random.default_rng(0).uniform(0.1, 0.9, size=(8, 1, 1, 1))
  x = jnp.asarray(np.broadcast_to(levels, (8, 12, 12, 1)), jnp.float32)
  y = jnp.zeros(8, jnp.int32)
  losses = []
  for i in range(30):
    state, metrics = step(state, x, y, weights, jax.random.key(i))
    losses.append(float(metrics['rec_full']))
  assert set(metrics) == {'loss', 'rec_full', 'code_penalty', 'grad_norm'}
  assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.5 * losses[0]


@pytest.fixture(scope='module')
def comdefend_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('comdefend')
  plain = quickstart.get_config('smoke')
  plain.model.decoder = 'none'
  plain.train.num_epochs = 3
  plain.data.test_limit = plain.eval.num_examples = 40
  plain_dir = str(root / 'plain')
  training.train_and_evaluate(plain, plain_dir)
  reformer = plain.copy_and_resolve_references()
  reformer.defense.name = 'comdefend'
  reformer.defense.classifier_workdir = plain_dir
  reformer.eval.attacks = ('fgsm', 'pgd')
  reformer.eval.figures = False
  ref_dir = str(root / 'comdefend')
  summary = training.train_and_evaluate(reformer, ref_dir)
  return plain, plain_dir, reformer, ref_dir, summary


def test_comdefend_run_summary_and_grey_box_is_transfer_from_the_classifier(comdefend_runs):
  plain, plain_dir, config, ref_dir, summary = comdefend_runs
  assert summary['model'] == 'comdefend-w2' and summary['seen'] == 40
  assert summary['clean_accuracy'] == summary['correct'] / 40
  with open(os.path.join(ref_dir, 'train_summary.json')) as f:
    assert json.load(f)['config']['defense']['classifier_workdir'] == plain_dir
  white = evaluation.evaluate(config, ref_dir, progress=False)
  assert white['threat_model'] == 'white_box' and white['clean_accuracy'] == summary[
      'clean_accuracy']
  grey_cfg = config.copy_and_resolve_references()
  grey_cfg.eval.threat_model = 'grey_box'
  grey = evaluation.evaluate(grey_cfg, ref_dir, progress=False)
  # Grey-box = adversarials crafted on the classifier run, evaluated on reformer + classifier:
  # exactly a transfer evaluation from the classifier's own workdir.
  transfer_cfg = config.copy_and_resolve_references()
  transfer_cfg.eval.source_workdir = plain_dir
  transfer = evaluation.evaluate(transfer_cfg, ref_dir, progress=False)
  got = {r['attack']: r['correct'] for r in grey['rows']}
  want = {r['attack']: r['correct'] for r in transfer['transfer']['rows']}
  assert got == want
  for r in white['rows'] + grey['rows']:
    assert r['seen'] == 40 and r['accuracy'] <= white['clean_accuracy'] + 1e-9


def test_grey_box_without_a_reformer_is_an_error():
  config = quickstart.get_config('smoke')
  config.eval.threat_model = 'grey_box'
  with pytest.raises(ValueError, match='config.eval.threat_model'):
    validate.validate_config(config)
  config.eval.threat_model = 'white_box'
  config.defense.name = 'no_such_defence'
  with pytest.raises(ValueError, match='config.defense.name'):
    validate.validate_config(config)
