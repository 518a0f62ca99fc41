"""HGD's tables run: train or reuse the classifiers and denoisers, evaluate every row three ways.

Usage:
  result = run_hgd_table('3', workdir='runs/repro', budget='cpu', data_dirs={...},
                         datasets=('mnist', 'cifar10'))

The tables as data, the roles of our models and the budgets: `hgd_cvpr2018`. Each evaluation
is a robustness.json under WORKDIR/<dataset>-<budget>/evals/hgd_*, reused when its config is
unchanged (a stopped run resumes); the results go to RESULTS_DIR/hgd_table<N>[_<budget>].json /
.md and, with `docs_path`, to the table's generated section of docs/HGD.md.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from defendpp_jax import data as data_lib
from defendpp_jax import files
from defendpp_jax import protocol
from defendpp_jax.attacks import specs as specs_lib
from defendpp_jax.defences import base
from defendpp_jax.defences import classifier as classifier_lib
from defendpp_jax.defences import hgd
from defendpp_jax.defences import registry
from defendpp_jax.evaluation import hgd_analysis
from defendpp_jax.evaluation.evaluate import run_entries
from defendpp_jax.reproduce import hgd_cvpr2018 as spec
from defendpp_jax.reproduce import runner


def _train_all(names, dataset, budget, root, data_dir, seed) -> dict[str, Any]:
  """Trains (or reuses) the classifiers, then the denoisers among `names`."""
  classifiers = [spec.TARGET, *spec.ENSEMBLE, spec.HELD_OUT]
  classifiers += [n for n in names if n not in spec.DENOISERS and n not in classifiers]
  summaries = {}
  for m in classifiers:
    print(f'=== hgd {dataset}: classifier {m}', flush=True)
    summaries[m] = runner._train(  # pylint: disable=protected-access
        spec.classifier_config(dataset, m, budget, root, data_dir, seed),
        runner.model_dir(root, dataset, budget, m))
  for m in [n for n in names if n in spec.DENOISERS]:
    print(f'=== hgd {dataset}: denoiser {m}', flush=True)
    t0 = time.time()
    summaries[m] = runner._train(  # pylint: disable=protected-access
        spec.denoiser_config(dataset, m, budget, root, data_dir, seed),
        runner.model_dir(root, dataset, budget, f'hgd_{m}'))
    summaries[m].setdefault('elapsed_s', time.time() - t0)
  return summaries


# ---------------------------------------------------------------------------------------------
# Rows of Tables 2-5 and 8: three evaluations each, through launch.evaluate's configs.


def _eval_config(row: spec.Row, kind: str, dataset, budget, root, data_dir, seed):
  if row.model in spec.DENOISERS:
    config = spec.denoiser_config(dataset, row.model, budget, root, data_dir, seed)
    if row.deploy_on:
      config.defense.classifier_workdir = runner.model_dir(root, dataset, budget, row.deploy_on)
    config.defense.hgd.residual_scale = row.residual_scale
  else:
    config = spec.classifier_config(dataset, row.model, budget, root, data_dir, seed)
    config.model.conv = 'auto'
  ec = config.eval
  ec.figures = False
  ec.classes = row.classes
  ec.num_examples = (spec.ADAPTIVE_IMAGES if kind == 'adaptive' else spec.EVAL_IMAGES)[budget]
  if kind == 'adaptive':
    ec.attacks = spec.adaptive_entries(dataset, spec.ADAPTIVE_STEPS[budget])
    ec.threat_model, ec.view = 'white_box', 'exact'
    ec.worst_case = True  # per-example worst case: each attack on the survivors of the others
  else:
    ec.attacks = spec.oblivious_entries(dataset)
    if kind == 'black':
      ec.threat_model = 'transfer'
      ec.source_workdir = runner.model_dir(root, dataset, budget, spec.HELD_OUT)
    else:
      ec.threat_model = 'oblivious' if row.model in spec.DENOISERS else 'white_box'
  return config


def _row_key(row: spec.Row) -> str:
  key = row.model + (f'_on_{row.deploy_on}' if row.deploy_on else '')
  key += f'_x{row.residual_scale:g}' if row.residual_scale != 1 else ''
  return key + ('_classes' + ''.join(map(str, row.classes)) if row.classes else '')


def _columns(white: dict, black: dict, adaptive: dict) -> dict[str, float]:
  """The paper's columns (and ours) in % from the three reports."""
  def acc(report, label):
    return {r['attack']: r['accuracy'] for r in report['rows']}[label]
  out = {'Clean': 100 * white['clean_accuracy']}
  for i in (1, 2):
    out[f'White eps{i}'] = 50 * (acc(white, f'fgsm_eps{i}') + acc(white, f'ifgsm4_eps{i}'))
    out[f'Black eps{i}'] = 50 * (acc(black, f'fgsm_eps{i}') + acc(black, f'ifgsm4_eps{i}'))
    labels = [r['attack'] for r in adaptive['rows'] if r['attack'].endswith(f'_eps{i}')]
    out[f'Adaptive eps{i}'] = 100 * min(acc(adaptive, k) for k in labels)
  return out


def _adaptive_checks(reports: dict[str, dict]) -> list[str]:
  """The reproduction's own sanity check: at each eps, the adaptive attacks (through D and f)
  are at least as strong as every oblivious one (names of the failed checks)."""
  failed = []
  for i in (1, 2):
    white = [r['accuracy'] for r in reports['white']['rows'] if r['attack'].endswith(f'_eps{i}')]
    adaptive = [r['accuracy'] for r in reports['adaptive']['rows']
                if r['attack'].endswith(f'_eps{i}')]
    if white and adaptive and min(adaptive) > min(white):
      failed.append(f'adaptive at eps{i} weaker than an oblivious attack '
                    f'({min(adaptive):.3f} > {min(white):.3f})')
  return failed


def _detail(reports: dict[str, dict]) -> dict[str, Any]:
  """{'<white|black|adaptive>:<attack>': accuracy, counts, view} of every row."""
  return {f'{kind}:{r["attack"]}': {'accuracy': r['accuracy'], 'correct': r['correct'],
                                    'seen': r['seen'], 'view': r.get('view'),
                                    'worst_case': bool(r.get('worst_case'))}
          for kind, rep in reports.items() for r in rep['rows']}


def _evaluate_row(table, row, dataset, budget, root, data_dir, seed) -> dict[str, Any]:
  reports, dirs = {}, {}
  for kind in ('white', 'black', 'adaptive'):
    config = _eval_config(row, kind, dataset, budget, root, data_dir, seed)
    out_dir = os.path.join(os.path.abspath(root), f'{dataset}-{budget}', 'evals',
                           f'hgd_{_row_key(row)}_{kind}')
    print(f'=== hgd table {table} {dataset}: {row.label!r}, {kind} -> {out_dir}', flush=True)
    reports[kind], dirs[kind] = runner._evaluate(  # pylint: disable=protected-access
        config, spec.run_dir(root, dataset, budget, row.model), out_dir)
  ours = _columns(reports['white'], reports['black'], reports['adaptive'])
  failed = sorted({c['name'] for r in reports.values() for c in r['sanity_checks']
                   if not c['passed']}) + _adaptive_checks(reports)
  return {'label': row.label, 'model': row.model, 'deploy_on': row.deploy_on,
          'classes': list(row.classes), 'residual_scale': row.residual_scale,
          'paper': dict(zip(spec.COLUMNS, row.paper)) if row.paper else None, 'ours': ours,
          'attacks': _detail(reports),
          'num_examples': {k: r['num_examples'] for k, r in reports.items()},
          'failed_checks': failed, 'eval_dirs': dirs}


# ---------------------------------------------------------------------------------------------
# Table 9: ensembles, evaluated in-process (no single run deploys them).


def _pipeline_defence(pipeline, dataset, budget, root, data_dir, ds):
  pres, classifiers = pipeline
  nets = [registry.build(spec.classifier_config(dataset, c, budget, root, data_dir),
                         runner.model_dir(root, dataset, budget, c), ds) for c in classifiers]
  behind = nets[0] if len(nets) == 1 else base.ensemble(nets)
  if not pres:
    return behind
  built = [registry.hgd_preprocessor(spec.denoiser_config(dataset, p, budget, root, data_dir),
                                     spec.run_dir(root, dataset, budget, p), ds) for p in pres]
  pre = built[0] if len(built) == 1 else hgd.averaged_preprocessors(built, '&'.join(pres))
  return base.preprocess(pre, behind)


def _table9(dataset, budget, root, data_dir, seed) -> list[dict[str, Any]]:
  config = spec.classifier_config(dataset, spec.TARGET, budget, root, data_dir, seed)
  ds = data_lib.dataset_of(config)
  f1 = registry.build(config, runner.model_dir(root, dataset, budget, spec.TARGET), ds)
  held_out = registry.build(spec.classifier_config(dataset, spec.HELD_OUT, budget, root, data_dir),
                            runner.model_dir(root, dataset, budget, spec.HELD_OUT), ds)
  images, labels = ds.test_images, ds.test_labels
  n, n_adv = spec.EVAL_IMAGES[budget] or len(labels), spec.ADAPTIVE_IMAGES[budget] or len(labels)
  thresholds = protocol.l2_thresholds(dataset)
  out = []
  for label, paper, pipelines in spec.ROWS_9:
    path = os.path.join(os.path.abspath(root), f'{dataset}-{budget}', 'evals',
                        'hgd_table9_' + label.replace(' ', '').replace('>', '').replace(
                            '&', '+') + '.json')
    key = {'label': label, 'pipelines': json.loads(json.dumps(pipelines)), 'n': n,
           'n_adaptive': n_adv, 'steps': spec.ADAPTIVE_STEPS[budget], 'seed': seed,
           'adaptive_worst_case': True,
           'models': {m: _fingerprint(root, dataset, budget, m)
                      for p in pipelines for m in p[0] + p[1]}}
    if os.path.isfile(path):
      with open(path) as f:
        saved = json.load(f)
      if saved.get('key') == key:
        out.append(saved['row'])
        continue
    print(f'=== hgd table 9 {dataset}: {label!r}', flush=True)
    members = [_pipeline_defence(p, dataset, budget, root, data_dir, ds) for p in pipelines]
    defence = members[0] if len(members) == 1 else base.ensemble(members, label)
    ec = config.eval
    reports = {}
    for kind, source, n_k, entries in (
        ('white', f1, n, spec.oblivious_entries(dataset)),
        ('black', held_out, n, spec.oblivious_entries(dataset)),
        ('adaptive', None, n_adv, spec.adaptive_entries(dataset, spec.ADAPTIVE_STEPS[budget]))):
      specs = specs_lib.attack_specs(
          ml_collections.ConfigDict({**ec.to_dict(), 'attacks': entries}), dataset)
      rep = run_entries(
          defence, images[:n_k], labels[:n_k], specs, batch_size=ec.batch_size,
          key=jax.random.key(ec.seed), view='exact', eot_samples=1, eot_chunk=1, draws=1,
          source=source, thresholds=thresholds, worst_case=kind == 'adaptive')
      reports[kind] = rep
    row = {'label': label, 'paper': dict(zip(spec.COLUMNS, paper)),
           'ours': _columns(reports['white'], reports['black'], reports['adaptive']),
           'attacks': _detail(reports),
           'num_examples': {k: rep['num_examples'] for k, rep in reports.items()},
           'failed_checks': sorted({c['name'] for rep in reports.values()
                                    for c in rep['sanity_checks'] if not c['passed']}) +
                            _adaptive_checks(reports),
           'white_crafted_on': f1.name, 'black_crafted_on': held_out.name}
    files.write_json(path, {'key': key, 'row': row})
    out.append(row)
  return out


def _fingerprint(root, dataset, budget, model) -> str:
  with open(os.path.join(spec.run_dir(root, dataset, budget, model), 'train_summary.json')) as f:
    return json.load(f)['params_sha256']


# ---------------------------------------------------------------------------------------------
# Figs. 5 and 7: the error amplification and the predicted-vs-true noise.

def figures(dataset, budget, root, data_dir, figures_dir, seed=0) -> dict[str, Any]:
  """Fig. 5 (layer-wise perturbation levels: no defence, random noise, the pixel-guided
  denoiser, LGD) and Fig. 7 (predicted vs true noise) on I-FGSM-4 images crafted on the
  training ensemble at eps2 (the paper's "IFGSM4 x IncV3/IncResV2/Res", eps 16), the first
  spec.FIGURE_IMAGES test images; PNGs in `figures_dir`, the numbers returned."""
  config = spec.classifier_config(dataset, spec.TARGET, budget, root, data_dir, seed)
  config.model.conv = 'auto'
  ds = data_lib.dataset_of(config)
  n = spec.FIGURE_IMAGES[budget]
  x = ds.test_images[:n]
  target = registry.build(config, runner.model_dir(root, dataset, budget, spec.TARGET), ds)
  members = []
  for m in spec.ENSEMBLE:
    c = spec.classifier_config(dataset, m, budget, root, data_dir, seed)
    c.model.conv = 'auto'
    members.append(registry.build(c, runner.model_dir(root, dataset, budget, m), ds))
  eps = spec.eps_pair(dataset)[1]
  vs = [target.variables] + [m.variables for m in members]
  craft = jax.jit(lambda vs, x, e, k: hgd.craft_batch(
      'ifgsm4_ensemble', lambda z: target.logits(vs[0], z),
      [lambda z, d=d, v=v: d.logits(v, z) for d, v in zip(members, vs[1:])], x, e, k)[0])
  adv = np.asarray(craft(vs, x, np.full(n, eps, np.float32), jax.random.key(seed)))
  sign = np.where(np.random.default_rng(seed).random(x.shape) < 0.5, -1.0, 1.0)
  noisy = np.clip(x + eps * sign, 0.0, 1.0).astype(np.float32)
  module = classifier_lib.module_of(config, ds)
  curves = {'no defence': hgd_analysis.amplification(module, target.variables, x, adv),
            'random noise (+-eps)': hgd_analysis.amplification(module, target.variables, x,
                                                                noisy)}
  curves_paper = dict(curves)
  slopes = {}
  for label, name in spec.FIGURE_DENOISERS:
    pre = registry.hgd_preprocessor(
        spec.denoiser_config(dataset, name, budget, root, data_dir, seed),
        spec.run_dir(root, dataset, budget, name), ds)
    den = lambda z, pre=pre: pre.apply(pre.variables, z, None, False)
    curves[label] = hgd_analysis.amplification(module, target.variables, x, adv, denoise=den)
    curves_paper[label] = hgd_analysis.amplification(module, target.variables, x, adv,
                                                     denoise=den, reference='clean')
    slopes[label] = hgd_analysis.noise_slope(x, adv, np.asarray(jax.jit(den)(adv)))
  tag = f'{dataset}{"_" + budget if budget != "cpu" else ""}'
  name = 'MNIST' if dataset == 'mnist' else 'CIFAR-10 (JPEG copy)'
  paths = {
      'fig5': hgd_analysis.plot_amplification(
          curves, os.path.join(figures_dir, f'hgd_fig5_{tag}.png'),
          title=f'{name}: ||f_l(D(x_adv)) - f_l(D(x))|| / ||f_l(D(x))||, I-FGSM-4 eps {eps:.3g}'),
      'fig5_paper_reference': hgd_analysis.plot_amplification(
          curves_paper, os.path.join(figures_dir, f'hgd_fig5_{tag}_vs_clean.png'),
          title=f'{name}: ||f_l(D(x_adv)) - f_l(x)|| / ||f_l(x)|| (the paper\'s formula)'),
      'fig7': hgd_analysis.plot_noise_slope(
          slopes, os.path.join(figures_dir, f'hgd_fig7_{tag}.png'),
          title=f'{name}: predicted vs true noise, I-FGSM-4 eps {eps:.3g}')}
  strip = lambda d: {k: v for k, v in d.items() if k != 'histogram'}
  return {'dataset': dataset, 'images': n, 'eps': eps, 'amplification': curves,
          'amplification_vs_clean': curves_paper,
          'noise_slope': {k: strip(v) for k, v in slopes.items()}, 'figures': paths}


# ---------------------------------------------------------------------------------------------
# Tables.

def run_hgd_table(table: str, workdir: str, budget: str = 'cpu',
                  data_dirs: dict[str, str] | None = None, results_dir: str = 'results',
                  seed: int = 0, datasets: tuple[str, ...] = spec.DATASETS,
                  docs_path: str | None = None, figures_dir: str = 'docs/figures'
                  ) -> dict[str, Any]:
  """Trains (or reuses) every model of `table` on each dataset, evaluates its rows, writes
  RESULTS_DIR/hgd_table<N>[_<budget>].json / .md and, with `docs_path`, the table's generated
  section of that document (docs/HGD.md); Table 3 also draws Figs. 5 and 7 in `figures_dir`."""
  table = str(table)
  if table not in spec.TABLES:
    raise ValueError(f'--table={table!r} is not one of {spec.TABLES} (--paper=hgd)')
  spec.check_budget(budget)
  for d in datasets:
    if d not in spec.DATASETS:
      raise ValueError(f'--datasets: {d!r} is not one of {spec.DATASETS}')
  result = {'table': table, 'budget': budget, 'seed': seed, 'datasets': {}}
  for dataset in datasets:
    data_dir = (data_dirs or {}).get(dataset, '')
    t0 = time.time()
    summaries = _train_all(spec.models_of(table), dataset, budget, workdir, data_dir, seed)
    rows = (_table9(dataset, budget, workdir, data_dir, seed) if table == '9' else
            [_evaluate_row(table, r, dataset, budget, workdir, data_dir, seed)
             for r in spec.ROWS[table]])
    e1, e2 = spec.eps_pair(dataset)
    result['datasets'][dataset] = {
        'data_dir': data_dir,
        'cifar10_is_jpeg_copy': dataset == 'cifar10' and 'jpeg' in data_dir,
        'eps': [e1, e2], 'rows': rows,
        'models': {m: {'step': s['step'], 'clean_accuracy_full_test': s.get('clean_accuracy'),
                       'params_sha256': s['params_sha256'], 'model': s.get('model')}
                   for m, s in summaries.items()},
        'elapsed_s': time.time() - t0}
    if table == '3':  # its models are the figures' (Figs. 5 and 7)
      result['datasets'][dataset]['figures'] = figures(dataset, budget, workdir, data_dir,
                                                       figures_dir, seed)
  result['budget_overrides'] = spec.BUDGET_OVERRIDES[budget]
  name = f'hgd_table{table}{"_" + budget if budget != "cpu" else ""}'
  path = os.path.join(results_dir, f'{name}.json')
  if os.path.isfile(path):  # keep the other datasets' results of an earlier run
    with open(path) as f:
      old = json.load(f)
    for d, v in old.get('datasets', {}).items():
      result['datasets'].setdefault(d, v)
  files.write_json(path, result)
  md = markdown(result)
  files.write_text(os.path.join(results_dir, f'{name}.md'), md)
  if docs_path:
    files.write_generated(docs_path, f'<!-- hgd-table{table}:start (generated by python -m '
                          f'launch.reproduce --paper=hgd --table={table}) -->',
                          f'<!-- hgd-table{table}:end -->', md, 'HGD reproduced')
  print(md, flush=True)
  return result


def markdown(result: dict[str, Any]) -> str:
  """Paper (ImageNet) / ours per column, one line per row, per dataset."""
  lines = []
  for dataset, d in result['datasets'].items():
    jpeg = ' (CIFAR-10 = the JPEG re-encoded copy)' if d['cifar10_is_jpeg_copy'] else ''
    e1, e2 = d['eps']
    n = d['rows'][0]['num_examples']
    lines += [f'HGD Table {result["table"]}, {dataset}{jpeg}, budget `{result["budget"]}`; '
              f'accuracy in %, paper (ImageNet, IncV3) / ours; eps1 = {e1:.4g}, eps2 = '
              f'{e2:.4g}; white / black on {n["white"]} test images, adaptive on '
              f'{n["adaptive"]}:', '',
              '| row | ' + ' | '.join(spec.COLUMNS + spec.ADAPTIVE_COLUMNS) + ' | checks |',
              '|---' * (len(spec.COLUMNS) + len(spec.ADAPTIVE_COLUMNS) + 2) + '|']
    for r in d['rows']:
      cells = []
      for c in spec.COLUMNS + spec.ADAPTIVE_COLUMNS:
        p = (r['paper'] or {}).get(c)
        o = r['ours'].get(c)
        cells.append(f'{"-" if p is None else f"{p:.1f}"} / {"-" if o is None else f"{o:.1f}"}')
      checks = 'ok' if not r['failed_checks'] else 'FAILED: ' + '; '.join(r['failed_checks'])
      lines.append(f'| {r["label"]} | ' + ' | '.join(cells) + f' | {checks} |')
    k = spec.ADAPTIVE_STEPS[result['budget']]
    lines += ['', 'White: FGSM and I-FGSM-4 (step eps/4) crafted on the target classifier '
              'alone (oblivious), the mean of the two; Black: the same crafted on the held-out '
              f'ResNet-34; Adaptive: PGD-{k}, APGD-CE and APGD-DLR ({k} steps) through the '
              'whole pipeline as a cascade, each on the images the ones before it left correct, '
              'eps1 first: the per-example worst case over the three (the paper has no such '
              'column).', '']
    if d.get('figures'):
      f = d['figures']
      lines += [f'Figs. 5 and 7 ({f["images"]} test images, I-FGSM-4 on the ensemble at eps '
                f'{f["eps"]:.3g}): ' + ', '.join(f'`{v}`' for v in f['figures'].values()) +
                '; noise slopes ' + ', '.join(f'{k}: {v["slope"]:.2f}'
                                              for k, v in f['noise_slope'].items()), '']
  return '\n'.join(lines)
