"""The plain classifier trained the same way in PyTorch: a check of our training against the
framework the paper's networks were written in.

  python -m launch.torch_reference --data_dir=../shared/data/mnist --width=16 --num_epochs=1 \
      --seeds=0,1,2,3,4 [--padding=torch|same] [--out=results/torch_reference.json]

Same data, same order (`defendpp_jax.data.train_batches` with the seed), same normalisation,
same CIFAR-style ResNet-18, the paper's MNIST recipe (SGD lr 0.01, momentum 0.9, weight decay
5e-4 on every parameter, batch 256, the last partial batch dropped, decay x0.1 at epochs 100
and 200), PyTorch's default initialisation; only the framework differs (and the random
initial weights, which no two frameworks draw alike). Prints and writes the clean test accuracy
of each seed. `--padding=same` pads the 3x3 stride-2 convolutions as XLA's 'SAME' does (0 before,
1 after on even sizes) instead of PyTorch's 1 on each side.
Needs PyTorch (requirements-bench.txt).
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import numpy as np

from defendpp_jax import data as data_lib
from launch import torch_resnet

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Folder of the raw MNIST / CIFAR-10 files.')
_DATASET = flags.DEFINE_enum('dataset', 'mnist', ['mnist', 'cifar10'], 'Dataset.')
_WIDTH = flags.DEFINE_integer('width', 16, 'Base width of the ResNet-18.')
_EPOCHS = flags.DEFINE_integer('num_epochs', 1, 'Epochs.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (data order and torch.manual_seed).')
_BATCH = flags.DEFINE_integer('batch_size', 256, 'Batch size.')
_LR = flags.DEFINE_float('learning_rate', 0.01, 'Initial learning rate.')
_DECAY = flags.DEFINE_list('lr_decay_epochs', ['100', '200'], 'Epochs of the x0.1 decays.')
_PADDING = flags.DEFINE_enum('padding', 'torch', ['torch', 'same'],
                             'Padding of the 3x3 stride-2 convolutions.')
_OUT = flags.DEFINE_string('out', None, 'JSON file to write (else only printed).')


def train_one(ds: data_lib.Dataset, seed: int) -> dict:
  """Trains and evaluates one seed; returns its record."""
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  mean, std = data_lib.STATS[ds.name]
  net = torch_resnet.resnet18(_WIDTH.value, ds.train_images.shape[-1], ds.num_classes, mean,
                              std, _PADDING.value)
  opt = torch.optim.SGD(net.parameters(), lr=_LR.value, momentum=0.9, weight_decay=5e-4)
  milestones = [int(e) for e in _DECAY.value]
  t0 = time.perf_counter()
  step = 0
  for epoch in range(_EPOCHS.value):
    lr = _LR.value * 0.1 ** sum(epoch >= m for m in milestones)
    for group in opt.param_groups:
      group['lr'] = lr
    net.train()
    for x, y in data_lib.train_batches(ds, _BATCH.value, seed, epoch):
      x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
      loss = torch.nn.functional.cross_entropy(net(x), torch.from_numpy(y).long())
      opt.zero_grad()
      loss.backward()
      opt.step()
      step += 1
  net.eval()
  correct = seen = 0
  with torch.no_grad():
    for x, y, mask in data_lib.eval_batches(ds.test_images, ds.test_labels, 1000):
      pred = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).argmax(1)
      correct += int(((pred.numpy() == y) & mask).sum())
      seen += int(mask.sum())
  return {'seed': seed, 'clean_accuracy': correct / seen, 'correct': correct, 'seen': seen,
          'step': step, 'train_s': round(time.perf_counter() - t0, 1)}


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  ds = data_lib.load_dataset(_DATASET.value, _DATA_DIR.value)
  settings = {'framework': f'torch {torch.__version__}', 'dataset': ds.name,
              'model': f'resnet18-w{_WIDTH.value}-none', 'num_epochs': _EPOCHS.value,
              'batch_size': _BATCH.value, 'learning_rate': _LR.value,
              'lr_decay_epochs': [int(e) for e in _DECAY.value], 'momentum': 0.9,
              'weight_decay': 5e-4, 'padding': _PADDING.value}
  runs = []
  for seed in (int(s) for s in _SEEDS.value):
    runs.append(train_one(ds, seed))
    print(json.dumps(runs[-1]), flush=True)
  acc = np.array([r['clean_accuracy'] for r in runs])
  summary = {'settings': settings, 'runs': runs, 'mean': float(acc.mean()),
             'std': float(acc.std(ddof=1)) if len(acc) > 1 else 0.0}
  print(json.dumps({k: summary[k] for k in ('mean', 'std')}))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(summary, f, indent=1)


if __name__ == '__main__':
  app.run(main)
