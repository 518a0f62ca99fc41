"""HGD's analyses of a denoiser in front of a frozen classifier (Liao et al., CVPR 2018): the
layer-wise perturbation levels of Fig. 5 (Sec. 5.1) and the predicted-vs-true noise of Fig. 7
(Sec. 5.4).

Usage:
  layers = layer_activations(module, variables, x)             # [('E0', a), ..., ('logits', z)]
  den = lambda x: denoiser.apply(den_vars, x, train=False)     # D, any JAX-traceable x -> D(x)
  curves = {'no defence': amplification(module, variables, clean, adv),
            'LGD': amplification(module, variables, clean, adv, denoise=den),
            'random noise': amplification(module, variables, clean, noisy)}
  plot_amplification(curves, 'amplification.png', title='MNIST, I-FGSM-4')
  slopes = {'LGD': noise_slope(clean, adv, np.asarray(jax.jit(den)(adv)))}
  plot_noise_slope(slopes, 'noise_slope.png')

`module` is a `DefendPP` (its `.classifier` is the frozen target f), run in inference mode.

Layer-wise perturbation level (`amplification`): for each layer l of f, the mean over images of

  ||f_l(D(x_p)) - f_l(D(x))||_2 / ||f_l(D(x))||_2,

x the clean image, x_p its perturbed copy (adversarial, random noise, ...), the L2 norm over every
element of the layer's output for that image. The layers are 'pixels' (the input of f itself:
||D(x_p) - D(x)|| / ||D(x)||), the output of every encoder block E_0 .. E_{B-1} (each block's
last tap) and the logits. `denoise=None` is the identity ("no defence"). The paper's formula
compares f_l(D(x_p)) with f_l(x), the undefended clean image, instead:
`reference='clean'` computes that; the default `reference='denoised'` compares the two images
after the same D, so that the level measures what D lets through of the perturbation only (a D
that maps everything to one image scores 0).

Noise slope (`noise_slope`): per pixel, the true perturbation dx = x_adv - x and the predicted
one dx^ = x_adv - D(x_adv) (what D removes); the least-squares line dx^ = a dx + b over every
pixel of every image (a < 1: D removes part of the noise, the paper's pixel-guided denoiser; a
> 1: it over-corrects, the paper's LGD), Pearson's r, the residual spread and a 60 x 60 2-D
histogram over [-m, m]^2 (m = max |dx| rounded up to two significant digits) to plot.
"""

from __future__ import annotations

import functools
import math
import textwrap
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from defendpp_jax.defences import hgd
from defendpp_jax.evaluation.reporting import _pyplot
from defendpp_jax.evaluation.reporting import _save

PIXELS = 'pixels'
LOGITS = 'logits'
REFERENCES = ('denoised', 'clean')
HIST_BINS = 60
LOG_SCALE_DECADES = 2  # plot_amplification: a log y axis when the levels span more than this

Denoise = Callable[[jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------
# The classifier's layers.


def _layers(module: Any, variables: Any, x: jax.Array) -> list[jax.Array]:
  """[output of E_0, ..., output of E_{B-1}, logits] of the classifier, inference mode."""
  logits, features = module.apply(variables, x, method=hgd.classifier_features)
  return [taps[-1][1] for taps in features] + [logits]


def _names(num_blocks: int) -> list[str]:
  return [f'E{k}' for k in range(num_blocks)] + [LOGITS]


@functools.lru_cache(maxsize=None)
def _layers_fn(module: Any) -> Callable:
  return jax.jit(functools.partial(_layers, module))


def _relative(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per row: ||a - b||_2 / ||b||_2 over all the row's elements (0 where a == b, even if b is
  0; inf where only b is 0)."""
  n = a.shape[0]
  d = jnp.sqrt(jnp.sum(jnp.square((a - b).reshape(n, -1).astype(jnp.float32)), -1))
  r = jnp.sqrt(jnp.sum(jnp.square(b.reshape(n, -1).astype(jnp.float32)), -1))
  return jnp.where(d == 0, 0.0, d / r)


@functools.lru_cache(maxsize=None)
def _levels_fn(module: Any) -> Callable:
  """jit of (variables, reference images, perturbed images) -> (1 + B + 1, N) per-image
  levels: pixels, E_0 .. E_{B-1}, logits. Two forwards of the same shape (not one of the
  concatenation), so that identical inputs give bitwise identical activations."""
  def levels(variables, ref, pert):
    a, b = _layers(module, variables, pert), _layers(module, variables, ref)
    return jnp.stack([_relative(pert, ref)] + [_relative(u, v) for u, v in zip(a, b)])
  return jax.jit(levels)


def _batches(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  for start in range(0, n, batch_size):
    yield start, min(start + batch_size, n)


def _padded(x: np.ndarray, size: int) -> np.ndarray:
  """x padded to `size` rows with copies of its last row (one compiled shape per run)."""
  if len(x) == size:
    return x
  return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def layer_activations(module: Any, variables: Any, x: np.ndarray,
                      batch_size: int = 250) -> list[tuple[str, np.ndarray]]:
  """[('E0', output of E_0), ..., ('E{B-1}', ...), ('logits', logits)] of the classifier of the
  `DefendPP` `module` on images x (N, H, W, C), inference mode, each (N, ...) float32."""
  x = np.asarray(x, np.float32)
  if len(x) == 0:
    raise ValueError('layer_activations: no images')
  fn = _layers_fn(module)
  size = min(batch_size, len(x))
  parts = []
  for start, stop in _batches(len(x), batch_size):
    out = fn(variables, _padded(x[start:stop], size))
    parts.append([np.asarray(o)[:stop - start] for o in out])
  arrays = [np.concatenate(p) for p in zip(*parts)]
  return list(zip(_names(len(arrays) - 1), arrays))


# ---------------------------------------------------------------------------------------------
# Fig. 5: the layer-wise perturbation level.


def amplification(module: Any, variables: Any, clean: np.ndarray, perturbed: np.ndarray,
                  denoise: Denoise | None = None, batch_size: int = 250,
                  reference: str = 'denoised') -> dict[str, Any]:
  """The paper's Fig. 5 curve: {'layers': ['pixels', 'E0', ..., 'logits'], 'level': mean over
  images of ||f_l(D(perturbed)) - f_l(R)|| / ||f_l(R)|| per layer, 'num_images', 'reference'},
  R = D(clean) (reference='denoised') or clean (reference='clean', the paper's formula).

  `denoise` (x -> D(x) on a batch, None = identity) is jitted here, so it must be
  JAX-traceable; for one that is not, denoise both sets first and pass denoise=None.
  """
  if reference not in REFERENCES:
    raise ValueError(f'amplification: reference={reference!r} is not one of {REFERENCES}')
  clean = np.asarray(clean, np.float32)
  perturbed = np.asarray(perturbed, np.float32)
  if clean.shape != perturbed.shape:
    raise ValueError(f'amplification: clean {clean.shape} and perturbed {perturbed.shape} '
                     'images differ in shape')
  n = len(clean)
  if n == 0:
    raise ValueError('amplification: no images')
  den = jax.jit(denoise) if denoise is not None else (lambda z: z)
  levels = _levels_fn(module)
  size = min(batch_size, n)
  sums = None
  for start, stop in _batches(n, batch_size):
    c = jnp.asarray(_padded(clean[start:stop], size))
    p = jnp.asarray(_padded(perturbed[start:stop], size))
    ref = den(c) if reference == 'denoised' else c
    per_image = np.asarray(levels(variables, ref, den(p)), np.float64)[:, :stop - start]
    sums = per_image.sum(1) if sums is None else sums + per_image.sum(1)
  return {'layers': [PIXELS] + _names(len(sums) - 2), 'level': [float(s / n) for s in sums],
          'num_images': n, 'reference': reference}


# ---------------------------------------------------------------------------------------------
# Fig. 7: predicted vs true adversarial noise.


def _round_up(x: float) -> float:
  """x > 0 rounded up to two significant digits (0.3 -> 0.3, 0.0627 -> 0.063), ignoring
  float32 noise in the last digits (0.30000001 -> 0.3)."""
  q = 10.0 ** (math.floor(math.log10(x)) - 1)
  return round(math.ceil(x / q - 1e-4) * q, 12)


def _chunks(clean, adversarial, denoised, batch_size):
  for start, stop in _batches(len(clean), batch_size):
    adv = np.asarray(adversarial[start:stop], np.float64)
    yield ((adv - np.asarray(clean[start:stop], np.float64)).ravel(),
           (adv - np.asarray(denoised[start:stop], np.float64)).ravel())


def noise_slope(clean: np.ndarray, adversarial: np.ndarray, denoised: np.ndarray,
                batch_size: int = 1000, bins: int = HIST_BINS) -> dict[str, Any]:
  """The fit dx^ = a dx + b over every pixel, dx = adversarial - clean (the true perturbation),
  dx^ = adversarial - denoised (what the denoiser removes), and their 2-D histogram (JSON-able):

    slope, intercept   a, b (least squares, dx^ on dx)
    r                  Pearson's correlation of dx and dx^ (None if dx^ is constant)
    residual_std       std of dx^ - (a dx + b): how noisy the prediction is
    num_pixels, num_images
    histogram          {'range': m, 'bins', 'edges' (bins + 1 floats over [-m, m]),
                        'counts' (bins x bins: counts[i][j] pixels with dx in bin i and dx^ in
                        bin j), 'outside' (pixels with dx^ beyond [-m, m], not counted)}

  Raises ValueError if adversarial == clean at every pixel (or dx is constant): no perturbation
  to fit against.
  """
  shapes = {np.shape(clean), np.shape(adversarial), np.shape(denoised)}
  if len(shapes) != 1:
    raise ValueError(f'noise_slope: clean {np.shape(clean)}, adversarial '
                     f'{np.shape(adversarial)} and denoised {np.shape(denoised)} differ in shape')
  if len(clean) == 0:
    raise ValueError('noise_slope: no images')
  # Pass 1: the histogram's range.
  top = max(float(np.max(np.abs(dx))) for dx, _ in _chunks(clean, adversarial, denoised,
                                                           batch_size))
  if top == 0:
    raise ValueError('noise_slope: adversarial == clean at every pixel (dx = 0 everywhere): '
                     'there is no perturbation to fit dx^ against; were the attacks run?')
  m = _round_up(top)
  edges = np.linspace(-m, m, bins + 1)
  # Pass 2: means and co-moments merged chunk by chunk (Chan et al.), and the histogram.
  n, mx, my, cxx, cyy, cxy = 0, 0.0, 0.0, 0.0, 0.0, 0.0
  counts = np.zeros((bins, bins), np.int64)
  for dx, dy in _chunks(clean, adversarial, denoised, batch_size):
    k = dx.size
    if k == 0:
      continue
    ax, ay = dx.mean(), dy.mean()
    ex, ey = dx - ax, dy - ay
    kxx, kyy, kxy = float(ex @ ex), float(ey @ ey), float(ex @ ey)
    tot = n + k
    ddx, ddy = ax - mx, ay - my
    cxx += kxx + ddx * ddx * n * k / tot
    cyy += kyy + ddy * ddy * n * k / tot
    cxy += kxy + ddx * ddy * n * k / tot
    mx += ddx * k / tot
    my += ddy * k / tot
    n = tot
    counts += np.histogram2d(dx, dy, bins=[edges, edges])[0].astype(np.int64)
  if cxx <= 0:
    raise ValueError(f'noise_slope: dx = {mx:g} at every pixel: a constant perturbation '
                     'leaves the slope undefined')
  a = cxy / cxx
  b = my - a * mx
  r = cxy / math.sqrt(cxx * cyy) if cyy > 0 else None
  residual = max(cyy - cxy * cxy / cxx, 0.0) / n
  return {
      'slope': float(a), 'intercept': float(b),
      'r': None if r is None else float(min(max(r, -1.0), 1.0)),
      'residual_std': float(math.sqrt(residual)),
      'num_pixels': int(n), 'num_images': int(len(clean)),
      'histogram': {'range': float(m), 'bins': int(bins), 'edges': edges.tolist(),
                    'counts': counts.tolist(), 'outside': int(n - counts.sum())},
  }


# ---------------------------------------------------------------------------------------------
# Figures.


def plot_amplification(curves: dict[str, dict[str, Any]], path: str, title: str = '') -> str:
  """Fig. 5: one line per curve ({label: amplification(...)}), x = the layers, y = the level
  (a log axis when the positive levels span more than two decades); a PNG at `path`."""
  if not curves:
    raise ValueError('plot_amplification: no curves')
  layers = next(iter(curves.values()))['layers']
  for label, c in curves.items():
    if list(c['layers']) != list(layers):
      raise ValueError(f'plot_amplification: curve {label!r} has layers {c["layers"]}, the '
                       f'first curve {layers}')
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.8))
  xs = np.arange(len(layers))
  for i, (label, c) in enumerate(curves.items()):
    ax.plot(xs, c['level'], 'o-', color=f'C{i}', label=label)
  positive = np.asarray([v for c in curves.values() for v in c['level']], np.float64)
  positive = positive[np.isfinite(positive) & (positive > 0)]
  if positive.size and positive.max() / positive.min() > 10.0 ** LOG_SCALE_DECADES:
    ax.set_yscale('log')
  ax.set_xticks(xs)
  ax.set_xticklabels(layers)
  ax.set_xlabel('layer of the target model')
  ax.set_ylabel('||f(x^) - f(x)|| / ||f(x)||')
  ax.set_title(textwrap.fill(title, 64), fontsize=9)  # (wrapped: a long title is cut)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(plt, fig, path)


def plot_noise_slope(slopes: dict[str, dict[str, Any]], path: str, title: str = '') -> str:
  """Fig. 7: one panel per denoiser ({label: noise_slope(...)}): the 2-D histogram of (dx, dx^)
  in log counts, the fitted line (red) and y = x (dashed); a PNG at `path`."""
  if not slopes:
    raise ValueError('plot_noise_slope: no denoisers')
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  plt = _pyplot()
  k = len(slopes)
  fig, axes = plt.subplots(1, k, figsize=(3.6 * k, 3.6), squeeze=False)
  for ax, (label, s) in zip(axes[0], slopes.items()):
    h = s['histogram']
    m, edges = h['range'], np.asarray(h['edges'])
    counts = np.asarray(h['counts'], np.float64).T  # rows: dx^ (y), columns: dx (x)
    norm = colors.LogNorm(vmin=1, vmax=max(counts.max(), 1)) if counts.max() > 0 else None
    mesh = ax.pcolormesh(edges, edges, np.ma.masked_equal(counts, 0), norm=norm,
                         cmap='viridis')
    fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.04, label='pixels')
    line = np.asarray([-m, m])
    ax.plot(line, s['slope'] * line + s['intercept'], color='red', lw=1.2,
            label=f'fit: {s["slope"]:.2f} dx {s["intercept"]:+.3f}')
    ax.plot(line, line, 'k--', lw=0.8, label='dx^ = dx')
    ax.set_xlim(-m, m)
    ax.set_ylim(-m, m)
    ax.set_aspect('equal')
    ax.set_xlabel('dx = x_adv - x')
    ax.set_ylabel('dx^ = x_adv - D(x_adv)')
    r = '' if s.get('r') is None else f', r {s["r"]:.2f}'
    ax.set_title(f'{label}: slope {s["slope"]:.2f}{r}', fontsize=9)
    ax.legend(fontsize=6, loc='upper left')
  if title:
    fig.suptitle(title)
  return _save(plt, fig, path)
