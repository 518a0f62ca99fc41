"""Square and the AutoAttack-style ensemble in the benchmark (`python -m launch.benchmark --autoattack`).

  python -m launch.benchmark --autoattack --width=16 --input=28x28x1 --batch=250 \
      --mnist_dir=../shared/data/mnist [--aa_workdir=W] [--aa_images=1000] [--aa_eps=0.3,0.1] \
      [--json]

Measured in one run:
  - Square (L-inf) on a randomly initialised ResNet-18, labelled with its own predictions and at
    an eps too small to break anything, so that every example spends the whole budget:
    img/s per 1,000 queries (its cost does not depend on the weights);
  - `autoattack` (APGD-CE -> APGD-T -> FAB-T -> Square, the cascade of evaluation.evaluate) end
    to end on the first --aa_images MNIST test images at each --aa_eps (0.3), on the trained
    ResNet-18 of --aa_workdir (trained there first, one epoch at the `cpu` budget's settings,
    if it holds no run): wall time, and per component its wall time (compilation included),
    the examples it attacked and the robust accuracy after it;
  - where PyTorch and the published AutoAttack (fra31/auto-attack: `pip install
    git+https://github.com/fra31/auto-attack`, or its source on PYTHONPATH) import, the published
    `standard` version on a PyTorch ResNet-18 holding the same weights (launch.torch_resnet;
    the largest logit difference from the JAX model is recorded), on the same images in the
    same run: its wall time, the cumulative time after each of its attacks (from its log), the
    ratio of the two wall times and the per-image agreement of the robust sets.
Records: {"work": "square" | "autoattack" | "autoattack_component" | "published_autoattack" |
"published_autoattack_component", ...}. Time nothing else while this runs.
"""

from __future__ import annotations

from contextlib import redirect_stdout
import io
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

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
  return registry.build(config, workdir, ds), config, ds


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
       'robust_accuracy': records[-1]['robust_accuracy'], **common,
       ROBUST_MASK: np.asarray(alive[0], bool)}]


# The key of the final robust mask on the `autoattack` record (dropped before printing).
ROBUST_MASK = '_robust'
# AutoAttack's log line after each of its attacks: cumulative time and robust accuracy.
_AA_LINE = re.compile(r'robust accuracy after (\S+): ([0-9.]+)% \(total time ([0-9.]+) s\)')


def published_autoattack(net, images, labels, batch: int, eps: float, seed: int = 0
                         ) -> list[dict]:
  """The published AutoAttack (fra31/auto-attack, `standard`: APGD-CE, APGD-T, FAB-T, Square;
  L-inf) on the PyTorch module `net` (pixels in [0, 1], NCHW): its wall time end to end and,
  from its own log, the cumulative time and robust accuracy after each attack."""
  import torch  # pylint: disable=g-import-not-at-top
  from autoattack import AutoAttack  # pylint: disable=g-import-not-at-top

  x = torch.from_numpy(np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2)))
  y = torch.from_numpy(np.asarray(labels, np.int64))
  adversary = AutoAttack(net, norm='Linf', eps=eps, version='standard', seed=seed,
                         device='cpu')
  log = io.StringIO()
  t0 = time.perf_counter()
  with redirect_stdout(log):
    x_adv = adversary.run_standard_evaluation(x, y, bs=batch)
  total = time.perf_counter() - t0
  with torch.no_grad():
    robust = np.concatenate([(net(x_adv[i:i + batch]).argmax(1) == y[i:i + batch]).numpy()
                             for i in range(0, len(y), batch)])
  common = {'images': len(labels), 'eps': eps, 'batch': batch, 'framework': 'torch',
            'torch_threads': torch.get_num_threads()}
  records = [{'work': 'published_autoattack_component', 'component': name.lower(),
              'cumulative_s': float(t), 'robust_accuracy': float(acc) / 100, **common}
             for name, acc, t in _AA_LINE.findall(log.getvalue())]
  return records + [{'work': 'published_autoattack', 'wall_s': total,
                     'img_per_s': len(labels) / total, 'robust_accuracy': float(robust.mean()),
                     **common, ROBUST_MASK: robust}]


def torch_twin(defence, config, ds):
  """A PyTorch ResNet-18 holding the weights of the plain run's `defence` (launch.torch_resnet),
  in inference mode, and the largest |logit| difference from the JAX model on 256 test images.
  Raises ImportError without PyTorch."""
  import torch  # pylint: disable=g-import-not-at-top
  from launch import torch_resnet  # pylint: disable=g-import-not-at-top
  net = torch_resnet.resnet18(config.model.width, ds.image_shape[-1], ds.num_classes, ds.mean,
                              ds.std, config.model.padding)
  torch_resnet.load_jax_variables(net, defence.variables)
  net.eval()
  x = np.asarray(ds.test_images[:256], np.float32)
  with torch.no_grad():
    theirs = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
  ours = np.asarray(defence.logits(defence.variables, jnp.asarray(x)))
  return net, float(np.abs(theirs - ours).max())


def agreement(ours_robust: np.ndarray, theirs_robust: np.ndarray) -> dict[str, int | float]:
  """Per-image agreement of our robust set and the published AutoAttack's (boolean masks; also
  launch.torch_autoattack's)."""
  count = lambda m: int(np.sum(m))
  return {'both_robust': count(ours_robust & theirs_robust),
          'both_broken': count(~ours_robust & ~theirs_robust),
          'robust_for_ours_only': count(ours_robust & ~theirs_robust),
          'robust_for_published_only': count(~ours_robust & theirs_robust),
          'fraction': float(np.mean(ours_robust == theirs_robust))}


def bench_autoattack(width: int, batch: int, n_images: int, mnist_dir: str,
                     workdir: str = '', eps: tuple[float, ...] = (0.3,)) -> list[dict]:
  """`autoattack` end to end on n_images MNIST test images at each eps, and each component's
  share; beside it the published AutoAttack where it imports (the model built once)."""
  workdir = workdir or os.path.join(tempfile.gettempdir(), f'aa_bench_w{width}')
  defence, config, ds = _trained_run(workdir, mnist_dir, width)
  images, labels = ds.test_images[:n_images], ds.test_labels[:n_images]
  try:
    net, diff = torch_twin(defence, config, ds)
  except ImportError as e:  # PyTorch not installed
    print(f'published AutoAttack not timed: {e}', flush=True)
    net = None
  out = []
  for e in eps:
    records = autoattack_breakdown(defence, images, labels, batch, e)
    published = []
    if net is not None:
      try:
        published = published_autoattack(net, images, labels, batch, e)
      except ImportError as err:  # the published package not installed
        print(f'published AutoAttack not timed: {err}', flush=True)
        net = None
    if published:
      ours, theirs = records[-1], published[-1]
      theirs.update(max_logit_diff=diff,
                    agreement=agreement(ours[ROBUST_MASK], theirs[ROBUST_MASK]),
                    wall_s_ratio_published_over_ours=theirs['wall_s'] / ours['wall_s'])
    out += [{**{k: v for k, v in r.items() if k != ROBUST_MASK}, 'width': width}
            for r in records + published]
  return out


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
    elif r['work'] == 'published_autoattack_component':
      out.append(f'  {r["component"]:22s} {r["cumulative_s"]:8.1f} s since the start -> '
                 f'robust {100 * r["robust_accuracy"]:.1f}%')
    elif r['work'] == 'published_autoattack':
      out.append(f'published AutoAttack (PyTorch, {r["torch_threads"]} threads, same weights: '
                 f'max |logit difference| {r.get("max_logit_diff", float("nan")):.2g}) on '
                 f'{r["images"]} MNIST images, eps {r["eps"]}: {r["wall_s"]:.1f} s end to end '
                 f'({r["img_per_s"]:.2f} img/s), robust {100 * r["robust_accuracy"]:.1f}%; '
                 f'{r.get("wall_s_ratio_published_over_ours", float("nan")):.2f} x our wall '
                 f'time; per image {r.get("agreement")}')
    else:
      out.append(f'autoattack {r["model"]} on {r["images"]} MNIST images, eps {r["eps"]}: '
                 f'{r["wall_s"]:.1f} s end to end ({r["img_per_s"]:.2f} img/s), robust '
                 f'{100 * r["robust_accuracy"]:.1f}%')
  return out

