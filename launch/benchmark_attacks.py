"""Square and the AutoAttack-style ensemble in the benchmark (`python -m launch.benchmark --autoattack`).

  python -m launch.benchmark --autoattack --width=16 --input=28x28x1 --batch=250 \
      --mnist_dir=../shared/data/mnist [--aa_workdir=W] [--aa_images=1000] [--json]

Measured in one run:
  - Square (L-inf) on a randomly initialised ResNet-18, labelled with its own predictions and at
    an eps too small to break anything, so that every example spends the whole budget:
    img/s per 1,000 queries (its cost does not depend on the weights);
  - `autoattack` (APGD-CE -> APGD-T -> Square, the cascade of evaluation.evaluate) end to end on
    the first --aa_images MNIST test images at eps 0.3, on the trained ResNet-18 of
    --aa_workdir (trained there first, one epoch at the `cpu` budget's settings, if it holds no
    run): wall time, and per component its wall time (compilation included), the examples it
    attacked and the robust accuracy after it.
The published AutoAttack (PyTorch, fra31/auto-attack) installs only from its git repository,
which this machine cannot reach: no PyTorch figure is measured here. Records: {"work":
"square" | "autoattack" | "autoattack_component", ...}. Time nothing else while this runs.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp

from defendpp_jax import attacks
from defendpp_jax import data as data_lib
from defendpp_jax import training
from defendpp_jax.attacks import specs as specs_lib
from defendpp_jax.defences import registry
from defendpp_jax.evaluation.evaluate import clean_masks
from defendpp_jax.evaluation import runner
from defendpp_jax.runs import config as config_lib
from defendpp_jax.nn import classifiers
from defendpp_jax.reproduce import runner as repro
from launch.timing import _time


def bench_square(width: int, shape, batch: int, queries: int, repeats: int) -> dict:
  """Square L-inf, the whole query budget per example: img/s per 1,000 queries."""
  model = classifiers.Classifier('resnet18', 10, width=width, image_size=shape[0],
                                 mean=(0.5,) * shape[2], std=(0.25,) * shape[2])
  x = jax.random.uniform(jax.random.key(0), (batch, *shape))
  variables = model.init(jax.random.key(1), x[:2])
  logits = lambda x: model.apply(variables, x)
  y = jnp.argmax(logits(x), -1)
  fn = jax.jit(lambda x, y, k: attacks.square(logits, x, y, eps=1e-4, num_queries=queries,
                                              key=k))
  compile_s, med = _time(lambda: fn(x, y, jax.random.key(2)), repeats)
  return {'work': 'square', 'width': width, 'input': 'x'.join(map(str, shape)),
          'batch': batch, 'queries': queries, 'img_per_s_per_1000_queries':
          batch / med * queries / 1000, 'compile_s': compile_s}


def _trained_run(workdir: str, mnist_dir: str, width: int):
  """The Defence of the plain MNIST run in `workdir` (trained there first if absent)."""
  config = repro.model_config('mnist', 'plain', 'cpu', workdir, mnist_dir)
  config.model.width, config.model.conv = width, 'auto'
  if not os.path.isfile(os.path.join(workdir, 'train_summary.json')):
    training.train_and_evaluate(config, workdir)
  ds = data_lib.dataset_of(config)
  return registry.build(config, workdir, ds), ds


def autoattack_breakdown(defence, images, labels, batch: int, eps: float,
                         dataset: str = 'mnist', seed: int = 0, **settings) -> list[dict]:
  """`autoattack` as evaluation.evaluate runs it (the clean pass, then each component on what
  the ones before it left), timed per component and end to end; `settings` as the entry's
  (steps, queries, targets: default the published 100, 5000, 9)."""
  ec = config_lib.get_base_config().eval
  parts = specs_lib.ensemble_specs(ec, dataset, 'autoattack', {'eps': eps, **settings})
  key = jax.random.key(seed)
  t0 = time.perf_counter()
  alive = clean_masks(defence, images, labels, batch, key, 1)
  records = [{'work': 'autoattack_component', 'component': 'clean', 'wall_s':
              time.perf_counter() - t0, 'attacked': 0,
              'robust_accuracy': float(alive[0].mean())}]
  for s in parts:
    t = time.perf_counter()
    attacked = int(alive[0].sum())
    res = runner.run_attack(s, defence, images, labels, batch, key, alive=alive,
                            progress=False)
    alive = res.ok_per_draw
    records.append({'work': 'autoattack_component', 'component': s.key,
                    'wall_s': time.perf_counter() - t, 'attacked': attacked,
                    'robust_accuracy': res.accuracy, 'steps_or_queries': s.steps})
  total = time.perf_counter() - t0
  common = {'images': len(labels), 'eps': eps, 'batch': batch, 'model': defence.name}
  return [{**r, **common} for r in records] + [
      {'work': 'autoattack', 'wall_s': total, 'img_per_s': len(labels) / total,
       'robust_accuracy': records[-1]['robust_accuracy'], **common}]


def bench_autoattack(width: int, batch: int, n_images: int, mnist_dir: str,
                     workdir: str = '', eps: float = 0.3) -> list[dict]:
  """`autoattack` end to end on n_images MNIST test images, and each component's share."""
  workdir = workdir or os.path.join(tempfile.gettempdir(), f'aa_bench_w{width}')
  defence, ds = _trained_run(workdir, mnist_dir, width)
  records = autoattack_breakdown(defence, ds.test_images[:n_images],
                                 ds.test_labels[:n_images], batch, eps)
  return [{**r, 'width': width} for r in records]


def lines(records: list[dict]) -> list[str]:
  out = []
  for r in records:
    if r['work'] == 'square':
      out.append(f'square w{r["width"]} {r["input"]} batch {r["batch"]}, {r["queries"]} '
                 f'queries: {r["img_per_s_per_1000_queries"]:.1f} img/s per 1000 queries '
                 f'(compile {r["compile_s"]:.1f} s)')
    elif r['work'] == 'autoattack_component':
      out.append(f'  {r["component"]:22s} {r["wall_s"]:8.1f} s on {r["attacked"]:5d} '
                 f'examples -> robust {100 * r["robust_accuracy"]:.1f}%')
    else:
      out.append(f'autoattack {r["model"]} on {r["images"]} MNIST images, eps {r["eps"]}: '
                 f'{r["wall_s"]:.1f} s end to end ({r["img_per_s"]:.2f} img/s), robust '
                 f'{100 * r["robust_accuracy"]:.1f}%')
  return out

