"""Defend++ Figs. 7 and 8: what the auto-encoder does to clean and FGSM images.

Usage:
  python -m launch.reproduce --table=fig7 --workdir=runs/repro --budget=cpu \
      --mnist_dir=../shared/data/mnist --cifar10_dir=../shared/data/cifar10-jpeg
  result = run_figure('fig8', 'runs/repro', 'cpu', data_dirs, figures_dir='docs/figures')

The model is the tables' "ours" (MODELS['ours'], trained in WORKDIR/<dataset>-<budget>/ours if
missing). On the first `num_examples` test images (the budget's eval.num_examples, at most
RECONSTRUCTED), FGSM at the tables' eps is crafted white-box on the deployed classifier
(inference mode), and the auto-encoder's full-resolution reconstruction AE(.) (the decoder's
level 0) is taken of the clean and of the adversarial images:

- fig7: clean images, AE(clean), FGSM images, AE(FGSM) (the first 8), as the paper's Fig. 7;
  FIGURES_DIR/fig7_<dataset>.png.
- fig8: the histogram of R = D_rc / D_ra, D_rc = ||AE(x_adv) - x||_2, D_ra = ||AE(x_adv) -
  x_adv||_2 (the paper: R always in (0, 1)); FIGURES_DIR/fig8_<dataset>.png.

Both write RESULTS_DIR/fig<7|8>[_<budget>].json with the distances' summaries next to the
perturbation's own size ||x_adv - x||_2 and the AE's error on clean images ||AE(x) - x||_2:
R < 1 alone says the reconstruction is nearer the clean image than the adversarial one, not
that the perturbation was removed (a constant grey image can have R < 1 too).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from defendpp_jax import data as data_lib
from defendpp_jax import files
from defendpp_jax import protocol
from defendpp_jax.defences import registry
from defendpp_jax.evaluation import reporting
from defendpp_jax.reproduce import runner

FIGURES = ('fig7', 'fig8')
DATASETS = ('mnist', 'cifar10')
RECONSTRUCTED = 1000  # images analysed at most (the figure shows the first 8)


def _summary(v: np.ndarray) -> dict[str, float]:
  q = np.quantile(v, [0.0, 0.05, 0.5, 0.95, 1.0])
  return {'mean': float(np.mean(v)), 'min': float(q[0]), 'p5': float(q[1]),
          'median': float(q[2]), 'p95': float(q[3]), 'max': float(q[4])}


def analyse(config, run_dir: str) -> dict[str, Any]:
  """The reconstruction analysis of the Defend++ run `run_dir` (config: its training config)."""
  ds = data_lib.dataset_of(config)
  defence = registry.build(config, run_dir, ds)
  if defence.diagnostics is None:
    raise ValueError(f'{run_dir} has no auto-encoder (config.model.decoder='
                     f'{config.model.decoder!r}): Figs. 7-8 need a Defend++ run')
  n = min(config.eval.num_examples or len(ds.test_labels), RECONSTRUCTED, len(ds.test_labels))
  images, labels = ds.test_images[:n], ds.test_labels[:n]
  eps = protocol.linf_eps(config.data.name, config.eval.eps)
  rec = defence.diagnostics(defence, images, labels, eps, config.eval.batch_size, num=n)
  out = {k: v for k, v in rec.items() if k not in ('images', 'ratio_R', 'distances')}
  ratios = np.asarray(rec['ratio_R'])
  out['num_examples'] = int(len(ratios))
  out['ratio_R'] = _summary(ratios)
  out['fraction_R_in_0_1'] = float(np.mean((ratios > 0) & (ratios < 1)))
  out['distances'] = {k: _summary(np.asarray(v)) for k, v in rec['distances'].items()}
  d = rec['distances']
  out['fraction_rec_closer_to_clean_than_adv_is'] = float(
      np.mean(np.asarray(d['d_rc']) < np.asarray(d['d_ac'])))
  return {'summary': out, 'rec': rec}


def run_figure(figure: str, workdir: str, budget: str = 'cpu',
               data_dirs: dict[str, str] | None = None, results_dir: str = 'results',
               figures_dir: str = 'docs/figures', seed: int = 0,
               datasets: tuple[str, ...] = DATASETS) -> dict[str, Any]:
  """Trains (or reuses) "ours" on each dataset, writes the figure and its JSON."""
  if figure not in FIGURES:
    raise ValueError(f'--table={figure!r} is not one of the figures {FIGURES}')
  unknown = sorted(set(datasets) - set(DATASETS))
  if unknown:
    raise ValueError(f'--datasets: unknown {unknown}; known: {DATASETS}')
  t0 = time.time()
  name = f'{figure}{"" if budget == "cpu" else "_" + budget}'
  path = os.path.join(results_dir, f'{name}.json')
  from defendpp_jax.reproduce import survey  # pylint: disable=g-import-not-at-top
  result = {'figure': figure, 'budget': budget, 'seed': seed, 'model': 'ours',
            'datasets': survey.saved_datasets(path)}
  os.makedirs(figures_dir, exist_ok=True)
  for dataset in datasets:
    data_dir = (data_dirs or {}).get(dataset, '')
    config = runner.model_config(dataset, 'ours', budget, workdir, data_dir)
    config.train.seed = seed
    run_dir = runner.model_dir(workdir, dataset, budget, 'ours')
    print(f'=== {figure} {dataset}: "ours" in {run_dir}', flush=True)
    summary = runner._train(config, run_dir)  # pylint: disable=protected-access
    analysis = analyse(config, run_dir)
    tag = '' if budget == 'cpu' else f'_{budget}'
    png = os.path.join(figures_dir, f'{figure}_{dataset}{tag}.png')
    if figure == 'fig7':
      reporting.plot_reconstructions(analysis['rec'], png)
    else:
      reporting.plot_ratio_histogram(analysis['rec'], png)
    result['datasets'][dataset] = {
        **analysis['summary'], 'figure': png, 'run_dir': run_dir,
        'cifar10_is_jpeg_copy': dataset == 'cifar10' and 'jpeg' in data_dir,
        'attack': f'FGSM, L-inf eps {analysis["summary"]["eps"]:g}, white-box on the '
                  'inference-mode classifier, true labels',
        'clean_accuracy_full_test': summary.get('clean_accuracy'),
        'params_sha256': summary.get('params_sha256')}
    result['elapsed_s'] = time.time() - t0
    files.write_json(path, result)
    print(_lines(result['datasets'][dataset], dataset), flush=True)
  return result


def _lines(r: dict[str, Any], dataset: str) -> str:
  d = r['distances']
  return (f'{dataset}: {r["attack"]}, {r["num_examples"]} images; R in (0, 1) for '
          f'{100 * r["fraction_R_in_0_1"]:.1f}%, median R {r["ratio_R"]["median"]:.3f}; median '
          f'||x_adv - x|| {d["d_ac"]["median"]:.3f}, D_rc {d["d_rc"]["median"]:.3f}, D_ra '
          f'{d["d_ra"]["median"]:.3f}, ||AE(x) - x|| {d["d_clean"]["median"]:.3f}; '
          f'accuracy on the FGSM images {100 * r["adversarial_accuracy"]:.1f}%')
