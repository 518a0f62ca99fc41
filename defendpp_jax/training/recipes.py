"""What a run trains: a Recipe per `config.defense.name`, and the one training step they share.

Usage:
  recipe = make_recipe(config, ds, steps_per_epoch)
  state = recipe.init(key)
  state, metrics = train_step(state, images, labels, weights, key, recipe=recipe)

A recipe names its model, optimiser (optionally with frozen parts: `optim.freeze`), an optional
`prepare` (work outside the gradient, e.g. adversarial crafting), its loss as named terms
(`loss` returns {name: scalar}, summed with the per-epoch `phase` weights in `term_names` order),
an optional `post_update` (a projection after each step, e.g. Parseval's retraction) and an
optional `report` (entries of train_summary.json computed from the final parameters). A new
training-time defence is a new recipe (or new terms), not a branch in the loop. Pre-processors
are trained in front of a frozen classifier: `frozen` variables reach `prepare` and `loss` as an
argument of the jitted step, never as trainable parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from defendpp_jax import data as data_lib
from defendpp_jax import losses
from defendpp_jax import protocol
from defendpp_jax.defences import classifier as classifier_lib
from defendpp_jax.defences import comdefend
from defendpp_jax.defences import hgd
from defendpp_jax.defences import noisy_layers
from defendpp_jax.defences import registry
from defendpp_jax.nn import denoisers
from defendpp_jax.runs import saved
from defendpp_jax.runs.state import TrainState
from defendpp_jax.training import objectives
from defendpp_jax.training import optim

# fold_in constant of the post-update transform's key (distinct from the loss's streams).
_POST_UPDATE = 0x905D

# (params, state, images, labels, key, prepared, frozen) -> (terms, new batch_stats, metrics)
LossFn = Callable[..., tuple[dict[str, jax.Array], Any, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How one kind of run trains (see the module docstring)."""
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init: Callable[[jax.Array], TrainState]
  loss: LossFn
  term_names: tuple[str, ...]
  phase: Callable[[int], tuple[tuple[float, ...], str]]  # epoch -> (term weights, phase name)
  prepare: Callable[..., Any] | None = None              # (state, images, labels, key, frozen)
  post_update: Callable[[Any, Any], Any] | None = None    # (params, key) -> params
  frozen: Any = None                                     # variables the loss reads, not trains
  precise_bn: bool = False                                # BN statistics may be re-estimated
  description: str = ''
  report: Callable[[Any], dict[str, Any]] | None = None  # final params -> train_summary entries
  # The recipe's own update instead of `loss` + `tx` (a GAN's critic / generator updates):
  # (state, images, labels, weights, key, frozen) -> (state, metrics with 'loss').
  step: Callable[..., Any] | None = None
  artifacts: Callable[[Any, str], dict[str, Any]] | None = None  # (params, workdir): files


def weighted_sum(terms: dict[str, jax.Array], weights: jax.Array,
                 names: tuple[str, ...]) -> jax.Array:
  """sum_i weights[i] * terms[names[i]], left to right."""
  total = weights[0] * terms[names[0]]
  for i, name in enumerate(names[1:], start=1):
    total = total + weights[i] * terms[name]
  return total


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, weights: jax.Array,
               key: jax.Array, frozen: Any = None, *, recipe: Recipe
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step of `recipe` on a batch; weights: the term weights of this epoch."""
  if recipe.step is not None:
    return recipe.step(state, images, labels, weights, key, frozen)
  step_key = jax.random.fold_in(key, state.step)
  prepared = None
  if recipe.prepare is not None:
    prepared = jax.lax.stop_gradient(recipe.prepare(state, images, labels, step_key, frozen))

  def loss_fn(params):
    terms, batch_stats, metrics = recipe.loss(params, state, images, labels, step_key, prepared,
                                              frozen)
    loss = weighted_sum(terms, weights, recipe.term_names)
    return loss, (batch_stats, {'loss': loss, **metrics})

  grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
  metrics = {**metrics, 'grad_norm': optax.global_norm(grads)}
  updates, opt_state = recipe.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if recipe.post_update is not None:
    params = recipe.post_update(params, jax.random.fold_in(step_key, _POST_UPDATE))
  return TrainState(state.step + 1, params, batch_stats, opt_state), metrics


# ---------------------------------------------------------------------------------------------
# Classifiers: Defend++ (joint / alternating), the plain net, adversarial training.


def copy_shared_into_ae(params, stats) -> tuple[dict, dict]:
  """(params, stats) with every AE-owned encoder block `ae_E{k}` set to the classifier's E_k."""
  params, stats = dict(params), dict(stats)
  for name in params:
    if name.startswith('ae_E'):
      block = name[len('ae_'):]
      params[name] = params['classifier'][block]
      stats[name] = stats['classifier'][block]
  return params, stats


def init_classifier_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                          batch_size: int = 2) -> TrainState:
  """Initial parameters; AE-owned encoder blocks start as copies of the classifier's."""
  variables = model.init({'params': key, 'noise': key},
                         jnp.zeros((batch_size, *model.image_shape), jnp.float32))
  params, stats = copy_shared_into_ae(variables['params'], variables.get('batch_stats', {}))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                    opt_state=tx.init(params))


def defendpp_loss(params, state, images, labels, key, x_adv, frozen, *, model, targets,
                  lambda_ms, full_scale_weight, adversarial):
  """Terms 'ce' (clean, adversarial, or their mean for FGSM training) and 'reconstruction'
  (||I~0 - I0||^2 weighted by full_scale_weight + lambda sum_m ||I~m - Im||^2, on clean images)."""
  del frozen
  (logits, recs), new_vars = model.apply(
      {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
      mutable=['batch_stats'], rngs={'noise': key})
  ce = clean_ce = losses.cross_entropy(logits, labels)
  batch_stats = new_vars['batch_stats']
  if x_adv is not None:
    adv_logits, adv_vars = model.apply(
        {'params': params, 'batch_stats': batch_stats}, x_adv, train=True,
        mutable=['batch_stats'], method='classify')
    batch_stats = adv_vars['batch_stats']
    adv_ce = losses.cross_entropy(adv_logits, labels)
    ce = 0.5 * (clean_ce + adv_ce) if adversarial == 'fgsm' else adv_ce
  rec_full, rec_ms = losses.reconstruction(recs, images, targets)
  terms = {'ce': ce, 'reconstruction': full_scale_weight * rec_full + lambda_ms * rec_ms}
  metrics = {'ce': ce, 'clean_ce': clean_ce, 'rec_full': rec_full, 'rec_ms': rec_ms,
             'correct': jnp.sum(jnp.argmax(logits, -1) == labels), 'seen': labels.shape[0]}
  return terms, batch_stats, metrics


def classifier_phase(config: ml_collections.ConfigDict, epoch: int
                     ) -> tuple[tuple[float, float], str]:
  """((w_ce, w_rec), phase name) of `epoch` (paper Sec. 3.4).

  'alternating': cycles of AE-alone epochs then classifier-alone epochs, then joint learning.
  The shared blocks are one set of parameters, so the paper's "copy the encoder weights into the
  classifier and back" happens by construction.
  """
  if config.model.decoder == 'none':
    return (1.0, 0.0), 'classifier'
  if config.train.schedule == 'alternating':
    alt = config.train.alternating
    period = alt.ae_epochs + alt.cls_epochs
    if epoch < alt.cycles * period:
      return ((0.0, 1.0), 'ae') if epoch % period < alt.ae_epochs else ((1.0, 0.0), 'classifier')
  return (1.0, 1.0), 'joint'


def classifier_recipe(config: ml_collections.ConfigDict, ds: data_lib.Dataset,
                      steps_per_epoch: int) -> Recipe:
  model = classifier_lib.module_of(config, ds)
  tx, schedule = optim.sgd_step_decay(config.train, steps_per_epoch)
  tc = config.train
  prepare = None
  if tc.adversarial != 'none':
    craft = functools.partial(
        objectives.craft_adversarial, model=model, adversarial=tc.adversarial,
        eps=protocol.linf_eps(config.data.name, tc.adv_eps), steps=tc.adv_steps,
        max_norm=protocol.ddn_max_norm(config.data.name, tc.adv_max_norm))
    prepare = lambda state, x, y, key, frozen: craft(state, x, y, jax.random.fold_in(key, 1))
  loss = functools.partial(defendpp_loss, model=model, targets=config.loss.targets,
                           lambda_ms=config.loss.lambda_ms,
                           full_scale_weight=config.loss.full_scale_weight,
                           adversarial=tc.adversarial)
  description = (f'{config.model.arch} width {config.model.width}, decoder '
                 f'{config.model.decoder}, shared blocks {config.model.shared_blocks}')
  return Recipe(model, tx, schedule, functools.partial(init_classifier_state, model, tx), loss,
                ('ce', 'reconstruction'), functools.partial(classifier_phase, config),
                prepare=prepare, precise_bn=tc.adversarial == 'none', description=description)


# ---------------------------------------------------------------------------------------------
# Pre-processors trained on clean images (ComDefend).


def init_reformer_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                        image_shape, batch_size: int = 2) -> TrainState:
  """Initial parameters of a pre-processing reformer (no BatchNorm statistics)."""
  variables = model.init({'params': key, 'noise': key},
                         jnp.zeros((batch_size, *image_shape), jnp.float32), train=True)
  params = dict(variables['params'])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                    opt_state=tx.init(params))


def comdefend_loss(params, state, images, labels, key, prepared, frozen, *, model):
  """Terms 'reconstruction' (MSE to x) and 'code_penalty' (mean code^2) of ComDefend."""
  del labels, prepared, frozen
  rec, code = model.apply({'params': params}, images, train=True, rngs={'noise': key})
  mse = jnp.mean(jnp.square(rec - images))
  code_pen = jnp.mean(jnp.square(code))
  return ({'reconstruction': mse, 'code_penalty': code_pen}, state.batch_stats,
          {'rec_full': mse, 'code_penalty': code_pen})


def comdefend_recipe(config: ml_collections.ConfigDict, ds: data_lib.Dataset,
                     steps_per_epoch: int) -> Recipe:
  del steps_per_epoch
  cd = config.defense.comdefend
  model = comdefend.build_reformer(cd, ds.image_shape)
  tx, schedule = optim.adam_constant(cd.learning_rate)
  return Recipe(model, tx, schedule,
                functools.partial(init_reformer_state, model, tx, image_shape=ds.image_shape),
                functools.partial(comdefend_loss, model=model),
                ('reconstruction', 'code_penalty'),
                lambda epoch: ((1.0, cd.code_weight), 'reformer'),
                description=f'comdefend reformer width {cd.width}')


# ---------------------------------------------------------------------------------------------
# Random self-ensemble (Liu et al. 2018): the classifier trained with its noise layers on.

# fold_in constant of the noise draws of RSE's training (distinct from the loss's own streams).
_RSE_STREAM = 0x45E


def rse_recipe(config: ml_collections.ConfigDict, ds: data_lib.Dataset,
               steps_per_epoch: int) -> Recipe:
  """The classifier recipe with RSE's noise before every convolution (as deployed)."""
  if config.model.decoder != 'none':
    raise ValueError("config.defense.name='rse' trains a plain classifier: set "
                     f"config.model.decoder='none' (got {config.model.decoder!r})")
  plain = classifier_recipe(config, ds, steps_per_epoch)
  rc = config.defense.rse

  def loss(params, state, images, labels, key, prepared, frozen):
    k_in, k_layers = jax.random.split(jax.random.fold_in(key, _RSE_STREAM))
    noisy = noisy_layers.rse_input(images, k_in, rc.input_std)
    with noisy_layers.rse_noise(k_layers, 0.0, rc.inner_std):
      return plain.loss(params, state, noisy, labels, key, prepared, frozen)

  # BatchNorm statistics stay the running averages of noisy batches (the deployed inputs);
  # precise-BN re-estimation on clean batches would not match them.
  return dataclasses.replace(
      plain, loss=loss, precise_bn=False,
      description=f'{plain.description}; RSE noise {rc.input_std:g} (pixels) / '
                  f'{rc.inner_std:g} (before every inner convolution)')


# ---------------------------------------------------------------------------------------------
# HGD (Liao et al. 2018): a denoiser trained in front of the frozen target on crafted pairs.


def init_denoiser_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                        image_shape, batch_size: int = 2) -> TrainState:
  variables = model.init(key, jnp.zeros((batch_size, *image_shape), jnp.float32))
  params = dict(variables['params'])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=dict(variables.get('batch_stats', {})),
                    opt_state=tx.init(params))


def hgd_loss(params, state, images, labels, key, prepared, frozen, *, model, target, kind):
  """Term 'guide' of `kind` (defences.hgd.LOSSES); images (N, 2, H, W, C) = [x_adv, x] rows;
  `frozen` = the target's variables, read in inference mode and never trained."""
  del key, prepared
  adv, clean = images[:, 0], images[:, 1]
  denoised, new_vars = model.apply({'params': params, 'batch_stats': state.batch_stats}, adv,
                                   train=True, mutable=['batch_stats'])
  loss, m = hgd.guided_loss(kind, hgd.guide_of(target, frozen), denoised, clean, labels)
  metrics = {'guide': loss, 'rec_full': m['pixel_l1'],
             'correct': jnp.sum(jnp.argmax(m['logits'], -1) == labels), 'seen': labels.shape[0]}
  return {'guide': loss}, new_vars['batch_stats'], metrics


def hgd_recipe(config: ml_collections.ConfigDict, ds: data_lib.Dataset,
               steps_per_epoch: int) -> Recipe:
  """The denoiser of config.defense.hgd, Adam with step decays at fractions of the run."""
  hc = config.defense.hgd
  model = denoisers.build_denoiser(hc.arch, ds.image_shape[-1], tuple(hc.widths),
                                   config.model.conv)
  cls_dir, cls_config = registry.protected_run(config)
  target = classifier_lib.module_of(cls_config, ds)
  frozen, _ = saved.restore_variables(cls_dir)
  tx, schedule = optim.adam_step_decay(hc.learning_rate, hc.lr_decay_fractions,
                                       hc.lr_decay_factor,
                                       steps_per_epoch * config.train.num_epochs)
  return Recipe(model, tx, schedule,
                functools.partial(init_denoiser_state, model, tx, image_shape=ds.image_shape),
                functools.partial(hgd_loss, model=model, target=target, kind=hc.loss),
                ('guide',), lambda epoch: ((1.0,), 'denoiser'), frozen=frozen,
                description=f'hgd {hc.arch} widths {tuple(hc.widths)}, loss {hc.loss}')


def hgd_training_data(config: ml_collections.ConfigDict, ds: data_lib.Dataset,
                      workdir: str) -> data_lib.Dataset:
  """`ds` with its training split replaced by HGD's pairs (N, 2, H, W, C) = [x_adv, x] and
  their true labels, crafted once (config.defense.hgd.trainset) and reused."""
  hc = config.defense.hgd
  crafted_on = hc.crafted_on or config.defense.classifier_workdir
  craft_config = config.copy_and_resolve_references()
  craft_config.defense.classifier_workdir = crafted_on
  target = registry.protected_classifier(craft_config, ds)
  members = []
  for d in hc.ensemble_workdirs:
    run_config = saved.config_of_run(d)
    if run_config.defense.name not in registry.CLASSIFIER_RUNS:
      raise ValueError(f'config.defense.hgd.ensemble_workdirs: {d!r} is a '
                       f'{run_config.defense.name} run, not a classifier run')
    if run_config.data.name != config.data.name:
      raise ValueError(f'config.defense.hgd.ensemble_workdirs: {d!r} was trained on '
                       f'{run_config.data.name}, not {config.data.name}')
    run_config.model.conv = config.model.conv
    members.append(registry.build(run_config, d, ds))
  index = np.arange(len(ds.train_labels))
  if hc.train_classes:
    index = index[np.isin(ds.train_labels, np.asarray(hc.train_classes))]
  index = np.random.default_rng(hc.seed).permutation(index)
  if hc.train_images:
    if hc.train_images > len(index):
      raise ValueError(f'config.defense.hgd.train_images={hc.train_images}: only {len(index)} '
                       'training images (of config.defense.hgd.train_classes) exist')
    index = index[:hc.train_images]
  index = np.sort(index)
  images = ds.train_images[index]
  fingerprint = lambda d: saved.summary_of_run(d)['params_sha256']
  meta = {'target': os.path.abspath(crafted_on), 'target_params': fingerprint(crafted_on),
          'ensemble': [os.path.abspath(d) for d in hc.ensemble_workdirs],
          'ensemble_params': [fingerprint(d) for d in hc.ensemble_workdirs],
          'dataset': config.data.name, 'train_limit': config.data.train_limit,
          'images': len(index), 'classes': list(hc.train_classes), 'seed': hc.seed,
          'variants': list(hc.variants), 'eps_unit': hgd.eps_unit(config.data.name),
          'eps_levels': hgd.EPS_LEVELS}
  path = hc.trainset or os.path.join(workdir, 'hgd_trainset.npz')
  data = hgd.load_or_craft(path, meta, lambda: hgd.craft_training_set(
      target, members, images, unit=hgd.eps_unit(config.data.name), seed=hc.seed,
      variants=tuple(hc.variants), batch_size=config.eval.batch_size, log=print))
  pairs = hgd.training_pairs(data, images)
  return dataclasses.replace(ds, train_images=pairs,
                             train_labels=ds.train_labels[index][data['clean_index']])


RECIPES = {'none': classifier_recipe, 'comdefend': comdefend_recipe, 'rse': rse_recipe,
           'hgd': hgd_recipe}
# Recipes that train on other data than the dataset's training split.
TRAINING_DATA = {'hgd': hgd_training_data}


def training_data(config: ml_collections.ConfigDict, ds: data_lib.Dataset,
                  workdir: str) -> data_lib.Dataset:
  """What a run's batches are drawn from: `ds`, or its recipe's own training set."""
  from defendpp_jax.training import training_defences  # pylint: disable=g-import-not-at-top
  fn = {**TRAINING_DATA, **training_defences.TRAINING_DATA}.get(config.defense.name)
  return ds if fn is None else fn(config, ds, workdir)


def make_recipe(config: ml_collections.ConfigDict, ds: data_lib.Dataset,
                steps_per_epoch: int) -> Recipe:
  """The recipe of `config.defense.name` ('none': the run trains its classifier)."""
  from defendpp_jax.training import gan  # pylint: disable=g-import-not-at-top
  from defendpp_jax.training import training_defences  # pylint: disable=g-import-not-at-top
  known = {**RECIPES, **training_defences.RECIPES, **gan.RECIPES}
  name = config.defense.name
  if name not in known:
    raise ValueError(f'config.defense.name={name!r} trains nothing (it has no recipe; known: '
                     f'{tuple(known)}); evaluate it with python -m launch.evaluate')
  return known[name](config, ds, steps_per_epoch)
