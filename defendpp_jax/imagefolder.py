"""ImageNet-style image folders (`config.data.name='imagefolder'`), read into float32 arrays.

Usage:
  train_x, train_y, test_x, test_y, num_classes = read_imagefolder('/data/imagenet', 10000, 1000)

`defendpp_jax.data.load_imagefolder` wraps this into a `Dataset`; see its docstring for the
layout, the order and limits, and the memory cap.
"""

from __future__ import annotations

import os

import numpy as np

from defendpp_jax.errors import DataError

# 'imagefolder': the side of the square images, the file types read, the test-split folders
# (the first present), and the largest split held in memory (float32 bytes).
IMAGE_SIZE = 224
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
_TEST_SPLITS = ('val', 'test')
MAX_BYTES = 8 * 2**30





def _is_image(filename: str) -> bool:
  return not filename.startswith('.') and filename.lower().endswith(IMAGE_EXTENSIONS)


def _class_folders(split_dir: str) -> list[str]:
  return sorted(e.name for e in os.scandir(split_dir)
                if e.is_dir() and not e.name.startswith('.'))


def _image_files(class_dir: str) -> list[str]:
  """The image files under `class_dir` (recursively), sorted by their path inside it."""
  found = []
  for root, dirs, files in os.walk(class_dir, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    found.extend(os.path.relpath(os.path.join(root, f), class_dir) for f in files if _is_image(f))
  return [os.path.join(class_dir, f) for f in sorted(found)]


def _round_robin(per_class: list[list[str]]) -> list[tuple[str, int]]:
  """(path, class) in rounds: the 1st file of every class in class order, then the 2nd, ..."""
  order = []
  for r in range(max((len(files) for files in per_class), default=0)):
    order.extend((files[r], c) for c, files in enumerate(per_class) if r < len(files))
  return order


def resize_centre_crop(image, size: int):
  """A PIL image as `size` x `size`: shorter side resized to `size` (bilinear), centre-cropped.

  As torchvision's `CenterCrop(size)(Resize(size)(image))` on a PIL image: the longer side
  becomes int(size * long / short), the crop starts at round((long - size) / 2). Pillow's
  bilinear filter is antialiased (its support widens with the reduction factor).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  w, h = image.size
  if w <= h:
    new_w, new_h = size, max(size, int(size * h / w))
  else:
    new_w, new_h = max(size, int(size * w / h)), size
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
  left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def _read_image(path: str, size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      rgb = im.convert('RGB')  # decodes the whole file: a truncated one fails here
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'unreadable image file {path} ({type(e).__name__}: {e})') from e
  return np.asarray(resize_centre_crop(rgb, size), np.uint8)


def _imagefolder_split(files: list[tuple[str, int]], split: str, limit: int | None, size: int,
                       max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
  if limit:
    files = files[:limit]
  nbytes = len(files) * size * size * 3 * np.dtype(np.float32).itemsize
  if nbytes > max_bytes:
    field = 'train_limit' if split == 'train' else 'test_limit'
    raise DataError(
        f'imagefolder {split} split: {len(files)} images of {size}x{size}x3 float32 are '
        f'{nbytes / 2**30:.1f} GiB, over the {max_bytes / 2**30:.1f} GiB held in memory; set '
        f'config.data.{field} to at most {max_bytes // (nbytes // len(files))} images')
  images = np.empty((len(files), size, size, 3), np.float32)
  for i, (path, _) in enumerate(files):
    images[i] = _read_image(path, size)
    images[i] /= 255.0
  return images, np.asarray([c for _, c in files], np.int32)


def read_imagefolder(data_dir: str, train_limit: int | None, test_limit: int | None,
                     image_size: int = IMAGE_SIZE, max_bytes: int = MAX_BYTES
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
  """(train images, train labels, test images, test labels, number of classes) of an
  ImageNet-style folder (`defendpp_jax.data.load_imagefolder`)."""
  if image_size < 1:
    raise ValueError(f'imagefolder image_size must be >= 1, got {image_size}')
  if not os.path.isdir(data_dir):
    raise DataError(f'config.data.data_dir={data_dir!r} is not a directory')
  train_dir = os.path.join(data_dir, 'train')
  if not os.path.isdir(train_dir):
    raise DataError(f'imagefolder: missing {train_dir} (expected train/<class>/<image> folders)')
  test_dir = next((os.path.join(data_dir, s) for s in _TEST_SPLITS
                   if os.path.isdir(os.path.join(data_dir, s))), None)
  if test_dir is None:
    raise DataError(f'imagefolder: missing {os.path.join(data_dir, "val")} (or '
                    f'{os.path.join(data_dir, "test")}): expected val/<class>/<image> folders')
  classes = _class_folders(train_dir)
  if not classes:
    raise DataError(f'imagefolder: no class folders in {train_dir} (expected one sub-folder '
                    'of images per class)')
  index = {c: i for i, c in enumerate(classes)}
  train_files = [_image_files(os.path.join(train_dir, c)) for c in classes]
  for c, files in zip(classes, train_files):
    if not files:
      raise DataError(f'imagefolder: class folder {os.path.join(train_dir, c)} holds no '
                      f'{"/".join(IMAGE_EXTENSIONS)} image')
  test_files = [[] for _ in classes]
  for c in _class_folders(test_dir):
    if c not in index:
      raise DataError(f'imagefolder: class folder {os.path.join(test_dir, c)} is not one of the '
                      f'{len(classes)} classes of {train_dir}')
    test_files[index[c]] = _image_files(os.path.join(test_dir, c))
  if not any(test_files):
    raise DataError(f'imagefolder: no {"/".join(IMAGE_EXTENSIONS)} image in the class folders '
                    f'of {test_dir}')
  train_x, train_y = _imagefolder_split(_round_robin(train_files), 'train', train_limit,
                                        image_size, max_bytes)
  test_x, test_y = _imagefolder_split(_round_robin(test_files), os.path.basename(test_dir),
                                      test_limit, image_size, max_bytes)
  return train_x, train_y, test_x, test_y, len(classes)


