"""Total-variance minimisation and image quilting (Guo et al. 2018): solvers and pre-processors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from defendpp_jax.defences import quilting as ql
from defendpp_jax.defences import tv_min as tv

LAM = 0.03


# ---------------------------------------------------------------------------------------------
# Total-variance minimisation.


def _smooth_images(shape, seed):
  """Smooth random images in [0, 1] (blurred noise)."""
  z = np.random.default_rng(seed).uniform(size=shape)
  return np.clip(ndimage.gaussian_filter(z, sigma=(0, 1.5, 1.5, 0)) * 3 - 1, 0, 1).astype(
      np.float32)


def _objective(u, x, mask, lam=LAM):
  """E(u) per image in float64 numpy (independent of the module's `tv_objective`)."""
  u, x = np.asarray(u, np.float64), np.asarray(x, np.float64)
  m = np.asarray(mask, np.float64)[..., None]
  tv_sum = np.abs(np.diff(u, axis=1)).sum((1, 2, 3)) + np.abs(np.diff(u, axis=2)).sum((1, 2, 3))
  return (m * (u - x) ** 2).sum((1, 2, 3)) + lam * tv_sum


def _primal_dual(x, mask, lam=LAM, iters=20000):
  """A reference minimiser of E: Chambolle-Pock in float64, run far past convergence."""
  x = np.asarray(x, np.float64)
  m = np.asarray(mask, np.float64)[..., None]
  u = x.copy()
  u_bar = u.copy()
  p_w, p_h = np.zeros_like(x[:, :, 1:]), np.zeros_like(x[:, 1:])
  tau = sigma = 0.99 / np.sqrt(8.0)  # tau sigma ||D||^2 < 1
  for _ in range(iters):
    p_w = np.clip(p_w + sigma * np.diff(u_bar, axis=2), -lam, lam)
    p_h = np.clip(p_h + sigma * np.diff(u_bar, axis=1), -lam, lam)
    d_t = np.zeros_like(x)  # D^T p
    d_t[:, :, :-1] -= p_w
    d_t[:, :, 1:] += p_w
    d_t[:, :-1] -= p_h
    d_t[:, 1:] += p_h
    new = (u - tau * d_t + 2 * tau * m * x) / (1 + 2 * tau * m)
    u_bar, u = 2 * new - u, new
  return u


def _images():
  return [_smooth_images((3, 28, 28, 1), 0), _smooth_images((2, 32, 32, 3), 1)]


def test_tv_minimise_all_pixels_agrees_with_scikit_image_and_a_reference_solve():
  pytest.importorskip('skimage')
  for x in _images():
    ones = np.ones(x.shape[:3], bool)
    ours = np.asarray(tv.tv_minimise(x, ones, LAM, 100))
    sk = tv.skimage_reference(x, LAM, 100)
    ref = _primal_dual(x, ones, iters=5000)
    # The minimiser: 100 iterations reach the reference solve (measured: rel. 4e-8, 7e-6).
    e_ours, e_ref = _objective(ours, x, ones), _objective(ref, x, ones)
    np.testing.assert_array_less(np.abs(e_ours - e_ref) / e_ref, 1e-5)
    assert np.abs(ours - ref).max() < 1e-4
    # scikit-image fixes its ghost cells to the reflected input, a different boundary (its
    # border pixels differ by up to 0.16): it agrees 6 pixels away from the border (measured
    # 4e-5 on 28x28, 4e-4 on 32x32x3; it has converged: 3000 iterations give the same) and its
    # result has a higher objective (measured 2.31 vs 2.20 on the first 28x28 image).
    assert np.abs(ours - sk)[:, 6:-6, 6:-6].max() < 1e-3
    np.testing.assert_array_less(e_ours, _objective(sk, x, ones) + 1e-6)
    # The module's own objective is the same function.
    np.testing.assert_allclose(np.asarray(tv.tv_objective(ours, x, ones, LAM)), e_ours,
                               rtol=1e-5)


def test_tv_minimise_masked_objective_reaches_a_reference_solve():
  for x in _images():
    mask = np.asarray(tv.random_mask(jax.random.key(1), x.shape[:3], 0.5))
    e_ref = _objective(_primal_dual(x, mask), x, mask)
    # Dropped pixels start at their values (the authors' start): after 100 iterations the
    # objective is within 2.3e-3 (relative) of the minimum, after 1000 within 3e-8; starting
    # from the local means of the kept pixels, within 1.4e-3 after 100.
    e_100 = _objective(tv.tv_minimise(x, mask, LAM, 100), x, mask)
    np.testing.assert_array_less((e_100 - e_ref) / e_ref, 5e-3)
    e_long = _objective(tv.tv_minimise(x, mask, LAM, 1000), x, mask)
    np.testing.assert_array_less(np.abs(e_long - e_ref) / e_ref, 1e-6)
    e_fill = _objective(tv.tv_minimise(x, mask, LAM, 100, 'fill'), x, mask)
    np.testing.assert_array_less((e_fill - e_ref) / e_ref, 5e-3)


def _piecewise_constant(n, h, w, c, seed):
  """n images of 3 flat rectangles on a flat background, and their edge pixels."""
  rng = np.random.default_rng(seed)
  images = np.empty((n, h, w, c), np.float32)
  for img in images:
    img[:] = rng.uniform(0.1, 0.9, c)
    for _ in range(3):
      y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
      img[y:y + rng.integers(6, 12), x:x + rng.integers(6, 12)] = rng.uniform(0.1, 0.9, c)
  s = images.sum(-1)
  edges = np.zeros(s.shape, bool)
  edges[:, 1:] |= s[:, 1:] != s[:, :-1]
  edges[:, :-1] |= s[:, 1:] != s[:, :-1]
  edges[:, :, 1:] |= s[:, :, 1:] != s[:, :, :-1]
  edges[:, :, :-1] |= s[:, :, 1:] != s[:, :, :-1]
  return images, edges


@pytest.mark.parametrize('shape', [(28, 28, 1), (32, 32, 3)])
def test_piecewise_constant_image_is_rebuilt_from_half_its_pixels(shape):
  x, edges = _piecewise_constant(4, *shape, seed=0)
  mask = np.asarray(tv.random_mask(jax.random.key(0), x.shape[:3], 0.5))
  # Pixels at least 2 pixels away from the edges of the rectangles.
  far = ~ndimage.binary_dilation(edges, structure=np.ones((1, 3, 3), bool))
  dropped = ~mask & far
  # The dropped pixels carry nothing: zeroed, or noise, and the 'fill' start never reads them.
  zeroed = x * mask[..., None]
  noisy = np.where(mask[..., None], x, np.random.default_rng(1).uniform(size=x.shape))
  u = np.asarray(tv.tv_minimise(zeroed, mask, LAM, 100, 'fill'))
  np.testing.assert_array_equal(u, np.asarray(tv.tv_minimise(noisy, mask, LAM, 100, 'fill')))
  err = np.abs(u - x).max(-1)
  assert err[dropped].max() < 0.05  # measured 0.021 (28x28), 0.030 (32x32x3)
  assert err[mask & far].max() < 0.05
  # The deployed start (the image itself) keeps the flat regions too (0.020, 0.030).
  err = np.abs(np.asarray(tv.tv_minimise(x, mask, LAM, 100)) - x).max(-1)
  assert err[dropped].max() < 0.05


def test_random_mask_keeps_about_keep_prob_and_differs_across_draws():
  shape = (8, 28, 28)
  for p in (0.5, 0.2):
    mask = np.asarray(tv.random_mask(jax.random.key(0), shape, p))
    assert mask.dtype == bool and mask.shape == shape
    assert abs(mask.mean() - p) < 0.02
    assert all(abs(m.mean() - p) < 0.1 for m in mask)
  a = np.asarray(tv.random_mask(jax.random.key(0), shape, 0.5))
  b = np.asarray(tv.random_mask(jax.random.key(1), shape, 0.5))
  assert (a != b).mean() > 0.3  # across keys
  assert (a[0] != a[1]).mean() > 0.3  # across the examples of a batch


def test_tv_min_preprocessor_is_randomised_and_clipped():
  pre = tv.tv_min()
  assert pre.randomised and pre.stand_ins == (('tv_min', 'identity'),)
  apply = jax.jit(pre.apply, static_argnums=3)
  x = jnp.asarray(np.repeat(_smooth_images((1, 28, 28, 1), 2), 3, axis=0))  # 3 equal images
  y0 = np.asarray(apply(pre.variables, x, jax.random.key(0), False))
  y1 = np.asarray(apply(pre.variables, x, jax.random.key(1), False))
  assert y0.shape == x.shape and y0.min() >= 0.0 and y0.max() <= 1.0
  assert np.abs(y0 - y1).max() > 1e-3  # keys
  assert np.abs(y0[0] - y0[1]).max() > 1e-3  # examples
  np.testing.assert_array_equal(y0, np.asarray(apply(pre.variables, x, jax.random.key(0), False)))
  # Same values with BPDA; keep_prob=1 is the deterministic solver, clipped.
  np.testing.assert_allclose(
      y0, np.asarray(apply(pre.variables, x, jax.random.key(0), True)), atol=1e-6)
  full = tv.tv_min(keep_prob=1.0)
  np.testing.assert_allclose(
      np.asarray(full.apply(None, x, jax.random.key(5), False)),
      np.clip(np.asarray(tv.tv_minimise(x, np.ones(x.shape[:3]), LAM, 100)), 0, 1), atol=1e-6)
  with pytest.raises(ValueError, match='needs a key'):
    pre.apply(None, x, None, False)


def test_tv_min_gradients():
  pre = tv.tv_min(iters=30)
  x = jnp.asarray(_smooth_images((2, 28, 28, 1), 3))
  w = jax.random.normal(jax.random.key(0), x.shape)
  loss = lambda x, bpda: jnp.sum(w * pre.apply(None, x, jax.random.key(1), bpda))
  bpda = jax.jit(jax.grad(functools.partial(loss, bpda=True)))(x)
  np.testing.assert_allclose(np.asarray(bpda), np.asarray(w), atol=1e-6)  # the identity's
  exact = np.asarray(jax.jit(jax.grad(functools.partial(loss, bpda=False)))(x))
  assert np.all(np.isfinite(exact)) and np.abs(exact).max() > 0
  assert np.abs(exact - np.asarray(w)).max() > 1e-2  # not the identity


def test_tv_min_validates_its_fields():
  for kwargs, field in [({'keep_prob': 0.0}, 'keep_prob'), ({'keep_prob': 1.5}, 'keep_prob'),
                        ({'lam': 0.0}, 'lam'), ({'iters': 0}, 'iters'),
                        ({'iters': 2.5}, 'iters'), ({'init': 'zeros'}, 'init')]:
    with pytest.raises(ValueError, match=f'config.defense.tv_min.{field}'):
      tv.tv_min(**kwargs)
  with pytest.raises(ValueError, match='mask must be'):
    tv.tv_minimise(jnp.zeros((2, 8, 8, 1)), jnp.ones((2, 8, 7)))


# ---------------------------------------------------------------------------------------------
# Image quilting.


def _database(c, num=300, seed=0):
  """A small database: patches of smooth random 'training' images."""
  train = _smooth_images((20, 32, 32, c), seed)
  return ql.patch_database(train, num, jax.random.key(seed)), train


def test_patch_database_crops_training_images_deterministically():
  db, train = _database(3, num=50)
  assert db.shape == (50, 5, 5, 3) and db.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(db),
                                np.asarray(ql.patch_database(train, 50, jax.random.key(0))))
  assert np.abs(np.asarray(db) - np.asarray(ql.patch_database(train, 50, jax.random.key(1)))
                ).max() > 0
  windows = np.lib.stride_tricks.sliding_window_view(train, (5, 5), axis=(1, 2))
  windows = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 75)  # every 5x5 crop
  for p in np.asarray(db).reshape(50, 75):
    assert np.abs(windows - p).max(axis=1).min() == 0.0
  with pytest.raises(ValueError, match='config.defense.quilting.num_patches'):
    ql.patch_database(train, 0, jax.random.key(0))


def test_nearest_patches_is_exact():
  rng = np.random.default_rng(0)
  db = rng.uniform(size=(300, 75)).astype(np.float32)
  queries = rng.uniform(size=(50, 75)).astype(np.float32)
  queries[:5] = db[[3, 77, 150, 299, 0]]  # exact hits, also in the last (padded) chunk
  # query 6's 16 nearest side by side (across block boundaries): a block holds several of them
  db[100:116] = queries[6] + rng.normal(scale=1e-2, size=(16, 75)).astype(np.float32)
  d2 = ((queries[:, None].astype(np.float64) - db[None].astype(np.float64)) ** 2).sum(-1)
  expected = np.argsort(d2, axis=1)[:, :10]
  # block pruning on and off (block 1 ranks every row; 300 blocks of 1 > k), blocks that do not
  # divide the chunk, fewer blocks per chunk than k (every row ranked)
  for chunk, query_chunk, block in [(64, 16, 16), (4096, 4096, 16), (7, 50, 3), (64, 16, 1),
                                    (96, 50, 5), (40, 50, 8)]:
    got = np.asarray(ql.nearest_patches(jnp.asarray(queries), jnp.asarray(db), 10, chunk,
                                        query_chunk, block))
    assert got.shape == (50, 10)
    for g, e, row in zip(got, expected, d2):
      assert set(g) == set(e)
      np.testing.assert_allclose(row[g], np.sort(row[e]), rtol=1e-5)  # nearest first
    np.testing.assert_array_equal(got[:5, 0], [3, 77, 150, 299, 0])


def _paste_numpy(db, indices, h, w, patch=5, overlap=2):
  """The paste rule, literally: patches written in raster order, later ones on top."""
  out = np.full((len(indices), h, w, db.shape[-1]), np.nan, np.float32)
  ys, xs = ql.tile_starts(h, patch, overlap), ql.tile_starts(w, patch, overlap)
  for n in range(len(indices)):
    for iy, y in enumerate(ys):
      for ix, x in enumerate(xs):
        out[n, y:y + patch, x:x + patch] = db[indices[n, iy, ix]]
  return out


def test_tile_grid_covers_every_pixel():
  np.testing.assert_array_equal(ql.tile_starts(28), [0, 3, 6, 9, 12, 15, 18, 21, 23])
  np.testing.assert_array_equal(ql.tile_starts(32), np.arange(0, 28, 3))


@pytest.mark.parametrize('shape', [(28, 28, 1), (32, 32, 3)])
def test_quilt_output_is_pasted_database_patches(shape):
  h, w, c = shape
  db, _ = _database(c)
  x = jnp.asarray(_smooth_images((3,) + shape, 5))
  out, idx = ql.quilt(x, db, jax.random.key(0), return_indices=True)
  ty, tx = len(ql.tile_starts(h)), len(ql.tile_starts(w))
  assert out.shape == x.shape and idx.shape == (3, ty, tx)
  np.testing.assert_array_equal(np.asarray(out), _paste_numpy(np.asarray(db), np.asarray(idx),
                                                              h, w))
  np.testing.assert_array_equal(np.asarray(out),
                                np.asarray(ql.quilt(x, db, jax.random.key(0))))
  # Every output pixel (its C values) is a pixel of the database.
  db_pixels = {tuple(p) for p in np.asarray(db).reshape(-1, c)}
  assert all(tuple(p) in db_pixels for p in np.asarray(out).reshape(-1, c))
  # Each chosen patch is among the 10 nearest to its tile.
  tiles = np.stack([np.asarray(x)[:, y:y + 5, xx:xx + 5] for y in ql.tile_starts(h)
                    for xx in ql.tile_starts(w)], 1).reshape(3 * ty * tx, -1)
  near = np.asarray(ql.nearest_patches(jnp.asarray(tiles), db.reshape(len(db), -1), 10))
  assert all(i in row for i, row in zip(np.asarray(idx).reshape(-1), near))


@pytest.mark.parametrize('shape', [(28, 28, 1), (32, 32, 3)])
def test_quilt_with_k1_returns_an_image_made_of_database_tiles(shape):
  h, w, c = shape
  x = _smooth_images((2,) + shape, 6)
  tiles = [x[n, y:y + 5, xx:xx + 5] for n in range(2) for y in ql.tile_starts(h)
           for xx in ql.tile_starts(w)]
  distractors, _ = _database(c, num=200)
  db = np.concatenate([np.asarray(distractors), np.stack(tiles)])
  db = db[np.random.default_rng(0).permutation(len(db))]
  out = ql.quilt(jnp.asarray(x), jnp.asarray(db), jax.random.key(0), k=1)
  np.testing.assert_array_equal(np.asarray(out), x)


def test_quilting_preprocessor_draws_and_gradients():
  db, _ = _database(1)
  pre = ql.quilting(db)
  assert pre.randomised and pre.stand_ins == (('quilting', 'identity'),)
  assert pre.variables['patches'].shape == (300, 5, 5, 1)
  apply = jax.jit(pre.apply, static_argnums=3)  # the database is an argument
  x = jnp.asarray(np.repeat(_smooth_images((1, 28, 28, 1), 7), 4, axis=0))  # 4 equal images
  y0 = np.asarray(apply(pre.variables, x, jax.random.key(0), False))
  y1 = np.asarray(apply(pre.variables, x, jax.random.key(1), False))
  assert np.abs(y0 - y1).max() > 0  # keys
  assert np.abs(y0[0] - y0[1]).max() > 0  # examples
  np.testing.assert_allclose(y0, np.asarray(apply(pre.variables, x, jax.random.key(0), True)),
                             atol=1e-6)
  # A different database is a different argument, not a recompiled constant.
  other = {'patches': jnp.clip(pre.variables['patches'] + 0.1, 0, 1)}
  assert np.abs(np.asarray(apply(other, x, jax.random.key(0), False)) - y0).max() > 0
  w = jax.random.normal(jax.random.key(2), x.shape)
  loss = lambda x, bpda: jnp.sum(w * pre.apply(pre.variables, x, jax.random.key(3), bpda))
  bpda = jax.jit(jax.grad(functools.partial(loss, bpda=True)))(x)
  np.testing.assert_allclose(np.asarray(bpda), np.asarray(w), atol=1e-6)
  exact = np.asarray(jax.jit(jax.grad(functools.partial(loss, bpda=False)))(x))
  assert np.all(exact == 0.0)  # a gather of database patches
  with pytest.raises(ValueError, match='needs a key'):
    pre.apply(pre.variables, x, None, False)


def test_quilting_validates_its_fields():
  db, _ = _database(1, num=20)
  for kwargs, field in [({'k': 0}, 'k'), ({'k': 21}, 'k'), ({'k': 2.0}, 'k'),
                        ({'overlap': 5}, 'overlap'), ({'overlap': -1}, 'overlap'),
                        ({'patch': 4}, 'patch'), ({'patch': 0}, 'patch')]:
    with pytest.raises(ValueError, match=f'config.defense.quilting.{field}'):
      ql.quilting(db, **kwargs)
