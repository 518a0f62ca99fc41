"""The survey's training-time defences as runs: each trains through launch.train's loop and
deploys as a Defence; known answers on what each adds (the regularisers' own closed forms are in
tests/test_regularisers.py, the Bayesian layers' in tests/test_bayes.py).

Run: JAX_COMPILATION_CACHE_DIR=.cache/jax python -m pytest -q tests/test_training_defences.py
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import quickstart_smoke_config
from defendpp_jax import data as data_lib
from defendpp_jax import defences
from defendpp_jax import training
from defendpp_jax.defences import registry
from defendpp_jax.evaluation import diagnostics
from defendpp_jax.nn import classifiers
from defendpp_jax.training import recipes
from defendpp_jax.training import training_defences


def _config(name, **defence_fields):
  config = quickstart_smoke_config()
  config.defense.name = name
  config.data.train_limit = 64     # 2 steps of batch 32
  config.train.precise_bn_batches = 1
  config.defense[name].update(defence_fields)
  return config


@pytest.fixture(scope='module')
def digits():
  return data_lib.dataset_of(_config('parseval'))


def _trained(tmp_path, config):
  workdir = str(tmp_path / config.defense.name)
  summary = training.train_and_evaluate(config, workdir)
  ds = data_lib.dataset_of(config)
  return summary, registry.build(config, workdir, ds), ds, workdir


def test_distillation_trains_its_teacher_then_the_student_on_its_soft_labels(tmp_path):
  config = _config('distillation', temperature=20.0)
  summary, student, ds, workdir = _trained(tmp_path, config)
  teacher_dir = os.path.join(workdir, 'teacher')
  with open(os.path.join(teacher_dir, 'train_summary.json')) as f:
    assert json.load(f)['config']['defense']['distillation']['role'] == 'teacher'
  assert summary['model'].endswith('-distilled-T20')
  # The student's labels: the teacher's softmax at T, from the teacher as deployed.
  teacher = registry.build(training_defences.teacher_config(config), teacher_dir, ds)
  soft = training_defences.distillation_data(config, ds, workdir).train_labels
  want = jax.nn.softmax(teacher.logits(teacher.variables, ds.train_images[:16]) / 20.0)
  np.testing.assert_allclose(soft[:16], np.asarray(want), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-5)
  # Deployed at T = 1: the logits are the network's own.
  assert not student.randomised
  bad = _config('distillation', role='pupil')
  with pytest.raises(ValueError, match='distillation.role'):
    recipes.make_recipe(bad, ds, 2)


def test_distillation_loss_scale_multiplies_the_loss_at_t(digits):
  # loss_scale = T gives the logits the gradient of training at T = 1 at the start (hard
  # labels): the loss is scaled, the reported CE at T is not.
  x, y = digits.train_images[:8], digits.train_labels[:8]
  out = {}
  for scale in (1.0, 20.0):
    config = _config('distillation', temperature=20.0, role='teacher', loss_scale=scale)
    recipe = recipes.make_recipe(config, digits, 2)
    state = recipe.init(jax.random.key(0))
    _, out[scale] = jax.jit(lambda s, r=recipe: recipes.train_step(
        s, x, y, jnp.ones(1), jax.random.key(1), recipe=r))(state)
  np.testing.assert_allclose(float(out[20.0]['ce']), float(out[1.0]['ce']), rtol=1e-5)
  np.testing.assert_allclose(float(out[20.0]['loss']), 20.0 * float(out[1.0]['loss']),
                             rtol=1e-5)
  with pytest.raises(ValueError, match='distillation.loss_scale'):
    recipes.make_recipe(_config('distillation', loss_scale=0.0), digits, 2)


def test_saturated_softmax_masks_ce_gradients_but_not_the_margin_loss():
  """A distilled net deployed at T = 1 has logits ~T x larger: on confident examples the CE
  input gradient underflows to exactly 0 (the zero-gradient diagnostic fires), while the
  margin loss on logits (C&W, DLR) still has a gradient."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 3)).astype(np.float32)
  x = rng.uniform(size=(64, 2, 2, 1)).astype(np.float32)
  logits_fn = lambda z: 100.0 * 20.0 * (z.reshape(len(z), -1) @ w - 0.5 * w.sum(0))
  y = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1), np.int32)
  defence = defences.from_logits_fn(logits_fn)
  checks = diagnostics.gradient_checks(defence, x, y, {}, jax.random.key(0), 'exact')
  zero = next(c for c in checks if c['name'].startswith('fraction of examples with an all-zero'))
  assert zero['value'] > 0.5 and not zero['passed']

  def margin(z, label):
    logits = logits_fn(z)
    true = jnp.take_along_axis(logits, label[:, None], 1)[:, 0]
    other = jnp.max(jnp.where(jax.nn.one_hot(label, 3) > 0, -jnp.inf, logits), -1)
    return jnp.sum(true - other)
  g = np.asarray(jax.grad(margin)(jnp.asarray(x), jnp.asarray(y)))
  assert np.all(np.abs(g).reshape(len(g), -1).max(1) > 0)


def test_parseval_retraction_of_a_network_and_its_convex_residuals(digits):
  config = _config('parseval', beta=0.1, row_fraction=1.0)
  recipe = recipes.make_recipe(config, digits, 2)
  state = recipe.init(jax.random.key(0))
  params = state.params
  update = jax.jit(recipe.post_update)
  for i in range(150):
    params = update(params, jax.random.key(i))
  report = recipe.report(params)['parseval']
  for name, layer in report['layers'].items():
    rows, cols = layer['shape']
    if rows <= cols:  # orthonormal rows are reachable: every singular value -> 1
      assert abs(layer['max'] - 1) < 1e-2 and abs(layer['min'] - 1) < 1e-2, (name, layer)
  before = recipe.report(state.params)['parseval']['largest_singular_value']
  assert abs(report['largest_singular_value'] - 1) < abs(before - 1)
  # A convex residual block computes half of the summed one (ReLU is positively homogeneous).
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 4))
  block = lambda residual: classifiers.BasicBlock(4, residual=residual)
  v = block('sum').init(jax.random.key(2), x, train=False)
  np.testing.assert_allclose(block('convex').apply(v, x, train=False),
                             0.5 * block('sum').apply(v, x, train=False), rtol=1e-5, atol=1e-6)


def test_parseval_run_reports_singular_values_and_refuses_a_plain_load(tmp_path):
  summary, _, ds, workdir = _trained(tmp_path, _config('parseval'))
  layers = summary['parseval']['layers']
  assert any('head' in k for k in layers) and all(v['max'] > 0 for v in layers.values())
  plain = _config('parseval')
  plain.defense.name = 'none'
  with pytest.raises(ValueError, match="defense.name='parseval'"):
    registry.build(plain, workdir, ds)


@pytest.mark.parametrize('name,term,fields', [
    ('cross_lipschitz', 'cross_lipschitz', {}),
    ('cross_lipschitz', 'cross_lipschitz', {'projections': 2}),
    # one unrolled DeepFool step (of the default 5) keeps the double backward pass's compile
    # short; the regulariser itself is checked on closed forms in tests/test_regularisers.py
    ('deep_defense', 'deep_defense', {'steps': 1}),
    ('deep_defense', 'deep_defense', {'steps': 1, 'examples': 3})])
def test_input_gradient_regularisers_enter_the_loss(digits, name, term, fields):
  config = _config(name, **fields)
  recipe = recipes.make_recipe(config, digits, 2)
  state = recipe.init(jax.random.key(0))
  x, y = digits.train_images[:8], digits.train_labels[:8]
  step = jax.jit(lambda s, w: recipes.train_step(s, x, y, w, jax.random.key(1), recipe=recipe))
  _, m = step(state, jnp.asarray([1.0, 1.0]))
  _, m0 = step(state, jnp.asarray([1.0, 0.0]))
  assert float(m[term]) > 0 and np.isfinite(float(m['loss']))
  weight = config.defense[name].weight
  np.testing.assert_allclose(float(m['loss']) - float(m0['loss']), weight * float(m[term]),
                             rtol=1e-4)
  if name == 'deep_defense' and fields.get('examples'):
    # on 3 of the 8 examples: another value than the whole batch's
    rec = recipes.make_recipe(_config(name, steps=1), digits, 2)
    _, mf = jax.jit(lambda s, w: recipes.train_step(s, x, y, w, jax.random.key(1), recipe=rec))(
        state, jnp.asarray([1.0, 1.0]))
    assert float(m[term]) != float(mf[term])
  if fields.get('projections'):  # an estimate: close to the exact term, not equal to it
    exact = _config(name)
    _, me = jax.jit(lambda s, w: recipes.train_step(
        s, x, y, w, jax.random.key(1), recipe=recipes.make_recipe(exact, digits, 2)))(
            state, jnp.asarray([1.0, 1.0]))
    assert float(m[term]) != float(me[term])
    assert 0.2 < float(m[term]) / float(me[term]) < 5


def test_adp_trains_an_ensemble_deployed_as_its_mean_softmax(tmp_path):
  summary, defence, ds, workdir = _trained(tmp_path, _config('adp', members=2))
  assert summary['model'].endswith('-adp-x2') and summary['clean_accuracy'] is not None
  x = ds.test_images[:6]
  member_logits = training_defences.ensemble_lib.Ensemble(
      registry.classifier.module_of(_config('adp', members=2), ds), 2).apply(
          defence.variables, x)
  want = np.log(np.mean(np.asarray(jax.nn.softmax(member_logits)), 0))
  np.testing.assert_allclose(np.asarray(defence.logits(defence.variables, x)), want,
                             rtol=1e-4, atol=1e-5)
  assert len(defence.variables['params']) == 2


def test_adv_bnn_trains_adversarially_and_deploys_randomised(tmp_path):
  config = _config('adv_bnn', passes=2)
  config.train.adversarial, config.train.adv_steps = 'pgd', 1
  summary, defence, ds, _ = _trained(tmp_path, config)
  assert defence.randomised and summary['model'].endswith('-advpgd-bnn-x2')
  x = ds.test_images[:4]
  logits = jax.jit(defence.logits)
  a, b = (np.asarray(logits(defence.variables, x, jax.random.key(k))) for k in (0, 1))
  again = np.asarray(logits(defence.variables, x, jax.random.key(0)))
  assert np.abs(a - b).max() > 1e-4
  np.testing.assert_array_equal(a, again)
  # The reference's optimiser (the default): Adam without weight decay, lr x 0.1 at 40 / 70 /
  # 90% of the run; a zero gradient moves nothing.
  config.train.num_epochs = 5                     # 10 steps of 2 per epoch: decays at 4, 7, 9
  recipe = recipes.make_recipe(config, ds, 2)
  lr = config.defense.adv_bnn.learning_rate
  np.testing.assert_allclose([float(recipe.schedule(s)) for s in (0, 3, 4, 6, 7, 8, 9)],
                             [lr, lr, lr / 10, lr / 10, lr / 100, lr / 100, lr / 1000],
                             rtol=1e-6)
  # (jitted: op by op, the init and the update would compile every layer's ops one by one)
  state = jax.jit(recipe.init)(jax.random.key(0))
  zero = jax.tree_util.tree_map(jnp.zeros_like, state.params)
  updates, _ = jax.jit(recipe.tx.update)(zero, state.opt_state, state.params)
  assert not any(np.any(np.asarray(u)) for u in jax.tree_util.tree_leaves(updates))
  # config.train's SGD instead: its weight decay leaves the log sigmas alone (only the gradient
  # moves them).
  config.defense.adv_bnn.optimizer = 'sgd'
  recipe = recipes.make_recipe(config, ds, 2)
  state = jax.jit(recipe.init)(jax.random.key(0))
  updates, _ = jax.jit(recipe.tx.update)(zero, state.opt_state, state.params)
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  for path, u in flat:
    leaf = str(getattr(path[-1], 'key', ''))
    if leaf.endswith('log_sigma'):
      assert not np.any(np.asarray(u)), path
    elif leaf == 'kernel_mu':
      assert np.any(np.asarray(u)), path
  config.defense.adv_bnn.optimizer = 'rmsprop'
  with pytest.raises(ValueError, match='adv_bnn.optimizer'):
    recipes.make_recipe(config, ds, 2)


def test_training_time_defences_are_known_to_the_registry():
  for name in registry.TRAINING_TIME:
    assert name in registry.NAMES and name in training_defences.RECIPES
    assert name not in registry.UNTRAINED
