"""HGD (Liao et al., CVPR 2018): a denoiser D trained in front of a frozen classifier f, deployed
as f(D(x)), and the adversarial training set it learns from.

Usage:
  guide = guide_of(module, variables)                  # x -> (top feature map, logits) of f
  loss, metrics = guided_loss('lgd', guide, denoised, clean, labels)
  data = craft_training_set(target, [vgg16, resnet50], images, unit=0.3 / 16, seed=0)
  pairs = training_pairs(data, images)                 # (N, 2, H, W, C): [x_adv, x] per row
  pre = preprocessor(denoiser, variables, 'hgd-dunet-lgd')   # D as a deployed pre-processor

Losses (`config.defense.hgd.loss`), the target in inference mode and only D trained:
  pixel  mean |D(x_adv) - x| (the paper's pixel-guided denoiser, "PGD" there)
  fgd    mean |F(D(x_adv)) - F(x)|, F the target's top convolutional feature map (before pooling)
  lgd    mean |z(D(x_adv)) - z(x)|, z the target's logits (the paper's default HGD)
  cgd    cross-entropy of f(D(x_adv)) against the true label
"mean |.|" is the official `DenoiseLoss` (an L1 mean over every element).

The training set follows the paper's Table 1 (and the official `Attackset/*/attack_iter.py`):
for each clean image, one copy per variant in `VARIANTS`: the clean image itself, random noise
(+-eps per pixel with equal probability, the NIPS solution's "random noise"), FGSM on the target
alone, and FGSM and I-FGSM-2 / 4 / 8 (step eps / steps, no random start) on the ensemble of the
target and the other members. An attack's label is the source models' prediction on the clean
image (no label leaking): the ensemble's is the argmax of the summed softmax, and its loss the
cross-entropy of the members' averaged logits, as the official code. Each image's eps is drawn
per variant uniformly from {1, ..., 16} x `unit` (CIFAR-10: 1/255, the paper's [1, 16] / 255;
MNIST: 0.3 / 16, the same range scaled to MNIST's eps).

Differences from the official code: pixels in [0, 1] (it attacks in [-1, 1]; eps scaled
alike); the adversarial images are kept in float32 (it saves PNGs, rounding them to 8 bits);
no Inception auxiliary-logit term (our classifiers have none).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from defendpp_jax import files
from defendpp_jax import losses
from defendpp_jax.attacks import bounded
from defendpp_jax.defences import base

ARCHS = ('dunet', 'dae')
LOSSES = ('pixel', 'fgd', 'lgd', 'cgd')
VARIANTS = ('clean', 'noise', 'fgsm_target', 'fgsm_ensemble', 'ifgsm2_ensemble',
            'ifgsm4_ensemble', 'ifgsm8_ensemble')
EPS_LEVELS = 16  # eps per image uniform in {1, ..., 16} x unit (the paper's [1, 16] / 255)
_STEPS = {'fgsm_target': 1, 'fgsm_ensemble': 1, 'ifgsm2_ensemble': 2, 'ifgsm4_ensemble': 4,
          'ifgsm8_ensemble': 8}

Guide = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def eps_unit(dataset: str) -> float:
  """One eps level: 1/255 on CIFAR-10 (the paper's pixel scale), 0.3/16 on MNIST (so that the
  16 levels span (0, 0.3], MNIST's usual eps)."""
  return 0.3 / EPS_LEVELS if dataset in ('mnist', 'digits') else 1.0 / 255.0


# ---------------------------------------------------------------------------------------------
# The guide (the frozen target) and the four losses.


def classifier_features(module, x):
  """(logits, features) of a `DefendPP`'s classifier in inference mode (a `method=` of
  `module.apply`): features = one list of (name, array) taps per encoder block."""
  return module.classifier(x, train=False, return_features=True)


def guide_of(module: Any, variables: Any) -> Guide:
  """x -> (top convolutional feature map before pooling, logits) of the classifier of a
  `DefendPP` module, in inference mode (BatchNorm's stored statistics)."""
  def guide(x):
    logits, features = module.apply(variables, x, method=classifier_features)
    return features[-1][-1][1], logits
  return guide


def guided_loss(kind: str, guide: Guide, denoised: jax.Array, clean: jax.Array,
                labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics) of `kind` in LOSSES; metrics: the pixel L1 and the target's logits on the
  denoised images (for its accuracy)."""
  if kind not in LOSSES:
    raise ValueError(f'config.defense.hgd.loss={kind!r} is not one of {LOSSES}')
  pixel_l1 = jnp.mean(jnp.abs(denoised - clean))
  n = denoised.shape[0]
  if kind in ('fgd', 'lgd'):
    # one forward of [D(x_adv); x]: inference-mode BatchNorm treats every row alike
    feats, logits = guide(jnp.concatenate([denoised, clean]))
    a, b = (feats[:n], feats[n:]) if kind == 'fgd' else (logits[:n], logits[n:])
    loss = jnp.mean(jnp.abs(a - jax.lax.stop_gradient(b)))
    logits = logits[:n]
  else:
    _, logits = guide(denoised)
    loss = pixel_l1 if kind == 'pixel' else losses.cross_entropy(logits, labels)
  return loss, {'pixel_l1': pixel_l1, 'logits': logits}


# ---------------------------------------------------------------------------------------------
# The training set.


def _ensemble(fns: Sequence[Callable]) -> tuple[Callable, Callable]:
  """(logits: the members' averaged logits, label: argmax of their summed softmax)."""
  def logits(x):
    return sum(f(x) for f in fns) / len(fns)

  def label(x):
    return jnp.argmax(sum(jax.nn.softmax(f(x)) for f in fns), axis=-1)
  return logits, label


def craft_batch(variant: str, target: Callable, members: Sequence[Callable], x: jax.Array,
                eps: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(image, source label) of one variant for a batch; eps: (N,) per image. `target` and
  `members` are logits functions (x -> logits, inference mode); the ensemble is
  [target, *members]."""
  if variant == 'clean':
    return x, jnp.argmax(target(x), -1)
  if variant == 'noise':
    sign = jnp.where(jax.random.bernoulli(key, 0.5, x.shape), 1.0, -1.0).astype(x.dtype)
    noisy = jnp.clip(x + eps.reshape((-1,) + (1,) * (x.ndim - 1)) * sign, 0.0, 1.0)
    return noisy, jnp.argmax(target(x), -1)
  if variant not in _STEPS:
    raise ValueError(f'config.defense.hgd.variants: {variant!r} is not one of {VARIANTS}')
  if variant.endswith('_target'):
    logits, y = target, jnp.argmax(target(x), -1)
  else:
    logits, label = _ensemble([target, *members])
    y = label(x)
  steps = _STEPS[variant]
  if steps == 1:
    return bounded.fgsm(logits, x, y, eps=eps), y
  return bounded.bim(logits, x, y, eps=eps, step_size=eps / steps, num_steps=steps), y


def craft_training_set(target: base.Defence, members: Sequence[base.Defence],
                       images: np.ndarray, *, unit: float, seed: int = 0,
                       variants: Sequence[str] = VARIANTS, batch_size: int = 250,
                       log: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
  """Every variant of every image (variant-major): {'adversarial' (V N, H, W, C),
  'clean_index' (V N,) into `images`, 'variant' (V N,) index into `variants`, 'eps' (V N,),
  'source_label' (V N,)}. Deterministic given `seed`."""
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f'config.defense.hgd.variants: {v!r} is not one of {VARIANTS}')
  rng = np.random.default_rng(seed)
  n = len(images)
  variables = [target.variables] + [m.variables for m in members]

  def run(variant, vs, x, eps, key):
    t = lambda z: target.logits(vs[0], z)
    ms = [lambda z, d=d, v=v: d.logits(v, z) for d, v in zip(members, vs[1:])]
    return craft_batch(variant, t, ms, x, eps, key)

  fns = {v: jax.jit(lambda vs, x, eps, key, v=v: run(v, vs, x, eps, key)) for v in variants}
  out = {k: [] for k in ('adversarial', 'clean_index', 'variant', 'eps', 'source_label')}
  for vi, variant in enumerate(variants):
    levels = rng.integers(1, EPS_LEVELS + 1, n)
    eps_all = (levels * unit).astype(np.float32)
    key = jax.random.key(int(rng.integers(2**31)))
    for start in range(0, n, batch_size):
      x = np.asarray(images[start:start + batch_size], np.float32)
      m = len(x)
      pad = batch_size - m
      eps = eps_all[start:start + m]
      if pad:  # one compiled shape: pad the last batch, drop the padding after
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
        eps = np.concatenate([eps, np.full(pad, unit, np.float32)])
      adv, y = fns[variant](variables, x, eps, jax.random.fold_in(key, start))
      out['adversarial'].append(np.asarray(adv)[:m])
      out['source_label'].append(np.asarray(y)[:m].astype(np.int32))
    out['clean_index'].append(np.arange(n, dtype=np.int32))
    out['variant'].append(np.full(n, vi, np.int32))
    out['eps'].append(eps_all)
    if log:
      log(f'HGD training set: {variant} crafted on {n} images')
  return {k: np.concatenate(v) for k, v in out.items()}


def training_pairs(data: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
  """(N, 2, H, W, C) float32: row i is [attacked image i, its clean image]."""
  clean = np.asarray(images, np.float32)[data['clean_index']]
  return np.stack([data['adversarial'], clean], axis=1)


def load_or_craft(path: str, meta: dict[str, Any], craft: Callable[[], dict[str, np.ndarray]],
                  log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
  """The training set stored at `path` if it was crafted with `meta`, else `craft()` written
  there atomically. A stored set with other settings is an error (nothing is overwritten)."""
  if os.path.isfile(path):
    with np.load(path) as f:
      stored = json.loads(str(f['meta']))
      if stored != json.loads(json.dumps(meta)):
        diff = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
        raise ValueError(
            f'config.defense.hgd.trainset={path!r} was crafted with other settings (differing: '
            f'{", ".join(diff)}): point config.defense.hgd.trainset elsewhere or delete it')
      log(f'HGD training set loaded from {path}')
      return {k: f[k] for k in f.files if k != 'meta'}
  data = craft()
  files.write_npz(path, meta=np.asarray(json.dumps(meta, sort_keys=True)), **data)
  log(f'HGD training set ({len(data["variant"])} images) written to {path}')
  return data


# ---------------------------------------------------------------------------------------------
# Deployment.


def preprocessor(denoiser: Any, variables: Any, name: str,
                 residual_scale: float = 1.0) -> base.Preprocessor:
  """The trained denoiser as a deployed pre-processor: x -> D(x), inference mode (BatchNorm's
  running statistics). Differentiable: no BPDA stand-in, the white-box view is exact.
  `residual_scale` s deploys x + s (D(x) - x) (2: the paper's "PGD x2", Appendix B)."""
  def apply(v, x, key, bpda):
    del key, bpda
    out = denoiser.apply(v, x, train=False)
    return out if residual_scale == 1.0 else x + residual_scale * (out - x)
  return base.Preprocessor(name, apply, variables)


def averaged_preprocessors(pres: Sequence[base.Preprocessor], name: str) -> base.Preprocessor:
  """The mean of several deterministic pre-processors' outputs (the paper's "LGD1&LGD2 ->",
  Appendix C); variables: a tuple of theirs."""
  pres = tuple(pres)

  def apply(v, x, key, bpda):
    return sum(p.apply(vi, x, key, bpda) for p, vi in zip(pres, v)) / len(pres)
  return base.Preprocessor(name, apply, tuple(p.variables for p in pres),
                           stand_ins=tuple(s for p in pres for s in p.stand_ins))
