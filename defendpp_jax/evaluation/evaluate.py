"""Robustness evaluation: every configured attack on a deployed defence, counted exactly.

Usage:
  report = evaluate(config, workdir)          # a trained run; writes robustness.{json,md}, figures
  report = evaluate_defence(defence, images, labels, attacks=('fgsm', 'pgd(steps=40)'), eps=0.3)

Accuracies are integer counts of correct predictions over examples seen, never averages of batch
means. Every row states its attack's settings, the attacker's view (exact / BPDA / EOT /
oblivious) and loss; the sanity and gradient checks that reveal gradient masking or a broken
attack are computed and written with every table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from defendpp_jax import data as data_lib
from defendpp_jax import files
from defendpp_jax import nn as dnn
from defendpp_jax import parallel
from defendpp_jax import protocol
from defendpp_jax import validate
from defendpp_jax.attacks import specs as specs_lib
from defendpp_jax.defences import registry
from defendpp_jax.defences.base import Defence
from defendpp_jax.evaluation import diagnostics
from defendpp_jax.evaluation import reporting
from defendpp_jax.evaluation import runner
from defendpp_jax.runs import config as config_lib
from defendpp_jax.runs import saved

# Under an evaluation's output directory: the finished draws of its attacks until its report
# is written (runner.Resume), unless config.eval.resume_dir / RESUME_ENV names a store.
RESUME_DIR = 'partial'
RESUME_ENV = 'DEFENDPP_RESUME_DIR'


def config_digest(config: ml_collections.ConfigDict) -> str:
  """SHA-256 of what an evaluation's results depend on in its config: all of it but where its
  draws are kept (config_lib.PLACE_FIELDS)."""
  d = config_lib.computed_fields(config.to_dict())
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=files.json_default).encode()
                        ).hexdigest()


def resume_store(config: ml_collections.ConfigDict, out_dir: str) -> tuple[runner.Resume, bool]:
  """(the Resume of an evaluation writing to `out_dir`, whether it is a shared store that is
  kept): config.eval.resume_dir, else $DEFENDPP_RESUME_DIR, else `out_dir`/partial."""
  shared = config.eval.get('resume_dir', '') or os.environ.get(RESUME_ENV, '')
  directory = os.path.abspath(shared) if shared else os.path.join(out_dir, RESUME_DIR)
  return runner.Resume(directory, config_digest(config)), bool(shared)


def _clean(defence: Defence, images, labels, batch_size, key, draws) -> tuple[int, int, float]:
  """(correct summed over draws, seen summed over draws, worst draw's accuracy)."""
  draws = draws if defence.randomised else 1
  per_draw = [runner.clean_counts(defence, images, labels, batch_size,
                                  key=runner.draw_key(key, r, draws))[0] for r in range(draws)]
  return sum(per_draw), draws * len(labels), min(per_draw) / len(labels)


def run_entries(defence: Defence, images: np.ndarray, labels: np.ndarray,
                specs: Sequence[specs_lib.AttackSpec], *, batch_size: int, key: jax.Array,
                view: str, eot_samples: int, eot_chunk: int, draws: int,
                source: Defence | None = None, thresholds=(), progress: bool = True,
                transfer_from: Defence | None = None, worst_case: bool = False,
                check_examples: int = 0, resume: runner.Resume | None = None
                ) -> dict[str, Any]:
  """The rows, transfer rows and checks of one evaluation of `defence` (no report written).

  `worst_case` (config.eval.worst_case): the eps-bounded attacks run as a cascade (AutoAttack's
  worst case over attacks), see `worst_case_results`. `resume`: every attack's finished draws
  are kept there, and loaded instead of attacked again (runner.run_attack)."""
  n = len(labels)
  correct, seen, worst = _clean(defence, images, labels, batch_size, key, draws)
  clean_acc = correct / seen
  common = dict(view=view, eot_samples=eot_samples, eot_chunk=eot_chunk, draws=draws,
                progress=progress, resume=resume)
  clean = None
  single = [s for s in specs if not s.group]
  if worst_case or len(single) < len(specs):
    clean = clean_masks(defence, images, labels, batch_size, key,
                        runner.effective_draws(defence, source, draws))
  if worst_case:
    results = worst_case_results(defence, images, labels, single, batch_size, key,
                                 source=source, clean=clean, **common)
  else:
    results = {s.key: runner.run_attack(s, defence, images, labels, batch_size, key,
                                        source=source, **common) for s in single}
  results.update(ensemble_results(defence, images, labels, specs, batch_size, key,
                                  source=source, clean=clean, **common))
  transfer = {}
  if transfer_from is not None:
    transfer = {s.key: runner.run_attack(s, defence, images, labels, batch_size, key,
                                         source=transfer_from, **common) for s in specs}
  checks = diagnostics.sanity_checks(defence, images, labels, clean_acc, results, batch_size,
                                     key, transfer, view=view, eot_samples=eot_samples,
                                     eot_chunk=eot_chunk, draws=draws,
                                     alive=clean if source is None else None,
                                     num=check_examples, resume=resume)
  if source is None:  # the gradients attacked are the defence's own
    checks += diagnostics.gradient_checks(defence, images, labels, results, key, view,
                                          eot_samples, eot_chunk)
  out = {'num_examples': n, 'clean_accuracy': clean_acc, 'clean_correct': correct,
         'randomised': defence.randomised,
         'stand_ins': [list(s) for s in defence.stand_ins],
         'rows': [runner.result_row(r, thresholds) for r in results.values()],
         'transfer_rows': [runner.result_row(r, thresholds) for r in transfer.values()],
         'sanity_checks': checks, 'sanity_checks_passed': all(c['passed'] for c in checks)}
  if defence.randomised and draws > 1:
    out.update(draws=draws, clean_accuracy_worst=worst)
  if defence.info:
    out['defence_info'] = dict(defence.info)
  if defence.rejects:
    rejected = runner.clean_rejections(defence, images, labels, batch_size, key)
    out['detector'] = {'clean_rejected': rejected, 'clean_false_positive_rate': rejected / n,
                       **{k: defence.info[k] for k in ('threshold', 'false_positive_rate')
                          if k in defence.info}}
  return out


def clean_masks(defence: Defence, images, labels, batch_size: int, key: jax.Array,
                draws: int) -> list[np.ndarray]:
  """Per draw, which unattacked examples the defence defends: where a cascade starts."""
  return [runner.clean_predictions(defence, images, labels, batch_size,
                                   key=runner.draw_key(key, r, draws), rejected_ok=True)
          for r in range(draws)]


def worst_case_results(defence: Defence, images: np.ndarray, labels: np.ndarray,
                       specs: Sequence[specs_lib.AttackSpec], batch_size: int, key: jax.Array,
                       source: Defence | None = None, draws: int = 1,
                       clean: list[np.ndarray] | None = None, **common
                       ) -> dict[str, runner.AttackResult]:
  """The eps-bounded attacks as a cascade, per norm in increasing eps (the given order within
  an eps): each attacks only the examples, per draw, still defended after the clean pass and
  every attack before it, so its row is the per-example worst case over it and them (an
  adversarial at a smaller eps lies in every larger ball) and never above the minimum over the
  attacks run independently. Minimal-norm attacks run on every example, after."""
  draws = runner.effective_draws(defence, source, draws)
  if clean is None:
    clean = clean_masks(defence, images, labels, batch_size, key, draws)
  results = {}
  bounded = sorted((s for s in specs if s.eps is not None), key=lambda s: (s.norm, s.eps))
  for norm in dict.fromkeys(s.norm for s in bounded):
    results.update(_cascade([s for s in bounded if s.norm == norm], defence, images, labels,
                            batch_size, key, source, draws, clean, common))
  for s in specs:
    if s.eps is None:
      results[s.key] = runner.run_attack(s, defence, images, labels, batch_size, key,
                                         source=source, draws=draws, **common)
  return results


def ensemble_results(defence: Defence, images: np.ndarray, labels: np.ndarray,
                     specs: Sequence[specs_lib.AttackSpec], batch_size: int, key: jax.Array,
                     source: Defence | None = None, draws: int = 1,
                     clean: list[np.ndarray] | None = None, **common
                     ) -> dict[str, runner.AttackResult]:
  """Each ensemble entry (autoattack): its components in order, each on the examples (per
  draw) still defended after the clean pass and the components before it; then the ensemble's
  own row, the worst case per example over all of them (the last component's count)."""
  groups: dict[str, list[specs_lib.AttackSpec]] = {}
  for s in specs:
    if s.group:
      groups.setdefault(s.group, []).append(s)
  if not groups:
    return {}
  draws = runner.effective_draws(defence, source, draws)
  if clean is None:
    clean = clean_masks(defence, images, labels, batch_size, key, draws)
  results = {}
  for group, parts in groups.items():
    part_results = _cascade(parts, defence, images, labels, batch_size, key, source, draws,
                            clean, common)
    results.update(part_results)
    last = part_results[parts[-1].key]
    results[group] = dataclasses.replace(last, spec=specs_lib.group_spec(parts))
  return results


def _cascade(specs, defence, images, labels, batch_size, key, source, draws, clean, common
             ) -> dict[str, runner.AttackResult]:
  """`specs` in order, each on the examples (per draw) still defended after `clean` and the
  ones before it."""
  alive, results = clean, {}
  for s in specs:
    res = runner.run_attack(s, defence, images, labels, batch_size, key, source=source,
                            draws=draws, alive=alive, **common)
    alive = res.ok_per_draw
    results[s.key] = res
  return results


def evaluate_defence(defence: Defence, images: np.ndarray, labels: np.ndarray,
                     attacks: Sequence[str] = ('fgsm', 'pgd', 'apgd', 'apgd_dlr'), *,
                     dataset: str = 'mnist', eps: float = 0.0, view: str = 'auto',
                     eot_samples: int = 10, eot_chunk: int = 10, draws: int = 1,
                     batch_size: int = 500, seed: int = 0, progress: bool = False,
                     **eval_fields) -> dict[str, Any]:
  """Attacks any Defence on (images, labels) and returns the report as a dict.

  `attacks` are entries as in config.eval.attacks; their defaults come from config.eval's
  fields (override any with keyword arguments, e.g. pgd_steps=40); `eps` 0 = `dataset`'s.
  """
  data_lib.check_pixels(np.asarray(images), 'images')
  ec = config_lib.get_base_config().eval
  ec.update({'attacks': tuple(attacks), 'eps': eps, **eval_fields})
  specs = specs_lib.attack_specs(ec, dataset)
  report = run_entries(defence, np.asarray(images, np.float32), np.asarray(labels, np.int32),
                       specs, batch_size=batch_size, key=jax.random.key(seed), view=view,
                       eot_samples=eot_samples, eot_chunk=eot_chunk, draws=draws,
                       thresholds=protocol.l2_thresholds(dataset), progress=progress,
                       worst_case=ec.worst_case, check_examples=ec.check_examples)
  return {'model': defence.name, 'dataset': dataset, 'step': None, **report}


def evaluate(config: ml_collections.ConfigDict, workdir: str, progress: bool = True,
             out_dir: str | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint of `workdir`; writes robustness.json / .md and figures.

  The files go to `out_dir` (default: `workdir`), so that one model can be evaluated under
  several settings (threat models, attack budgets) side by side.
  """
  validate.validate_config(config)
  ds = data_lib.dataset_of(config)
  ec = config.eval
  images, labels = test_split(ds, ec)
  target = registry.build(config, workdir, ds)
  step = _step_of(config, workdir)
  source = None
  if ec.source_workdir:
    source = registry.build(saved.config_of_run(ec.source_workdir), ec.source_workdir, ds)
  # What the report's rows are crafted on: the target itself through the view (white-box; the
  # oblivious view for grey-box) or another trained run (transfer).
  oblivious = ec.threat_model in validate.OBLIVIOUS
  view = 'oblivious' if oblivious else ec.view
  attack_source = source if ec.threat_model == 'transfer' else None
  crafted_on = ('classifier' if oblivious else
                source.name if ec.threat_model == 'transfer' and source else 'target')
  out_dir = out_dir or workdir
  # A stopped evaluation re-run with the same config resumes at the draw it was in.
  resume, shared_store = None, False
  if jax.process_count() == 1:
    resume, shared_store = resume_store(config, out_dir)
  report = run_entries(
      target, images, labels, specs_lib.attack_specs(ec, config.data.name),
      batch_size=ec.batch_size, key=jax.random.key(ec.seed), view=view,
      eot_samples=ec.eot_samples, eot_chunk=ec.eot_chunk, draws=ec.draws, source=attack_source,
      thresholds=protocol.l2_thresholds(config.data.name, ec.l2_thresholds), progress=progress,
      transfer_from=source if ec.threat_model != 'transfer' else None,
      worst_case=ec.get('worst_case', False), check_examples=ec.check_examples, resume=resume)
  transfer_rows = report.pop('transfer_rows')
  report = {
      'model': target.name, 'workdir': os.path.abspath(workdir), 'step': step,
      'weights_read': saved.weights_read(config.to_dict(), workdir),
      'dataset': config.data.name, 'threat_model': ec.threat_model, 'crafted_on': crafted_on,
      # the kernels the convolutions ran on (config.model.conv resolved on this machine)
      **dnn.conv_kernels(config.model.get('conv', dnn.CONV_BEFORE_FIELD)), **report,
      'transfer': ({'source_workdir': os.path.abspath(ec.source_workdir),
                    'source_model': source.name, 'rows': transfer_rows}
                   if transfer_rows else None),
      'config': config.to_dict(),
  }
  if ec.figures:
    report['eps_sweep'] = eps_sweep(config, target, images, labels, jax.random.key(ec.seed),
                                    view=view, source=attack_source)
    if target.diagnostics is not None:
      report['reconstruction'] = target.diagnostics(
          target, images, labels, protocol.linf_eps(config.data.name, ec.eps), ec.batch_size)
  if jax.process_index() == 0:
    reporting.write_report(report, out_dir)
  if resume is not None and not shared_store:
    resume.clear()
  print(reporting.markdown_table(report), flush=True)
  return report


def test_split(ds: data_lib.Dataset, ec: ml_collections.ConfigDict
               ) -> tuple[np.ndarray, np.ndarray]:
  """The evaluated test images: those of config.eval.classes (() = all), the first
  config.eval.num_examples of them (0 = all)."""
  images, labels = ds.test_images, ds.test_labels
  classes = tuple(ec.get('classes', ()))
  if classes:
    unknown = sorted(set(classes) - set(range(ds.num_classes)))
    if unknown:
      raise ValueError(f'config.eval.classes={classes}: {unknown} are not classes of '
                       f'{ds.name} (0 .. {ds.num_classes - 1})')
    keep = np.isin(labels, np.asarray(classes))
    images, labels = images[keep], labels[keep]
  n = ec.num_examples or len(labels)
  return images[:n], labels[:n]


def _step_of(config, workdir) -> int | None:
  """The training step of the run's checkpoint (None for a defence that trains nothing)."""
  if config.defense.name in registry.UNTRAINED:
    return None
  return saved.summary_of_run(workdir)['step'] if os.path.isfile(
      os.path.join(workdir, saved.SUMMARY)) else saved.restore_variables(workdir)[1]


def eps_sweep(config, target: Defence, images, labels, key, view: str = 'auto',
              source: Defence | None = None) -> dict[str, Any]:
  """Accuracy vs eps for FGSM and PGD (paper Fig. 6)."""
  ec = config.eval
  grid = protocol.eps_grid(config.data.name, ec.eps_grid)
  n = min(len(labels), ec.sweep_examples)
  out = {'eps': list(grid), 'fgsm': [], 'pgd': [], 'pgd_steps': ec.sweep_pgd_steps,
         'num_examples': n}
  for eps in grid:
    for name, spec in (('fgsm', specs_lib.make_spec('fgsm', eps=eps)),
                       ('pgd', specs_lib.make_spec('pgd', eps=eps, steps=ec.sweep_pgd_steps,
                                                   step_size_factor=ec.step_size_factor))):
      res = runner.run_attack(spec, target, images[:n], labels[:n], ec.batch_size, key,
                              source=source, view=view, eot_samples=ec.eot_samples,
                              eot_chunk=ec.eot_chunk, progress=False)
      out[name].append(res.accuracy)
  return out
