"""Dataset loading (raw files, digits), errors on bad files, deterministic ordering."""

import gzip
import os
import pickle
import shutil

import numpy as np
import pytest

from defendpp_jax import data
from conftest import SHARED_DATA

MNIST_DIR = os.path.join(SHARED_DATA, 'mnist')
CIFAR_DIR = os.path.join(SHARED_DATA, 'cifar10-jpeg')


def _check(ds, n_train, n_test, shape):
  assert ds.train_images.shape == (n_train, *shape) and ds.test_images.shape == (n_test, *shape)
  assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
  for x in (ds.train_images, ds.test_images):
    assert 0.0 <= x.min() and x.max() <= 1.0
  assert set(np.unique(ds.train_labels)) == set(range(10))


def test_mnist_raw_files():
  ds = data.load_dataset('mnist', MNIST_DIR)
  _check(ds, 60000, 10000, (28, 28, 1))
  # Known facts of the official files: label counts and the first training label.
  assert np.bincount(ds.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                  974, 1009]
  assert ds.train_labels[0] == 5
  np.testing.assert_allclose(ds.train_images.mean(), 0.1307, atol=1e-4)
  assert ds.train_images.max() == 1.0  # uint8 255 -> 1.0


def test_cifar10_raw_files_and_limits(monkeypatch):
  monkeypatch.setenv('DEFENDPP_DATA_DIR', CIFAR_DIR)  # the environment variable is honoured
  ds = data.load_dataset('cifar10', train_limit=1000, test_limit=100)
  _check(ds, 1000, 100, (32, 32, 3))
  assert np.bincount(ds.train_labels[:1000], minlength=10).sum() == 1000
  full_test = data.load_dataset('cifar10', CIFAR_DIR).test_labels
  assert np.bincount(full_test).tolist() == [1000] * 10


def test_digits_embedded_default():
  ds = data.load_dataset('digits')
  _check(ds, 1437, 360, (28, 28, 1))
  again = data.load_dataset('digits')  # the split is fixed
  np.testing.assert_array_equal(ds.test_labels, again.test_labels)


def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(data.DataError, match='train-images-idx3-ubyte.gz'):
    data.load_dataset('mnist', str(tmp_path))
  for name in os.listdir(MNIST_DIR):
    shutil.copy(os.path.join(MNIST_DIR, name), tmp_path)
  bad = tmp_path / 't10k-labels-idx1-ubyte.gz'
  bad.write_bytes(b'not a gzip file')
  with pytest.raises(data.DataError, match='t10k-labels-idx1-ubyte.gz'):
    data.load_dataset('mnist', str(tmp_path))
  with gzip.open(bad, 'wb') as f:  # right format, wrong magic number
    f.write(np.asarray([2051, 10000], '>i4').tobytes() + bytes(10000))
  with pytest.raises(data.DataError, match='magic'):
    data.load_dataset('mnist', str(tmp_path))
  with pytest.raises(data.DataError, match='data_batch_1'):
    data.load_dataset('cifar10', str(tmp_path))
  with pytest.raises(data.DataError, match='not a directory'):
    data.load_dataset('cifar10', str(tmp_path / 'nowhere'))
  (tmp_path / 'c').mkdir()
  for i in range(1, 6):
    with open(tmp_path / 'c' / f'data_batch_{i}', 'wb') as f:
      pickle.dump({b'data': np.zeros((2, 3072), np.uint8), b'labels': [0, 1]}, f)
  with open(tmp_path / 'c' / 'test_batch', 'wb') as f:
    pickle.dump({b'data': np.zeros((2, 100), np.uint8), b'labels': [0, 1]}, f)
  with pytest.raises(data.DataError, match='test_batch.*3072'):
    data.load_dataset('cifar10', str(tmp_path / 'c'))


def test_bad_names_and_pixels():
  with pytest.raises(ValueError, match='config.data.name'):
    data.load_dataset('imagenet21k')
  with pytest.raises(ValueError, match=r'pixels must be in \[0, 1\]'):
    data.check_pixels(np.full((1, 2, 2, 1), 255.0), 'batch')
  with pytest.raises(ValueError, match='NHWC'):
    data.check_pixels(np.zeros((2, 2)))


def _tiny():
  n = 40
  return data.Dataset('digits', np.random.default_rng(0).uniform(size=(n, 2, 2, 1)).astype(
      np.float32), np.arange(n, dtype=np.int32), np.zeros((5, 2, 2, 1), np.float32),
                      np.arange(5, dtype=np.int32), 10)


def test_shuffling_is_deterministic_and_resumable():
  ds = _tiny()
  labels = lambda **kw: [y.tolist() for _, y in data.train_batches(ds, 8, **kw)]
  first = labels(seed=0, epoch=0)
  assert len(first) == 5 and sorted(sum(first, [])) == list(range(40))
  assert labels(seed=0, epoch=0) == first
  assert labels(seed=0, epoch=1) != first and labels(seed=1, epoch=0) != first
  assert labels(seed=0, epoch=0, start_step=3) == first[3:]  # a resumed epoch continues
  # Two processes each read their half of every global batch.
  halves = [labels(seed=0, epoch=0, process_index=i, process_count=2) for i in range(2)]
  assert [a + b for a, b in zip(*halves)] == first
  with pytest.raises(ValueError, match='batch_size'):
    labels(seed=0, epoch=0, process_count=3)
  with pytest.raises(ValueError, match='batch_size'):
    data.steps_per_epoch(10, 11)


def test_eval_batches_pad_and_mask():
  ds = _tiny()
  batches = list(data.eval_batches(ds.train_images, ds.train_labels, 16))
  assert [len(y) for _, y, _ in batches] == [16, 16, 16]
  assert [int(m.sum()) for _, _, m in batches] == [16, 16, 8]
  kept = np.concatenate([y[m] for _, y, m in batches])
  np.testing.assert_array_equal(kept, ds.train_labels)


@pytest.mark.parametrize('name,shape', [('mnist', (28, 28, 1)), ('cifar10', (32, 32, 3))])
def test_tfds_path_without_data_dir(monkeypatch, name, shape):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.delenv('DEFENDPP_DATA_DIR', raising=False)
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load_dataset(name, train_limit=10)
  assert ds.train_images.shape == (10, *shape) and ds.test_images.shape == (12, *shape)
  assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
  assert 0.0 <= ds.train_images.min() and ds.train_images.max() <= 1.0
