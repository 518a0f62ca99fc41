"""The survey's defences in the benchmark (`python -m launch.benchmark --defences`).

  python -m launch.benchmark --defences --width=8 --input=28x28x1 --batch=128 --json

Measured in one run, on random images and a randomly initialised ResNet-18 (the cost of a
defence does not depend on its weights):
  - each deployed defence's forward pass (the classifier behind / around it), img/s, and the
    bare classifier's, so that each defence's cost is also a ratio;
  - TV minimisation jitted over the batch (all pixels kept) vs scikit-image's
    `denoise_tv_bregman` image by image on the same images and iterations (ratio);
  - quilting's exact kNN (chunked matmuls) in GFLOP/s, as a fraction of the machine's fp32
    matmul ceiling (a 2048 x 2048 matmul, timed in the same run);
  - PGD-10 with EOT over k draws through each randomised defence, as a ratio to k x EOT-1
    (the target: <= 1.1);
  - with --hgd: HGD's denoiser training step at the `cpu` widths next to the classifier's.
Records: {"work": "defence_forward" | "tv_vs_skimage" | "knn" | "matmul" | "defence_eot_pgd",
"defence", ...}. Time nothing else on the machine while this runs.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from defendpp_jax import attacks
from defendpp_jax import defences
from defendpp_jax.defences import noisy_layers
from defendpp_jax.defences import quilting
from defendpp_jax.defences import squeezing
from defendpp_jax.defences import tv_min
from defendpp_jax.nn import classifiers
from launch.timing import _time


def _setup(width: int, shape, batch: int, num_patches: int = 20000):
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(batch, *shape)).astype(np.float32)
  y = rng.integers(0, 10, batch).astype(np.int32)
  held_out = rng.uniform(size=(64, *shape)).astype(np.float32)
  module = classifiers.Classifier('resnet18', 10, width=width, image_size=shape[0],
                                  mean=(0.5,) * shape[2], std=(0.25,) * shape[2])
  variables = module.init(jax.random.key(0), jnp.asarray(x[:2]))
  net = defences.from_flax(module, variables, name='resnet18', method=None)
  db = quilting.patch_database(rng.uniform(size=(256, *shape)).astype(np.float32),
                               num_patches, jax.random.key(1))
  bits = 1 if shape[2] == 1 else 5
  built = {
      'classifier': net,
      'jpeg': defences.preprocess(defences.jpeg.jpeg(75), net),
      'bit_depth': defences.preprocess(squeezing.bit_depth(bits), net),
      'median': defences.preprocess(squeezing.median(2), net),
      'feature_squeezing': squeezing.squeezing_detector(
          net, [squeezing.bit_depth(bits), squeezing.median(2)], held_out),
      'tv_min': defences.preprocess(tv_min.tv_min(0.5, 0.03, 100), net),
      'quilting': defences.preprocess(quilting.quilting(db), net),
      'resize_pad': defences.preprocess(defences.resize_pad(), net),
      'sap': noisy_layers.sap(module, variables, 'resnet18', method=None),
      'rse': noisy_layers.rse(module, variables, 'resnet18', passes=10, method=None),
  }
  return x, y, built, db


def bench_defences(width: int, shape, batch: int, eot: tuple[int, ...], repeats: int,
                   eot_batch: int = 32, num_patches: int = 20000,
                   names: tuple[str, ...] | None = None) -> list[dict]:
  """The records of every defence (or of `names`, with 'classifier' always measured)."""
  x, y, built, db = _setup(width, shape, batch, num_patches)
  if names:
    built = {n: d for n, d in built.items() if n in names or n == 'classifier'}
  base = {'arch': 'resnet18', 'width': width, 'input': 'x'.join(map(str, shape)),
          'framework': 'jax'}
  out = []
  key = jax.random.key(2)
  for name, d in built.items():
    fwd = jax.jit(lambda v, x, k, d=d: d.logits(v, x, k))
    c, t = _time(lambda: fwd(d.variables, x, key), repeats)
    out.append({**base, 'work': 'defence_forward', 'defence': name, 'batch': batch,
                'img_per_s': batch / t, 'compile_s': c})
  out.append(_tv_vs_skimage(x[:16], base, repeats))
  out += _knn(x, db, base, repeats)
  xs, ys = x[:eot_batch], y[:eot_batch]
  for name, d in built.items():
    if not d.randomised:
      continue
    view = 'bpda+eot' if d.stand_ins else 'eot'
    for k in eot:
      fn = jax.jit(lambda v, x, y, key, d=d, k=k: attacks.pgd(
          d.attack_model(view, eot_samples=k, eot_chunk=k, variables=v), x, y, eps=0.1,
          step_size=0.01, num_steps=10, key=key))
      c, t = _time(lambda: fn(d.variables, xs, ys, key), max(2, repeats // 2))
      out.append({**base, 'work': 'defence_eot_pgd', 'defence': name, 'view': view,
                  'steps': 10, 'eot_samples': k, 'batch': eot_batch,
                  'img_per_s': eot_batch / t, 'compile_s': c})
  return out


def _tv_vs_skimage(x, base, repeats) -> dict:
  mask = jnp.ones(x.shape[:3], bool)
  ours = jax.jit(lambda x, m: tv_min.tv_minimise(x, m, 0.03, 100))
  c, t_ours = _time(lambda: ours(x, mask), repeats)
  t0 = time.perf_counter()
  tv_min.skimage_reference(np.asarray(x), 0.03, 100)
  t_ref = time.perf_counter() - t0
  return {**base, 'work': 'tv_vs_skimage', 'batch': len(x), 'iters': 100,
          'img_per_s': len(x) / t_ours, 'skimage_img_per_s': len(x) / t_ref,
          'ratio': t_ref / t_ours, 'compile_s': c}


def _knn(x, db, base, repeats) -> list[dict]:
  """Quilting's kNN on the tiles of a batch, and the matmul ceiling of the same run."""
  starts = quilting.tile_starts(x.shape[1])
  p = db.shape[1]
  tiles = np.stack([x[:, i:i + p, j:j + p, :] for i in starts for j in starts], 1)
  queries = jnp.asarray(tiles.reshape(-1, p * p * x.shape[-1]))
  flat = jnp.asarray(np.asarray(db).reshape(len(db), -1))
  knn = jax.jit(lambda q, d: quilting.nearest_patches(q, d, 10))
  c, t = _time(lambda: knn(queries, flat), repeats)
  flops = 2.0 * queries.shape[0] * flat.shape[0] * flat.shape[1]
  a = jnp.asarray(np.random.default_rng(3).normal(size=(2048, 2048)).astype(np.float32))
  mm = jax.jit(lambda a: a @ a)
  _, t_mm = _time(lambda: mm(a), repeats)
  ceiling = 2.0 * 2048 ** 3 / t_mm / 1e9
  return [{**base, 'work': 'knn', 'queries': int(queries.shape[0]), 'database': len(db),
           'dims': int(flat.shape[1]), 'gflop_per_s': flops / t / 1e9,
           'fraction_of_matmul': flops / t / 1e9 / ceiling, 'compile_s': c,
           'batch': len(x), 'img_per_s': len(x) / t},
          {**base, 'work': 'matmul', 'n': 2048, 'gflop_per_s': ceiling, 'batch': 1,
           'img_per_s': 0.0, 'compile_s': 0.0}]


def bench_hgd(width: int, shape, batch: int, repeats: int, conv: str = 'auto',
              losses: tuple[str, ...] = ('pixel', 'lgd')) -> list[dict]:
  """HGD's denoiser training step (DUNET at the `cpu` widths w, 2w, 4w, 4w, 4w in front of a
  frozen width-w ResNet-18), per loss, and the classifier's own training step, in one run.
  Records {"work": "hgd_train_step" | "train_step", "loss", "conv", ...}."""
  import functools  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from defendpp_jax import nn as dnn  # pylint: disable=g-import-not-at-top
  from defendpp_jax import parallel  # pylint: disable=g-import-not-at-top
  from defendpp_jax import training  # pylint: disable=g-import-not-at-top
  from defendpp_jax.nn import denoisers  # pylint: disable=g-import-not-at-top
  from defendpp_jax.runs import config as config_lib  # pylint: disable=g-import-not-at-top
  from defendpp_jax.training import recipes  # pylint: disable=g-import-not-at-top
  config = config_lib.get_base_config()
  config.model.update(arch='resnet18', width=width, decoder='none', conv=conv)
  config.train.update(learning_rate=0.01, lr_decay_epochs=(), num_epochs=1)
  ds = types.SimpleNamespace(num_classes=10, image_shape=shape, mean=(0.5,), std=(0.5,))
  cls = recipes.classifier_recipe(config, ds, 1)
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(batch, *shape)).astype(np.float32)
  y = rng.integers(0, 10, batch).astype(np.int32)
  pairs = np.stack([np.clip(x + rng.uniform(-0.1, 0.1, x.shape), 0, 1), x], 1).astype(
      np.float32)
  base = {'arch': 'resnet18', 'width': width, 'input': 'x'.join(map(str, shape)),
          'batch': batch, 'framework': 'jax', 'conv': dnn.resolve_conv_backend(conv)}
  key = jax.random.key(1)
  out = []

  def timed(recipe, images, weights, frozen):
    step = training.jit_train_step(functools.partial(recipes.train_step, recipe=recipe), mesh)
    holder = [parallel.initial_state(recipe.init, jax.random.key(0), mesh)]
    xs, ys = parallel.shard_batch(mesh, images, y)

    def once():
      holder[0], m = step(holder[0], xs, ys, weights, key, frozen)  # state donated
      return m['loss']
    return _time(once, repeats), holder[0]

  (c, t), cls_state = timed(cls, x, jnp.ones(2), None)
  out.append({**base, 'work': 'train_step', 'img_per_s': batch / t, 'compile_s': c})
  widths = (width, 2 * width, 4 * width, 4 * width, 4 * width)
  den = denoisers.build_denoiser('dunet', shape[-1], widths, conv)
  for loss in losses:
    tx = optax.adam(1e-3)
    recipe = recipes.Recipe(
        den, tx, optax.constant_schedule(1e-3),
        functools.partial(recipes.init_denoiser_state, den, tx, image_shape=shape),
        functools.partial(recipes.hgd_loss, model=den, target=cls.model, kind=loss),
        ('guide',), lambda epoch: ((1.0,), 'denoiser'))
    (c, t), _ = timed(recipe, pairs, jnp.ones(1), cls_state.variables)
    out.append({**base, 'work': 'hgd_train_step', 'loss': loss, 'denoiser_widths': widths,
                'img_per_s': batch / t, 'compile_s': c})
  return out


def bench_training_defences(width: int, shape, batch: int, repeats: int, conv: str = 'auto',
                            names: tuple[str, ...] = ('distillation', 'parseval',
                                                      'cross_lipschitz', 'deep_defense', 'adp',
                                                      'adv_bnn')) -> list[dict]:
  """The training step of each training-time defence's recipe (a width-w ResNet-18; Adv-BNN
  with PGD-5 crafting, as configured for the board) and the plain classifier's, in one run.
  Records {"work": "train_step" | "defence_train_step", "defence", "conv", ...}."""
  import functools  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from defendpp_jax import nn as dnn  # pylint: disable=g-import-not-at-top
  from defendpp_jax import parallel  # pylint: disable=g-import-not-at-top
  from defendpp_jax import training  # pylint: disable=g-import-not-at-top
  from defendpp_jax.runs import config as config_lib  # pylint: disable=g-import-not-at-top
  from defendpp_jax.training import recipes  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(batch, *shape)).astype(np.float32)
  y = rng.integers(0, 10, batch).astype(np.int32)
  ds = types.SimpleNamespace(num_classes=10, image_shape=shape, mean=(0.5,), std=(0.5,),
                             train_labels=y)
  mesh = parallel.make_mesh()
  base = {'arch': 'resnet18', 'width': width, 'input': 'x'.join(map(str, shape)),
          'batch': batch, 'framework': 'jax', 'conv': dnn.resolve_conv_backend(conv)}
  out = []
  # Cross-Lipschitz twice: exact (K input gradients) and from one random projection.
  runs = [(n, p) for n in ('none',) + tuple(names)
          for p in ((0, 1) if n == 'cross_lipschitz' else (0,))]
  for name, projections in runs:
    config = config_lib.get_base_config()
    config.model.update(arch='resnet18', width=width, decoder='none', conv=conv)
    config.train.update(learning_rate=0.01, lr_decay_epochs=(), num_epochs=1, adv_steps=5)
    config.defense.name = name
    config.defense.cross_lipschitz.projections = projections
    if name == 'adv_bnn':
      config.train.adversarial = 'pgd'
    recipe = recipes.make_recipe(config, ds, 1)
    labels = y
    if name == 'distillation':  # the student's soft labels
      labels = np.asarray(jax.nn.softmax(rng.normal(size=(batch, 10))), np.float32)
    step = training.jit_train_step(functools.partial(recipes.train_step, recipe=recipe), mesh)
    holder = [parallel.initial_state(recipe.init, jax.random.key(0), mesh)]
    xs, ys = parallel.shard_batch(mesh, x, labels)
    weights = jnp.ones(len(recipe.term_names))

    def once(step=step, holder=holder, xs=xs, ys=ys, weights=weights):
      holder[0], m = step(holder[0], xs, ys, weights, jax.random.key(1), None)  # donated
      return m['loss']
    c, t = _time(once, repeats)
    work = 'train_step' if name == 'none' else 'defence_train_step'
    label = name if not projections else f'{name} (projections={projections})'
    out.append({**base, 'work': work, 'defence': label, 'img_per_s': batch / t,
                'compile_s': c})
  return out


def ratios(records: list[dict]) -> list[str]:
  """The one-run ratios: each defence's forward vs the classifier's, TV vs scikit-image,
  kNN vs the matmul ceiling, EOT-k vs k x EOT-1 per randomised defence."""
  fwd = {r['defence']: r['img_per_s'] for r in records if r['work'] == 'defence_forward'}
  out = [f'{n} forward = {v / fwd["classifier"]:.3f} x the classifier\'s'
         for n, v in fwd.items() if n != 'classifier']
  out += [f'TV minimisation (batch of {r["batch"]}, {r["iters"]} iterations): '
          f'{r["ratio"]:.1f} x faster than scikit-image image by image'
          for r in records if r['work'] == 'tv_vs_skimage']
  out += [f'quilting kNN: {r["gflop_per_s"]:.0f} GFLOP/s = {100 * r["fraction_of_matmul"]:.0f}%'
          ' of the matmul ceiling' for r in records if r['work'] == 'knn']
  cls_step = [r['img_per_s'] for r in records if r['work'] == 'train_step']
  out += [f'HGD denoiser training step ({r["loss"]}): {r["img_per_s"]:.0f} img/s = '
          f'{r["img_per_s"] / cls_step[0]:.2f} x the classifier\'s training step'
          for r in records if r['work'] == 'hgd_train_step' and cls_step]
  cls_step = [r['img_per_s'] for r in records if r['work'] == 'train_step']
  out += [f'{r["defence"]} training step: {r["img_per_s"]:.0f} img/s = '
          f'{r["img_per_s"] / cls_step[0]:.3f} x the plain training step'
          for r in records if r['work'] == 'defence_train_step' and cls_step]
  eot = {}
  for r in records:
    if r['work'] == 'defence_eot_pgd':
      eot.setdefault(r['defence'], {})[r['eot_samples']] = r['img_per_s']
  for n, by_k in eot.items():
    out += [f'{n}: EOT-{k} PGD-10 time / ({k} x EOT-1) = {by_k[1] / (k * v):.2f}'
            for k, v in by_k.items() if k > 1 and 1 in by_k]
  return out
