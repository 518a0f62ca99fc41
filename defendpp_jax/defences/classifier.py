"""A trained classifier as a Defence: the plain net, Defend++'s deployed classifier, adversarially
trained nets; and Defend++'s diagnostics (reconstructions, the R histogram of paper Figs. 7-8).

Usage:
  module = module_of(config, ds)                       # the DefendPP a config trains
  defence = classifier_defence(module, variables, 'resnet18-w16-pyramid')
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from defendpp_jax import attacks
from defendpp_jax import data as data_lib
from defendpp_jax.defences import base
from defendpp_jax.nn import defendpp


def module_of(config: ml_collections.ConfigDict, ds: data_lib.Dataset) -> defendpp.DefendPP:
  """The `DefendPP` (classifier + optional auto-encoder) that `config` trains on `ds`: convex
  residual aggregation for Parseval networks, Bayesian layers for Adv-BNN."""
  name = config.defense.name
  return defendpp.build_model(
      config.model, ds.num_classes, ds.image_shape, ds.mean, ds.std,
      noise_std=config.train.noise_std, residual='convex' if name == 'parseval' else 'sum',
      bayes_prior=config.defense.adv_bnn.prior_sigma if name == 'adv_bnn' else 0.0)


def classifier_defence(module: defendpp.DefendPP, variables: Any, name: str) -> base.Defence:
  """The inference-mode classifier of `module` (its decoder, if any, is not deployed)."""
  def apply(v, x, key, bpda):
    del key, bpda
    return module.apply(v, x, method='classify')
  diagnostics = (functools.partial(reconstruction_analysis, module)
                 if module.decoder != 'none' else None)
  return base.Defence(name, apply, variables, diagnostics=diagnostics)


def reconstruction_analysis(module: defendpp.DefendPP, defence: base.Defence, images, labels,
                            eps: float, batch_size: int, num: int = 500) -> dict[str, Any]:
  """FGSM images, the AE's reconstructions and R = D_rc / D_ra (paper Figs. 7-8)."""
  n = min(num, len(labels))
  attack_fn = jax.jit(lambda v, x, y: attacks.fgsm(
      defence.attack_model('exact', variables=v), x, y, eps=eps))
  full = jax.jit(lambda v, x: module.apply(v, x, train=False)[1][0])
  classify = jax.jit(lambda v, x: jnp.argmax(defence.logits(v, x), -1))
  l2 = lambda a, b: np.sqrt(((a - b) ** 2).sum(axis=(1, 2, 3)))
  dist = {'d_rc': [], 'd_ra': [], 'd_ac': [], 'd_clean': []}
  ratios, correct, shown = [], 0, None
  for start in range(0, n, batch_size):
    x, y = images[start:start + batch_size][:n - start], labels[start:start + batch_size]
    y = y[:len(x)]
    adv = np.asarray(attack_fn(defence.variables, x, y))
    rec_adv = np.asarray(full(defence.variables, adv))
    rec = np.asarray(full(defence.variables, x))
    d_rc, d_ra = l2(rec_adv, x), l2(rec_adv, adv)
    for k, v in (('d_rc', d_rc), ('d_ra', d_ra), ('d_ac', l2(adv, x)), ('d_clean', l2(rec, x))):
      dist[k].append(v)
    ratios.append(d_rc / np.maximum(d_ra, 1e-12))
    correct += int(np.sum(np.asarray(classify(defence.variables, adv)) == y))
    if shown is None:
      k = min(8, len(x))
      shown = {'clean': x[:k], 'rec_clean': rec[:k], 'adv': adv[:k], 'rec_adv': rec_adv[:k]}
  ratios = np.concatenate(ratios)
  # d_rc = ||AE(x_adv) - x||, d_ra = ||AE(x_adv) - x_adv||, d_ac = ||x_adv - x||,
  # d_clean = ||AE(x) - x|| (per image, L2 over all pixels)
  return {'eps': eps, 'ratio_R': ratios.tolist(), 'fraction_R_below_1': float(np.mean(ratios < 1)),
          'distances': {k: np.concatenate(v).tolist() for k, v in dist.items()},
          'adversarial_accuracy': correct / len(ratios), 'images': shown}
