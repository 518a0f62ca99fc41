"""Robustness evaluation: every configured attack on the inference-mode classifier, counted exactly.

Usage:
  report = evaluate(config, workdir)   # writes workdir/robustness.{json,md} and figures

Each attack runs jitted once per (attack, setting) over fixed-size batches (the last one padded
and masked), sharded over all devices along 'data'. Accuracies are integer counts of correct
predictions over examples seen, never averages of batch means. The sanity checks that reveal
gradient masking or a broken attack are computed and written with every table.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import base
from defendpp_jax import attacks as attacks_lib
from defendpp_jax import checkpointing
from defendpp_jax import data as data_lib
from defendpp_jax import models
from defendpp_jax import reporting
from defendpp_jax import training

# Paper Sec. 4.1: FGSM eps 0.2 / 0.05 / 0.01 for MNIST / CIFAR-10 / ImageNet; digits as MNIST.
DEFAULT_EPS = {'mnist': 0.2, 'digits': 0.2, 'cifar10': 0.05, 'imagenet': 0.01}
# L2 thresholds at which the minimal-norm attacks are also read as bounded attacks.
DEFAULT_L2_THRESHOLDS = {'mnist': (1.0, 1.5, 2.0, 2.4), 'digits': (1.0, 1.5, 2.0, 2.4),
                         'cifar10': (0.25, 0.5, 1.0), 'imagenet': (0.5, 1.0, 2.0)}
DEFAULT_EPS_GRID = {'mnist': tuple(round(0.1 * i, 1) for i in range(1, 11)),
                    'digits': tuple(round(0.1 * i, 1) for i in range(1, 11)),
                    'cifar10': (0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3),
                    'imagenet': (0.002, 0.005, 0.01, 0.02, 0.05)}


@dataclasses.dataclass
class AttackSpec:
  """One (attack, setting): the name, its keyword arguments and how the result is reported."""
  attack: str
  kwargs: dict[str, Any]
  norm: str
  eps: float | None
  steps: int
  restarts: int = 1
  label: str = ''

  @property
  def key(self) -> str:
    return self.label or self.attack


def attack_specs(config: ml_collections.ConfigDict, dataset: str) -> list[AttackSpec]:
  """The attacks of `config.eval.attacks` with the paper's per-dataset defaults."""
  ec = config.eval
  eps = ec.eps or DEFAULT_EPS.get(dataset, 0.05)
  factor = ec.step_size_factor
  specs = []
  for name in ec.attacks:
    if name == 'fgsm':
      specs.append(AttackSpec('fgsm', {'eps': eps}, 'linf', eps, 1))
    elif name == 'bim':
      specs.append(AttackSpec('bim', {'eps': eps, 'step_size': factor * eps / ec.bim_steps,
                                      'num_steps': ec.bim_steps}, 'linf', eps, ec.bim_steps))
    elif name == 'pgd':
      specs.append(AttackSpec(
          'pgd', {'eps': eps, 'step_size': factor * eps / ec.pgd_steps,
                  'num_steps': ec.pgd_steps, 'restarts': ec.pgd_restarts, 'norm': 'linf'},
          'linf', eps, ec.pgd_steps, ec.pgd_restarts))
    elif name == 'apgd':
      specs.append(AttackSpec('apgd', {'eps': eps, 'num_steps': ec.apgd_steps,
                                       'loss': ec.apgd_loss, 'norm': 'linf'},
                              'linf', eps, ec.apgd_steps))
    elif name == 'apgd_dlr':  # the DLR-loss run of AutoAttack, beside the CE one
      specs.append(AttackSpec('apgd', {'eps': eps, 'num_steps': ec.apgd_steps, 'loss': 'dlr',
                                       'norm': 'linf'}, 'linf', eps, ec.apgd_steps,
                              label='apgd_dlr'))
    elif name == 'cw_l2':
      specs.append(AttackSpec('cw_l2', {'binary_search_steps': ec.cw_binary_steps,
                                        'num_steps': ec.cw_steps, 'confidence': 0.0,
                                        'initial_const': ec.cw_initial_const, 'lr': ec.cw_lr},
                              'l2', None, ec.cw_binary_steps * ec.cw_steps))
    elif name == 'ddn':
      specs.append(AttackSpec('ddn', {'num_steps': ec.ddn_steps, 'gamma': 0.05,
                                      'init_norm': 1.0}, 'l2', None, ec.ddn_steps))
    else:
      raise ValueError(f'config.eval.attacks: unknown attack {name!r}; known: '
                       f'{tuple(attacks_lib.ATTACKS) + ("apgd_dlr",)}')
  return specs


# ---------------------------------------------------------------------------------------------
# Loading trained models.


@dataclasses.dataclass
class LoadedModel:
  """A trained, deployed model: `apply_logits(variables, x)` is pure and in inference mode.

  `model` is the `DefendPP` module when the deployed model is a Defend++ / baseline classifier
  (its decoder is then available for the reconstruction figures), None for a reformer in front
  of a classifier.
  """
  config: ml_collections.ConfigDict
  apply_logits: Callable[[Any, jax.Array], jax.Array]
  variables: Any
  step: int
  workdir: str
  model: models.DefendPP | None = None

  @property
  def name(self) -> str:
    return training.run_name(self.config)

  def logits_fn(self, variables=None) -> Callable[[jax.Array], jax.Array]:
    return functools.partial(self.apply_logits, variables or self.variables)


def _restore(config: ml_collections.ConfigDict, workdir: str, ds: data_lib.Dataset
             ) -> tuple[training.Setup, training.TrainState]:
  """The latest checkpoint of `workdir` as a TrainState; a clear error when there is none."""
  setup = training.make_setup(config, ds, 1)
  replicated = NamedSharding(training.make_mesh(), P())
  abstract = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
      jax.eval_shape(setup.init, jax.random.key(0)))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  state, _ = ckpt.restore_latest(abstract)
  ckpt.close()
  if state is None:
    raise FileNotFoundError(f'no checkpoint in {os.path.join(workdir, "checkpoints")}: train '
                            f'first with python -m launch.train --workdir={workdir}')
  return setup, state


def load_model(config: ml_collections.ConfigDict, workdir: str,
               ds: data_lib.Dataset) -> LoadedModel:
  """The deployed model of the run in `workdir` (its latest checkpoint), built from `config`."""
  if config.defense.name != 'none':
    return load_deployed(config, workdir, ds)
  check_same_classifier(config, workdir, '--workdir')
  setup, state = _restore(config, workdir, ds)
  return LoadedModel(config, models.classify_apply(setup.model), state.variables,
                     int(state.step), workdir, model=setup.model)


def load_deployed(config: ml_collections.ConfigDict, workdir: str, ds: data_lib.Dataset,
                  state: training.TrainState | None = None) -> LoadedModel:
  """A reformer run (`workdir`, or its `state`) in front of its classifier run.

  The classifier is `config.defense.classifier_workdir`'s deployed model. The binarisation of
  the code has a straight-through gradient (BPDA), so a white-box attack differentiates the
  whole pipeline; the values are those of the hard binarisation.
  """
  if not config.defense.classifier_workdir:
    raise ValueError(f'config.defense.name={config.defense.name!r} needs '
                     'config.defense.classifier_workdir (the classifier it protects)')
  classifier = load_model(config_of_run(config.defense.classifier_workdir),
                          config.defense.classifier_workdir, ds)
  setup = training.make_setup(config, ds, 1)
  if state is None:
    setup, state = _restore(config, workdir, ds)
  reformer, cls_apply = setup.model, classifier.apply_logits

  def apply_logits(variables, x):
    cleaned = reformer.apply({'params': variables['reformer']}, x, straight_through=True)
    return cls_apply(variables['classifier'], cleaned)

  return LoadedModel(config, apply_logits,
                     {'reformer': state.params, 'classifier': classifier.variables},
                     int(state.step), workdir)


def classifier_of(deployed: LoadedModel, ds: data_lib.Dataset) -> LoadedModel:
  """The classifier behind a reformer: what a grey-box attacker sees."""
  cls_dir = deployed.config.defense.classifier_workdir
  return load_model(config_of_run(cls_dir), cls_dir, ds)


def config_of_run(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (from its train_summary.json, completed)."""
  path = os.path.join(workdir, 'train_summary.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a finished training run?')
  with open(path) as f:
    return ml_collections.ConfigDict(complete_saved_config(json.load(f)['config']))


def as_saved_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as its saved JSON reads back (tuples as lists), to compare with a saved one."""
  return json.loads(json.dumps(config.to_dict(), default=list))


# Fields added after some runs were saved, whose default then differs from how those runs behaved.
BEFORE_FIELD = {'model.conv': models.CONV_BEFORE_FIELD,
                'model.padding': models.PADDING_BEFORE_FIELD,
                'train.precise_bn_batches': 0}


def complete_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config (JSON) with every field it lacks filled in as its run behaved.

  A missing field was added to the project after the config was saved: the run behaved as
  that field's base-config default, or as BEFORE_FIELD says where the default has changed.
  """
  def fill(saved_part, default_part):
    if not isinstance(saved_part, dict) or not isinstance(default_part, dict):
      return saved_part
    out = dict(saved_part)
    for k, v in default_part.items():
      out[k] = fill(out[k], v) if k in out else v
    return out

  defaults = as_saved_json(base.get_base_config())
  for path, value in BEFORE_FIELD.items():
    section, field = path.split('.')
    defaults[section][field] = value
  return fill(saved, defaults)


# The fields that define a classifier's function beyond its parameter shapes (the dataset sets
# the input normalisation).
CLASSIFIER_FIELDS = ('data.name', 'model.arch', 'model.width', 'model.stem', 'model.padding')


def check_same_classifier(config: ml_collections.ConfigDict, run_dir: str, what: str) -> None:
  """Raises, naming the field, unless `config` builds the classifier that `run_dir` trained.

  Parameter shapes alone cannot tell e.g. two paddings apart: restoring weights into the other
  would evaluate a different function without any error. Runs without a train_summary.json
  (unfinished) are not checked.
  """
  if not os.path.isfile(os.path.join(run_dir, 'train_summary.json')):
    return
  saved = config_of_run(run_dir)
  for path in CLASSIFIER_FIELDS:
    section, field = path.split('.')
    mine, theirs = config[section][field], saved[section][field]
    if mine != theirs:
      raise ValueError(f'{what}={run_dir!r} was trained with config.{path}={theirs!r}, the '
                       f'config given has {mine!r}: the classifiers differ (pass '
                       f'--config.{path}={theirs})')


# ---------------------------------------------------------------------------------------------
# Running attacks.


def _batch_size(requested: int, mesh, num_examples: int) -> int:
  """The requested batch, no larger than needed, divisible by the number of devices."""
  return math.ceil(min(requested, num_examples) / mesh.size) * mesh.size


def make_attack_fn(spec: AttackSpec, apply_logits: Callable[[Any, jax.Array], jax.Array]
                   ) -> Callable:
  """jit(variables, x, y, key) -> x_adv against the inference-mode `apply_logits`."""
  attack = attacks_lib.ATTACKS[spec.attack]
  kwargs = dict(spec.kwargs)
  needs_key = spec.attack in ('pgd', 'apgd')

  def run(variables, x, y, key):
    logits_fn = functools.partial(apply_logits, variables)
    extra = {'key': key} if needs_key else {}
    return attack(logits_fn, x, y, **kwargs, **extra)

  return jax.jit(run)


def _predict_fn(apply_logits):
  return jax.jit(lambda v, x: jnp.argmax(apply_logits(v, x), -1))


@dataclasses.dataclass
class AttackResult:
  spec: AttackSpec
  correct: int
  seen: int
  distances: np.ndarray | None = None  # per example, minimal-norm attacks only

  @property
  def accuracy(self) -> float:
    return self.correct / self.seen


# Adversarials crafted on one model and classified by others (transfer, grey-box), kept for the
# life of the process: every row of a table that classifies the same crafted images (C&W / DDN
# crafted on the undefended net, for each defended model) pays the crafting once. Least recently
# used first out once the kept images pass CRAFTED_MAX_BYTES (checked when a new set starts, so
# the newest set may take the total past the bound until the next one starts).
_CRAFTED: dict[tuple, list[np.ndarray]] = {}
CRAFTED_MAX_BYTES = 2 << 30


def _crafted_batches(key: tuple) -> list[np.ndarray]:
  """The batches kept under `key` (a new empty list on a miss; appended to by the caller)."""
  if key in _CRAFTED:
    _CRAFTED[key] = _CRAFTED.pop(key)  # now the most recently used
    return _CRAFTED[key]
  total = sum(a.nbytes for batches in _CRAFTED.values() for a in batches)
  while _CRAFTED and total > CRAFTED_MAX_BYTES:
    total -= sum(a.nbytes for a in _CRAFTED.pop(next(iter(_CRAFTED))))
  return _CRAFTED.setdefault(key, [])


def _crafting_key(spec, source: LoadedModel, images, labels, batch_size, key) -> tuple:
  """Everything x_adv depends on: the source's weights, the attack, the inputs, batching, key."""
  data = hashlib.sha256(np.ascontiguousarray(images).tobytes())
  data.update(np.ascontiguousarray(labels).tobytes())
  return (training.params_sha256(source.variables), spec.attack,
          json.dumps(_jsonable(spec.kwargs), sort_keys=True), data.hexdigest(), batch_size,
          tuple(np.asarray(jax.random.key_data(key)).ravel().tolist()))


def run_attack(spec: AttackSpec, target: LoadedModel, images: np.ndarray, labels: np.ndarray,
               batch_size: int, key: jax.Array, source: LoadedModel | None = None,
               progress: bool = True) -> AttackResult:
  """Crafts adversarials on `source` (default: `target`, white-box) and counts `target`'s hits."""
  reuse = source is not None and source is not target
  source = source or target
  mesh = training.make_mesh()
  sharding = NamedSharding(mesh, P('data'))
  batch_size = _batch_size(batch_size, mesh, len(labels))
  attack_fn = make_attack_fn(spec, source.apply_logits)
  predict = _predict_fn(target.apply_logits)
  crafted = None
  if reuse:
    crafted = _crafted_batches(_crafting_key(spec, source, images, labels, batch_size, key))
  correct, seen, distances = 0, 0, []
  batches = data_lib.eval_batches(images, labels, batch_size)
  n_batches = math.ceil(len(labels) / batch_size)
  for i, (x, y, mask) in enumerate(reporting.progress(batches, n_batches, spec.key, progress)):
    xs, ys = jax.device_put(x, sharding), jax.device_put(y, sharding)
    if crafted is not None and i < len(crafted):
      x_adv = jax.device_put(crafted[i], sharding)
    else:
      x_adv = attack_fn(source.variables, xs, ys, jax.random.fold_in(key, i))
      if crafted is not None:
        crafted.append(np.asarray(x_adv))
    pred = np.asarray(predict(target.variables, x_adv))
    ok = (pred == y) & mask
    correct += int(ok.sum())
    seen += int(mask.sum())
    if spec.eps is None:
      d = np.sqrt(np.sum((np.asarray(x_adv, np.float64) - x) ** 2, axis=(1, 2, 3)))
      clean_pred = np.asarray(predict(target.variables, xs))
      # 0 for examples misclassified without attack, inf where the attack found nothing.
      d = np.where(clean_pred != y, 0.0, np.where(ok, np.inf, d))
      distances.append(d[mask])
  return AttackResult(spec, correct, seen,
                      np.concatenate(distances) if distances else None)


def result_row(res: AttackResult, thresholds) -> dict[str, Any]:
  spec = res.spec
  row = {'attack': spec.key, 'norm': spec.norm, 'eps': spec.eps, 'steps': spec.steps,
         'restarts': spec.restarts, 'accuracy': res.accuracy, 'correct': res.correct,
         'seen': res.seen, 'settings': _jsonable(spec.kwargs)}
  if res.distances is not None:
    d = res.distances
    finite = d[np.isfinite(d) & (d > 0)]
    median = float(np.median(d))
    row['median_l2'] = median if math.isfinite(median) else None
    row['mean_l2'] = float(finite.mean()) if finite.size else None
    row['accuracy_at'] = {f'{t:g}': float(np.mean(d > t)) for t in thresholds}
  return row


def _jsonable(kwargs):
  return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in kwargs.items()}


# ---------------------------------------------------------------------------------------------
# Sanity checks (signatures of gradient masking or of a broken attack).


def sanity_checks(target: LoadedModel, images, labels, clean_acc: float,
                  results: dict[str, AttackResult], batch_size: int, key: jax.Array,
                  transfer: dict[str, AttackResult] | None = None,
                  progress: bool = False) -> list[dict[str, Any]]:
  checks = []
  zero = AttackSpec('pgd', {'eps': 0.0, 'step_size': 0.0, 'num_steps': 5, 'norm': 'linf'},
                    'linf', 0.0, 5, label='pgd_eps0')
  acc0 = run_attack(zero, target, images, labels, batch_size, key, progress=progress).accuracy
  checks.append({'name': 'PGD at eps=0 equals clean accuracy', 'value': acc0,
                 'expected': clean_acc, 'passed': abs(acc0 - clean_acc) < 1e-9})
  big = AttackSpec('pgd', {'eps': 1.0, 'step_size': 0.1, 'num_steps': 20, 'norm': 'linf'},
                   'linf', 1.0, 20, label='pgd_eps1')
  acc_big = run_attack(big, target, images, labels, batch_size, key, progress=progress).accuracy
  checks.append({'name': 'accuracy under L-inf eps=1.0 (PGD-20) is ~0', 'value': acc_big,
                 'expected': '<= 0.05', 'passed': acc_big <= 0.05})
  if 'fgsm' in results:
    fgsm = results['fgsm'].accuracy
    for name in ('bim', 'pgd', 'apgd', 'apgd_dlr'):
      if name in results:
        acc = results[name].accuracy
        checks.append({'name': f'{name} at least as strong as FGSM at the same eps',
                       'value': acc, 'expected': f'<= {fgsm:.4f} (+0.01)',
                       'passed': acc <= fgsm + 0.01})
  for name, res in (transfer or {}).items():
    if name in results:
      wb = results[name].accuracy
      checks.append({'name': f'white-box {name} at least as strong as transfer {name}',
                     'value': wb, 'expected': f'<= {res.accuracy:.4f} (+0.01)',
                     'passed': wb <= res.accuracy + 0.01})
  return checks


# ---------------------------------------------------------------------------------------------


def evaluate(config: ml_collections.ConfigDict, workdir: str, progress: bool = True,
             out_dir: str | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint of `workdir`; writes robustness.json / .md and figures.

  The files go to `out_dir` (default: `workdir`), so that one model can be evaluated under
  several settings (threat models, attack budgets) side by side.
  """
  training.validate_config(config)
  ds = training.dataset_of(config)
  n = config.eval.num_examples or len(ds.test_labels)
  images, labels = ds.test_images[:n], ds.test_labels[:n]
  target = load_model(config, workdir, ds)
  key = jax.random.key(config.eval.seed)
  mesh = training.make_mesh()
  correct, seen = training.evaluate_clean(target.apply_logits, target.variables, images, labels,
                                          config.eval.batch_size, mesh)
  clean_acc = correct / seen
  specs = attack_specs(config, config.data.name)
  thresholds = tuple(config.eval.l2_thresholds) or DEFAULT_L2_THRESHOLDS.get(
      config.data.name, (0.5, 1.0))
  source = None
  if config.eval.source_workdir:
    source = load_model(config_of_run(config.eval.source_workdir), config.eval.source_workdir,
                        ds)
  # The model the report's rows are crafted on: the target itself (white-box), the classifier
  # behind a hidden reformer (grey-box) or another trained run (transfer).
  if config.eval.threat_model == 'grey_box':
    crafter, crafted_on = classifier_of(target, ds), 'classifier'
  elif config.eval.threat_model == 'transfer':
    crafter, crafted_on = source, source.name
  else:
    crafter, crafted_on = None, 'target'
  results = {}
  for spec in specs:
    results[spec.key] = run_attack(spec, target, images, labels, config.eval.batch_size, key,
                                   source=crafter, progress=progress)
  transfer = {}
  if source is not None and config.eval.threat_model != 'transfer':
    for spec in specs:
      transfer[spec.key] = run_attack(spec, target, images, labels, config.eval.batch_size,
                                      key, source=source, progress=progress)
  checks = sanity_checks(target, images, labels, clean_acc, results, config.eval.batch_size,
                         key, transfer, progress=False)
  report = {
      'model': target.name, 'workdir': os.path.abspath(workdir), 'step': target.step,
      'dataset': config.data.name, 'num_examples': seen,
      'threat_model': config.eval.threat_model,
      'crafted_on': crafted_on,
      # the kernels the convolutions ran on (config.model.conv resolved on this machine)
      **models.conv_kernels(config.model.get('conv', models.CONV_BEFORE_FIELD)),
      'clean_accuracy': clean_acc, 'clean_correct': correct,
      'rows': [result_row(r, thresholds) for r in results.values()],
      'transfer': ({'source_workdir': os.path.abspath(config.eval.source_workdir),
                    'source_model': source.name,
                    'rows': [result_row(r, thresholds) for r in transfer.values()]}
                   if transfer else None),
      'sanity_checks': checks,
      'sanity_checks_passed': all(c['passed'] for c in checks),
      'config': config.to_dict(),
  }
  if config.eval.figures:
    report['eps_sweep'] = eps_sweep(config, target, images, labels, key, source=crafter)
    if target.model is not None and config.model.decoder != 'none':
      report['reconstruction'] = reconstruction_analysis(
          target, images, labels, DEFAULT_EPS.get(config.data.name, 0.05) if not config.eval.eps
          else config.eval.eps, config.eval.batch_size)
  if jax.process_index() == 0:
    reporting.write_report(report, out_dir or workdir)
  print(reporting.markdown_table(report), flush=True)
  return report


def eps_sweep(config, target: LoadedModel, images, labels, key,
              source: LoadedModel | None = None) -> dict[str, Any]:
  """Accuracy vs eps for FGSM and PGD (paper Fig. 6)."""
  ec = config.eval
  grid = tuple(ec.eps_grid) or DEFAULT_EPS_GRID.get(config.data.name, (0.01, 0.05, 0.1))
  n = min(len(labels), ec.sweep_examples)
  out = {'eps': list(grid), 'fgsm': [], 'pgd': [], 'pgd_steps': ec.sweep_pgd_steps,
         'num_examples': n}
  for eps in grid:
    fgsm = AttackSpec('fgsm', {'eps': eps}, 'linf', eps, 1)
    pgd = AttackSpec('pgd', {'eps': eps, 'step_size': ec.step_size_factor * eps /
                             ec.sweep_pgd_steps, 'num_steps': ec.sweep_pgd_steps,
                             'norm': 'linf'}, 'linf', eps, ec.sweep_pgd_steps)
    for name, spec in (('fgsm', fgsm), ('pgd', pgd)):
      res = run_attack(spec, target, images[:n], labels[:n], ec.batch_size, key, source=source,
                       progress=False)
      out[name].append(res.accuracy)
  return out


def reconstruction_analysis(target: LoadedModel, images, labels, eps: float,
                            batch_size: int, num: int = 500) -> dict[str, Any]:
  """FGSM images, the AE's reconstructions and R = D_rc / D_ra (paper Figs. 7-8)."""
  n = min(num, len(labels))
  spec = AttackSpec('fgsm', {'eps': eps}, 'linf', eps, 1)
  attack_fn = make_attack_fn(spec, target.apply_logits)
  full = jax.jit(lambda v, x: target.model.apply(v, x, train=False)[1][0])
  ratios, shown = [], None
  for start in range(0, n, batch_size):
    x, y = images[start:start + batch_size][:n - start], labels[start:start + batch_size]
    y = y[:len(x)]
    adv = np.asarray(attack_fn(target.variables, x, y, jax.random.key(0)))
    rec_adv = np.asarray(full(target.variables, adv))
    d_rc = np.sqrt(((rec_adv - x) ** 2).sum(axis=(1, 2, 3)))
    d_ra = np.sqrt(((rec_adv - adv) ** 2).sum(axis=(1, 2, 3)))
    ratios.append(d_rc / np.maximum(d_ra, 1e-12))
    if shown is None:
      k = min(8, len(x))
      shown = {'clean': x[:k], 'rec_clean': np.asarray(full(target.variables, x[:k])),
               'adv': adv[:k], 'rec_adv': rec_adv[:k]}
  ratios = np.concatenate(ratios)
  return {'eps': eps, 'ratio_R': ratios.tolist(), 'fraction_R_below_1': float(np.mean(ratios < 1)),
          'images': shown}
