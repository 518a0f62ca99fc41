"""The survey's training-time defences as recipes: distillation, Parseval, Cross-Lipschitz, Deep
Defense, ADP ensembles, Adv-BNN (their fields: config.defense.<name>, runs/defence_fields.py).

Usage:
  python -m launch.train --config=configs/mnist.py --workdir=OUT --config.model.decoder=none \
      --config.defense.name=parseval
  recipe = training.make_recipe(config, ds, steps_per_epoch)   # dispatches here by name

Each is the classifier recipe (recipes.classifier_recipe: same model, optimiser, schedule and
adversarial crafting) with its own loss terms, post-update transform or model:
- distillation: CE of logits / T (the teacher, role 'teacher') or the soft cross-entropy to the
  teacher's softmax at T (the student, on soft labels computed once: `distillation_data`);
  deployed at T = 1.
- parseval: after every step the retraction of each convolution / dense kernel, convex residual
  aggregation (classifier.module_of); its final singular values go to train_summary.json.
- cross_lipschitz, deep_defense: input-gradient regularisers (double back-propagation) on the
  training-mode classifier.
- adp: `members` classifiers in one module (nn.ensemble.Ensemble), the ADP loss.
- adv_bnn: Bayesian layers (nn.bayes), CE + kl_weight x KL / N, PGD crafted on one weight draw.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from defendpp_jax import attacks
from defendpp_jax import data as data_lib
from defendpp_jax import losses
from defendpp_jax import protocol
from defendpp_jax.defences import classifier as classifier_lib
from defendpp_jax.nn import bayes
from defendpp_jax.nn import ensemble as ensemble_lib
from defendpp_jax.runs import saved
from defendpp_jax.training import recipes
from defendpp_jax.training import optim
from defendpp_jax.training import regularisers

ROLES = ('teacher', 'student')
# fold_in constant of the Adv-BNN crafting's weight draw (distinct from the loss's).
_BNN_CRAFT = 0xB2
# fold_in constant of Cross-Lipschitz's random projections.
_CROSS_LIPSCHITZ = 0xC1
# fold_in constant of Deep Defense's choice of examples.
_DEEP_DEFENSE = 0xDD


def _needs_plain_model(config: ml_collections.ConfigDict) -> None:
  if config.model.decoder != 'none':
    raise ValueError(f"config.defense.name={config.defense.name!r} trains a plain classifier: "
                     f"set config.model.decoder='none' (got {config.model.decoder!r})")


def _classify(model, params, state, x, key=None):
  """Training-mode logits and the updated BatchNorm statistics (and sown losses)."""
  (logits, new_vars) = model.apply(
      {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
      mutable=['batch_stats', 'losses'], method='classify',
      rngs=None if key is None else {'noise': key})
  return logits, new_vars


def _metrics(logits, labels, **extra):
  hard = jnp.argmax(labels, -1) if labels.ndim == 2 else labels
  return {'correct': jnp.sum(jnp.argmax(logits, -1) == hard), 'seen': labels.shape[0], **extra}


def _with_loss(config, ds, spe, loss_fn, terms=('ce',), **replace) -> recipes.Recipe:
  """The classifier recipe with `loss_fn(model, params, state, x, y, key, prepared)` ->
  (terms, batch_stats, metrics)."""
  _needs_plain_model(config)
  plain = recipes.classifier_recipe(config, ds, spe)
  model = plain.model

  def loss(params, state, images, labels, key, prepared, frozen):
    del frozen
    return loss_fn(model, params, state, images, labels, key, prepared)

  weights = tuple(1.0 for _ in terms)
  return dataclasses.replace(plain, loss=loss, term_names=terms,
                             phase=lambda epoch: (weights, 'classifier'), **replace)


# ---------------------------------------------------------------------------------------------
# Defensive distillation.


def distillation_recipe(config, ds, spe) -> recipes.Recipe:
  dc = config.defense.distillation
  if dc.role not in ROLES:
    raise ValueError(f'config.defense.distillation.role={dc.role!r} is not one of {ROLES}')
  if not dc.temperature > 0:
    raise ValueError(f'config.defense.distillation.temperature must be > 0, got '
                     f'{dc.temperature}')
  if not dc.loss_scale > 0:
    raise ValueError(f'config.defense.distillation.loss_scale must be > 0, got '
                     f'{dc.loss_scale}')
  t, scale = float(dc.temperature), float(dc.loss_scale)

  def loss_fn(model, params, state, x, y, key, prepared):
    del key
    logits, new = _classify(model, params, state, x if prepared is None else prepared)
    if y.ndim == 2:  # the student: the teacher's softmax at T
      ce = regularisers.soft_cross_entropy(logits / t, y)
    else:
      ce = losses.cross_entropy(logits / t, y)
    return {'ce': scale * ce}, new['batch_stats'], _metrics(logits, y, ce=ce)

  recipe = _with_loss(config, ds, spe, loss_fn)
  return dataclasses.replace(recipe, description=f'{recipe.description}; distillation '
                                                 f'{dc.role} at T={t:g}'
                                                 + ('' if scale == 1 else f', loss x {scale:g}'))


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  teacher = config.copy_and_resolve_references()
  teacher.defense.distillation.role = 'teacher'
  teacher.defense.distillation.teacher_workdir = ''
  return teacher


def distillation_data(config, ds, workdir) -> data_lib.Dataset:
  """The student's training set: the teacher's softmax at T on every training image (N, K),
  the teacher trained first in WORKDIR/teacher unless config.defense.distillation
  .teacher_workdir names one."""
  dc = config.defense.distillation
  if dc.role == 'teacher':
    return ds
  from defendpp_jax.defences import registry  # pylint: disable=g-import-not-at-top
  teacher_dir = dc.teacher_workdir or os.path.join(workdir, 'teacher')
  if not dc.teacher_workdir:
    _train_once(teacher_config(config), teacher_dir)
  t_config = saved.config_of_run(teacher_dir)
  if (t_config.defense.name, t_config.defense.distillation.role) != ('distillation', 'teacher'):
    raise ValueError(f'config.defense.distillation.teacher_workdir={teacher_dir!r} is not a '
                     'distillation teacher run')
  t_config.model.conv = config.model.conv
  teacher = registry.build(t_config, teacher_dir, ds)
  soft = jax.jit(lambda v, x: jax.nn.softmax(teacher.logits(v, x) / dc.temperature))
  out = []
  for x, _, m in data_lib.eval_batches(ds.train_images, ds.train_labels,
                                       config.eval.batch_size):
    out.append(np.asarray(soft(teacher.variables, x))[m])
  return dataclasses.replace(ds, train_labels=np.concatenate(out).astype(np.float32))


def _train_once(config, workdir) -> None:
  """Trains `config` in `workdir` unless a finished run of the same config is there."""
  from defendpp_jax.runs import config as config_lib  # pylint: disable=g-import-not-at-top
  from defendpp_jax.training import loop  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, saved.SUMMARY)
  if os.path.isfile(path):
    with open(path) as f:
      if config_lib.migrate_config(json.load(f)['config']) == config_lib.as_saved_json(config):
        return
  summary = loop.train_and_evaluate(config, workdir)
  if summary.get('preempted'):
    raise RuntimeError(f'the distillation teacher in {workdir} stopped at step '
                       f'{summary["step"]} (saved); the same command resumes it')


# ---------------------------------------------------------------------------------------------
# Parseval networks.


def _kernels(params):
  """{path: kernel} of every convolution (4-D) and dense (2-D) kernel."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(str(getattr(k, 'key', k)) for k in path): leaf for path, leaf in flat
          if str(getattr(path[-1], 'key', '')) == 'kernel' and leaf.ndim in (2, 4)}


def parseval_update(params, key, beta: float, row_fraction: float):
  """Every kernel retracted toward orthonormal rows (regularisers.parseval_retraction)."""
  def update(path, leaf):
    name = str(getattr(path[-1], 'key', ''))
    if name != 'kernel' or leaf.ndim not in (2, 4):
      return leaf
    k = jax.random.fold_in(key, zlib.crc32('/'.join(str(getattr(p, 'key', p)) for p in path)
                                           .encode()) % (2**31))
    w, restore = regularisers.as_matrix(leaf)
    return restore(regularisers.parseval_retraction(w, beta, key=k, row_fraction=row_fraction))
  return jax.tree_util.tree_map_with_path(update, params)


def singular_values_report(params) -> dict[str, Any]:
  """Each kernel's largest singular value (as the (out, in) matrix the retraction acts on)."""
  out = {}
  for path, leaf in _kernels(params).items():
    w, _ = regularisers.as_matrix(jnp.asarray(leaf))
    s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    out['/'.join(path)] = {'max': float(s[0]), 'min': float(s[-1]), 'shape': list(w.shape)}
  worst = max((v['max'] for v in out.values()), default=float('nan'))
  return {'parseval': {'largest_singular_value': worst, 'layers': out}}


def parseval_recipe(config, ds, spe) -> recipes.Recipe:
  pc = config.defense.parseval
  if not 0 < pc.row_fraction <= 1:
    raise ValueError(f'config.defense.parseval.row_fraction must be in (0, 1], got '
                     f'{pc.row_fraction}')
  if not pc.beta >= 0:
    raise ValueError(f'config.defense.parseval.beta must be >= 0, got {pc.beta}')
  _needs_plain_model(config)
  plain = recipes.classifier_recipe(config, ds, spe)
  return dataclasses.replace(
      plain, post_update=functools.partial(parseval_update, beta=pc.beta,
                                           row_fraction=pc.row_fraction),
      report=singular_values_report,
      description=f'{plain.description}; Parseval beta {pc.beta:g}, rows {pc.row_fraction:g}, '
                  'convex residuals')


# ---------------------------------------------------------------------------------------------
# Input-gradient regularisers: Cross-Lipschitz, Deep Defense.


def _regularised(config, ds, spe, name, reg_fn, weight, keyed=False) -> recipes.Recipe:
  """`reg_fn(logits_fn, x, y)` (or `(logits_fn, x, y, key)` when `keyed`) weighted into the loss."""
  # Second-order gradients (of an input gradient) run on XLA's convolutions: the oneDNN ones
  # are first-order only. The deployed network is the same function (to float tolerance).
  config = config.copy_and_resolve_references()
  config.model.conv = 'xla'

  def loss_fn(model, params, state, x, y, key, prepared):
    logits, new = _classify(model, params, state, x if prepared is None else prepared)
    ce = losses.cross_entropy(logits, y)
    # the regulariser on clean images, the training-mode classifier (statistics discarded)
    logits_fn = lambda z: _classify(model, params, state, z)[0]
    reg = reg_fn(logits_fn, x, y, key) if keyed else reg_fn(logits_fn, x, y)
    return ({'ce': ce, name: weight * reg}, new['batch_stats'],
            _metrics(logits, y, ce=ce, **{name: reg}))

  recipe = _with_loss(config, ds, spe, loss_fn, terms=('ce', name))
  return dataclasses.replace(recipe, description=f'{recipe.description}; {name} x {weight:g}')


def cross_lipschitz_recipe(config, ds, spe) -> recipes.Recipe:
  cl = config.defense.cross_lipschitz
  if not isinstance(cl.projections, int) or cl.projections < 0:
    raise ValueError('config.defense.cross_lipschitz.projections must be an integer >= 0 '
                     f'(0 = exact), got {cl.projections!r}')
  if cl.projections == 0:
    reg = lambda f, x, y, key: regularisers.cross_lipschitz(f, x)
  else:
    reg = lambda f, x, y, key: regularisers.cross_lipschitz_projected(
        f, x, jax.random.fold_in(key, _CROSS_LIPSCHITZ), cl.projections)
  return _regularised(config, ds, spe, 'cross_lipschitz', reg, cl.weight, keyed=True)


def deep_defense_recipe(config, ds, spe) -> recipes.Recipe:
  dd = config.defense.deep_defense
  if not isinstance(dd.examples, int) or dd.examples < 0:
    raise ValueError('config.defense.deep_defense.examples must be an integer >= 0 (0 = the '
                     f'whole batch), got {dd.examples!r}')
  norm_eps = dd.norm_eps
  if norm_eps == -1:
    if config.data.name not in regularisers.DEEPFOOL_NORM_EPS:
      raise ValueError(f'config.defense.deep_defense.norm_eps=-1 (the reference\'s guard) is '
                       f'defined for {sorted(regularisers.DEEPFOOL_NORM_EPS)}, not '
                       f'config.data.name={config.data.name!r}: give it a value >= 0')
    norm_eps = regularisers.DEEPFOOL_NORM_EPS[config.data.name]
  elif not norm_eps >= 0:
    raise ValueError('config.defense.deep_defense.norm_eps must be >= 0 or -1 (the '
                     f'reference\'s), got {dd.norm_eps}')
  reg = functools.partial(regularisers.deep_defense_regulariser, steps=dd.steps, c=dd.c,
                          d=dd.d, overshoot=dd.overshoot, norm_eps=norm_eps)

  def subset_reg(f, x, y, key):
    if not dd.examples or dd.examples >= x.shape[0]:
      return reg(f, x, y)
    idx = jax.random.choice(jax.random.fold_in(key, _DEEP_DEFENSE), x.shape[0],
                            (dd.examples,), replace=False)
    return reg(f, jnp.take(jnp.asarray(x), idx, axis=0), jnp.take(jnp.asarray(y), idx, axis=0))
  return _regularised(config, ds, spe, 'deep_defense', subset_reg, dd.weight, keyed=True)


# ---------------------------------------------------------------------------------------------
# ADP ensembles.


def adp_recipe(config, ds, spe) -> recipes.Recipe:
  ac = config.defense.adp
  if not isinstance(ac.members, int) or ac.members < 2:
    raise ValueError(f'config.defense.adp.members must be an integer >= 2, got {ac.members!r}')
  _needs_plain_model(config)
  if config.train.adversarial != 'none':
    raise ValueError('config.defense.name=adp trains on clean images (as its authors\' main '
                     f'results): config.train.adversarial={config.train.adversarial!r}')
  plain = recipes.classifier_recipe(config, ds, spe)
  model = ensemble_lib.Ensemble(classifier_lib.module_of(config, ds), ac.members)

  def loss(params, state, images, labels, key, prepared, frozen):
    del key, prepared, frozen
    member_logits, new = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                     images, train=True, mutable=['batch_stats'])
    total, m = regularisers.adp_loss(member_logits, labels, alpha=ac.alpha, beta=ac.beta)
    mean = jnp.log(jnp.mean(jax.nn.softmax(member_logits), 0))
    return {'adp': total}, new['batch_stats'], _metrics(mean, labels, **m)

  return dataclasses.replace(
      plain, model=model, loss=loss, term_names=('adp',),
      init=functools.partial(recipes.init_classifier_state, model, plain.tx),
      phase=lambda epoch: ((1.0,), 'ensemble'),
      description=f'ADP ensemble of {ac.members} x {plain.description}, alpha {ac.alpha:g}, '
                  f'beta {ac.beta:g}')


# ---------------------------------------------------------------------------------------------
# Adv-BNN.


# xuanqing94/BayesianDefense, main_adv_vi.py: epochs [80, 60, 40, 20], a new Adam at lr / 10 each.
ADV_BNN_DECAY_FRACTIONS = (0.4, 0.7, 0.9)


def adv_bnn_recipe(config, ds, spe) -> recipes.Recipe:
  bc, tc = config.defense.adv_bnn, config.train
  _needs_plain_model(config)
  n_train = len(ds.train_labels)
  plain = recipes.classifier_recipe(config, ds, spe)
  model = plain.model
  eps = protocol.linf_eps(config.data.name, tc.adv_eps)

  def prepare(state, x, y, key, frozen):
    del frozen
    k = jax.random.fold_in(key, _BNN_CRAFT)
    logits_fn = lambda z: _classify(model, state.params, state, z, k)[0]
    if tc.adversarial == 'pgd':
      return attacks.pgd(logits_fn, x, y, eps=eps, step_size=2.5 * eps / tc.adv_steps,
                         num_steps=tc.adv_steps, key=jax.random.fold_in(k, 1))
    if tc.adversarial == 'fgsm':
      return attacks.fgsm(logits_fn, x, y, eps=eps)
    raise ValueError(f'config.train.adversarial={tc.adversarial!r}: Adv-BNN crafts with pgd '
                     '(or fgsm; none = the plain BNN)')

  def loss(params, state, images, labels, key, prepared, frozen):
    del frozen
    x = images if prepared is None else prepared
    logits, new = _classify(model, params, state, x, key)
    ce = losses.cross_entropy(logits, labels)
    kl = bayes.collected_kl(new) / n_train
    return ({'ce': ce, 'kl': bc.kl_weight * kl}, new['batch_stats'],
            _metrics(logits, labels, ce=ce, kl=kl))

  if bc.optimizer == 'adam':
    # The reference's: Adam, no weight decay, lr / 10 after 80, 140 and 180 of 200 epochs.
    tx, schedule = optim.adam_step_decay(bc.learning_rate, ADV_BNN_DECAY_FRACTIONS, 0.1,
                                         spe * tc.num_epochs)
    opt = f'Adam {bc.learning_rate:g}'
  elif bc.optimizer == 'sgd':
    # No weight decay on the log standard deviations (it would pull every sigma toward 1); the
    # means decay as the plain classifier's weights.
    not_log_sigma = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: not str(getattr(path[-1], 'key', '')).endswith('log_sigma'), params)
    tx, schedule = optim.sgd_step_decay(tc, spe, decay_mask=not_log_sigma)
    opt = 'config.train\'s SGD'
  else:
    raise ValueError(f'config.defense.adv_bnn.optimizer must be adam or sgd, got '
                     f'{bc.optimizer!r}')
  weights = (1.0, 1.0)
  return dataclasses.replace(
      plain, tx=tx, schedule=schedule,
      init=functools.partial(recipes.init_classifier_state, model, tx),
      loss=loss, term_names=('ce', 'kl'), phase=lambda epoch: (weights, 'classifier'),
      prepare=prepare if tc.adversarial != 'none' else None, precise_bn=False,
      description=f'{plain.description}; Bayesian layers (prior {bc.prior_sigma:g}), KL x '
                  f'{bc.kl_weight:g} / {n_train}, {opt}')


RECIPES = {'distillation': distillation_recipe, 'parseval': parseval_recipe,
           'cross_lipschitz': cross_lipschitz_recipe, 'deep_defense': deep_defense_recipe,
           'adp': adp_recipe, 'adv_bnn': adv_bnn_recipe}
TRAINING_DATA = {'distillation': distillation_data}
