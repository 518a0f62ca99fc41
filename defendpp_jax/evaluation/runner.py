"""Running one attack entry on a defence: jitted per batch, counted exactly, over R draws.

Usage:
  res = run_attack(spec, defence, images, labels, batch_size=500, key=key, view='auto')
  res.accuracy, res.correct, res.seen

Each attack is jitted once per (attack, setting) over fixed-size batches (the last one padded and
masked), sharded over all devices along 'data'. It crafts on the attacker's view of `source`
(default: the defence itself, white-box) and counts the deployed defence's correct predictions.
A randomised defence is evaluated over `draws` independent draws of its randomness (the attack's
keys and the classification keys both fresh per draw): `accuracy` is the mean over draws,
`accuracy_worst` the worst draw; `correct` / `seen` sum over draws.

`alive` (one boolean mask per draw) restricts an attack to the examples still defended, as in
AutoAttack's cascade (evaluate.run_entries with config.eval.worst_case): the others count as
broken without being attacked, and the survivors run in batches of the next power of two (so
that a cascade compiles a handful of batch shapes, not one per survivor count).

`resume` (a `Resume`) saves each finished draw of each attack to disk, keyed by everything its
result depends on, and loads it instead of attacking again: an evaluation stopped mid-way
(evaluate.evaluate passes one under its output directory) picks up at the draw it was in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from defendpp_jax import attacks as attacks_lib
from defendpp_jax import data as data_lib
from defendpp_jax import files
from defendpp_jax import parallel
from defendpp_jax.attacks.specs import AttackSpec
from defendpp_jax.defences.base import Defence
from defendpp_jax.evaluation import reporting
from defendpp_jax.runs import state as state_lib

# fold_in constant of the classification keys (distinct from the attacks' streams).
_CLASSIFY = 0xC1A55


def draw_key(key: jax.Array, draw: int, draws: int) -> jax.Array:
  """The evaluation key of draw `draw` (the key itself when there is a single draw)."""
  return key if draws == 1 else jax.random.fold_in(key, draw)


def classify_key(defence: Defence, key: jax.Array, batch: int) -> jax.Array | None:
  """The key the deployed defence classifies batch `batch` with (None if deterministic)."""
  if not defence.randomised:
    return None
  return jax.random.fold_in(jax.random.fold_in(key, _CLASSIFY), batch)


def predict_fn(defence: Defence):
  """jit(variables, x, key) -> the deployed defence's predicted classes (one per defence)."""
  return defence.program('predict', lambda: jax.jit(
      lambda v, x, k: jnp.argmax(defence.logits(v, x, k), -1)))


def defended(defence: Defence, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Per example: an attacked input is defended if classified right or, by a detector,
  rejected (its last output)."""
  ok = pred == y
  return ok | (pred == rejected_class(defence)) if defence.rejects else ok


def rejected_class(defence: Defence) -> int | None:
  """The index of a detector's "rejected" output (the last), None for a classifier."""
  if not defence.rejects:
    return None
  return int(defence.info['num_classes'])


def clean_rejections(defence: Defence, images: np.ndarray, labels: np.ndarray,
                     batch_size: int, key: jax.Array, mesh=None) -> int:
  """How many unattacked images a detector rejects (its false positives)."""
  mesh = mesh or parallel.make_mesh()
  batch_size = parallel.divisible_batch(batch_size, mesh)
  predict = predict_fn(defence)
  rejected = 0
  for i, (x, y, m) in enumerate(data_lib.eval_batches(images, labels, batch_size)):
    xs, = parallel.put_batch(mesh, x)
    pred = np.asarray(predict(defence.variables, xs, classify_key(defence, key, i)))
    rejected += int(np.sum((pred == rejected_class(defence)) & m))
  return rejected


def clean_predictions(defence: Defence, images: np.ndarray, labels: np.ndarray,
                      batch_size: int, key: jax.Array | None = None, mesh=None,
                      rejected_ok: bool = False) -> np.ndarray:
  """Per-example correctness (bool) of the deployed defence on unattacked images
  (`rejected_ok`: a detector's rejection counts as defended, as for attacked inputs)."""
  mesh = mesh or parallel.make_mesh()
  key = jax.random.key(0) if key is None else key
  batch_size = parallel.divisible_batch(batch_size, mesh)
  predict = predict_fn(defence)
  out = []
  for i, (x, y, m) in enumerate(data_lib.eval_batches(images, labels, batch_size)):
    xs, = parallel.put_batch(mesh, x)
    pred = np.asarray(predict(defence.variables, xs, classify_key(defence, key, i)))
    out.append((defended(defence, pred, y) if rejected_ok else pred == y)[m])
  return np.concatenate(out)


def clean_counts(defence: Defence, images: np.ndarray, labels: np.ndarray, batch_size: int,
                 mesh=None, key: jax.Array | None = None) -> tuple[int, int]:
  """(correct, seen) of the inference-mode defence on a whole split (one draw).

  Counted on the devices (a replicated scalar per batch), so that every process of a
  multi-host run can read it; equal to `clean_predictions(...).sum()`."""
  mesh = mesh or parallel.make_mesh()
  key = jax.random.key(0) if key is None else key
  batch_size = parallel.divisible_batch(batch_size, mesh)
  count = defence.program('count', lambda: jax.jit(lambda v, x, y, m, k: jnp.sum(
      (jnp.argmax(defence.logits(v, x, k), -1) == y) & m)))
  correct = 0
  for i, (x, y, m) in enumerate(data_lib.eval_batches(images, labels, batch_size)):
    correct += int(count(defence.variables, *parallel.put_batch(mesh, x, y, m),
                         classify_key(defence, key, i)))
  return correct, len(labels)


@dataclasses.dataclass
class AttackResult:
  spec: AttackSpec
  view: str
  eot_samples: int
  correct_per_draw: list[int]
  seen: int                                # examples per draw
  correct_every_draw: int                  # examples correct in every draw
  distances: np.ndarray | None = None      # per example (first draw), minimal-norm attacks only
  detected_per_draw: list[int] | None = None  # a detector's rejections of the attacked inputs
  ok_per_draw: list[np.ndarray] | None = None  # per draw, per example: defended
  cascade: bool = False                    # attacked only the examples `alive` before it

  @property
  def draws(self) -> int:
    return len(self.correct_per_draw)

  @property
  def correct(self) -> int:
    return sum(self.correct_per_draw)

  @property
  def accuracy(self) -> float:
    return self.correct / (self.seen * self.draws)

  @property
  def accuracy_worst(self) -> float:
    return min(self.correct_per_draw) / self.seen


# Numeric budgets passed to the jitted attack as arguments, not compiled in as constants: the
# same attack at another eps (an eps sweep, the survey's two eps) reuses one program. The same
# adversarials as constants, bit for bit, but for L2 APGD / Square (a pixel's last bit may differ).
TRACED_BUDGETS = ('eps', 'step_size', 'gamma')


def make_attack_fn(spec: AttackSpec, source: Defence, view: str, eot_samples: int,
                   eot_chunk: int):
  """(variables, x, y, key) -> x_adv, crafted on `source`'s `view`; jitted once per source,
  attack, view and static settings (TRACED_BUDGETS are arguments of the program)."""
  attack = attacks_lib.ATTACKS[spec.attack]
  budgets = {k: float(v) for k, v in spec.kwargs.items()
             if k in TRACED_BUDGETS and isinstance(v, (int, float)) and not isinstance(v, bool)}
  static = {k: v for k, v in spec.kwargs.items() if k not in budgets}

  def build():
    def run(variables, x, y, key, budgets):
      model = source.attack_model(view, eot_samples, eot_chunk, variables=variables)
      return attack(model, x, y, key=key, **static, **budgets)
    return jax.jit(run)

  program = source.program(
      ('attack', spec.attack, json.dumps(jsonable(static), sort_keys=True, default=str),
       view, eot_samples, eot_chunk), build)
  return lambda variables, x, y, key: program(variables, x, y, key, budgets)


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


def _crafting_key(spec, source: Defence, view, eot_samples, images, labels, batch_size,
                  key) -> tuple:
  """Everything x_adv depends on: the source's weights, the attack and its view, the inputs,
  the batching and the key."""
  return (state_lib.params_sha256(source.variables), spec.attack,
          json.dumps(jsonable(spec.kwargs), sort_keys=True), view, eot_samples,
          _data_digest(images, labels), batch_size,
          tuple(np.asarray(jax.random.key_data(key)).ravel()))


def _data_digest(images: np.ndarray, labels: np.ndarray) -> str:
  data = hashlib.sha256(np.ascontiguousarray(images).tobytes())
  data.update(np.ascontiguousarray(labels).tobytes())
  return data.hexdigest()


@dataclasses.dataclass(frozen=True)
class Resume:
  """Finished draws of attacks kept in `directory` (one .npz each), for an evaluation that is
  stopped and re-run. `digest` stands for everything the caller's evaluation depends on beyond
  what `run_attack` keys itself (the evaluation's config: a defence's settings that are not
  weights); `run_attack` adds the attack, its view, both models' weights, the images, the
  batching, the draw's key and the examples attacked."""
  directory: str
  digest: str

  def path(self, *parts: Any) -> str:
    h = hashlib.sha256(json.dumps([self.digest, *parts], sort_keys=True,
                                  default=files.json_default).encode())
    return os.path.join(self.directory, f'{h.hexdigest()[:40]}.npz')

  @staticmethod
  def load(path: str) -> tuple[np.ndarray, int, np.ndarray | None] | None:
    """(defended mask over all examples, rejections, distances or None), or None if absent."""
    if not os.path.isfile(path):
      return None
    with np.load(path) as f:
      return (f['ok'].astype(bool), int(f['rejected']),
              f['distances'] if f['has_distances'] else None)

  @staticmethod
  def save(path: str, ok: np.ndarray, rejected: int, distances: np.ndarray | None) -> None:
    files.write_npz(path, ok=ok, rejected=np.int64(rejected),
                    has_distances=np.bool_(distances is not None),
                    distances=np.zeros(0) if distances is None else distances)

  def clear(self) -> None:
    """Removes the kept draws (once the evaluation's report is written)."""
    if os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if name.endswith('.npz'):
          os.remove(os.path.join(self.directory, name))
      if not os.listdir(self.directory):
        os.rmdir(self.directory)


def _resume_parts(spec: AttackSpec, target: Defence, source: Defence, settings, eot_chunk,
                  images, labels, batch_size) -> list[Any]:
  """What every draw's result depends on besides its key and examples."""
  weights = state_lib.params_sha256(target.variables)
  return [spec.key, spec.attack, jsonable(spec.kwargs), settings['view'],
          settings['eot_samples'], eot_chunk, target.name, source.name, weights,
          weights if source is target else state_lib.params_sha256(source.variables),
          _data_digest(images, labels), batch_size]


def run_attack(spec: AttackSpec, target: Defence, images: np.ndarray, labels: np.ndarray,
               batch_size: int, key: jax.Array, source: Defence | None = None,
               view: str = 'auto', eot_samples: int = 10, eot_chunk: int = 10, draws: int = 1,
               progress: bool = True, alive: list[np.ndarray] | None = None,
               resume: Resume | None = None) -> AttackResult:
  """Crafts adversarials on `source`'s view (default: `target`, white-box) and counts
  `target`'s correct predictions, over `draws` draws when `target` is randomised; with `alive`
  (a mask per draw) only on the examples it marks (the others count as broken); with `resume`,
  each draw already finished under the same settings is loaded instead of attacked."""
  reuse = source is not None and source is not target
  source = source or target
  view = spec.view or view
  eot_samples = spec.eot_samples or eot_samples
  settings = source.view_settings(view, eot_samples)
  draws = effective_draws(target, source, draws)
  if alive is not None and (len(alive) != draws or spec.eps is None):
    raise ValueError(f'{spec.key}: `alive` needs one mask per draw ({draws}) and an eps-bounded '
                     'attack')
  mesh = parallel.make_mesh()
  full_batch = parallel.divisible_batch(batch_size, mesh, len(labels))
  attack_fn = make_attack_fn(spec, source, view, eot_samples, eot_chunk)
  predict = predict_fn(target)

  def attack_draw(r, key_r, idx):
    """(defended mask over all examples, rejections, distances or None) of draw `r`."""
    x_r, y_r = images[idx], labels[idx]
    batch = full_batch if alive is None else survivor_batch(len(idx), full_batch, mesh)
    crafted = None
    if reuse:
      crafted = _crafted_batches(_crafting_key(spec, source, settings['view'],
                                               settings['eot_samples'], x_r, y_r, batch, key_r))
    ok_all, d_all, rejected = [np.zeros(0, bool)], [], 0
    batches = data_lib.eval_batches(x_r, y_r, batch) if len(idx) else iter(())
    n_batches = math.ceil(len(idx) / batch)
    desc = spec.key if draws == 1 else f'{spec.key} draw {r + 1}/{draws}'
    if alive is not None:
      desc += f' ({len(idx)} left)'
    for i, (x, y, mask) in enumerate(reporting.progress(batches, n_batches, desc, progress)):
      xs, ys = parallel.put_batch(mesh, x, y)
      if crafted is not None and i < len(crafted):
        x_adv, = parallel.put_batch(mesh, crafted[i])
      else:
        x_adv = attack_fn(source.variables, xs, ys, jax.random.fold_in(key_r, i))
        if crafted is not None:
          crafted.append(np.asarray(x_adv))
      k_cls = classify_key(target, key_r, i)
      pred = np.asarray(predict(target.variables, x_adv, k_cls))
      ok = defended(target, pred, y) & mask
      if target.rejects:
        rejected += int(np.sum((pred == rejected_class(target)) & mask))
      ok_all.append(ok[mask])
      if spec.eps is None and r == 0:
        d = np.sqrt(np.sum((np.asarray(x_adv, np.float64) - x) ** 2, axis=(1, 2, 3)))
        clean_ok = np.asarray(predict(target.variables, xs, k_cls)) == y
        # 0 for examples misclassified without attack, inf where the attack found nothing.
        d = np.where(~clean_ok, 0.0, np.where(ok, np.inf, d))
        d_all.append(d[mask])
    ok_full = np.zeros(len(labels), bool)
    ok_full[idx] = np.concatenate(ok_all)
    return ok_full, rejected, (np.concatenate(d_all) if d_all else None)

  parts = (None if resume is None else
           _resume_parts(spec, target, source, settings, eot_chunk, images, labels, full_batch))
  per_draw, every, distances, detected, ok_draws = [], None, None, [], []
  for r in range(draws):
    key_r = draw_key(key, r, draws)
    idx = np.arange(len(labels)) if alive is None else np.flatnonzero(alive[r])
    path = kept = None
    if resume is not None:
      path = resume.path(*parts, np.asarray(jax.random.key_data(key_r)).ravel(), idx)
      kept = resume.load(path)
      if kept is not None and progress:
        print(f'  {spec.key} draw {r + 1}/{draws}: resumed from {path}', flush=True)
    if kept is None:
      kept = attack_draw(r, key_r, idx)
      if path is not None:
        Resume.save(path, *kept)
    ok_all, rejected, d = kept
    ok_draws.append(ok_all)
    per_draw.append(int(ok_all.sum()))
    detected.append(rejected)
    every = ok_all if every is None else every & ok_all
    if d is not None:
      distances = d
  return AttackResult(spec, settings['view'], settings['eot_samples'], per_draw, len(labels),
                      int(every.sum()), distances, detected if target.rejects else None,
                      ok_draws, alive is not None)


def effective_draws(target: Defence, source: Defence | None, draws: int) -> int:
  """How many draws an attack on `target` crafted on `source` runs: 1 if neither is random."""
  return draws if target.randomised or (source is not None and source.randomised) else 1


def survivor_batch(n: int, full_batch: int, mesh) -> int:
  """The batch `n` surviving examples run in: the next power of two (a multiple of the device
  count), at most the full batch."""
  return min(full_batch, parallel.divisible_batch(1 << max(0, n - 1).bit_length(), mesh))


def result_row(res: AttackResult, thresholds) -> dict[str, Any]:
  """One row of robustness.json: the attack's full settings next to its number."""
  spec = res.spec
  row = {'attack': spec.key, 'norm': spec.norm, 'eps': spec.eps, 'steps': spec.steps,
         'restarts': spec.restarts, 'loss': spec.loss, 'view': res.view,
         'eot_samples': res.eot_samples, 'accuracy': res.accuracy, 'correct': res.correct,
         'seen': res.seen * res.draws, 'settings': jsonable(spec.kwargs)}
  if res.cascade:  # counted over all examples; only the survivors of the rows above attacked
    row['worst_case'] = True
  if res.draws > 1:
    row.update(draws=res.draws, accuracy_worst=res.accuracy_worst,
               correct_per_draw=res.correct_per_draw, correct_every_draw=res.correct_every_draw)
  if res.detected_per_draw is not None:
    row['detected'] = sum(res.detected_per_draw)
    row['detection_rate'] = row['detected'] / row['seen']
  if res.distances is not None:
    d = res.distances
    finite = d[np.isfinite(d) & (d > 0)]
    median = float(np.median(d))
    row['median_l2'] = median if math.isfinite(median) else None
    row['mean_l2'] = float(finite.mean()) if finite.size else None
    row['accuracy_at'] = {f'{t:g}': float(np.mean(d > t)) for t in thresholds}
  return row


def jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
  return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in kwargs.items()}
