"""Joint (and alternating) training of Defend++ and its baselines, data-parallel on all devices.

Usage:
  summary = train_and_evaluate(config, workdir)   # resumes from workdir's latest checkpoint

One jitted step runs on a ('data',) mesh of every device: the global batch is sharded along
'data', parameters and optimizer state are replicated, and XLA inserts the cross-device means, so
BatchNorm statistics and gradients are those of the whole global batch on 1 or N devices.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import signal
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from defendpp_jax import attacks
from defendpp_jax import checkpointing
from defendpp_jax import data as data_lib
from defendpp_jax import defenses
from defendpp_jax import frequency
from defendpp_jax import losses
from defendpp_jax import models

SCHEDULES = ('joint', 'alternating')
THREAT_MODELS = ('white_box', 'grey_box', 'transfer')
ADVERSARIAL = ('none', 'fgsm', 'pgd', 'ddn')
# Adversarial-training budgets when config.train.adv_eps / adv_max_norm are 0: the evaluation's
# L-inf eps per dataset (paper Sec. 4.1) and Rony et al.'s DDN norms (MNIST 2.4, CIFAR-10 1.0).
ADV_EPS = {'mnist': 0.2, 'digits': 0.2, 'cifar10': 0.05}
ADV_MAX_NORM = {'mnist': 2.4, 'digits': 2.4, 'cifar10': 1.0}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    return {'params': self.params, 'batch_stats': self.batch_stats}


# ---------------------------------------------------------------------------------------------
# Configuration checks.


def _choice(config, path: str, choices) -> None:
  value = config
  for part in path.split('.'):
    value = value[part]
  if value not in choices:
    raise ValueError(f'config.{path}={value!r} is not one of {tuple(choices)}')


def dataset_of(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """The dataset `config.data` names (from its data_dir, else tfds), with its limits."""
  return data_lib.load_dataset(config.data.name, config.data.data_dir or None,
                               config.data.train_limit or None, config.data.test_limit or None)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the field, on a config value the trainer cannot run."""
  _choice(config, 'data.name', data_lib.DATASETS)
  _choice(config, 'model.arch', models.ARCHS)
  _choice(config, 'model.decoder', models.DECODERS)
  _choice(config, 'model.conv', models.CONV_BACKENDS)
  _choice(config, 'model.padding', models.PADDINGS)
  _choice(config, 'loss.targets', frequency.TARGET_KINDS)
  _choice(config, 'train.schedule', SCHEDULES)
  _choice(config, 'train.adversarial', ADVERSARIAL)
  _choice(config, 'defense.name', defenses.DEFENSES)
  _choice(config, 'eval.threat_model', THREAT_MODELS)
  if config.eval.threat_model == 'grey_box' and config.defense.name == 'none':
    raise ValueError("config.eval.threat_model='grey_box' needs a pre-processing defence "
                     "(config.defense.name='comdefend'): without one nothing is hidden")
  if config.eval.threat_model == 'transfer' and not config.eval.source_workdir:
    raise ValueError("config.eval.threat_model='transfer' needs config.eval.source_workdir: "
                     'the trained run the adversarials are crafted on')
  max_shared = 5 if config.model.arch == 'vgg16' else 4
  if not 1 <= config.model.shared_blocks <= max_shared:
    raise ValueError(f'config.model.shared_blocks={config.model.shared_blocks} must be in '
                     f'[1, {max_shared}] for {config.model.arch}')
  positive = {'model.width': config.model.width, 'train.batch_size': config.train.batch_size,
              'train.learning_rate': config.train.learning_rate,
              'eval.batch_size': config.eval.batch_size}
  for name, value in positive.items():
    if not value > 0:
      raise ValueError(f'config.{name} must be > 0, got {value}')
  non_negative = {'train.num_epochs': config.train.num_epochs,
                  'loss.lambda_ms': config.loss.lambda_ms,
                  'loss.full_scale_weight': config.loss.full_scale_weight,
                  'train.noise_std': config.train.noise_std,
                  'train.precise_bn_batches': config.train.get('precise_bn_batches', 0),
                  'train.weight_decay': config.train.weight_decay}
  for name, value in non_negative.items():
    if not value >= 0:
      raise ValueError(f'config.{name} must be >= 0, got {value}')
  num_devices = jax.device_count()
  if config.train.batch_size % num_devices:
    raise ValueError(f'config.train.batch_size={config.train.batch_size} is not divisible by '
                     f'the {num_devices} devices')


# ---------------------------------------------------------------------------------------------
# Model, optimizer, state.


def build(config: ml_collections.ConfigDict, ds: data_lib.Dataset) -> models.DefendPP:
  return models.build_model(config.model, ds.num_classes, ds.image_shape, ds.mean, ds.std,
                            noise_std=config.train.noise_std)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum and (PyTorch-style, coupled) weight decay; step-decay learning rate.

  The decay epochs are those of a `lr_schedule_epochs`-long run (the paper's 250 / 300 epochs),
  stretched or shrunk to the `num_epochs` actually trained, so that a shortened run still
  anneals at the same fractions of its length (0: no rescaling).
  """
  tc = config.train
  horizon = tc.get('lr_schedule_epochs', 0)
  scale = tc.num_epochs / horizon if horizon else 1.0
  boundaries = {}
  for e in tc.lr_decay_epochs:
    b = int(round(float(e) * scale * steps_per_epoch))
    if b > 0:
      boundaries[b] = boundaries.get(b, 1.0) * tc.lr_decay_factor
  schedule = optax.piecewise_constant_schedule(tc.learning_rate, boundaries)
  tx = optax.chain(optax.add_decayed_weights(tc.weight_decay),
                   optax.sgd(schedule, momentum=tc.momentum))
  return tx, schedule


def init_state(model: models.DefendPP, tx: optax.GradientTransformation, key: jax.Array,
               batch_size: int = 2) -> TrainState:
  """Initial parameters; AE-owned encoder blocks start as copies of the classifier's."""
  variables = model.init({'params': key, 'noise': key},
                         jnp.zeros((batch_size, *model.image_shape), jnp.float32))
  params, stats = _copy_shared_into_ae(variables['params'], variables.get('batch_stats', {}))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                    opt_state=tx.init(params))


def _copy_shared_into_ae(params, stats) -> tuple[dict, dict]:
  """(params, stats) with every AE-owned encoder block `ae_E{k}` set to the classifier's E_k."""
  params, stats = dict(params), dict(stats)
  for name in params:
    if name.startswith('ae_E'):
      block = name[len('ae_'):]
      params[name] = params['classifier'][block]
      stats[name] = stats['classifier'][block]
  return params, stats


def warm_start(state: TrainState, config: ml_collections.ConfigDict, ds: data_lib.Dataset,
               tx: optax.GradientTransformation) -> TrainState:
  """`state` with the classifier of the finished run `config.train.init_from`.

  The classifier's parameters and BatchNorm statistics are copied, and so are the AE-owned
  encoder blocks (which start as copies of the classifier's, as in `init_state`); the decoder
  keeps its fresh initialisation and the optimizer state starts anew. The source must be the
  same classifier: same dataset, architecture, width, stem and padding.
  """
  from defendpp_jax import evaluation  # pylint: disable=g-import-not-at-top
  src_dir = config.train.init_from
  if config.defense.name != 'none':
    raise ValueError(f'config.train.init_from initialises a classifier; a '
                     f'config.defense.name={config.defense.name!r} run trains a reformer')
  src_config = evaluation.config_of_run(src_dir)
  evaluation.check_same_classifier(config, src_dir, 'config.train.init_from')
  if src_config.defense.name != 'none':
    raise ValueError(f'config.train.init_from={src_dir!r} is a {src_config.defense.name} '
                     'reformer run, not a classifier run')
  src = evaluation.load_model(src_config, src_dir, ds).variables
  params, stats = _copy_shared_into_ae(
      {**state.params, 'classifier': src['params']['classifier']},
      {**state.batch_stats, 'classifier': src['batch_stats']['classifier']})
  return state.replace(params=params, batch_stats=stats, opt_state=tx.init(params))


def init_reformer_state(model: defenses.ComDefend, tx: optax.GradientTransformation,
                        key: jax.Array, batch_size: int = 2, image_shape=None) -> TrainState:
  """Initial parameters of a pre-processing reformer (no BatchNorm statistics)."""
  variables = model.init({'params': key, 'noise': key},
                         jnp.zeros((batch_size, *image_shape), jnp.float32), train=True)
  params = dict(variables['params'])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                    opt_state=tx.init(params))


def reformer_train_step(state: TrainState, images: jax.Array, labels: jax.Array,
                        weights: jax.Array, key: jax.Array, *, model: defenses.ComDefend,
                        tx: optax.GradientTransformation, code_weight: float
                        ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step of a reformer on clean images (labels and phase weights are unused)."""
  del labels, weights
  step_key = jax.random.fold_in(key, state.step)

  def loss_fn(params):
    rec, code = model.apply({'params': params}, images, train=True, rngs={'noise': step_key})
    loss, terms = defenses.reformer_loss(rec, code, images, code_weight)
    return loss, {'loss': loss, **terms}

  grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(state.step + 1, params, state.batch_stats, opt_state), metrics


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run trains, selected by config: Defend++ / a baseline classifier, or a reformer."""
  model: Any                      # models.DefendPP or defenses.ComDefend
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init: Callable[[jax.Array], TrainState]
  step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]  # (state, x, y, weights, key)


def make_setup(config: ml_collections.ConfigDict, ds: data_lib.Dataset,
               steps_per_epoch: int) -> Setup:
  if config.defense.name == 'comdefend':
    model = defenses.build_reformer(config.defense, ds.image_shape)
    lr = config.defense.learning_rate
    tx, schedule = optax.adam(lr, b1=0.5, b2=0.999), optax.constant_schedule(lr)
    return Setup(model, tx, schedule,
                 functools.partial(init_reformer_state, model, tx,
                                   image_shape=ds.image_shape),
                 functools.partial(reformer_train_step, model=model, tx=tx,
                                   code_weight=config.defense.code_weight))
  model = build(config, ds)
  tx, schedule = make_optimizer(config, steps_per_epoch)
  step = functools.partial(
      train_step, model=model, tx=tx, targets=config.loss.targets,
      lambda_ms=config.loss.lambda_ms, full_scale_weight=config.loss.full_scale_weight,
      adversarial=config.train.adversarial,
      adv_eps=config.train.adv_eps or ADV_EPS.get(config.data.name, 0.05),
      adv_steps=config.train.adv_steps,
      adv_max_norm=config.train.adv_max_norm or ADV_MAX_NORM.get(config.data.name, 1.0))
  return Setup(model, tx, schedule, functools.partial(init_state, model, tx), step)


def phase_weights(config: ml_collections.ConfigDict, epoch: int) -> tuple[float, float, str]:
  """(classification weight, reconstruction weight, phase name) of `epoch` (paper Sec. 3.4).

  'alternating': cycles of AE-alone epochs then classifier-alone epochs, then joint learning.
  The shared blocks are one set of parameters, so the paper's "copy the encoder weights into the
  classifier and back" happens by construction.
  """
  if config.defense.name != 'none':
    return 0.0, 1.0, 'reformer'
  if config.model.decoder == 'none':
    return 1.0, 0.0, 'classifier'
  if config.train.schedule == 'alternating':
    alt = config.train.alternating
    period = alt.ae_epochs + alt.cls_epochs
    if epoch < alt.cycles * period:
      return (0.0, 1.0, 'ae') if epoch % period < alt.ae_epochs else (1.0, 0.0, 'classifier')
  return 1.0, 1.0, 'joint'


# ---------------------------------------------------------------------------------------------
# Steps.


def craft_adversarial(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array,
                      *, model: models.DefendPP, adversarial: str, eps: float, steps: int,
                      max_norm: float, step_size_factor: float = 2.5) -> jax.Array:
  """Adversarial training inputs against the current classifier.

  The attack sees the classifier in training mode (batch statistics, as the model it updates),
  but its BatchNorm statistic updates are discarded: crafting must not move the running averages.
  """
  def logits_fn(x):
    return model.apply(state.variables, x, train=True, mutable=['batch_stats'],
                       method='classify')[0]

  if adversarial == 'fgsm':
    return attacks.fgsm(logits_fn, images, labels, eps=eps)
  if adversarial == 'pgd':
    return attacks.pgd(logits_fn, images, labels, eps=eps, step_size=step_size_factor * eps /
                       steps, num_steps=steps, key=key)
  if adversarial == 'ddn':
    return attacks.ddn(logits_fn, images, labels, num_steps=steps, max_norm=max_norm)
  raise ValueError(f'config.train.adversarial={adversarial!r} is not one of {ADVERSARIAL}')


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, weights: jax.Array,
               key: jax.Array, *, model: models.DefendPP, tx: optax.GradientTransformation,
               targets: str, lambda_ms: float, full_scale_weight: float,
               adversarial: str = 'none', adv_eps: float = 0.0, adv_steps: int = 10,
               adv_max_norm: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on L = w_ce CE + w_rec (||I~0 - I0||^2 + lambda sum_m ||I~m - Im||^2).

  With adversarial training, CE is taken on adversarial inputs crafted against the current model
  ('pgd': Madry et al.; 'ddn': Rony et al.) or is the mean of clean and FGSM CE ('fgsm':
  Goodfellow et al., alpha = 0.5); the reconstruction loss always uses the clean images.
  """
  step_key = jax.random.fold_in(key, state.step)
  x_adv = None
  if adversarial != 'none':
    x_adv = jax.lax.stop_gradient(craft_adversarial(
        state, images, labels, jax.random.fold_in(step_key, 1), model=model,
        adversarial=adversarial, eps=adv_eps, steps=adv_steps, max_norm=adv_max_norm))

  def loss_fn(params):
    (logits, recs), new_vars = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'], rngs={'noise': step_key})
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
    loss = weights[0] * ce + weights[1] * (full_scale_weight * rec_full + lambda_ms * rec_ms)
    metrics = {'loss': loss, 'ce': ce, 'clean_ce': clean_ce, 'rec_full': rec_full,
               'rec_ms': rec_ms, 'correct': jnp.sum(jnp.argmax(logits, -1) == labels),
               'seen': labels.shape[0]}
    return loss, (batch_stats, metrics)

  grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(state.step + 1, params, batch_stats, opt_state), metrics


def batch_statistics(model: models.DefendPP) -> Callable:
  """jit(params, batch_stats, images, key) -> the BatchNorm statistics of this batch alone.

  The training-mode forward of the whole model (classifier, AE-owned blocks, decoder) from
  zero running averages: each returned average is (1 - BN_MOMENTUM) x the batch's statistic.
  """
  def stats(params, batch_stats, images, key):
    zeros = jax.tree_util.tree_map(jnp.zeros_like, batch_stats)
    _, new = model.apply({'params': params, 'batch_stats': zeros}, images, train=True,
                         mutable=['batch_stats'], rngs={'noise': key})
    return jax.tree_util.tree_map(lambda s: s / (1.0 - models.BN_MOMENTUM),
                                  new['batch_stats'])
  return jax.jit(stats)


def precise_batch_stats(state: TrainState, model: models.DefendPP,
                        batches: Iterator[tuple[np.ndarray, np.ndarray]], mesh: Mesh,
                        key: jax.Array) -> tuple[Any, int]:
  """(statistics, number of batches): every BatchNorm's mean and variance averaged over
  `batches` with the weights of `state` ("precise BN")."""
  fn = batch_statistics(model)
  total, n = None, 0
  for images, _ in batches:
    images, = shard_batch(mesh, images)
    s = fn(state.params, state.batch_stats, images, jax.random.fold_in(key, n))
    total = s if total is None else jax.tree_util.tree_map(jnp.add, total, s)
    n += 1
  if not n:
    return state.batch_stats, 0
  return jax.tree_util.tree_map(lambda t: t / n, total), n


def eval_step(variables: Any, images: jax.Array, labels: jax.Array, mask: jax.Array, *,
              logits_apply: Callable[[Any, jax.Array], jax.Array]) -> jax.Array:
  """Number of correctly classified, unmasked examples of `logits_apply(variables, images)`."""
  logits = logits_apply(variables, images)
  return jnp.sum((jnp.argmax(logits, -1) == labels) & mask)


def make_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))


def jit_train_step(step_fn: Callable, mesh: Mesh) -> Callable:
  """Jits `step_fn(state, images, labels, weights, key)` with the batch sharded over 'data'."""
  repl, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  return jax.jit(step_fn, in_shardings=(repl, batch, batch, repl, repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Global arrays from this process's rows, sharded along 'data'."""
  sharding = NamedSharding(mesh, P('data'))
  return tuple(jax.make_array_from_process_local_data(sharding, a) for a in arrays)


def evaluate_clean(logits_apply: Callable[[Any, jax.Array], jax.Array], variables: Any,
                   images: np.ndarray, labels: np.ndarray, batch_size: int,
                   mesh: Mesh | None = None) -> tuple[int, int]:
  """(correct, seen) of an inference-mode `logits_apply(variables, x)` on a whole split.

  For a `DefendPP` model, `logits_apply` is `models.classify_apply(model)` (classifier alone).
  """
  mesh = mesh or make_mesh()
  batch_size = math.ceil(batch_size / mesh.size) * mesh.size
  step = jax.jit(functools.partial(eval_step, logits_apply=logits_apply))
  correct = 0
  for x, y, m in data_lib.eval_batches(images, labels, batch_size):
    correct += int(step(variables, *_device_put_batch(mesh, x, y, m)))
  return correct, len(labels)


def _device_put_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Shards a batch that every process holds whole (evaluation) along 'data'."""
  sharding = NamedSharding(mesh, P('data'))
  return tuple(jax.device_put(a, sharding) for a in arrays)


# ---------------------------------------------------------------------------------------------
# Summaries.


def param_l2(params: Any) -> float:
  return float(math.sqrt(sum(float(np.sum(np.asarray(p, np.float64) ** 2))
                             for p in jax.tree_util.tree_leaves(params))))


def params_sha256(params: Any) -> str:
  """SHA-256 of all parameter bytes, leaves in flax's sorted-key flattening order."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
  return h.hexdigest()


class _Writer:
  """TensorBoard scalars (process 0 only)."""

  def __init__(self, logdir: str):
    self._tb = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _Preemption:
  """Turns SIGTERM into a flag the training loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, no preemption support
      self._previous = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains per `config`, resuming from `workdir`, and writes `workdir/train_summary.json`."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  ds = dataset_of(config)
  spe = data_lib.steps_per_epoch(len(ds.train_labels), config.train.batch_size)
  total_steps = spe * config.train.num_epochs
  setup = make_setup(config, ds, spe)
  model, schedule = setup.model, setup.schedule
  mesh = make_mesh()
  repl = NamedSharding(mesh, P())
  key = jax.random.key(config.train.seed)
  init_key, step_key = jax.random.split(key)
  state = jax.jit(setup.init, out_shardings=repl)(init_key)

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    max_to_keep=config.train.max_to_keep)
  restored, meta = ckpt.restore_latest(checkpointing.abstract_like(state))
  if restored is not None:
    state = restored
    _log(f'resumed from step {int(state.step)} ({ckpt.directory})')
  elif config.train.init_from:
    state = warm_start(state, config, ds, setup.tx)
    _log(f'classifier initialised from {config.train.init_from}')
  start = int(state.step)

  step_fn = jit_train_step(setup.step, mesh)
  writer = _Writer(os.path.join(workdir, 'tensorboard'))
  n_params = sum(p.size for p in jax.tree_util.tree_leaves(state.params))
  if config.defense.name == 'none':
    n_cls = sum(p.size for p in jax.tree_util.tree_leaves(state.params['classifier']))
    what = (f'{config.model.arch} width {config.model.width}, decoder {config.model.decoder}, '
            f'shared blocks {config.model.shared_blocks}; {n_params:,} params ({n_cls:,} in the '
            'classifier)')
  else:
    what = (f'{config.defense.name} reformer width {config.defense.width}; {n_params:,} params; '
            f'classifier from {config.defense.classifier_workdir or "(none given)"}')
  _log(f'{config.data.name}: {len(ds.train_labels)} train / {len(ds.test_labels)} test '
       f'{ds.image_shape}; {what}; {jax.device_count()} device(s); '
       f'{total_steps} steps of batch {config.train.batch_size}')

  # Device-side index of the first step with a non-finite loss (-1: none yet), so that a NaN is
  # reported at the step it appeared without a device-to-host read after every step.
  first_bad = jnp.asarray(-1, jnp.int32)

  def save(step: int, bn_statistics: str = 'running') -> None:
    _check_finite(first_bad, step, ckpt)  # never checkpoint a diverged state
    ckpt.save(step, state, meta={'step': step, 'epoch': step // spe,
                                 'step_in_epoch': step % spe, 'data_seed': config.train.seed,
                                 'bn_statistics': bn_statistics})

  last_saved, t0, seen_t0, step = start, time.time(), start, start
  stopped_early = False
  with _Preemption() as preemption:
    for epoch in range(start // spe, config.train.num_epochs):
      w_ce, w_rec, phase = phase_weights(config, epoch)
      weights = jnp.asarray([w_ce, w_rec], jnp.float32)
      batches = data_lib.train_batches(
          ds, config.train.batch_size, config.train.seed, epoch,
          start_step=(start % spe) if epoch == start // spe else 0,
          process_index=jax.process_index(), process_count=jax.process_count())
      for images, labels in batches:
        images, labels = shard_batch(mesh, images, labels)
        state, metrics = step_fn(state, images, labels, weights, step_key)
        step += 1  # a host-side counter: reading state.step would wait for the device
        first_bad = _track_non_finite(first_bad, metrics['loss'], step)
        if step % config.train.log_every_steps == 0 or step == total_steps:
          _check_finite(first_bad, step, ckpt)
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          rate = (step - seen_t0) * config.train.batch_size / max(time.time() - t0, 1e-9)
          t0, seen_t0 = time.time(), step
          if 'seen' in m:
            m['train_accuracy'] = m.pop('correct') / max(m.pop('seen'), 1)
          m['learning_rate'] = float(schedule(step))
          writer.scalars(step, m)
          _log(f'[{step}/{total_steps}] epoch {epoch} ({phase}) ' +
               ' '.join(f'{k} {m[k]:.5g}' for k in _LOGGED if k in m) + f' {rate:.0f} img/s')
        if step == total_steps:
          break  # the last state is saved below, after its BatchNorm statistics are final
        if step % config.train.checkpoint_every_steps == 0:
          save(step)
          last_saved = step
        if preemption.requested:
          _log(f'SIGTERM received: saving step {step} and exiting')
          if last_saved != step:
            save(step)
          stopped_early = True
          break
      if stopped_early:
        break
    final_step = int(state.step)
    if not stopped_early and final_step != last_saved:
      bn_statistics = 'running' if jax.tree_util.tree_leaves(state.batch_stats) else 'none'
      n_precise = config.train.get('precise_bn_batches', 0)
      if n_precise and config.defense.name == 'none' and config.train.adversarial == 'none':
        batches = itertools.islice(data_lib.train_batches(
            ds, config.train.batch_size, config.train.seed, config.train.num_epochs,
            process_index=jax.process_index(), process_count=jax.process_count()), n_precise)
        stats, n = precise_batch_stats(state, model, batches, mesh,
                                       jax.random.fold_in(step_key, final_step))
        state = state.replace(batch_stats=stats)
        bn_statistics = f'precise ({n} batches)'
        _log(f'BatchNorm statistics re-estimated with the final weights on {n} training batches')
      save(final_step, bn_statistics)
    else:
      bn_statistics = (meta or {}).get('bn_statistics', 'running')
  ckpt.close()
  writer.close()
  if stopped_early:
    return {'step': final_step, 'preempted': True}

  summary = {'step': final_step, 'param_l2': param_l2(state.params),
             'params_sha256': params_sha256(state.params), 'model': run_name(config),
             'bn_statistics': bn_statistics, **models.conv_kernels(config.model.conv),
             'num_devices': jax.device_count(), 'config': config.to_dict()}
  if config.defense.name == 'none':
    logits_apply, variables = models.classify_apply(model), state.variables
  elif config.defense.classifier_workdir:
    from defendpp_jax import evaluation  # pylint: disable=g-import-not-at-top
    deployed = evaluation.load_deployed(config, workdir, ds, state=state)
    logits_apply, variables = deployed.apply_logits, deployed.variables
  else:  # a reformer without a classifier: report its reconstruction error only
    logits_apply = variables = None
  if logits_apply is None:
    summary.update(clean_accuracy=None, correct=None, seen=len(ds.test_labels))
    correct = seen = 0
  else:
    correct, seen = evaluate_clean(logits_apply, variables, ds.test_images, ds.test_labels,
                                   config.eval.batch_size, mesh)
    summary.update(clean_accuracy=correct / seen, correct=correct, seen=seen)
  if summary['clean_accuracy'] is not None:
    writer = _Writer(os.path.join(workdir, 'tensorboard'))
    writer.scalars(final_step, {'test_clean_accuracy': summary['clean_accuracy']})
    writer.close()
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, 'train_summary.json'), summary)
  if summary['clean_accuracy'] is not None:
    _log(f'clean test accuracy {summary["clean_accuracy"]:.4f} ({correct}/{seen}) at step '
         f'{final_step}; summary in {os.path.join(workdir, "train_summary.json")}')
  else:
    _log(f'reformer trained to step {final_step} (no config.defense.classifier_workdir: no '
         f'accuracy); summary in {os.path.join(workdir, "train_summary.json")}')
  return summary


def run_name(config: ml_collections.ConfigDict) -> str:
  """A short name of what a run deploys, e.g. 'resnet18-w16-pyramid' or 'comdefend-w4'."""
  if config.defense.name != 'none':
    return f'{config.defense.name}-w{config.defense.width}'
  name = f'{config.model.arch}-w{config.model.width}-{config.model.decoder}'
  if config.train.adversarial != 'none':
    name += f'-adv{config.train.adversarial}'
  return name


_LOGGED = ('loss', 'ce', 'rec_full', 'rec_ms', 'code_penalty', 'train_accuracy', 'learning_rate')


@jax.jit
def _track_non_finite(first_bad: jax.Array, loss: jax.Array, step: int) -> jax.Array:
  return jnp.where((first_bad < 0) & ~jnp.isfinite(loss), step, first_bad)


def _check_finite(first_bad: jax.Array, step: int, ckpt: checkpointing.Checkpointer) -> None:
  bad = int(first_bad)
  if bad >= 0:
    ckpt.wait()
    raise FloatingPointError(
        f'non-finite training loss at step {bad} (detected at step {step}); stopping without '
        f'saving. The last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}')


def _write_json(path: str, obj: Any) -> None:
  """Atomic write: a crash leaves the previous file intact."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
  os.replace(tmp, path)


def _json_default(obj):
  if isinstance(obj, (np.integer, np.floating)):
    return obj.item()
  if isinstance(obj, (tuple, set)):
    return list(obj)
  return str(obj)
