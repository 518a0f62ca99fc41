"""The 'imagefolder' dataset on tiny synthetic ImageNet-style folders made with Pillow."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from defendpp_jax import data
from defendpp_jax.runs import config as config_lib

SIZE = 16
# Created in this (unsorted) order; the class index is the sorted position: apple 0, mango 1,
# zebra 2.
COLOURS = {'zebra': (20, 200, 60), 'apple': (230, 30, 30), 'mango': (250, 180, 20)}
CLASSES = sorted(COLOURS)
# (file name, (width, height), mode): landscape, portrait, square, upscaled; PNG and JPEG with
# every extension spelling; RGBA (alpha dropped) and greyscale (converted to RGB).
TRAIN_FILES = (('a.png', (40, 30), 'RGB'), ('b.jpg', (30, 50), 'RGB'),
               ('c.JPEG', (64, 64), 'RGB'), ('d.png', (10, 12), 'RGBA'))
VAL_FILES = (('v1.jpeg', (33, 21), 'RGB'), ('v2.PNG', (25, 25), 'L'))
JPEG_ATOL = 4 / 255  # a solid colour through JPEG (quality 95)


def _save(path, size, mode, colour):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  value = {'RGB': colour, 'RGBA': (*colour, 128), 'L': colour[0]}[mode]
  Image.new(mode, size, value).save(path, quality=95)
  return colour if mode != 'L' else (colour[0],) * 3


def _make_folder(root, val_name='val'):
  """3 classes x 4 train + 2 val solid-colour images; returns the expected (label, colour) lists
  in round-robin order (1st file of every class, then the 2nd, ...)."""
  expected = {'train': [], val_name: []}
  for split, files in (('train', TRAIN_FILES), (val_name, VAL_FILES)):
    for name, size, mode in files:
      for cls, colour in COLOURS.items():
        got = _save(os.path.join(root, split, cls, name), size, mode, colour)
        expected[split].append((CLASSES.index(cls), got, name.lower().endswith(('jpg', 'jpeg'))))
    for row in range(len(files)):  # round-robin: within a round, by class index
      expected[split][row * 3:(row + 1) * 3] = sorted(expected[split][row * 3:(row + 1) * 3])
  # Ignored: other file types, hidden files and folders.
  (root / 'train' / 'apple' / 'notes.txt').write_text('not an image')
  (root / 'train' / 'apple' / '.hidden.png').write_bytes(b'not an image either')
  os.makedirs(root / 'train' / '.cache')
  return expected['train'], expected[val_name]


def _check_colours(images, labels, expected):
  assert labels.tolist() == [label for label, _, _ in expected]
  for image, (_, colour, is_jpeg) in zip(images, expected):
    want = np.broadcast_to(np.asarray(colour, np.float32) / 255, image.shape)
    np.testing.assert_allclose(image, want, atol=JPEG_ATOL if is_jpeg else 1e-6)


def test_shapes_labels_and_colours(tmp_path):
  train, val = _make_folder(tmp_path)
  ds = data.load_dataset('imagefolder', str(tmp_path), image_size=SIZE)
  assert ds.name == 'imagefolder' and ds.num_classes == 3
  assert ds.train_images.shape == (12, SIZE, SIZE, 3) and ds.test_images.shape == (6, SIZE, SIZE, 3)
  assert ds.image_shape == (SIZE, SIZE, 3)
  for x, y in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert 0.0 <= x.min() and x.max() <= 1.0
  # Labels are the sorted class index; every solid-colour image keeps its colour at any size.
  _check_colours(ds.train_images, ds.train_labels, train)
  _check_colours(ds.test_images, ds.test_labels, val)
  assert ds.train_labels.tolist() == [0, 1, 2] * 4
  assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
  assert 'imagefolder' in data.DATASETS and 'imagefolder' in data.STATS


def test_test_folder_and_default_size_from_config(tmp_path, monkeypatch):
  monkeypatch.delenv('DEFENDPP_DATA_DIR', raising=False)
  _, val = _make_folder(tmp_path, val_name='test')  # test/ instead of val/
  config = config_lib.get_base_config()
  config.data.name, config.data.data_dir = 'imagefolder', str(tmp_path)
  config.data.train_limit, config.data.test_limit = 2, 0
  ds = data.dataset_of(config)
  assert data.IMAGE_SIZE == 224 and ds.image_shape == (224, 224, 3)
  assert ds.train_labels.tolist() == [0, 1] and len(ds.test_labels) == 6
  _check_colours(ds.test_images, ds.test_labels, val)


def _columns_image(width, height):
  """Pixel (x, y) = x in every channel (uint8): the crop's columns tell where it started."""
  cols = np.broadcast_to(np.arange(width, dtype=np.uint8)[None, :, None], (height, width, 3))
  return Image.fromarray(np.ascontiguousarray(cols))


def test_resize_centre_crop_known_answers(tmp_path):
  # Shorter side already SIZE: no resize, the crop is the exact centre (columns 16..31 of 48).
  out = np.asarray(data.resize_centre_crop(_columns_image(3 * SIZE, SIZE), SIZE))
  assert out.shape == (SIZE, SIZE, 3)
  np.testing.assert_array_equal(out[0, :, 0], np.arange(SIZE, 2 * SIZE))
  # Portrait (16 x 48, pixel (x, y) = y): the centre rows.
  tall = np.asarray(data.resize_centre_crop(_columns_image(3 * SIZE, SIZE).transpose(
      Image.Transpose.TRANSPOSE), SIZE))
  np.testing.assert_array_equal(tall[:, 0, 0], np.arange(SIZE, 2 * SIZE))
  # Black | white | black thirds, width 3 x height: all white after the crop to a square.
  for height in (SIZE, 2 * SIZE):  # as is, and halved by the bilinear resize
    thirds = np.zeros((height, 3 * height, 3), np.uint8)
    thirds[:, height:2 * height] = 255
    split = tmp_path / f'h{height}'
    for sub in ('train/x', 'val/x'):
      os.makedirs(split / sub)
      Image.fromarray(thirds).save(split / sub / 'thirds.png')
    ds = data.load_dataset('imagefolder', str(split), image_size=SIZE)
    x = ds.train_images[0]
    if height == SIZE:
      np.testing.assert_array_equal(x, np.ones_like(x))
    else:  # the antialiased filter reaches 1 source pixel into the black at the crop's edges
      np.testing.assert_array_equal(x[:, 1:-1], np.ones_like(x[:, 1:-1]))
      assert x[:, [0, -1]].min() > 0.7
    np.testing.assert_array_equal(ds.test_images, ds.train_images)
  # Upscaling: a 4x8 image of 0 / 255 halves becomes 16x32, cropped to the middle 16 columns.
  halves = np.zeros((4, 8, 3), np.uint8)
  halves[:, 4:] = 255
  up = np.asarray(data.resize_centre_crop(Image.fromarray(halves), SIZE), np.float32)[0, :, 0]
  assert up.shape == (SIZE,) and np.all(np.diff(up) >= 0)
  assert up[0] < 255 / 2 < up[-1]
  np.testing.assert_allclose(up[:SIZE // 2], 255 - up[::-1][:SIZE // 2], atol=1)


def test_limits_round_robin_over_classes(tmp_path):
  train, val = _make_folder(tmp_path)
  full = data.load_dataset('imagefolder', str(tmp_path), image_size=SIZE)
  ds = data.load_dataset('imagefolder', str(tmp_path), train_limit=5, test_limit=4,
                         image_size=SIZE)
  assert ds.train_labels.tolist() == [0, 1, 2, 0, 1] and ds.test_labels.tolist() == [0, 1, 2, 0]
  assert ds.num_classes == 3
  # A limited split is a prefix of the full one: the first files (a.png, then b.jpg) of each.
  np.testing.assert_array_equal(ds.train_images, full.train_images[:5])
  np.testing.assert_array_equal(ds.test_images, full.test_images[:4])
  _check_colours(ds.train_images, ds.train_labels, train[:5])
  big = data.load_dataset('imagefolder', str(tmp_path), train_limit=100, image_size=SIZE)
  np.testing.assert_array_equal(big.train_images, full.train_images)  # over the size: all
  with pytest.raises(ValueError, match='train_limit must be >= 0'):
    data.load_dataset('imagefolder', str(tmp_path), train_limit=-1)
  # Unequal classes (one nested in a sub-folder): rounds skip the exhausted classes.
  root = tmp_path / 'unequal'
  files = {'a': ('0.png', '1.png', '2.png'), 'b': ('nested/0.png',), 'c': ('1.png', '0.png')}
  for cls, names in files.items():
    for name in names:
      _save(str(root / 'train' / cls / name), (20, 20), 'RGB', (int(name[-5]) * 100, 0, 0))
  _save(str(root / 'val' / 'c' / '0.png'), (20, 20), 'RGB', (0, 0, 0))  # val/ lacks a and b
  ds = data.load_dataset('imagefolder', str(root), image_size=SIZE)
  assert ds.num_classes == 3 and ds.train_labels.tolist() == [0, 1, 2, 0, 2, 0]
  # Within a class by file name: the red channel is 100 x the file's number.
  assert np.round(ds.train_images[:, 0, 0, 0] * 255).tolist() == [0, 0, 0, 100, 100, 200]
  assert ds.test_labels.tolist() == [2]
  limited = data.load_dataset('imagefolder', str(root), train_limit=4, image_size=SIZE)
  assert limited.train_labels.tolist() == [0, 1, 2, 0]


def test_memory_cap(tmp_path, monkeypatch):
  _make_folder(tmp_path)
  per_image = SIZE * SIZE * 3 * 4
  with pytest.raises(data.DataError, match=r'train split: 12 images.*config\.data\.train_limit '
                                           r'to at most 10 images'):
    data.load_imagefolder(str(tmp_path), image_size=SIZE, max_bytes=10 * per_image)
  with pytest.raises(data.DataError, match=r'val split: 6 images.*config\.data\.test_limit'):
    data.load_imagefolder(str(tmp_path), train_limit=3, image_size=SIZE, max_bytes=5 * per_image)
  ds = data.load_imagefolder(str(tmp_path), train_limit=5, test_limit=5, image_size=SIZE,
                             max_bytes=5 * per_image)
  assert len(ds.train_labels) == len(ds.test_labels) == 5
  # The default cap is the module's 8 GiB (read at call time), as load_dataset applies it.
  assert data.IMAGEFOLDER_MAX_BYTES == 8 * 2**30
  monkeypatch.setattr(data, 'IMAGEFOLDER_MAX_BYTES', 4 * per_image)
  with pytest.raises(data.DataError, match='GiB.*train_limit'):
    data.load_dataset('imagefolder', str(tmp_path), image_size=SIZE)
  # The 1.28M-image ImageNet training set at 224 px: ~718 GiB, refused before decoding.
  assert 1281167 * 224 * 224 * 3 * 4 / 2**30 > 700


def _q(path):
  return re.escape(str(path))


def test_errors_name_the_path(tmp_path, monkeypatch):
  monkeypatch.delenv('DEFENDPP_DATA_DIR', raising=False)
  with pytest.raises(data.DataError, match='needs config.data.data_dir'):
    data.load_dataset('imagefolder')
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(data.DataError, match=f'{_q(missing)}.*not a directory'):
    data.load_dataset('imagefolder', missing)
  with pytest.raises(data.DataError, match=f'missing {_q(tmp_path / "train")}'):
    data.load_dataset('imagefolder', str(tmp_path))
  os.makedirs(tmp_path / 'train')
  with pytest.raises(data.DataError, match=f'missing {_q(tmp_path / "val")}.*test'):
    data.load_dataset('imagefolder', str(tmp_path))
  os.makedirs(tmp_path / 'val')
  with pytest.raises(data.DataError, match=f'no class folders in {_q(tmp_path / "train")}'):
    data.load_dataset('imagefolder', str(tmp_path))
  os.makedirs(tmp_path / 'train' / 'empty')
  with pytest.raises(data.DataError, match=f'{_q(tmp_path / "train" / "empty")} holds no'):
    data.load_dataset('imagefolder', str(tmp_path))
  os.rmdir(tmp_path / 'train' / 'empty')
  _save(str(tmp_path / 'train' / 'cat' / 'a.png'), (8, 8), 'RGB', (1, 2, 3))
  with pytest.raises(data.DataError, match=f'no .* image in the class folders of '
                                           f'{_q(tmp_path / "val")}'):
    data.load_dataset('imagefolder', str(tmp_path))
  _save(str(tmp_path / 'val' / 'dog' / 'a.png'), (8, 8), 'RGB', (1, 2, 3))
  with pytest.raises(data.DataError, match=f'{_q(tmp_path / "val" / "dog")} is not one of the 1 '
                                           'classes'):
    data.load_dataset('imagefolder', str(tmp_path))
  os.rename(tmp_path / 'val' / 'dog', tmp_path / 'val' / 'cat')
  assert data.load_dataset('imagefolder', str(tmp_path), image_size=4).num_classes == 1
  # Unreadable files: not an image, and a truncated JPEG.
  bad = tmp_path / 'train' / 'cat' / 'b.png'
  bad.write_bytes(b'not a png')
  with pytest.raises(data.DataError, match=f'unreadable image file {_q(bad)}'):
    data.load_dataset('imagefolder', str(tmp_path), image_size=4)
  bad.unlink()
  jpeg = tmp_path / 'val' / 'cat' / 'c.jpg'
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(jpeg)
  jpeg.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2])
  with pytest.raises(data.DataError, match=f'unreadable image file {_q(jpeg)}'):
    data.load_dataset('imagefolder', str(tmp_path), image_size=4)
  # A limit that leaves the bad file out never reads it.
  assert len(data.load_dataset('imagefolder', str(tmp_path), test_limit=1,
                               image_size=4).test_labels) == 1
  with pytest.raises(ValueError, match='image_size applies to imagefolder only'):
    data.load_dataset('digits', image_size=32)
  with pytest.raises(ValueError, match='image_size must be >= 1'):
    data.load_dataset('imagefolder', str(tmp_path), image_size=0)
