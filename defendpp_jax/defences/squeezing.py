"""Feature squeezing (Xu et al. 2018): bit-depth reduction, median smoothing, and the detector.

Usage:
  pre = bit_depth(bits=1)                       # x -> round(x (2^b - 1)) / (2^b - 1)
  pre = median(size=2)                          # scipy.ndimage.median_filter, mode='reflect'
  detector = squeezing_detector(net, [bit_depth(1), median(2)], held_out_images)

Bit depth is a hard quantiser (zero gradient almost everywhere): its BPDA stand-in is the
identity. The median filter is piecewise linear (its gradient flows to the selected pixel), so
it needs no stand-in. The detector flags x when max over squeezers s of
||softmax(f(x)) - softmax(f(s(x)))||_1 exceeds the threshold that gives 5% false positives on
held-out clean images (EvadeML-Zoo); a flagged input counts as defended. The deployed detector
returns K + 1 logits, the last one "rejected" (it wins the argmax exactly when the score is over
the threshold). An attacker aware of the detector (He et al. 2017) maximises its loss minus a
penalty on the score: the attack model of every view but 'oblivious' drops the reject column and
carries `penalty_weight * relu(score - 0.8 * threshold)` (hinged below the threshold, so that
the adversarial stays under it); the oblivious attacker (Xu et al.'s own evaluation) attacks the
classifier alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from defendpp_jax.defences import base

# The hinge of the detector-aware penalty, as a fraction of the threshold.
PENALTY_HINGE = 0.8


def bit_depth(bits: int) -> base.Preprocessor:
  """Each pixel rounded to 2^bits levels (EvadeML-Zoo's `reduce_precision`); BPDA: identity."""
  if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
    raise ValueError(f'config.defense.bit_depth.bits must be an integer in [1, 8], got {bits!r}')
  levels = float(2 ** bits - 1)

  def apply(variables, x, key, bpda):
    del variables, key
    hard = jnp.round(x * levels) / levels
    return base.straight_through(hard, x) if bpda else hard

  name = f'bit_depth({bits})'
  return base.Preprocessor(name, apply, stand_ins=((name, 'identity'),))


def median_filter(x: jax.Array, size: int) -> jax.Array:
  """scipy.ndimage.median_filter(x, size=(1, size, size, 1), mode='reflect') on NHWC images.

  As scipy: the window of an even size covers offsets -size//2 .. size - 1 - size//2 around the
  pixel, the boundary is mirrored with the edge pixel repeated ('reflect' = numpy 'symmetric'),
  and the median of an even count is the upper one (rank size*size // 2)."""
  before = size // 2
  after = size - 1 - before
  padded = jnp.pad(x, ((0, 0), (before, after), (before, after), (0, 0)), mode='symmetric')
  h, w = x.shape[1:3]
  windows = [padded[:, i:i + h, j:j + w, :] for i in range(size) for j in range(size)]
  stacked = jnp.stack(windows, axis=-1)
  return jnp.sort(stacked, axis=-1)[..., (size * size) // 2]


def median(size: int) -> base.Preprocessor:
  """Median smoothing over size x size windows, per channel (differentiable: no stand-in)."""
  if not isinstance(size, int) or isinstance(size, bool) or not 2 <= size <= 5:
    raise ValueError(f'config.defense.median.size must be an integer in [2, 5], got {size!r}')

  def apply(variables, x, key, bpda):
    del variables, key, bpda
    return median_filter(x, size)

  return base.Preprocessor(f'median({size}x{size})', apply)


def squeezers_of(names: Sequence[str]) -> list[base.Preprocessor]:
  """'bit_depth_5', 'median_2' -> the squeezers (config.defense.feature_squeezing.squeezers)."""
  out = []
  for name in names:
    kind, _, arg = name.rpartition('_')
    if kind not in ('bit_depth', 'median') or not arg.isdigit():
      raise ValueError(f'config.defense.feature_squeezing.squeezers: {name!r} is not '
                       'bit_depth_<bits> or median_<size>')
    out.append(bit_depth(int(arg)) if kind == 'bit_depth' else median(int(arg)))
  if not out:
    raise ValueError('config.defense.feature_squeezing.squeezers is empty')
  return out


def score_fn(classifier: base.Defence, squeezers: Sequence[base.Preprocessor]):
  """(variables, x, key, bpda) -> (logits of x, per-example detector score)."""
  def score(variables, x, key, bpda):
    logits = classifier.apply(variables, x, key, bpda)
    p = jax.nn.softmax(logits)
    dists = []
    for s in squeezers:
      z = classifier.apply(variables, s.apply(None, x, key, bpda), key, bpda)
      dists.append(jnp.sum(jnp.abs(p - jax.nn.softmax(z)), axis=-1))
    return logits, jnp.max(jnp.stack(dists, -1), axis=-1)
  return score


def calibrate(classifier: base.Defence, squeezers: Sequence[base.Preprocessor],
              images: np.ndarray, false_positive_rate: float = 0.05,
              batch_size: int = 500) -> tuple[float, np.ndarray]:
  """(threshold, scores): the (1 - fpr) quantile of the scores of held-out clean images."""
  if not 0 < false_positive_rate < 1:
    raise ValueError('config.defense.feature_squeezing.false_positive_rate must be in (0, 1), '
                     f'got {false_positive_rate}')
  score = jax.jit(lambda v, x: score_fn(classifier, squeezers)(v, x, None, False)[1])
  scores = np.concatenate([np.asarray(score(classifier.variables, images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])
  # As EvadeML-Zoo: the ceil(n (1 - fpr))-th smallest score, so that at most fpr of the
  # held-out scores lie strictly above it (exactly fpr when n fpr is a whole number, no ties).
  ranked = np.sort(scores)
  index = max(int(np.ceil(len(ranked) * (1.0 - false_positive_rate))) - 1, 0)
  return float(ranked[index]), scores


def squeezing_detector(classifier: base.Defence, squeezers: Sequence[base.Preprocessor],
                       held_out: np.ndarray, false_positive_rate: float = 0.05,
                       penalty_weight: float = 10.0, name: str | None = None,
                       batch_size: int = 500) -> base.Defence:
  """The detector + classifier as a Defence with K + 1 outputs (the last: rejected)."""
  if classifier.randomised:
    raise ValueError('feature_squeezing protects a deterministic classifier')
  threshold, scores = calibrate(classifier, squeezers, held_out, false_positive_rate,
                                batch_size)
  score = score_fn(classifier, squeezers)

  def apply(variables, x, key, bpda):
    logits, s = score(variables['classifier'], x, key, bpda)
    reject = jnp.max(logits, axis=-1) + (s - threshold)   # > max(logits) iff s > threshold
    return jnp.concatenate([logits, reject[:, None]], axis=-1)

  def penalty(variables, x, key, bpda):
    _, s = score(variables['classifier'], x, key, bpda)
    return penalty_weight * jax.nn.relu(s - PENALTY_HINGE * threshold)

  label = name or 'feature_squeezing(' + ', '.join(s.name for s in squeezers) + ')'
  stand_ins = tuple(si for s in squeezers for si in s.stand_ins) + classifier.stand_ins
  num_classes = jax.eval_shape(lambda x: classifier.apply(classifier.variables, x, None, False),
                               jnp.asarray(held_out[:1])).shape[-1]
  info = {'num_classes': int(num_classes), 'threshold': threshold,
          'false_positive_rate': false_positive_rate,
          'calibration_examples': int(len(held_out)),
          'calibration_false_positives': int(np.sum(scores > threshold)),
          'squeezers': [s.name for s in squeezers], 'penalty_weight': penalty_weight,
          'penalty_hinge': PENALTY_HINGE}
  return base.Defence(label, apply, {'classifier': classifier.variables},
                      stand_ins=stand_ins, behind=classifier, rejects=True, penalty=penalty,
                      info=info)
