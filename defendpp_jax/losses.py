"""Training losses of Defend++ (paper eq. 3): cross-entropy and multi-scale reconstruction.

Usage:
  ce = cross_entropy(logits, labels)
  rec_full, rec_ms = reconstruction([I~0, I~1, I~2], images, targets='dct')
  loss = ce + rec_full + 0.01 * rec_ms
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from defendpp_jax import frequency


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Pixel-wise mean squared error (the paper's ||.||_2^2, averaged over pixels and batch)."""
  if prediction.shape != target.shape:
    raise ValueError(f'reconstruction shape {prediction.shape} != target shape {target.shape}')
  return jnp.mean(jnp.square(prediction - target))


def reconstruction(reconstructions: Sequence[jax.Array], images: jax.Array,
                   targets: str = 'dct') -> tuple[jax.Array, jax.Array]:
  """(||I~0 - I0||^2, sum_{m>=1} ||I~m - Im||^2) against low-pass targets of `images`.

  Zeros when there is no decoder (`reconstructions` empty).
  """
  if not reconstructions:
    zero = jnp.zeros((), jnp.float32)
    return zero, zero
  pyramid = frequency.lowpass_pyramid(images, len(reconstructions), kind=targets)
  terms = [mse(r, jax.lax.stop_gradient(t)) for r, t in zip(reconstructions, pyramid)]
  return terms[0], sum(terms[1:], jnp.zeros((), jnp.float32))
