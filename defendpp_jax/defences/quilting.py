"""Image quilting (Guo et al. 2018): the input rebuilt from patches of clean training images.

Usage:
  db = patch_database(train_images, num_patches=100_000, key=jax.random.key(0))
  quilted = preprocess(quilting(db, k=10), classifier)     # randomised: attack with BPDA + EOT
  y, idx = quilt(x, db, key, return_indices=True)           # the chosen database patches

The input is cut into overlapping tiles (`patch` x `patch`, `overlap` pixels shared with the
previous tile, stride patch - overlap); when (H - patch) is not a multiple of the stride a last
tile row at H - patch (and column at W - patch) is added so that every pixel is covered. For each
tile the k nearest database patches in L2 (exact search) are found and one of them is drawn
uniformly; the drawn patches are pasted into the output in raster order, each overwriting the
previous ones on its overlap: the authors' `quilt(..., graphcut=False)` option (their default
cuts the overlaps along a minimum-error boundary instead). The output is made of database pixels
only, so its gradient with respect to the input is zero: the BPDA stand-in is the identity.

The database is the Preprocessor's `variables` ({'patches': (P, patch, patch, C)}), an argument
of the jitted functions rather than a compiled-in constant.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp

from defendpp_jax.defences import base

STAND_INS = (('quilting', 'identity'),)


def patch_database(images: Any, num_patches: int, key: jax.Array, patch: int = 5) -> jax.Array:
  """`num_patches` patch x patch crops at uniformly random positions of random images.

  Args:
    images: (M, H, W, C) clean training images, float in [0, 1] (numpy or jax).
    num_patches: the database size.
    key: the draw (the database is a deterministic function of it).
    patch: the side of a patch.

  Returns:
    (num_patches, patch, patch, C) float32.
  """
  shape = np.shape(images)
  if len(shape) != 4:
    raise ValueError(f'images must be (M, H, W, C), got shape {shape}')
  m, h, w, _ = shape
  if isinstance(num_patches, bool) or not isinstance(num_patches, (int, np.integer)) or (
      num_patches < 1):
    raise ValueError(f'config.defense.quilting.num_patches must be an integer >= 1, got '
                     f'{num_patches!r}')
  if not 1 <= patch <= min(h, w):
    raise ValueError(f'config.defense.quilting.patch must be in [1, {min(h, w)}], got {patch}')
  k_img, k_y, k_x = jax.random.split(key, 3)
  which = np.asarray(jax.random.randint(k_img, (num_patches,), 0, m))
  ys = np.asarray(jax.random.randint(k_y, (num_patches,), 0, h - patch + 1))
  xs = np.asarray(jax.random.randint(k_x, (num_patches,), 0, w - patch + 1))
  offsets = np.arange(patch)
  # A host-side gather: the training set never has to be on the device.
  crops = np.asarray(images)[which[:, None, None], ys[:, None, None] + offsets[None, :, None],
                             xs[:, None, None] + offsets[None, None, :]]
  return jnp.asarray(crops, jnp.float32)


def _merge_top_k(dist_a, idx_a, dist_b, idx_b, k):
  """The k smallest of two (Q, *) candidate lists (distances ascending)."""
  dist = jnp.concatenate([dist_a, dist_b], axis=1)
  idx = jnp.concatenate([idx_a, idx_b], axis=1)
  neg, pos = jax.lax.top_k(-dist, k)
  return -neg, jnp.take_along_axis(idx, pos, axis=1)


@functools.partial(jax.jit, static_argnames=('k', 'chunk', 'query_chunk', 'block'))
def nearest_patches(queries: jax.Array, db: jax.Array, k: int, chunk: int = 16384,
                    query_chunk: int = 256, block: int = 16) -> jax.Array:
  """Exact k nearest neighbours in L2: (Q, D) queries, (P, D) database -> (Q, k) indices.

  Squared distances ||d||^2 - 2 q.d (+ ||q||^2, which does not change a query's ranking) are
  computed by matmuls over database chunks of at most `chunk` rows (queries in chunks of
  `query_chunk`), and each chunk's k best are merged with the best so far; memory is
  O(query_chunk x chunk). Within a chunk, the rows are grouped in blocks of `block`: the k
  nearest rows lie in the k blocks of smallest minimum (a block holding one of them has a
  minimum no larger than it, and k blocks of smaller minimum would hold k nearer rows), so only
  those k x block candidates are ranked. That is exact, and ranks chunk / block + k x block
  values per query instead of chunk (`lax.top_k` on the CPU costs as much as the matmul
  otherwise). Neighbours come nearest first.
  """
  queries = jnp.asarray(queries)
  db = jnp.asarray(db, queries.dtype)
  if queries.ndim != 2:
    raise ValueError(f'queries must be (Q, D), got shape {queries.shape}')
  q, d = queries.shape
  p = db.shape[0]
  if db.ndim != 2 or db.shape[1] != d:
    raise ValueError(f'db must be (P, {d}), got shape {db.shape}')
  if not 1 <= k <= p:
    raise ValueError(f'k must be in [1, {p}] (the database size), got {k}')
  block = int(max(1, min(block, p)))
  # Balanced chunks of at most `chunk` rows, in whole blocks (padding costs as much as rows).
  n_chunks = -(-p // int(min(chunk, p)))
  chunk = -(-p // n_chunks)
  chunk = -(-chunk // block) * block
  query_chunk = int(min(query_chunk, q))
  pad = n_chunks * chunk - p
  db_sq = jnp.sum(db * db, axis=1)
  # Padding rows get an infinite distance, so they are never chosen.
  db_sq = jnp.concatenate([db_sq, jnp.full((pad,), jnp.inf, db_sq.dtype)])
  db_chunks = jnp.concatenate([db, jnp.zeros((pad, d), db.dtype)]).reshape(n_chunks, chunk, d)
  sq_chunks = db_sq.reshape(n_chunks, chunk)
  kc = min(k, chunk)
  n_blocks = chunk // block
  kb = min(kc, n_blocks)

  def search(qs):  # (query_chunk, D) -> (query_chunk, k)
    def body(best, inputs):
      rows, rows_sq, start = inputs
      dist = rows_sq[None, :] - 2.0 * jnp.matmul(qs, rows.T, precision=jax.lax.Precision.HIGHEST)
      if kb < n_blocks:
        minima = jnp.min(dist.reshape(dist.shape[0], n_blocks, block), axis=2)
        _, blocks = jax.lax.top_k(-minima, kb)  # (Qc, kb)
        cand = (blocks[:, :, None] * block + jnp.arange(block, dtype=blocks.dtype))
        cand = cand.reshape(dist.shape[0], kb * block)
        cand_dist = jnp.take_along_axis(dist, cand, axis=1)
      else:
        cand, cand_dist = None, dist
      neg, pos = jax.lax.top_k(-cand_dist, kc)
      if cand is not None:
        pos = jnp.take_along_axis(cand, pos, axis=1)
      return _merge_top_k(*best, -neg, pos + start, k), None

    init = (jnp.full((qs.shape[0], k), jnp.inf, qs.dtype),
            jnp.zeros((qs.shape[0], k), jnp.int32))
    starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    (_, idx), _ = jax.lax.scan(body, init, (db_chunks, sq_chunks, starts))
    return idx

  n_q = -(-q // query_chunk)
  q_pad = n_q * query_chunk - q
  padded = jnp.concatenate([queries, jnp.zeros((q_pad, d), queries.dtype)])
  idx = jax.lax.map(search, padded.reshape(n_q, query_chunk, d))
  return idx.reshape(n_q * query_chunk, k)[:q]


def tile_starts(size: int, patch: int = 5, overlap: int = 2) -> np.ndarray:
  """Tile offsets along one axis: 0, stride, 2 stride, ... and size - patch if not reached."""
  stride = patch - overlap
  starts = list(range(0, size - patch + 1, stride))
  if starts[-1] != size - patch:
    starts.append(size - patch)
  return np.asarray(starts)


def _owners(size: int, patch: int, overlap: int) -> tuple[np.ndarray, np.ndarray]:
  """For each pixel along one axis: the last tile covering it and the offset inside that tile
  (the tile that a raster-order paste writes last)."""
  starts = tile_starts(size, patch, overlap)
  owner = np.zeros(size, np.int32)
  for t, s in enumerate(starts):
    owner[s:s + patch] = t
  return owner, np.arange(size) - starts[owner]


def _check(x: jax.Array, db: jax.Array, k: int, patch: int, overlap: int) -> None:
  if x.ndim != 4:
    raise ValueError(f'x must be (N, H, W, C), got shape {x.shape}')
  if not 1 <= patch <= min(x.shape[1:3]):
    raise ValueError(f'config.defense.quilting.patch must be in [1, {min(x.shape[1:3])}], '
                     f'got {patch}')
  if not 0 <= overlap < patch:
    raise ValueError(f'config.defense.quilting.overlap must be in [0, {patch}), got {overlap}')
  if db.shape[1:] != (patch, patch, x.shape[3]):
    raise ValueError(f'the patch database must be (P, {patch}, {patch}, {x.shape[3]}) '
                     f'(config.defense.quilting.patch), got shape {db.shape}')
  if not 1 <= k <= db.shape[0]:
    raise ValueError(f'config.defense.quilting.k must be in [1, {db.shape[0]}] (the database '
                     f'size), got {k}')


@functools.partial(jax.jit, static_argnames=('k', 'patch', 'overlap'))
def choose_patches(x: jax.Array, db: jax.Array, key: jax.Array, k: int = 10, patch: int = 5,
                   overlap: int = 2) -> jax.Array:
  """The database patch drawn for each tile: (N, tiles down, tiles across) int32 indices
  (uniform among the k nearest to the tile; independent draws per tile and example)."""
  x = jnp.asarray(x)
  db = jnp.asarray(db, x.dtype)
  _check(x, db, k, patch, overlap)
  n, h, w, c = x.shape
  rows = tile_starts(h, patch, overlap)[:, None] + np.arange(patch)  # (Ty, patch)
  cols = tile_starts(w, patch, overlap)[:, None] + np.arange(patch)  # (Tx, patch)
  x = jax.lax.stop_gradient(x)  # the choice is discrete: no gradient flows through it
  tiles = x[:, rows[:, None, :, None], cols[None, :, None, :], :]  # (N, Ty, Tx, p, p, C)
  ty, tx = len(rows), len(cols)
  queries = tiles.reshape(n * ty * tx, patch * patch * c)
  neighbours = nearest_patches(queries, db.reshape(db.shape[0], -1), k)
  pick = jax.random.randint(key, (n * ty * tx, 1), 0, k)
  return jnp.take_along_axis(neighbours, pick, axis=1).reshape(n, ty, tx)


@functools.partial(jax.jit, static_argnames=('height', 'width', 'overlap'))
def paste(db: jax.Array, indices: jax.Array, height: int, width: int,
          overlap: int = 2) -> jax.Array:
  """The image the patches db[indices] make when pasted on the tile grid in raster order
  (each overwriting the previous ones): (N, Ty, Tx) -> (N, height, width, C)."""
  patch = db.shape[1]
  own_y, off_y = _owners(height, patch, overlap)
  own_x, off_x = _owners(width, patch, overlap)
  which = indices[:, own_y[:, None], own_x[None, :]]  # (N, H, W): the patch owning each pixel
  return db[which, off_y[None, :, None], off_x[None, None, :]]


@functools.partial(jax.jit, static_argnames=('k', 'patch', 'overlap', 'return_indices'))
def quilt(x: jax.Array, db: jax.Array, key: jax.Array, k: int = 10, patch: int = 5,
          overlap: int = 2, return_indices: bool = False) -> Any:
  """x (N, H, W, C) quilted from the database db (P, patch, patch, C); with return_indices,
  also the (N, Ty, Tx) indices of the pasted patches."""
  idx = choose_patches(x, db, key, k, patch, overlap)
  out = paste(jnp.asarray(db, jnp.asarray(x).dtype), idx, x.shape[1], x.shape[2], overlap)
  return (out, idx) if return_indices else out


def quilting(db: Any, k: int = 10, patch: int = 5, overlap: int = 2) -> base.Preprocessor:
  """The randomised quilting pre-processor; variables {'patches': db}."""
  for field, value in (('k', k), ('patch', patch), ('overlap', overlap)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f'config.defense.quilting.{field} must be an integer, got {value!r}')
  if not patch >= 1:
    raise ValueError(f'config.defense.quilting.patch must be >= 1, got {patch}')
  if not 0 <= overlap < patch:
    raise ValueError(f'config.defense.quilting.overlap must be in [0, {patch}), got {overlap}')
  db = jnp.asarray(db, jnp.float32)
  if db.ndim != 4 or db.shape[1:3] != (patch, patch):
    raise ValueError(f'the patch database must be (P, {patch}, {patch}, C) '
                     f'(config.defense.quilting.patch), got shape {db.shape}')
  if not 1 <= k <= db.shape[0]:
    raise ValueError(f'config.defense.quilting.k must be in [1, {db.shape[0]}] (the database '
                     f'size, config.defense.quilting.num_patches), got {k}')
  k, patch, overlap = int(k), int(patch), int(overlap)

  def apply(variables, x, key, bpda):
    if key is None:
      raise ValueError('quilting is randomised (a random pick among the k nearest patches): '
                       'its output needs a key')
    out = quilt(x, variables['patches'], key, k, patch, overlap)
    return base.straight_through(out, x) if bpda else out

  return base.Preprocessor(f'quilting(k={k},db={db.shape[0]})', apply, {'patches': db},
                           randomised=True, stand_ins=STAND_INS)
