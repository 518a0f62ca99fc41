"""Training step, config checks, checkpoints and the end-to-end trainer on tiny configs."""

import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from defendpp_jax import data as data_lib
from defendpp_jax import parallel
from defendpp_jax import training
from defendpp_jax import validate
from defendpp_jax.defences import registry
from defendpp_jax.evaluation import runner
from defendpp_jax.runs import checkpointing
from defendpp_jax.runs import saved as saved_runs
from defendpp_jax.training import batch_norm
from defendpp_jax.training import objectives
from defendpp_jax.training import optim
from defendpp_jax.training import recipes

_DIGITS = type('DS', (), {'image_shape': (28, 28, 1), 'num_classes': 10, 'name': 'digits',
                          'mean': (0.5,), 'std': (0.5,)})()


def _recipe(config):
  return recipes.make_recipe(config, _DIGITS, 4)


def _tiny(decoder='pyramid', **train):
  config = quickstart.get_config('smoke')
  config.model.decoder = decoder
  config.train.update(train)
  recipe = _recipe(config)
  state = jax.jit(recipe.init)(jax.random.key(0))
  return config, recipe, state


def _step(recipe):
  return functools.partial(recipes.train_step, recipe=recipe)


def test_train_step_compiles_once_and_learns():
  config, recipe, state = _tiny()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, x, y, weights, key):
    return recipes.train_step(state, x, y, weights, key, recipe=recipe)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(16, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
  weights = jnp.ones(2)
  losses = []
  for i in range(6):  # same shapes and dtypes: one trace, however the weights change
    state, metrics = step(state, x, y, weights * (1.0 if i % 2 else 0.5), jax.random.key(i))
    losses.append(float(metrics['loss']) / (1.0 if i % 2 else 0.5))
  assert int(state.step) == 6
  assert losses[-1] < losses[0]  # a fixed batch is fitted
  assert all(np.isfinite(losses))


def test_config_errors_name_the_field():
  config = quickstart.get_config('smoke')
  for field, value, match in [('model.decoder', 'unet', 'config.model.decoder'),
                              ('model.arch', 'resnet101', 'config.model.arch'),
                              ('loss.targets', 'wavelet', 'config.loss.targets'),
                              ('train.schedule', 'cyclic', 'config.train.schedule'),
                              ('model.shared_blocks', 5, 'config.model.shared_blocks'),
                              ('train.batch_size', 0, 'config.train.batch_size'),
                              ('loss.lambda_ms', -1.0, 'config.loss.lambda_ms'),
                              ('data.name', 'svhn', 'config.data.name'),
                              ('model.padding', 'valid', 'config.model.padding'),
                              ('train.precise_bn_batches', -1, 'config.train.precise_bn_batches')]:
    bad = quickstart.get_config('smoke')
    section, name = field.split('.')
    bad[section][name] = value
    with pytest.raises(ValueError, match=match):
      validate.validate_config(bad)
  validate.validate_config(config)
  with pytest.raises(ValueError, match='smoke'):
    quickstart.get_config('smok')


def test_step_decay_is_rescaled_to_the_run_length():
  from configs import mnist  # pylint: disable=g-import-not-at-top
  config = mnist.get_config()
  config.train.lr_schedule_epochs = 250  # the decay epochs (100, 200) are those of 250 epochs
  _, paper = optim.sgd_step_decay(config.train, steps_per_epoch=10)  # 250 epochs: the paper's
  assert [float(paper(s)) for s in (999, 1000, 1999, 2000)] == pytest.approx(
      [0.01, 0.001, 0.001, 0.0001])
  config.train.num_epochs = 1  # the same schedule shrunk to one epoch: decays at 40% and 80%
  _, short = optim.sgd_step_decay(config.train, steps_per_epoch=100)
  assert [float(short(s)) for s in (39, 40, 79, 80)] == pytest.approx(
      [0.01, 0.001, 0.001, 0.0001])
  config.train.lr_schedule_epochs = 0  # no rescaling: the decay epochs are never reached
  _, flat = optim.sgd_step_decay(config.train, steps_per_epoch=100)
  assert float(flat(99)) == pytest.approx(0.01)


def test_sgd_clips_the_gradient_to_a_global_norm_before_decay_and_momentum():
  from configs import mnist  # pylint: disable=g-import-not-at-top
  tc = mnist.get_config().train
  tc.weight_decay, tc.learning_rate = 0.0, 0.1
  params = {'a': jnp.zeros(3), 'b': jnp.zeros(4)}
  grads = {'a': jnp.full(3, 2.0), 'b': jnp.full(4, 2.0)}     # global norm 2 sqrt(7)
  for clip, scale in ((0.0, 1.0), (1.0, 1.0 / (2.0 * np.sqrt(7.0))), (100.0, 1.0)):
    tc.clip_grad_norm = clip
    tx, _ = optim.sgd_step_decay(tc, steps_per_epoch=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    for k in params:
      np.testing.assert_allclose(updates[k], -0.1 * scale * grads[k], rtol=1e-6)
  tc.clip_grad_norm = -1.0
  with pytest.raises(ValueError, match='clip_grad_norm'):
    optim.sgd_step_decay(tc, steps_per_epoch=10)


def test_alternating_schedule_phases():
  config = quickstart.get_config('smoke')
  config.train.schedule = 'alternating'
  config.train.alternating.update(ae_epochs=2, cls_epochs=1, cycles=2)
  phases = [recipes.classifier_phase(config, e)[1] for e in range(8)]
  assert phases == ['ae', 'ae', 'classifier', 'ae', 'ae', 'classifier', 'joint', 'joint']
  assert recipes.classifier_phase(config, 0)[0] == (0.0, 1.0)
  assert _recipe(config).term_names == ('ce', 'reconstruction')
  config.model.decoder = 'none'
  assert recipes.classifier_phase(config, 0)[0] == (1.0, 0.0)


def test_checkpoint_round_trip_and_truncated_fallback(tmp_path, capsys):
  _, _, state = _tiny()
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3, async_save=False)
  ckpt.save(1, state, meta={'epoch': 0})
  later = state.replace(step=state.step + 1,
                        params=jax.tree_util.tree_map(lambda p: p + 1.0, state.params))
  ckpt.save(2, later)
  ckpt.close()
  reader = checkpointing.Checkpointer(str(tmp_path))
  abstract = checkpointing.abstract_like(state)
  restored, meta = reader.restore(1, abstract)
  chex.assert_trees_all_equal(restored, state)
  assert meta == {'epoch': 0}
  latest, _ = reader.restore_latest(abstract)
  chex.assert_trees_all_equal(latest, later)
  # Truncate the newest step: it is reported by name and step 1 is used.
  state_dir = tmp_path / '2' / 'state'
  for root, _, files in os.walk(state_dir):
    for f in files:
      os.remove(os.path.join(root, f))
  capsys.readouterr()
  fallback, _ = reader.restore_latest(abstract)
  chex.assert_trees_all_equal(fallback, state)
  assert f'checkpoint {tmp_path / "2"} is unreadable' in capsys.readouterr().out
  reader.close()


def test_train_and_evaluate_end_to_end_and_resume(tmp_path):
  config = quickstart.get_config('smoke')
  workdir = str(tmp_path / 'run')
  summary = training.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'train_summary.json')) as f:
    saved = json.load(f)
  for key in ('clean_accuracy', 'step', 'param_l2', 'params_sha256', 'config'):
    assert key in saved
  assert saved['step'] == 4 and saved['seen'] == 64
  assert 0.0 <= saved['clean_accuracy'] <= 1.0
  assert saved['clean_accuracy'] == saved['correct'] / saved['seen']
  assert saved['config']['model']['decoder'] == 'pyramid'
  assert saved['conv_backend'] in ('xla', 'onednn')  # and the build, on oneDNN
  assert (saved['conv_library'] is None) == (saved['conv_backend'] == 'xla')
  assert saved['params_sha256'] == summary['params_sha256'] and len(saved['params_sha256']) == 64
  # BatchNorm statistics re-estimated on the 4 batches an epoch holds (40 asked), and saved: the
  # final checkpoint classifies the test set exactly as the summary says.
  assert saved['bn_statistics'] == 'precise (4 batches)'
  ds = data_lib.dataset_of(config)
  loaded = registry.build(config, workdir, ds)
  assert runner.clean_counts(loaded, ds.test_images, ds.test_labels, 32) == (
      saved['correct'], saved['seen'])
  # The same command again resumes from the final checkpoint and changes nothing.
  again = training.train_and_evaluate(config, workdir)
  assert again['params_sha256'] == summary['params_sha256']
  assert again['param_l2'] == summary['param_l2']
  # Two more epochs continue from step 4: the first 4 steps are not redone.
  config.train.num_epochs = 2
  longer = training.train_and_evaluate(config, workdir)
  assert longer['step'] == 8 and longer['params_sha256'] != summary['params_sha256']
  # Interrupted after epoch 1 and resumed == uninterrupted 2 epochs.
  fresh = training.train_and_evaluate(config, str(tmp_path / 'fresh'))
  assert fresh['params_sha256'] == longer['params_sha256']


def test_precise_bn_statistics_average_each_batch_statistics():
  # Known answer: every BatchNorm's statistics = the mean over the batches of that batch's
  # per-channel mean and (biased) variance of the BatchNorm's input, with the given weights.
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  _, recipe, state = _tiny(decoder='pyramid')
  model = recipe.model
  rng = np.random.default_rng(0)
  batches = [(rng.uniform(size=(8, 28, 28, 1)).astype(np.float32), None) for _ in range(3)]
  stats, n = batch_norm.precise_batch_stats(state, model, iter(batches), parallel.make_mesh(),
                                            jax.random.key(0))
  assert n == 3
  taps = {('E0', 'stem'): ('E0', 'stem_bn'), ('E3', 'block1', 'Conv_1'):
          ('E3', 'block1', 'BatchNorm_1'), ('E2', 'block0', 'proj'): ('E2', 'block0', 'proj_bn')}
  want = {bn: [] for bn in taps.values()}
  for x, _ in batches:
    _, inter = model.apply(state.variables, jnp.asarray(x), train=True,
                           mutable=['batch_stats', 'intermediates'],
                           capture_intermediates=lambda m, _: isinstance(m, nn.Conv))
    for conv, bn in taps.items():
      h = inter['intermediates']['classifier']
      for part in conv:
        h = h[part]
      h = np.asarray(h['__call__'][0], np.float64)
      want[bn].append((h.mean((0, 1, 2)), h.var((0, 1, 2))))
  for bn, per_batch in want.items():
    got = stats['classifier']
    for part in bn:
      got = got[part]
    np.testing.assert_allclose(got['mean'], np.mean([m for m, _ in per_batch], 0),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got['var'], np.mean([v for _, v in per_batch], 0),
                               rtol=1e-4, atol=1e-5)
  # The decoder's BatchNorms are re-estimated too (they are part of the saved model).
  assert set(stats) == set(state.batch_stats)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = quickstart.get_config('smoke')
  workdir = str(tmp_path / 'run')
  training.train_and_evaluate(config, workdir)  # steps 1-4, checkpoints at 2 and 4
  config.train.num_epochs = 3
  config.train.learning_rate = 1e30  # diverges at once
  with pytest.raises(FloatingPointError, match=r'non-finite training loss at step \d+.*step 4'):
    training.train_and_evaluate(config, workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ckpt.latest_step() == 4
  ckpt.close()


@pytest.mark.parametrize('adversarial', ['fgsm', 'pgd', 'ddn'])
def test_adversarial_training_uses_adversarial_inputs(adversarial):
  config, recipe, state = _tiny(decoder='none')
  model = recipe.model
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0.2, 0.8, size=(8, 28, 28, 1)), jnp.float32)
  # Labels = the model's own predictions, so that every example starts correctly classified
  # (an example misclassified already is its own minimal-norm adversarial for DDN).
  y = jnp.argmax(model.apply(state.variables, x, method='classify'), -1)
  # A small eps: on this untrained net the clean CE along the FGSM direction peaks near
  # eps = 0.01 and falls beyond it (a sign step of 0.1 overshoots the linear regime).
  eps = 0.01
  kwargs = dict(model=model, adversarial=adversarial, eps=eps, steps=3, max_norm=1.0)
  x_adv = jax.jit(functools.partial(objectives.craft_adversarial, **kwargs))(
      state, x, y, jax.random.key(0))
  delta = np.asarray(x_adv - x)
  assert np.abs(delta).max() > 0
  if adversarial == 'ddn':
    assert np.sqrt((delta ** 2).sum(axis=(1, 2, 3))).max() <= 1.0 + 1e-4
  else:
    assert np.abs(delta).max() <= eps + 1e-6
  adv_config = config.copy_and_resolve_references()
  adv_config.train.update(adversarial=adversarial, adv_eps=eps, adv_steps=3, adv_max_norm=1.0)
  step = jax.jit(_step(_recipe(adv_config)))
  _, metrics = step(state, x, y, jnp.ones(2), jax.random.key(0))
  # The training loss is the CE of the crafted inputs (FGSM: averaged with the clean CE), which
  # is higher than the clean CE of the same parameters.
  assert float(metrics['ce']) > float(metrics['clean_ce'])
  clean_step = jax.jit(_step(recipe))
  _, clean_metrics = clean_step(state, x, y, jnp.ones(2), jax.random.key(0))
  np.testing.assert_allclose(float(clean_metrics['ce']), float(metrics['clean_ce']), rtol=1e-5)


def test_init_from_starts_from_a_trained_classifier(tmp_path):
  plain = quickstart.get_config('smoke')
  plain.model.decoder = 'none'
  src_dir = str(tmp_path / 'plain')
  src = training.train_and_evaluate(plain, src_dir)

  config = quickstart.get_config('smoke')
  config.model.shared_blocks = 2  # so that the AE owns copies of blocks E_2, E_3
  config.train.init_from = src_dir
  ds = data_lib.dataset_of(config)
  setup = recipes.make_recipe(config, ds, 4)
  state = jax.jit(setup.init)(jax.random.key(1))
  warm = training.warm_start(state, config, setup.tx)
  want = registry.build(saved_runs.config_of_run(src_dir), src_dir, ds).variables
  chex.assert_trees_all_equal(warm.params['classifier'], want['params']['classifier'])
  chex.assert_trees_all_equal(warm.batch_stats['classifier'], want['batch_stats']['classifier'])
  owned = [n for n in warm.params if n.startswith('ae_E')]
  assert owned  # the AE-owned encoder copies start as the trained classifier's blocks
  for name in owned:
    chex.assert_trees_all_equal(warm.params[name], want['params']['classifier'][name[3:]])
  for name in warm.params:  # the decoder keeps its own fresh initialisation
    if name != 'classifier' and not name.startswith('ae_E'):
      chex.assert_trees_all_equal(warm.params[name], state.params[name])
  # Through the trainer: before any step the run classifies exactly as its source does.
  config.train.num_epochs = 0
  got = training.train_and_evaluate(config, str(tmp_path / 'ours'))
  assert got['correct'] == src['correct'] and got['seen'] == src['seen']
  # A different classifier is refused, naming the field.
  config.model.width = 8
  with pytest.raises(ValueError, match=r'config\.model\.width'):
    training.warm_start(state, config, setup.tx)
  config.model.width = plain.model.width
  config.model.padding = 'same'  # same parameter shapes, another function
  with pytest.raises(ValueError, match=r'config\.model\.padding'):
    training.warm_start(state, config, setup.tx)


def test_initial_state_compiled_at_a_low_level_has_the_default_levels_bits():
  """parallel.initial_state compiles at XLA backend level 1 (5-8x faster for a ResNet-18 here):
  the same values as the default level for every initialiser kind the lab's models use (flax's
  default truncated normal, the PyTorch-style uniform, normal, constants, a Bayesian layer's
  log sigma, BatchNorm, optimiser state), up to the last bit of a float32 (the two levels may
  contract a multiply-add differently: here normal(0.02) differs by 1 ulp on 4% of a kernel)."""
  import flax.linen as nn
  import optax
  from defendpp_jax.nn import bayes
  from defendpp_jax.nn.conv import torch_init

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(16, (4, 4), strides=2)(x)                       # truncated normal
      x = nn.relu(nn.BatchNorm(use_running_average=False)(x))
      x = nn.Conv(16, (3, 3), kernel_init=torch_init)(x)          # uniform
      x = bayes.BayesConv(8, (3, 3))(x)                           # mu uniform, log sigma const
      x = nn.ConvTranspose(8, (4, 4), kernel_init=nn.initializers.normal(0.02))(x)
      x = x.reshape(x.shape[0], -1)
      return nn.Dense(10)(bayes.BayesDense(32)(x))

  tx = optax.sgd(0.1, momentum=0.9)

  def init(key):  # what a recipe's initial state keeps (not the layers' sown KL sums)
    variables = Net().init({'params': key, 'noise': key}, jnp.zeros((2, 28, 28, 1)))
    return variables['params'], variables['batch_stats'], tx.init(variables['params'])

  mesh = parallel.make_mesh()
  key = jax.random.key(3)
  low = parallel.initial_state(init, key, mesh)
  default = jax.jit(init)(key)
  leaves_low, leaves_default = jax.tree.leaves(low), jax.tree.leaves(default)
  assert len(leaves_low) == len(leaves_default) > 10
  exact = 0
  for a, b in zip(leaves_low, leaves_default):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    exact += bool((a == b).all())
  assert exact >= len(leaves_low) // 2  # most leaves bit for bit (zeros, constants, uniform)
  assert parallel.INIT_COMPILER_OPTIONS == {'xla_backend_optimization_level': 1}
