"""HGD: its four losses (known answers on a toy target), the crafted training set (eps-balls,
[0, 1], labels from the clean prediction), training through the recipe (only D changes; the
loss falls) and deployment as a Defence (oblivious vs adaptive).

Run: JAX_COMPILATION_CACHE_DIR=.cache/jax python -m pytest -q tests/test_hgd.py
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import quickstart_smoke_config
from conftest import run_python_args
from defendpp_jax import data as data_lib
from defendpp_jax import evaluation
from defendpp_jax import training
from defendpp_jax.defences import base
from defendpp_jax.defences import hgd
from defendpp_jax.defences import registry
from defendpp_jax.runs import saved
from defendpp_jax.training import recipes

# ---------------------------------------------------------------------------------------------
# Losses on a toy target: feats = 2 x (per pixel), logits = [sum x, -sum x].


def _toy_guide(x):
  feats = 2.0 * x
  s = jnp.sum(x, axis=(1, 2, 3))
  return feats, jnp.stack([s, -s], -1)


@pytest.mark.parametrize('kind', ['pixel', 'fgd', 'lgd'])
def test_each_unsupervised_loss_is_zero_when_the_denoiser_restores_x(kind):
  x = jax.random.uniform(jax.random.key(0), (3, 4, 4, 1))
  loss, _ = hgd.guided_loss(kind, _toy_guide, x, x, jnp.zeros(3, jnp.int32))
  assert float(loss) == 0.0


def test_losses_match_a_hand_computation_on_the_toy_target():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2, 3, 3, 1)).astype(np.float32)
  d = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
  y = np.array([0, 1], np.int32)
  got = {k: float(hgd.guided_loss(k, _toy_guide, jnp.asarray(d), jnp.asarray(x),
                                  jnp.asarray(y))[0]) for k in hgd.LOSSES}
  sd, sx = d.sum(axis=(1, 2, 3)), x.sum(axis=(1, 2, 3))
  logits = np.stack([sd, -sd], -1)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = {'pixel': np.abs(d - x).mean(), 'fgd': np.abs(2 * d - 2 * x).mean(),
          'lgd': np.abs(np.stack([sd - sx, sx - sd], -1)).mean(),
          'cgd': -logp[np.arange(2), y].mean()}
  for k in hgd.LOSSES:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)


def test_guided_losses_do_not_train_through_the_clean_branch():
  x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 1))
  d = x + 0.1
  g = jax.grad(lambda c: hgd.guided_loss('lgd', _toy_guide, d, c, jnp.zeros(2, jnp.int32))[0])(x)
  assert float(jnp.abs(g).max()) == 0.0


def test_unknown_loss_names_the_field():
  with pytest.raises(ValueError, match='config.defense.hgd.loss'):
    hgd.guided_loss('l2', _toy_guide, jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)),
                    jnp.zeros(1, jnp.int32))


# ---------------------------------------------------------------------------------------------
# The training set, on linear toy models (their FGSM / I-FGSM known in closed form).


def _linear(w):
  w = jnp.asarray(w)
  return base.Defence('linear', lambda v, x, key, bpda: x.reshape(len(x), -1) @ v, w)


def test_crafted_set_respects_eps_balls_pixels_and_clean_prediction_labels():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(20, 4, 4, 1)).astype(np.float32)
  target = _linear(rng.normal(size=(16, 3)).astype(np.float32))
  others = [_linear(rng.normal(size=(16, 3)).astype(np.float32)) for _ in range(2)]
  unit = 0.3 / 16
  data = hgd.craft_training_set(target, others, images, unit=unit, seed=0, batch_size=8)
  n, v = len(images), len(hgd.VARIANTS)
  assert data['adversarial'].shape == (n * v, 4, 4, 1)
  clean = images[data['clean_index']]
  delta = np.abs(data['adversarial'] - clean).reshape(n * v, -1).max(-1)
  assert np.all(delta <= data['eps'] + 1e-6)
  assert data['adversarial'].min() >= 0.0 and data['adversarial'].max() <= 1.0
  levels = data['eps'] / unit
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  assert levels.min() >= 1 - 1e-4 and levels.max() <= 16 + 1e-4
  flat = images.reshape(n, -1)
  target_pred = np.argmax(flat @ np.asarray(target.variables), -1)
  probs = sum(np.asarray(jax.nn.softmax(flat @ np.asarray(m.variables))) for m in [target] + others)
  ens_pred = np.argmax(probs, -1)
  for i, name in enumerate(hgd.VARIANTS):
    rows = data['variant'] == i
    want = ens_pred if name.endswith('_ensemble') else target_pred
    np.testing.assert_array_equal(data['source_label'][rows], want, err_msg=name)
  clean_rows = data['variant'] == hgd.VARIANTS.index('clean')
  np.testing.assert_array_equal(data['adversarial'][clean_rows], images)
  # FGSM on the target alone moves every pixel by eps (or to the box) along the sign of the
  # gradient of its CE: for a linear model, sign(w_y' - w_y) summed with softmax weights.
  fg = data['variant'] == hgd.VARIANTS.index('fgsm_target')
  w = np.asarray(target.variables)
  p = np.asarray(jax.nn.softmax(flat @ w))
  grad = (p @ w.T) - w.T[target_pred]          # d CE / d x of each image
  expect = np.clip(flat + data['eps'][fg][:, None] * np.sign(grad), 0, 1)
  np.testing.assert_allclose(data['adversarial'][fg].reshape(n, -1), expect, atol=1e-6)
  # deterministic given the seed
  again = hgd.craft_training_set(target, others, images, unit=unit, seed=0, batch_size=8)
  np.testing.assert_array_equal(again['adversarial'], data['adversarial'])


def test_every_ensemble_attack_raises_the_ensemble_loss():
  rng = np.random.default_rng(1)
  images = rng.uniform(0.3, 0.7, size=(32, 4, 4, 1)).astype(np.float32)
  target = _linear(rng.normal(size=(16, 3)).astype(np.float32))
  others = [_linear(rng.normal(size=(16, 3)).astype(np.float32))]
  data = hgd.craft_training_set(target, others, images, unit=0.01, seed=0, batch_size=32,
                                variants=('fgsm_ensemble', 'ifgsm8_ensemble'))
  assert data['adversarial'].shape[0] == 64
  # The same eps draws are not shared across variants, so compare the loss per unit eps.
  ws = [np.asarray(m.variables) for m in [target] + others]

  def ce(x, y):
    z = sum(x.reshape(len(x), -1) @ w for w in ws) / len(ws)
    z = z - z.max(-1, keepdims=True)
    return -(z[np.arange(len(x)), y] - np.log(np.exp(z).sum(-1)))

  for i in range(2):
    rows = data['variant'] == i
    gain = (ce(data['adversarial'][rows], data['source_label'][rows]) -
            ce(images, data['source_label'][rows]))
    assert np.all(gain >= -1e-5)


def test_the_stored_set_is_reused_and_other_settings_are_refused(tmp_path):
  path = str(tmp_path / 'set.npz')
  calls = []

  def craft():
    calls.append(1)
    return {'adversarial': np.zeros((2, 2, 2, 1), np.float32),
            'clean_index': np.arange(2, dtype=np.int32), 'variant': np.zeros(2, np.int32),
            'eps': np.ones(2, np.float32), 'source_label': np.zeros(2, np.int32)}

  a = hgd.load_or_craft(path, {'seed': 0}, craft, log=lambda m: None)
  b = hgd.load_or_craft(path, {'seed': 0}, craft, log=lambda m: None)
  assert len(calls) == 1 and set(a) == set(b)
  before = os.path.getmtime(path)
  with pytest.raises(ValueError, match=r'config.defense.hgd.trainset.*seed'):
    hgd.load_or_craft(path, {'seed': 1}, craft, log=lambda m: None)
  assert os.path.getmtime(path) == before and len(calls) == 1


# ---------------------------------------------------------------------------------------------
# Training through the recipe, deployment, evaluation.


_smoke = quickstart_smoke_config


@pytest.fixture(scope='module')
def runs(tmp_path_factory, plain_run):
  root = tmp_path_factory.mktemp('hgd')
  target_dir, other_dir = plain_run[1], str(root / 'other')
  other = _smoke()
  other.train.seed = 1
  training.train_and_evaluate(other, other_dir)
  return root, target_dir, other_dir


def _hgd_config(target_dir, other_dir, loss='lgd', arch='dunet'):
  config = _smoke()
  config.defense.name = 'hgd'
  config.defense.classifier_workdir = target_dir
  config.defense.hgd.ensemble_workdirs = (other_dir,)
  config.defense.hgd.loss = loss
  config.defense.hgd.arch = arch
  config.defense.hgd.train_images = 48
  config.train.batch_size = 16
  config.train.num_epochs = 2
  return config


def test_hgd_trains_only_the_denoiser_and_lowers_its_loss(runs):
  root, target_dir, other_dir = runs
  config = _hgd_config(target_dir, other_dir)
  ds = data_lib.dataset_of(config)
  workdir = str(root / 'lgd')
  train_ds = recipes.training_data(config, ds, workdir)
  assert train_ds.train_images.shape == (48 * len(hgd.VARIANTS), 2, *ds.image_shape)
  assert os.path.isfile(os.path.join(workdir, 'hgd_trainset.npz'))
  before, _ = saved.restore_variables(target_dir)
  recipe = recipes.make_recipe(config, ds, 10)
  state = recipe.init(jax.random.key(0))
  assert set(state.params) != set(before['params'])   # the denoiser's own tree
  images = jnp.asarray(train_ds.train_images[:32])
  labels = jnp.asarray(train_ds.train_labels[:32])
  step = jax.jit(lambda s, k: recipes.train_step(s, images, labels, jnp.ones(1), k,
                                                 recipe.frozen, recipe=recipe))
  first = None
  for i in range(12):
    state, metrics = step(state, jax.random.key(i))
    first = float(metrics['loss']) if first is None else first
  assert float(metrics['loss']) < first
  # the target's parameters and BatchNorm statistics are untouched
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(recipe.frozen)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  after, _ = saved.restore_variables(target_dir)
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_hgd_run_deploys_and_adaptive_attack_beats_oblivious(runs, tmp_path):
  _, target_dir, other_dir = runs
  workdir = str(tmp_path / 'cgd')
  config = _hgd_config(target_dir, other_dir, loss='cgd')
  summary = training.train_and_evaluate(config, workdir)
  assert summary['model'] == 'hgd-dunet-cgd-w4' and summary['seen'] == 96
  ds = data_lib.dataset_of(config)
  defence = registry.build(config, workdir, ds)
  assert defence.behind is not None and not defence.stand_ins and not defence.randomised
  x, y = ds.test_images[:24], ds.test_labels[:24]
  common = dict(dataset='digits', eps=0.1, batch_size=24)
  adaptive = evaluation.evaluate_defence(defence, x, y, ('pgd(steps=20)',), view='exact',
                                         **common)
  oblivious = evaluation.evaluate_defence(defence, x, y, ('pgd(steps=20)',), view='oblivious',
                                          **common)
  acc = lambda r: r['rows'][0]['accuracy']
  assert acc(adaptive) <= acc(oblivious), (acc(adaptive), acc(oblivious))
  assert acc(adaptive) < acc(evaluation.evaluate_defence(defence, x, y, ('fgsm',), **common))


def test_launch_evaluate_with_the_oblivious_threat_model(runs, tmp_path):
  root, target_dir, other_dir = runs
  workdir = str(root / 'lgd')
  config = _hgd_config(target_dir, other_dir)
  training.train_and_evaluate(config, workdir)
  out = tmp_path / 'oblivious'
  run_python_args(['-m', 'launch.evaluate', '--config=configs/quickstart.py:smoke',
                   f'--workdir={workdir}', f'--out_dir={out}', '--config.defense.name=hgd',
                   f'--config.defense.classifier_workdir={target_dir}',
                   '--config.eval.threat_model=oblivious', '--config.data.test_limit=96',
                   '--config.eval.num_examples=24', "--config.eval.attacks=('fgsm',)",
                   '--config.eval.figures=False', '--config.defense.hgd.widths=(4,8,8,8,8)'])
  report = json.loads((out / 'robustness.json').read_text())
  assert report['threat_model'] == 'oblivious' and report['crafted_on'] == 'classifier'
  assert report['model'] == 'hgd-dunet-lgd-w4'


def test_ensembles_average_logits_and_are_attacked_obliviously_through_their_classifiers():
  rng = np.random.default_rng(3)
  nets = [_linear(rng.normal(size=(16, 3)).astype(np.float32)) for _ in range(2)]
  shift = base.Preprocessor('shift', lambda v, x, key, bpda: x + v, 0.25)
  pipes = [base.preprocess(shift, n) for n in nets]
  both = base.ensemble(pipes)
  x = jnp.asarray(rng.uniform(size=(5, 4, 4, 1)).astype(np.float32))
  want = sum(n.logits(n.variables, x + 0.25) for n in nets) / 2
  np.testing.assert_allclose(both.logits(both.variables, x), want, rtol=1e-6)
  oblivious = both.attack_model('oblivious').logits(x, None)
  np.testing.assert_allclose(oblivious, sum(n.logits(n.variables, x) for n in nets) / 2,
                             rtol=1e-6)
  avg = hgd.averaged_preprocessors([shift, base.Preprocessor('neg', lambda v, x, k, b: -x, None)],
                                   'avg')
  np.testing.assert_allclose(avg.apply(avg.variables, x, None, False), 0.125, atol=1e-6)


def test_hgd_reproduction_writes_its_table_and_docs_section(tmp_path, monkeypatch):
  from conftest import SHARED_DATA
  from defendpp_jax.reproduce import hgd_cvpr2018 as repro
  from defendpp_jax.reproduce import hgd_runner
  # the smallest cast: no ensemble members, the target as its own black-box source
  monkeypatch.setattr(repro, 'ENSEMBLE', ())
  monkeypatch.setattr(repro, 'HELD_OUT', repro.TARGET)
  # two rows, PGD alone as the adaptive attack (APGD's compile costs minutes at this size)
  monkeypatch.setitem(repro.ROWS, '2', [repro.ROWS['2'][0], repro.ROWS['2'][2]])
  monkeypatch.setattr(repro, 'adaptive_entries', lambda dataset, steps: tuple(
      f'pgd(eps={e:.6g}, steps={steps}, label=pgd_eps{i})'
      for i, e in enumerate(repro.eps_pair(dataset), start=1)))
  docs = tmp_path / 'HGD.md'
  docs.write_text('# HGD\n\nhand-written text\n')
  data_dirs = {'mnist': os.path.join(SHARED_DATA, 'mnist')}
  result = hgd_runner.run_hgd_table('2', str(tmp_path / 'runs'), 'smoke', data_dirs,
                                    results_dir=str(tmp_path / 'results'), datasets=('mnist',),
                                    docs_path=str(docs))
  rows = result['datasets']['mnist']['rows']
  assert [r['label'] for r in rows] == ['NA', 'DUNET']
  for r in rows:
    assert set(r['ours']) == set(repro.COLUMNS + repro.ADAPTIVE_COLUMNS)
    assert all(0 <= v <= 100 for v in r['ours'].values())
    assert r['num_examples'] == {'white': 24, 'black': 24, 'adaptive': 16}
  # the white column of a denoiser is oblivious: crafted on the classifier behind it
  assert {a['view'] for k, a in rows[1]['attacks'].items() if k.startswith('white:')} == {
      'oblivious'}
  assert {a['view'] for k, a in rows[1]['attacks'].items() if k.startswith('adaptive:')} == {
      'exact'}
  # the adaptive attacks run as a worst-case cascade, the oblivious ones each on every image
  assert all(a['worst_case'] == k.startswith('adaptive:') for k, a in rows[1]['attacks'].items())
  # the adaptive attack through D and f is at least as strong as the oblivious one
  for i in (1, 2):
    assert rows[1]['ours'][f'Adaptive eps{i}'] <= rows[1]['ours'][f'White eps{i}']
  text = docs.read_text()
  assert 'hand-written text' in text and '| DUNET |' in text
  assert (tmp_path / 'results' / 'hgd_table2_smoke.json').is_file()
  # a second run reuses every model and evaluation
  again = hgd_runner.run_hgd_table('2', str(tmp_path / 'runs'), 'smoke', data_dirs,
                                   results_dir=str(tmp_path / 'results'), datasets=('mnist',))
  assert again['datasets']['mnist']['rows'][1]['ours'] == rows[1]['ours']
