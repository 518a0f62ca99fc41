"""All dataset I/O: MNIST / CIFAR-10 raw files or tfds, the embedded scikit-learn digits, and
ImageNet-style image folders.

Usage:
  ds = load_dataset('mnist', data_dir='../shared/data/mnist', train_limit=1000)
  ds = load_dataset('imagefolder', data_dir='/data/imagenet', train_limit=10000, test_limit=1000)
  for images, labels in train_batches(ds, batch_size=256, seed=0, epoch=3): ...

Every image leaves this module as float32 NHWC with pixels in [0, 1]; labels are int32.
Raw files are read when `data_dir` (or the environment variable DEFENDPP_DATA_DIR) is given:
MNIST as the four official IDX `.gz` files, CIFAR-10 as the official python batches
(`data_batch_1..5`, `test_batch`; the `cifar-10-batches-py` sub-folder is also accepted).
Without a data directory, MNIST and CIFAR-10 come from tensorflow-datasets (`tfds.data_source`).

'imagefolder' (e.g. ImageNet) has no tfds fallback: `data_dir` must hold `train/` and `val/`
(or `test/`) sub-folders with one sub-folder of .png / .jpg / .jpeg images per class; every
image is resized to IMAGE_SIZE x IMAGE_SIZE RGB and the whole split is held in memory, so a
full ImageNet needs train_limit / test_limit (see `load_imagefolder`).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
from typing import Iterator

import numpy as np

from defendpp_jax import imagefolder
from defendpp_jax.errors import DataError

DATASETS = ('mnist', 'cifar10', 'digits', 'imagefolder')

# Per-channel statistics of the training split, used by the model's internal normalisation.
STATS = {
    'mnist': ((0.1307,), (0.3081,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'digits': ((0.337,), (0.323,)),
    'imagefolder': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}

_MNIST_FILES = {
    'train_images': ('train-images-idx3-ubyte.gz', 2051, 60000),
    'train_labels': ('train-labels-idx1-ubyte.gz', 2049, 60000),
    'test_images': ('t10k-images-idx3-ubyte.gz', 2051, 10000),
    'test_labels': ('t10k-labels-idx1-ubyte.gz', 2049, 10000),
}
_CIFAR_TRAIN = tuple(f'data_batch_{i}' for i in range(1, 6))
_CIFAR_TEST = 'test_batch'
_DIGITS_SIZE = 28
_DIGITS_TEST_FRACTION = 0.2

# 'imagefolder' (defendpp_jax.imagefolder): the side of the square images, the largest split
# held in memory (float32 bytes).
IMAGE_SIZE = imagefolder.IMAGE_SIZE
IMAGEFOLDER_MAX_BYTES = imagefolder.MAX_BYTES
resize_centre_crop = imagefolder.resize_centre_crop


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train_images: np.ndarray  # (N, H, W, C) float32 in [0, 1]
  train_labels: np.ndarray  # (N,) int32
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])

  @property
  def mean(self) -> tuple[float, ...]:
    return STATS[self.name][0]

  @property
  def std(self) -> tuple[float, ...]:
    return STATS[self.name][1]


# ---------------------------------------------------------------------------------------------
# Raw files.


def _read_idx(path: str, magic: int, count: int) -> np.ndarray:
  if not os.path.isfile(path):
    raise DataError(f'missing MNIST file {path} (expected the official gzip IDX file)')
  try:
    with gzip.open(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f'corrupt MNIST file {path}: not a readable gzip file ({e})') from e
  header = 16 if magic == 2051 else 8
  if len(raw) < header:
    raise DataError(f'corrupt MNIST file {path}: {len(raw)} bytes, shorter than its header')
  got_magic, got_count = np.frombuffer(raw[:8], '>i4')
  if got_magic != magic or got_count != count:
    raise DataError(f'corrupt MNIST file {path}: header magic={got_magic} count={got_count}, '
                    f'expected magic={magic} count={count}')
  shape = (count, 28, 28) if magic == 2051 else (count,)
  if len(raw) != header + int(np.prod(shape)):
    raise DataError(f'corrupt MNIST file {path}: {len(raw) - header} data bytes, expected '
                    f'{int(np.prod(shape))}')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _load_mnist_raw(data_dir: str) -> tuple[np.ndarray, ...]:
  arrays = {k: _read_idx(os.path.join(data_dir, f), m, n)
            for k, (f, m, n) in _MNIST_FILES.items()}
  if arrays['train_labels'].max() > 9 or arrays['test_labels'].max() > 9:
    raise DataError(f'corrupt MNIST labels in {data_dir}: values outside 0-9')
  return (arrays['train_images'][..., None], arrays['train_labels'],
          arrays['test_images'][..., None], arrays['test_labels'])


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  if not os.path.isfile(path):
    raise DataError(f'missing CIFAR-10 file {path} (expected an official python-version batch)')
  try:
    with open(path, 'rb') as f:
      batch = pickle.load(f, encoding='bytes')
    data = np.asarray(batch[b'data'], np.uint8)
    labels = np.asarray(batch[b'labels'], np.int64)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'corrupt CIFAR-10 file {path}: expected a pickled dict with b"data" '
                    f'(N x 3072 uint8) and b"labels" ({type(e).__name__}: {e})') from e
  if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
    raise DataError(f'corrupt CIFAR-10 file {path}: data shape {data.shape}, '
                    f'{len(labels)} labels; expected (N, 3072) and N labels')
  if labels.min() < 0 or labels.max() > 9:
    raise DataError(f'corrupt CIFAR-10 file {path}: labels outside 0-9')
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _load_cifar_raw(data_dir: str) -> tuple[np.ndarray, ...]:
  nested = os.path.join(data_dir, 'cifar-10-batches-py')
  if not os.path.isfile(os.path.join(data_dir, _CIFAR_TEST)) and os.path.isdir(nested):
    data_dir = nested
  train = [_read_cifar_batch(os.path.join(data_dir, f)) for f in _CIFAR_TRAIN]
  test_x, test_y = _read_cifar_batch(os.path.join(data_dir, _CIFAR_TEST))
  return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
          test_x, test_y)


def _load_tfds(name: str) -> tuple[np.ndarray, ...]:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f'no data_dir given for {name!r} and tensorflow-datasets is not installed: '
                    'set config.data.data_dir (or DEFENDPP_DATA_DIR) to the raw files') from e
  out = []
  for split in ('train', 'test'):
    source = tfds.data_source(name, split=split)
    records = [source[i] for i in range(len(source))]
    out.append(np.stack([np.asarray(r['image']) for r in records]))
    out.append(np.asarray([r['label'] for r in records]))
  return tuple(out)


def _load_digits() -> tuple[np.ndarray, ...]:
  """The 1,797 8x8 digits shipped with scikit-learn, bilinearly resized to 28x28."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32) / 16.0
  zoom = _DIGITS_SIZE / images.shape[1]
  images = np.stack([ndimage.zoom(im, zoom, order=1) for im in images])
  images = np.clip(images, 0.0, 1.0)[..., None]
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      images, digits.target, test_size=_DIGITS_TEST_FRACTION, random_state=0,
      stratify=digits.target)
  return train_x, train_y, test_x, test_y


def load_imagefolder(data_dir: str, train_limit: int | None = None,
                     test_limit: int | None = None, image_size: int = IMAGE_SIZE,
                     max_bytes: int | None = None) -> Dataset:
  """An ImageNet-style folder: `data_dir`/{train,val}/<class>/<image>, as Dataset 'imagefolder'.

  Layout: `train/` and `val/` (or, without `val/`, `test/`) each hold one folder per class;
  the classes are train/'s folders in sorted order (class index = position; num_classes = their
  number, every one must hold an image), and a val/ folder not among them is an error (val/
  may lack some). Images are the .png / .jpg / .jpeg files (any case; recursively; names
  starting with '.' are skipped), read with Pillow, converted to RGB and `resize_centre_crop`ped
  to `image_size` x `image_size` (shorter side resized to image_size, bilinear, then the centre
  square: torchvision's Resize(s) + CenterCrop(s), not its ImageNet-eval Resize(256) +
  CenterCrop(224)).

  Order and limits: within a class the files are sorted by path; a split is ordered
  round-robin over the classes (1st image of every class in class order, then the 2nd, ...),
  and train_limit / test_limit keep the first N of that order, so a limited split stays
  balanced over the classes instead of holding only the first ones (None or 0: all).

  Memory: the whole split is decoded into one float32 array (image_size 224: 588 KiB an
  image; the 1.28M ImageNet training images would take ~720 GiB, so a full ImageNet cannot be
  loaded). A split larger than `max_bytes` (None: IMAGEFOLDER_MAX_BYTES, 8 GiB, ~14,000
  images of 224 px) is refused, before any image is decoded, with a DataError naming the
  config.data.train_limit / test_limit to set; streaming from disk is not implemented.
  """
  train_x, train_y, test_x, test_y, num_classes = imagefolder.read_imagefolder(
      data_dir, train_limit, test_limit, image_size,
      IMAGEFOLDER_MAX_BYTES if max_bytes is None else max_bytes)
  ds = Dataset('imagefolder', train_x, train_y, test_x, test_y, num_classes=num_classes)
  check_pixels(ds.train_images, 'imagefolder train images')
  check_pixels(ds.test_images, 'imagefolder test images')
  return ds


def _to_float(images: np.ndarray) -> np.ndarray:
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return images.astype(np.float32)


def load_dataset(name: str, data_dir: str | None = None, train_limit: int | None = None,
                 test_limit: int | None = None, image_size: int | None = None) -> Dataset:
  """Loads a dataset by name (see module docstring for where the files come from).

  Args:
    name: 'mnist', 'cifar10', 'digits' or 'imagefolder'.
    data_dir: folder of the raw files; defaults to $DEFENDPP_DATA_DIR; tfds when neither is set
      (not for 'imagefolder', which needs one: see `load_imagefolder`).
    train_limit / test_limit: keep only the first N examples of a split (None or 0: all;
      'imagefolder': the first N of a round-robin order over the classes).
    image_size: 'imagefolder' only: the side of its square images (None: IMAGE_SIZE).
  """
  if name not in DATASETS:
    raise ValueError(f'config.data.name={name!r} is not one of {DATASETS}')
  for field, limit in (('train_limit', train_limit), ('test_limit', test_limit)):
    if limit is not None and limit < 0:
      raise ValueError(f'config.data.{field} must be >= 0 (0 = all), got {limit}')
  if image_size is not None and name != 'imagefolder':
    raise ValueError(f'image_size applies to imagefolder only, not {name!r}')
  data_dir = data_dir or os.environ.get('DEFENDPP_DATA_DIR') or None
  if name == 'imagefolder':
    if not data_dir:
      raise DataError('config.data.name=imagefolder needs config.data.data_dir (or '
                      'DEFENDPP_DATA_DIR): the folder holding train/ and val/ class folders; '
                      'it has no tensorflow-datasets fallback')
    return load_imagefolder(data_dir, train_limit, test_limit,
                            IMAGE_SIZE if image_size is None else image_size)
  if name == 'digits':
    arrays = _load_digits()
  elif data_dir:
    if not os.path.isdir(data_dir):
      raise DataError(f'config.data.data_dir={data_dir!r} is not a directory')
    arrays = _load_mnist_raw(data_dir) if name == 'mnist' else _load_cifar_raw(data_dir)
  else:
    arrays = _load_tfds(name)
  train_x, train_y, test_x, test_y = arrays
  if train_limit:
    train_x, train_y = train_x[:train_limit], train_y[:train_limit]
  if test_limit:
    test_x, test_y = test_x[:test_limit], test_y[:test_limit]
  ds = Dataset(name, _to_float(train_x), np.asarray(train_y, np.int32), _to_float(test_x),
               np.asarray(test_y, np.int32), num_classes=10)
  check_pixels(ds.train_images, f'{name} train images')
  check_pixels(ds.test_images, f'{name} test images')
  return ds


def dataset_of(config) -> Dataset:
  """The dataset `config.data` names (from its data_dir, else tfds), with its limits."""
  return load_dataset(config.data.name, config.data.data_dir or None,
                      config.data.train_limit or None, config.data.test_limit or None)


def check_pixels(images: np.ndarray, what: str = 'images') -> None:
  """Raises if `images` are not float NHWC with pixels in [0, 1]."""
  if images.ndim != 4:
    raise ValueError(f'{what}: expected NHWC images, got shape {images.shape}')
  if images.size and (images.min() < 0.0 or images.max() > 1.0):
    raise ValueError(f'{what}: pixels must be in [0, 1], got range '
                     f'[{images.min():.4g}, {images.max():.4g}]')


# ---------------------------------------------------------------------------------------------
# Iteration.


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The training order of one epoch: a pure function of (seed, epoch), so resumes replay it."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  if batch_size > num_examples:
    raise ValueError(f'config.train.batch_size={batch_size} is larger than the '
                     f'{num_examples} training examples')
  return num_examples // batch_size  # the last partial batch is dropped


def train_batches(ds: Dataset, batch_size: int, seed: int, epoch: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields this process's slice of each global training batch of `epoch`, from `start_step`.

  `batch_size` is global; with several processes each yields rows
  [i * batch_size / process_count, (i + 1) * batch_size / process_count) of every global batch.
  """
  if batch_size % process_count:
    raise ValueError(f'config.train.batch_size={batch_size} is not divisible by the '
                     f'{process_count} processes')
  per_process = batch_size // process_count
  order = epoch_permutation(len(ds.train_labels), seed, epoch)
  for step in range(start_step, steps_per_epoch(len(order), batch_size)):
    idx = order[step * batch_size:(step + 1) * batch_size]
    idx = idx[process_index * per_process:(process_index + 1) * per_process]
    yield ds.train_images[idx], ds.train_labels[idx]


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields fixed-size (images, labels, mask) batches; the last is zero-padded with mask False."""
  n = len(labels)
  for start in range(0, n, batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    mask = np.ones(len(y), bool)
    pad = batch_size - len(y)
    if pad:
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, bool)])
    yield x, y, mask
