"""The paper's experiments (Tables 1-3, 5-8, Fig. 6) run: train or reuse models, evaluate rows.

Usage:
  result = run_table(2, workdir='runs/repro', budget='cpu', data_dirs={'mnist': ...})

Every model a table needs is a named set of config overrides (defendpp_mm2020.MODELS); it trains
in WORKDIR/<dataset>-<budget>/<model> (reused, by checkpoint, by every table that needs it) and
each evaluation of it writes its report to WORKDIR/<dataset>-<budget>/evals/<row> (reused when
its config is unchanged). The table is written to RESULTS_DIR/table<N>.json and table<N>.md.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections

from defendpp_jax import evaluation
from defendpp_jax import files
from defendpp_jax import training
from defendpp_jax.attacks import specs as specs_lib
from defendpp_jax.attacks.specs import COLUMNS
from defendpp_jax.evaluation import reporting
from defendpp_jax.reproduce.defendpp_mm2020 import BUDGETS
from defendpp_jax.reproduce.defendpp_mm2020 import CPU_BUDGET
from defendpp_jax.reproduce.defendpp_mm2020 import CPU_BUDGET_CIFAR
from defendpp_jax.reproduce.defendpp_mm2020 import GN_STD
from defendpp_jax.reproduce.defendpp_mm2020 import MEDIUM_BUDGET
from defendpp_jax.reproduce.defendpp_mm2020 import MEDIUM_BUDGET_CIFAR
from defendpp_jax.reproduce.defendpp_mm2020 import MODELS
from defendpp_jax.reproduce.defendpp_mm2020 import PAPER_BUDGET
from defendpp_jax.reproduce.defendpp_mm2020 import PAPER_COLUMNS
from defendpp_jax.reproduce.defendpp_mm2020 import STRONG_ATTACKS
from defendpp_jax.reproduce.defendpp_mm2020 import STRONG_EVAL
from defendpp_jax.reproduce.defendpp_mm2020 import TRANSFER_ATTACKS
from defendpp_jax.reproduce.defendpp_mm2020 import TRANSFER_COLUMNS
from defendpp_jax.reproduce.defendpp_mm2020 import table_spec
from defendpp_jax.runs import config as config_lib
from defendpp_jax.runs import saved
from defendpp_jax.runs import store as store_lib


def _override(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  for path, value in overrides.items():
    *parents, field = path.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[field] = value


def model_config(dataset: str, model: str, budget: str, root: str,
                 data_dir: str) -> ml_collections.ConfigDict:
  """The training config of MODELS[model] on `dataset` at `budget`."""
  if budget not in BUDGETS:
    raise ValueError(f'--budget={budget!r} is not one of {BUDGETS}')
  config = config_lib.dataset_config(dataset)
  config.data.data_dir = data_dir
  if budget == 'cpu':
    _override(config, CPU_BUDGET if dataset == 'mnist' else CPU_BUDGET_CIFAR)
  elif budget == 'medium':
    _override(config, MEDIUM_BUDGET if dataset == 'mnist' else MEDIUM_BUDGET_CIFAR)
  elif budget == 'paper':
    _override(config, PAPER_BUDGET)
  else:
    config = config_lib.apply_smoke(config)
  _override(config, MODELS[model])
  if config.defense.name != 'none':
    config.defense.classifier_workdir = model_dir(root, dataset, budget, 'plain')
  return config


def model_dir(root: str, dataset: str, budget: str, model: str) -> str:
  return os.path.join(os.path.abspath(root), f'{dataset}-{budget}', model)


class Preempted(RuntimeError):
  """A model's training stopped on SIGTERM (checkpoint saved): the table run stops too."""


def _same_config(saved: dict[str, Any], config: ml_collections.ConfigDict) -> bool:
  """Whether a saved run's / evaluation's config is `config` (migrated: fields it lacks filled
  in as its run behaved, moved fields read from their old place; where the draws were kept,
  config_lib.PLACE_FIELDS, aside)."""
  return (config_lib.computed_fields(config_lib.migrate_config(saved))
          == config_lib.computed_fields(config_lib.as_saved_json(config)))


def _has_every_row(report: dict[str, Any], config: ml_collections.ConfigDict) -> bool:
  """Whether a saved report has a row for every attack its config runs today: an ensemble
  entry (autoattack) whose components changed since is evaluated again, not reused."""
  specs = specs_lib.attack_specs(config.eval, config.data.name)
  wanted = {s.key for s in specs} | {s.group for s in specs if s.group}
  return wanted <= {r['attack'] for r in report.get('rows', ())}


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The finished run of `config` in `workdir`: found there, taken from the model store
  ($DEFENDPP_MODEL_STORE, `--model_store`) or trained; kept in the store when one is set."""
  store = os.environ.get(store_lib.STORE_ENV, '')
  path = os.path.join(workdir, 'train_summary.json')
  summary = None
  if os.path.isfile(path):
    with open(path) as f:
      summary = json.load(f)
    if not _same_config(summary['config'], config):
      saved_seed = config_lib.migrate_config(summary['config'])['train']['seed']
      if saved_seed != config.train.seed:
        raise ValueError(f'{workdir} holds a model trained with --seed={saved_seed}; --seed='
                         f'{config.train.seed} would retrain over it: give that seed its own '
                         '--workdir (and --results_dir)')
      summary = None
  elif store:
    summary = store_lib.import_run(workdir, store, config.train.seed,
                                   lambda s: _same_config(s, config))
  if summary is None:
    summary = training.train_and_evaluate(config, workdir)
    if summary.get('preempted'):
      raise Preempted(f'training in {workdir} stopped at step {summary["step"]} on SIGTERM '
                      '(saved); the same command resumes it')
  if store:
    store_lib.export_run(workdir, store, config.train.seed, lambda s: _same_config(s, config))
  return summary


def _evaluate(config: ml_collections.ConfigDict, workdir: str, out_dir: str
              ) -> tuple[dict[str, Any], str]:
  """(report, its directory): a saved evaluation of this model with this very config (in
  `out_dir` or, made for another table's row, beside it) and of the weights on disk now (a
  model retrained since is evaluated again), or a new one in `out_dir`."""
  evals = os.path.dirname(out_dir)
  others = sorted(os.listdir(evals)) if os.path.isdir(evals) else []
  weights = saved.weights_read(config.to_dict(), workdir)
  for d in [out_dir] + [os.path.join(evals, o) for o in others]:
    path = os.path.join(d, 'robustness.json')
    if os.path.isfile(path):
      with open(path) as f:
        report = json.load(f)
      if (_same_config(report['config'], config)
          and report['workdir'] == os.path.abspath(workdir)
          and report.get('weights_read') == weights and _has_every_row(report, config)):
        return report, d
  return evaluation.evaluate(config, workdir, progress=True, out_dir=out_dir), out_dir


def _train_models(table, rows, dataset, budget, workdir, data_dir, seed) -> dict[str, Any]:
  """Trains (or reuses) every model the rows need: {model: train summary}."""
  needed = []
  for row in rows:
    for m in (row.model, row.source, row.transfer):
      if m and m not in needed:
        needed.append(m)
  if any(MODELS[m].get('defense.name') for m in needed):  # a reformer's classifier first
    needed = ['plain'] + [m for m in needed if m != 'plain']
  summaries = {}
  for m in needed:
    config = model_config(dataset, m, budget, workdir, data_dir)
    config.train.seed = seed
    print(f'=== table {table}: model {m} in {model_dir(workdir, dataset, budget, m)}', flush=True)
    summaries[m] = _train(config, model_dir(workdir, dataset, budget, m))
  return summaries


def _row_config(row, dataset, budget, workdir, data_dir, seed, strong, attacks):
  config = model_config(dataset, row.model, budget, workdir, data_dir)
  config.train.seed = seed
  config.eval.attacks = attacks or (STRONG_ATTACKS if strong else row.attacks)
  if strong:
    _override(config, STRONG_EVAL)
    # The kernels do not change the weights being attacked, only the speed (and float
    # rounding); the MNIST budget pins XLA's for bit-identical re-runs of its standard tables.
    config.model.conv = 'auto'
  config.eval.threat_model = row.threat_model
  if row.source:
    config.eval.source_workdir = model_dir(workdir, dataset, budget, row.source)
  # Figures (eps sweep, reconstructions) once per model, in the standard evaluation.
  config.eval.figures = not (strong or row.source)
  return config


def _row_dir(table, row, dataset, budget, workdir, suffix) -> str:
  key = row.label.lower().replace(' ', '_').replace('.', '').replace('/', '').replace(
      '<-', 'from').replace('+', 'plus').replace('(', '').replace(')', '')
  return os.path.join(os.path.abspath(workdir), f'{dataset}-{budget}', 'evals',
                      f'table{table}_{key}{suffix}')


def _transfer_columns(table, row, config, dataset, budget, workdir, out_dir, ours):
  """The C&W / DDN columns crafted on `row.transfer` (added to `ours`); their summary."""
  t_config = config.copy_and_resolve_references()
  t_config.eval.threat_model = 'transfer'
  t_config.eval.source_workdir = model_dir(workdir, dataset, budget, row.transfer)
  t_config.eval.attacks = TRANSFER_ATTACKS
  t_config.eval.figures = False
  print(f'=== table {table}: row {row.label!r}, C&W / DDN crafted on {row.transfer}',
        flush=True)
  t_report, t_dir = _evaluate(t_config, model_dir(workdir, dataset, budget, row.model),
                              out_dir + '_transfer')
  t_rows = {r['attack']: r for r in t_report['rows']}
  ours.update({label: 100 * t_rows[k]['accuracy'] for k, label in TRANSFER_COLUMNS})
  return {'source_model': row.transfer, 'eval_dir': t_dir,
          'median_l2': {k: t_rows[k].get('median_l2') for k in TRANSFER_ATTACKS},
          'sanity_checks_passed': t_report['sanity_checks_passed']}


def _row_result(row, report, out_dir, ours, transfer) -> dict[str, Any]:
  measured = report['transfer']['rows'] if row.source else report['rows']
  rows_by = {r['attack']: r for r in measured}
  return {
      'label': row.label, 'model': row.model, 'threat_model': row.threat_model,
      'source_model': row.source,
      'paper': (dict(zip(PAPER_COLUMNS if len(row.paper or ()) == 5 else ('FGSM',),
                         row.paper)) if row.paper else None),
      'ours': ours,
      'median_l2': {k: rows_by[k].get('median_l2') for k in ('cw_l2', 'ddn') if k in rows_by},
      'accuracy_at': {k: rows_by[k].get('accuracy_at') for k in ('cw_l2', 'ddn')
                      if k in rows_by},
      'sanity_checks_passed': report['sanity_checks_passed'],
      'failed_checks': [c['name'] for c in report['sanity_checks'] if not c['passed']],
      'num_examples': report['num_examples'], 'eval_dir': out_dir,
      'train_step': report['step'],
      'eps_sweep': report.get('eps_sweep'),
      'transfer': transfer,
      'settings': {r['attack']: reporting.settings_text(r, results=False) for r in measured},
  }


def run_table(table: str, workdir: str, budget: str = 'cpu', data_dirs: dict[str, str] | None
              = None, strong: bool = False, results_dir: str = 'results',
              seed: int = 0, attacks: tuple[str, ...] | None = None,
              figures_dir: str = 'docs/figures',
              datasets: tuple[str, ...] = ('mnist', 'cifar10'),
              models: tuple[str, ...] | None = None) -> dict[str, Any]:
  """Trains (or reuses) every model of `table`, evaluates each row, writes the results.

  `attacks` replaces the rows' attacks (tests use a short list). `models` (MODELS keys) runs
  only the rows of those models; the results file keeps the other rows it already has. Figs. 7
  and 8 (defendpp_figures) write their PNGs to `figures_dir`, one per dataset in `datasets`.
  """
  table = str(table)
  if table in ('fig7', 'fig8'):
    from defendpp_jax.reproduce import defendpp_figures  # pylint: disable=g-import-not-at-top
    return defendpp_figures.run_figure(table, workdir, budget, data_dirs, results_dir,
                                       figures_dir, seed, datasets)
  dataset, rows = table_spec(table)
  all_rows = rows
  if models:
    unknown = sorted(set(models) - {r.model for r in rows})
    if unknown:
      raise ValueError(f'--models: {unknown} not in Table {table} (its models: '
                       f'{sorted({r.model for r in rows})})')
    rows = [r for r in rows if r.model in models]
  data_dir = (data_dirs or {}).get(dataset, '')
  t0 = time.time()
  summaries = _train_models(table, rows, dataset, budget, workdir, data_dir, seed)
  out_rows = []
  suffix = '_strong' if strong else ''
  for row in rows:
    config = _row_config(row, dataset, budget, workdir, data_dir, seed, strong, attacks)
    out_dir = _row_dir(table, row, dataset, budget, workdir, suffix)
    print(f'=== table {table}: row {row.label!r} -> {out_dir}', flush=True)
    report, out_dir = _evaluate(config, model_dir(workdir, dataset, budget, row.model), out_dir)
    measured = report['transfer']['rows'] if row.source else report['rows']
    rows_by = {r['attack']: r for r in measured}
    ours = {label: 100 * rows_by[k]['accuracy'] for k, label in COLUMNS if k in rows_by}
    ours['Clean'] = 100 * report['clean_accuracy']
    transfer = None
    if row.transfer and not strong:
      transfer = _transfer_columns(table, row, config, dataset, budget, workdir, out_dir, ours)
    out_rows.append(_row_result(row, report, out_dir, ours, transfer))
  if models:  # keep the saved rows of the other models, in the table's order
    new_labels = {r['label'] for r in out_rows}
    before = _saved_result(table, budget, suffix, results_dir)
    saved = [r for r in before.get('rows', []) if r['label'] not in new_labels]
    order = [r.label for r in all_rows]
    out_rows = sorted(out_rows + [r for r in saved if r['label'] in order],
                      key=lambda r: order.index(r['label']))
  result = {
      'table': table, 'dataset': dataset, 'budget': budget, 'strong': strong, 'seed': seed,
      'data_dir': data_dir, 'cifar10_is_jpeg_copy': dataset == 'cifar10' and 'jpeg' in data_dir,
      'budget_overrides': {'cpu': CPU_BUDGET if dataset == 'mnist' else CPU_BUDGET_CIFAR,
                           'medium': MEDIUM_BUDGET if dataset == 'mnist' else MEDIUM_BUDGET_CIFAR,
                           'paper': PAPER_BUDGET}.get(budget, 'runs/config.py:apply_smoke'),
      'gn_std': GN_STD, 'rows': out_rows,
      'models': {m: {'clean_accuracy_full_test': s.get('clean_accuracy'), 'step': s['step'],
                     'params_sha256': s['params_sha256']} for m, s in summaries.items()},
      'elapsed_s': time.time() - t0,
  }
  if models:
    result['models'] = {**before.get('models', {}), **result['models']}
  _write_result(result, table, budget, suffix, results_dir)
  return result


def _result_name(table, budget, suffix) -> str:
  return f'table{table}{"_" + budget if budget != "cpu" else ""}{suffix}'


def _saved_result(table, budget, suffix, results_dir) -> dict[str, Any]:
  path = os.path.join(results_dir, f'{_result_name(table, budget, suffix)}.json')
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_result(result, table, budget, suffix, results_dir) -> None:
  name = _result_name(table, budget, suffix)
  files.write_json(os.path.join(results_dir, f'{name}.json'), result)
  md = markdown(result)
  files.write_text(os.path.join(results_dir, f'{name}.md'), md)
  if table == 'fig6':
    reporting.plot_eps_curves(
        {r['label']: r['eps_sweep'] for r in result['rows'] if r['eps_sweep']},
        os.path.join(results_dir, f'{name}.png'), title=f'MNIST ({budget} budget)')
  print(md, flush=True)


def markdown(result: dict[str, Any]) -> str:
  """Paper vs ours, side by side, one line per row."""
  cols = [c for _, c in COLUMNS + TRANSFER_COLUMNS
          if any(c in r['ours'] for r in result['rows'])] + ['Clean']
  jpeg = ' (CIFAR-10 = the JPEG re-encoded copy)' if result['cifar10_is_jpeg_copy'] else ''
  lines = [f'Table {result["table"]}, {result["dataset"]}{jpeg}, budget `{result["budget"]}`'
           f'{", strong evaluation" if result["strong"] else ""}; accuracy in % on '
           f'{result["rows"][0]["num_examples"]} test images, paper / ours:', '',
           '| row | ' + ' | '.join(cols) + ' | median L2 C&W / DDN | checks |',
           '|---' * (len(cols) + 3) + '|']
  for r in result['rows']:
    cells = []
    for c in cols:
      p = (r['paper'] or {}).get(c)
      o = r['ours'].get(c)
      cells.append(f'{"-" if p is None else f"{p:.2f}"} / {"-" if o is None else f"{o:.2f}"}')
    med = ' / '.join('-' if r['median_l2'].get(k) is None else f'{r["median_l2"][k]:.2f}'
                     for k in ('cw_l2', 'ddn'))
    checks = 'ok' if r['sanity_checks_passed'] else 'FAILED: ' + '; '.join(r['failed_checks'])
    tm = ' (grey-box)' if r['threat_model'] == 'grey_box' else ''
    lines.append(f'| {r["label"]}{tm} | ' + ' | '.join(cells) + f' | {med} | {checks} |')
  lines += ['', 'Settings: ' + '; '.join(f'{k}: {v}' for k, v in
                                         result['rows'][0]['settings'].items()), '']
  return '\n'.join(lines)
