"""Defense-GAN: the projection, the latent attack's known optimum, WGAN-GP's step, and a run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defendpp_jax import attacks
from defendpp_jax import defences
from defendpp_jax.defences import defense_gan
from defendpp_jax.reproduce import board
from defendpp_jax.reproduce import survey
from defendpp_jax.training import gan

H = W = 4                  # toy images 4 x 4 x 1: 16 pixels
P, LATENT = H * W, 3


def _toy_generator(seed=0, scale=1.0):
  """G(z) = reshape(0.5 + scale * A z), A (16, 3) with orthonormal columns."""
  a, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(P, LATENT)))
  a = jnp.asarray(a * scale, jnp.float32)
  return a, lambda z: (0.5 + z @ a.T).reshape(z.shape[:-1] + (H, W, 1))


def test_projection_recovers_the_latent_of_a_linear_generator():
  """||G(z) - G(z0)||^2 is a quadratic with its minimum at z0: the momentum steps find it."""
  _, generate = _toy_generator(scale=2.0)
  z0 = jax.random.normal(jax.random.key(1), (5, LATENT)) * 0.1
  settings = defense_gan.ProjectionSettings(restarts=3, steps=200, lr=1.0)
  rec, z, err = defense_gan.project(generate, generate(z0), jax.random.key(2), latent=LATENT,
                                    settings=settings)
  np.testing.assert_allclose(z, z0, atol=1e-4)
  np.testing.assert_allclose(rec, generate(z0), atol=1e-4)
  assert float(jnp.max(err)) < 1e-8


def test_projection_of_a_generated_image_lands_near_it():
  """A random-weight DCGAN generator (weights x3, so that its images vary: pixel std ~0.3):
  the best of 10 restarts x 200 steps (the reference's settings) reconstructs G(z0) far closer
  than a random latent point does."""
  gen = defense_gan.Generator((8, 8, 1), latent=8, width=8)
  v = jax.tree_util.tree_map(lambda p: 3.0 * p, gen.init(jax.random.key(0), jnp.zeros((1, 8))))
  generate = lambda z: gen.apply(v, z)
  z0 = jax.random.normal(jax.random.key(3), (6, 8))
  x = generate(z0)
  rec, _, err = jax.jit(lambda x, k: defense_gan.project(generate, x, k, latent=8))(
      x, jax.random.key(4))
  random_err = jnp.mean(jnp.square(generate(jax.random.normal(jax.random.key(5), (6, 8))) - x),
                        axis=(1, 2, 3))
  assert float(jnp.max(err)) < 1e-3 * float(jnp.min(random_err))
  np.testing.assert_allclose(err, jnp.mean(jnp.square(rec - x), axis=(1, 2, 3)), rtol=1e-4)


def _latent_model(w):
  """The classifier f(x) = [0, w . x] and the exact encoder of the toy generator."""
  a, generate = _toy_generator()
  logits = lambda x, key: jnp.stack([jnp.zeros(x.shape[0]), x.reshape(x.shape[0], -1) @ w], -1)
  encode = lambda x, key: (x.reshape(x.shape[0], -1) - 0.5) @ a
  space = attacks.LatentSpace(generate, encode)
  return a, generate, attacks.AttackModel(logits, latent=space)


def test_latent_attack_reaches_the_penalised_optimum():
  """argmin_z ||G(z) - x||^2 - c margin(f(G(z))) with orthonormal G and linear f is
  z0 + (c / 2) A^T w: the attack returns G of it when the ball does not bind."""
  w = jnp.asarray(np.random.default_rng(7).normal(size=P), jnp.float32)
  a, generate, model = _latent_model(w)
  z0 = jax.random.normal(jax.random.key(0), (4, LATENT)) * 0.05
  x, y = generate(z0), jnp.zeros(4, jnp.int32)
  c = 0.1
  x_adv = attacks.latent(model, x, y, key=jax.random.key(1), eps=10.0, norm='l2',
                         num_steps=600, lr=0.01, const=c)
  expected = generate(z0 + 0.5 * c * (w @ a))
  np.testing.assert_allclose(x_adv, expected, atol=0.02)


def test_latent_attack_reaches_the_best_margin_in_a_binding_ball():
  """In an L2 ball of radius eps the best point of G's range is x + eps A u, u = A^T w /
  ||A^T w||: margin m0 + eps ||A^T w||; the attack gets there and stays in the ball and [0, 1]."""
  w = jnp.asarray(np.random.default_rng(8).normal(size=P), jnp.float32)
  a, generate, model = _latent_model(w)
  z0 = jax.random.normal(jax.random.key(2), (4, LATENT)) * 0.05
  x, y = generate(z0), jnp.zeros(4, jnp.int32)
  eps = 0.2
  x_adv = attacks.latent(model, x, y, key=jax.random.key(3), eps=eps, norm='l2',
                         num_steps=300, lr=0.05, const=10.0)
  flat = lambda v: v.reshape(v.shape[0], -1)
  margin, m0 = flat(x_adv) @ w, flat(x) @ w
  best = m0 + eps * jnp.linalg.norm(w @ a)
  np.testing.assert_allclose(margin, best, rtol=0.01)
  assert float(jnp.max(jnp.linalg.norm(flat(x_adv - x), axis=1))) <= eps + 1e-5
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0


def test_defence_views_and_the_latent_view():
  gen = defense_gan.Generator((8, 8, 1), latent=4, width=4)
  v = gen.init(jax.random.key(0), jnp.zeros((1, 4)))
  settings = defense_gan.ProjectionSettings(restarts=2, steps=5)
  w = jax.random.normal(jax.random.key(1), (64, 3))
  net = defences.from_logits_fn(lambda x: x.reshape(x.shape[0], -1) @ w)
  d = defences.preprocess(defense_gan.projection(gen, v, settings), net)
  assert d.randomised and d.default_view == 'bpda+eot' and d.latent is not None
  x = jax.random.uniform(jax.random.key(2), (3, 8, 8, 1))
  y = jnp.zeros(3, jnp.int32)
  model = d.attack_model('latent')
  assert model.latent is not None and not model.randomised
  np.testing.assert_allclose(model.logits(x, None), net.logits({}, x), rtol=1e-6)
  # BPDA: the projection's values, the identity's gradient (the classifier's at G(z*))
  bpda = d.attack_model('bpda', eot_samples=1)
  k = jax.random.key(3)
  rec = defense_gan.project(lambda z: gen.apply(v, z), x, k, latent=4, settings=settings)[0]
  _, logits, g = bpda.value_and_grad(attacks.objective('margin', y), x, k)
  np.testing.assert_allclose(logits, net.logits({}, rec), rtol=1e-5, atol=1e-5)
  at_rec = jax.grad(lambda r: jnp.sum(attacks.margin_loss(net.logits({}, r), y)))(rec)
  np.testing.assert_allclose(g, at_rec, rtol=1e-5, atol=1e-6)
  x_adv = attacks.latent(model, x, y, key=k, eps=0.1, num_steps=3)
  assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.1 + 1e-6
  with pytest.raises(ValueError, match='no generator'):
    net.attack_model('latent')
  with pytest.raises(ValueError, match='no generator'):
    attacks.latent(attacks.AttackModel(lambda x, k: net.logits({}, x)), x, y, key=k, eps=0.1)


def test_gradient_penalty_of_a_linear_critic():
  """critic(x) = v . x has gradient v everywhere: the penalty is (||v|| - 1)^2."""
  v = jax.random.normal(jax.random.key(0), (8, 8, 1))
  critic = lambda x: jnp.sum(x * v, axis=(1, 2, 3))
  real = jax.random.uniform(jax.random.key(1), (5, 8, 8, 1))
  gp = gan.gradient_penalty(critic, real, jnp.zeros_like(real), jax.random.key(2))
  np.testing.assert_allclose(gp, (jnp.linalg.norm(v) - 1.0) ** 2, rtol=1e-5)


def test_generator_updates_once_per_critic_steps(tmp_path):
  """Steps 1-4 change the critic only; step 5 also the generator; metrics are finite."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from defendpp_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config('smoke')
  config.defense.name = 'defense_gan'
  config.defense.defense_gan.update(width=4, latent=8, critic_steps=5)
  ds = data_lib.dataset_of(config)
  recipe = gan.wgan_recipe(config, ds, 4)
  state = recipe.init(jax.random.key(0))
  step = jax.jit(lambda s, x: recipe.step(s, x, None, None, jax.random.key(1), None))
  x = jnp.asarray(ds.train_images[:8])
  g0 = state.params['generator']
  leaves_equal = lambda a, b: all(bool(jnp.array_equal(p, q)) for p, q in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
  for i in range(4):
    c_before = state.params['critic']
    state, metrics = step(state, x)
    assert leaves_equal(state.params['generator'], g0), i
    assert not leaves_equal(state.params['critic'], c_before)
    assert all(np.isfinite(float(m)) for m in metrics.values())
  state, _ = step(state, x)
  assert not leaves_equal(state.params['generator'], g0)


def test_defense_gan_run_trains_and_deploys(plain_run, tmp_path):
  """launch.train's path: a WGAN-GP run in front of a trained classifier writes its samples,
  its checkpoint and a summary counted on summary_examples test images."""
  from defendpp_jax import training  # pylint: disable=g-import-not-at-top
  cls_config, cls_dir = plain_run
  config = cls_config.copy_and_resolve_references()
  config.defense.name = 'defense_gan'
  config.defense.classifier_workdir = cls_dir
  config.defense.defense_gan.update(width=4, latent=8, restarts=2, steps=5,
                                    summary_examples=8)
  workdir = str(tmp_path / 'gan')
  summary = training.train_and_evaluate(config, workdir)
  assert summary['seen'] == 8 and 0 <= summary['correct'] <= 8
  assert summary['model'] == 'defense_gan-w4-r2xL5'
  assert os.path.isfile(os.path.join(workdir, gan.SAMPLES_PNG))
  assert np.isfinite(summary['projection_mse_test16'])
  with open(os.path.join(workdir, 'train_summary.json')) as f:
    assert json.load(f)['samples_png'] == gan.SAMPLES_PNG


def test_board_entry_configs(tmp_path):
  """The board's Defense-GAN modes: oblivious, naive (exact), BPDA + EOT, latent; each in front
  of the board's plain classifier, with its own attacks."""
  from defendpp_jax import validate  # pylint: disable=g-import-not-at-top
  from defendpp_jax.reproduce import runner  # pylint: disable=g-import-not-at-top
  d = survey.BY_NAME['defense_gan']
  modes = survey.modes(d)
  assert [m.name for m in modes] == ['published', 'naive', 'bpda+eot', 'latent']
  plain = runner.model_dir(str(tmp_path), 'mnist', 'cpu', 'plain')
  for mode in modes:
    c = survey.eval_config(d, mode, 'mnist', 'cpu', str(tmp_path), '', 0)
    validate.validate_config(c)
    assert c.defense.classifier_workdir == plain
    costly = mode.name in ('naive', 'bpda+eot')  # each attack step re-runs the projection
    assert (c.eval.draws, c.eval.num_examples) == ((1, 20) if costly else (2, 100))
    attacks = ' '.join(c.eval.attacks)
    assert ('latent(eps=0.2' in attacks) == (mode.name == 'latent')
  t = survey._train_config(d, 'mnist', 'cpu', str(tmp_path), '', 0)  # pylint: disable=protected-access
  assert t.defense.name == 'defense_gan' and t.defense.classifier_workdir == plain


def _summary(mode, accuracies, clean):
  """The survey table's summary of one mode whose attack rows have these accuracies per eps
  (through survey_report.mode_summary, as --table=transforms writes it)."""
  from defendpp_jax.reproduce import survey_report
  rows = [{'attack': f'pgd100_eps{e}', 'eps': float(e), 'accuracy': a, 'correct': int(200 * a),
           'seen': 200, 'view': 'bpda', 'eot_samples': 1} for e, a in accuracies.items()]
  report = {'rows': rows, 'model': 'defense_gan-w16', 'clean_accuracy': clean,
            'num_examples': 100, 'draws': 2, 'sanity_checks': [], 'sanity_checks_passed': True}
  return survey_report.mode_summary(mode, report, f'/evals/{mode.name}')


def test_board_takes_defense_gan_from_the_transforms_table(tmp_path):
  """--from_transforms: the Defense-GAN row (no autoattack: its modes are exactly the
  transforms table's) is built from the saved table, nothing trained or evaluated; every
  mismatch is a clear error."""
  e = board.BY_NAME['defense_gan']
  accs = {'published': 0.8, 'naive': 0.05, 'bpda+eot': 0.5, 'latent': 0.3}
  modes = [_summary(m, {'0.2': accs[m.name], '0.1': 0.9}, 0.955) for m in board.entry_modes(e)]
  saved = {'seed': 0, 'datasets': {'mnist': {'defences': [
      {'defence': 'defense_gan', 'modes': modes}]}}}
  results = tmp_path / 'results'
  results.mkdir()
  path = results / 'survey_transforms_smoke.json'
  path.write_text(json.dumps(saved))
  kwargs = dict(workdir=str(tmp_path / 'w'), budget='smoke', results_dir=str(results),
                datasets=('mnist',), defences=('defense_gan',), from_transforms=True)
  res = board.run_board(**kwargs)
  row, = res['datasets']['mnist']['rows']
  c = row['columns']['0.2']
  assert (c['published'], c['autoattack'], c['adaptive'], c['adaptive_mode']) == (
      0.8, None, 0.05, 'naive')
  assert c['robust'] == 0.05 and abs(c['gap'] - 0.75) < 1e-12
  assert row['clean_accuracy'] == 0.955 and row['no_autoattack']
  assert not (tmp_path / 'w').exists()  # nothing trained, nothing evaluated
  md = (results / 'survey_board_smoke.md').read_text()
  assert 'taken from `survey_transforms_smoke.json` (--from_transforms)' in md
  with pytest.raises(ValueError, match='adds autoattack'):
    board.run_board(**{**kwargs, 'defences': ('bit_depth',)})
  with pytest.raises(ValueError, match='seed 0'):
    board.run_board(**{**kwargs, 'seed': 1})
  with pytest.raises(ValueError, match='no cifar10 row'):
    board.run_board(**{**kwargs, 'datasets': ('cifar10',)})
  path.write_text(json.dumps({**saved, 'datasets': {'mnist': {'defences': [
      {'defence': 'defense_gan', 'modes': modes[:2]}]}}}))
  with pytest.raises(ValueError, match='the board evaluates'):
    board.run_board(**kwargs)
  path.unlink()
  with pytest.raises(FileNotFoundError, match='survey_transforms_smoke.json'):
    board.run_board(**kwargs)
  with pytest.raises(ValueError, match='needs --table=board'):
    survey.run_survey('transforms', **{k: v for k, v in kwargs.items() if k != 'defences'})
