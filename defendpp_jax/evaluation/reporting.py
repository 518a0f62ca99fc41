"""Reports of robustness evaluations: JSON, the paper's Markdown table, figures, progress bars.

Usage:
  write_report(report, workdir)     # robustness.json, robustness.md, *.png
  print(markdown_table(report))
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable

import numpy as np

from defendpp_jax import files
from defendpp_jax.attacks.specs import COLUMNS as TABLE_COLUMNS


def progress(iterable: Iterable, total: int, desc: str, enabled: bool = True) -> Iterable:
  """Progress on stderr when enabled: a tqdm bar on a terminal, else one line per item done
  (`desc i/total, elapsed`), so that a background run's log shows where it is."""
  if not enabled:
    return iterable
  if sys.stderr.isatty():
    try:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)
    except ImportError:
      pass
  return _progress_lines(iterable, total, desc)


def _progress_lines(iterable: Iterable, total: int, desc: str) -> Iterable:
  t0 = time.perf_counter()
  for i, item in enumerate(iterable):
    yield item
    print(f'  {desc} {i + 1}/{total}, {time.perf_counter() - t0:.0f} s', file=sys.stderr,
          flush=True)


def _pct(x: float | None) -> str:
  return '-' if x is None else f'{100 * x:.2f}'


def _steps(row: dict[str, Any]) -> str:
  settings = row.get('settings', {})
  if 'binary_search_steps' in settings:
    return f'{settings["binary_search_steps"]} x {settings["num_steps"]} steps'
  return f'{row["steps"]} step{"s" if row["steps"] != 1 else ""}'


def _view(row: dict[str, Any]) -> str:
  """', loss ce, exact view' (+ ' (EOT 10)', ', mean of 5 draws (worst 12.30%)')."""
  if 'view' not in row:  # a report written before views existed: exact gradients
    return ''
  s = f', loss {row["loss"]}, {row["view"]} view'
  if row.get('eot_samples', 1) > 1:
    s += f' (EOT {row["eot_samples"]})'
  if row.get('draws', 1) > 1:
    s += f', mean of {row["draws"]} draws (worst {_pct(row["accuracy_worst"])}%)'
  if row.get('worst_case'):
    s += '; worst case over this and the rows above (cascade)'
  return s


def settings_text(row: dict[str, Any], results: bool = True) -> str:
  """An attack's settings (loss, view, EOT, draws); `results` adds a minimal-norm attack's
  median L2 / accuracy at L2."""
  if row['eps'] is not None:
    s = f'{row["norm"]} eps={row["eps"]:g}, {_steps(row)}'
    if row.get('restarts', 1) > 1:
      s += f' x {row["restarts"]} restarts'
    return s + _view(row)
  s = f'{row["norm"]} minimal-norm, {_steps(row)}' + _view(row)
  if not results:
    return s
  s += '; median L2 '
  s += '-' if row.get('median_l2') is None else f'{row["median_l2"]:.3f}'
  at = ', '.join(f'{_pct(v)}% @ {t}' for t, v in row.get('accuracy_at', {}).items())
  return f'{s}; accuracy at L2 <= t: {at}'


def markdown_table(report: dict[str, Any], title: str | None = None) -> str:
  """The paper's layout (FGSM, BIM, PGD, C&W, DDN, APGD, Clean), then settings and checks."""
  rows = {r['attack']: r for r in report['rows']}
  crafted = {'grey_box': ', grey-box: crafted on the classifier behind the reformer',
             'oblivious': ', oblivious: crafted on the classifier behind the pre-processor',
             'transfer': f', transfer: crafted on {report.get("crafted_on")}'}.get(
                 report.get('threat_model'), '')
  if report.get('draws', 1) > 1:
    crafted += f'; randomised defence: accuracies are means over {report["draws"]} draws'
  step = 'untrained' if report['step'] is None else f'step {report["step"]}'
  lines = [f'### {title or report["model"]} ({report["dataset"]}, {report["num_examples"]} '
           f'test images, {step}{crafted})', '']
  header = [label for key, label in TABLE_COLUMNS if key in rows] + ['Clean']
  lines.append('| model | ' + ' | '.join(header) + ' |')
  lines.append('|---' * (len(header) + 1) + '|')
  cells = [_pct(rows[key]['accuracy']) for key, _ in TABLE_COLUMNS if key in rows]
  lines.append(f'| {report["model"]} | ' + ' | '.join(cells + [_pct(report['clean_accuracy'])])
               + ' |')
  if report.get('transfer'):
    t_rows = {r['attack']: r for r in report['transfer']['rows']}
    cells = [_pct(t_rows[key]['accuracy']) if key in t_rows else '-'
             for key, _ in TABLE_COLUMNS if key in rows]
    lines.append(f'| transfer from {report["transfer"]["source_model"]} | ' +
                 ' | '.join(cells + ['-']) + ' |')
  lines += ['', 'Accuracy in % (correct / seen). Settings:', '']
  for r in report['rows']:
    detected = (f'; rejected by the detector: {r["detected"]}/{r["seen"]}'
                if 'detected' in r else '')
    lines.append(f'- {r["attack"]}: {settings_text(r)} ({r["correct"]}/{r["seen"]}{detected})')
  if report.get('detector'):
    d = report['detector']
    lines += ['', f'Detector: threshold {d.get("threshold", float("nan")):.4f} '
              f'(set at {_pct(d.get("false_positive_rate", 0))}% false positives on held-out '
              f'clean images); {d["clean_rejected"]}/{report["num_examples"]} evaluated clean '
              'images rejected (counted as errors in Clean); an attacked input the detector '
              'rejects counts as defended.']
  lines += ['', 'Sanity checks:' if report['sanity_checks_passed']
            else '**SANITY CHECK FAILED — these numbers are not trustworthy:**', '']
  for c in report['sanity_checks']:
    mark = 'ok' if c['passed'] else '**FAILED**'
    expected, value = c['expected'], c['value']
    expected = f'{expected:.4f}' if isinstance(expected, float) else expected
    value = f'{value:.4f}' if isinstance(value, (int, float)) else value
    lines.append(f'- [{mark}] {c["name"]}: {value} (expected {expected})')
  return '\n'.join(lines) + '\n'


def write_report(report: dict[str, Any], workdir: str) -> None:
  """Writes robustness.json (without image arrays), robustness.md and the figures."""
  os.makedirs(workdir, exist_ok=True)
  figures = []
  if report.get('eps_sweep'):
    figures.append(plot_eps_sweep(report, os.path.join(workdir, 'accuracy_vs_eps.png')))
  rec = report.get('reconstruction')
  if rec:
    figures.append(plot_reconstructions(rec, os.path.join(workdir, 'reconstructions.png')))
    figures.append(plot_ratio_histogram(rec, os.path.join(workdir, 'ratio_histogram.png')))
  out = dict(report)
  if rec:
    out['reconstruction'] = {k: v for k, v in rec.items() if k != 'images'}
  out['figures'] = [os.path.basename(f) for f in figures]
  files.write_json(os.path.join(workdir, 'robustness.json'), out)
  files.write_text(os.path.join(workdir, 'robustness.md'), markdown_table(report))


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(plt, fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_eps_sweep(report: dict[str, Any], path: str) -> str:
  plt = _pyplot()
  sweep = report['eps_sweep']
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(sweep['eps'], np.asarray(sweep['fgsm']) * 100, 'o-', label='FGSM')
  ax.plot(sweep['eps'], np.asarray(sweep['pgd']) * 100, 's-',
          label=f'PGD-{sweep["pgd_steps"]}')
  ax.set_xlabel('L-inf epsilon')
  ax.set_ylabel('accuracy (%)')
  ax.set_ylim(-2, 102)
  ax.set_title(f'{report["model"]} ({report["dataset"]}, {sweep["num_examples"]} images)')
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(plt, fig, path)


def plot_reconstructions(rec: dict[str, Any], path: str) -> str:
  plt = _pyplot()
  rows = [('clean', 'clean'), ('rec_clean', 'AE(clean)'), ('adv', f'FGSM eps={rec["eps"]:g}'),
          ('rec_adv', 'AE(adversarial)')]
  imgs = rec['images']
  k = len(imgs['clean'])
  fig, axes = plt.subplots(len(rows), k, figsize=(1.2 * k, 1.3 * len(rows)), squeeze=False)
  for i, (key, label) in enumerate(rows):
    for j in range(k):
      im = np.clip(np.asarray(imgs[key][j]), 0, 1)
      ax = axes[i, j]
      ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap='gray', vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(label, fontsize=7)
  return _save(plt, fig, path)


def plot_ratio_histogram(rec: dict[str, Any], path: str) -> str:
  plt = _pyplot()
  r = np.asarray(rec['ratio_R'])
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.hist(r, bins=40, color='tab:blue')
  ax.axvline(1.0, color='k', ls='--', lw=1)
  ax.set_xlabel('R = D_rc / D_ra')
  ax.set_ylabel('count')
  ax.set_title(f'{100 * rec["fraction_R_below_1"]:.1f}% of {len(r)} FGSM images have R < 1')
  return _save(plt, fig, path)


def plot_eps_curves(sweeps: dict[str, dict[str, Any]], path: str, title: str = '') -> str:
  """Accuracy vs eps of several models on one plot (paper Fig. 6): FGSM solid, PGD dashed."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for i, (label, sweep) in enumerate(sweeps.items()):
    color = f'C{i}'
    ax.plot(sweep['eps'], np.asarray(sweep['fgsm']) * 100, 'o-', color=color,
            label=f'{label}, FGSM')
    ax.plot(sweep['eps'], np.asarray(sweep['pgd']) * 100, 's--', color=color,
            label=f'{label}, PGD-{sweep["pgd_steps"]}')
  ax.set_xlabel('L-inf epsilon')
  ax.set_ylabel('accuracy (%)')
  ax.set_ylim(-2, 102)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(plt, fig, path)
