"""How close the differentiable JAX JPEG is to Pillow's codec on real test images.

  python -m launch.jpeg_agreement --mnist_dir=../shared/data/mnist \
      --cifar10_dir=../shared/data/cifar10-jpeg --num=1000 --out=results/jpeg_agreement.json

For each dataset and quality: the fraction of pixel values of `jpeg_jax` (straight-through
rounding) within one grey level of Pillow's, the fraction equal, and the largest difference.
"""

import platform

from absl import app
from absl import flags
import PIL

from defendpp_jax import data as data_lib
from defendpp_jax import files
from defendpp_jax.defences import jpeg

_MNIST = flags.DEFINE_string('mnist_dir', '', 'MNIST raw files.')
_CIFAR = flags.DEFINE_string('cifar10_dir', '', 'CIFAR-10 python batches.')
_NUM = flags.DEFINE_integer('num', 1000, 'First N test images of each dataset.')
_QUALITIES = flags.DEFINE_list('qualities', ['1', '5', '10', '25', '50', '75', '90', '95', '100'],
                               'JPEG qualities.')
_OUT = flags.DEFINE_string('out', 'results/jpeg_agreement.json', 'Where the figures go.')


def main(argv):
  del argv
  out = {'pillow': PIL.__version__, 'python': platform.python_version(), 'num': _NUM.value,
         'rows': []}
  for name, data_dir in (('mnist', _MNIST.value), ('cifar10', _CIFAR.value)):
    ds = data_lib.load_dataset(name, data_dir or None, train_limit=1, test_limit=_NUM.value)
    for q in (int(v) for v in _QUALITIES.value):
      row = {'dataset': name, **jpeg.agreement(ds.test_images, q)}
      print(row, flush=True)
      out['rows'].append(row)
  files.write_json(_OUT.value, out)


if __name__ == '__main__':
  app.run(main)
