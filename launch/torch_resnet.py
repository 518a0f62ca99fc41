"""The CIFAR-style ResNet-18 of defendpp_jax.models written in PyTorch (optional dependency,
requirements-bench.txt), for launch.benchmark --compare=torch / --autoattack and
launch.torch_reference.

Usage:
  net = resnet18(width, in_channels, 10, mean, std, padding)
  load_jax_variables(net, variables)   # a trained JAX ResNet-18's weights (the same function)
"""

from __future__ import annotations


def resnet18(width: int, in_channels: int, num_classes: int = 10,
             mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.5,),
             padding: str = 'torch'):
  """The CIFAR-style ResNet-18 of defendpp_jax.models in PyTorch (NCHW, pixels in [0, 1])."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  class SamePad(nn.Module):
    """XLA's 'SAME' padding of a 3x3 stride-2 window: on an even size, 0 before and 1 after."""

    def forward(self, x):
      pads = []
      for n in (x.shape[3], x.shape[2]):
        total = max((-(-n // 2) - 1) * 2 + 3 - n, 0)
        pads += [total // 2, total - total // 2]
      return nn.functional.pad(x, pads)

  def conv3x3(cin, cout, stride):
    if stride == 1 or padding == 'torch':
      return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    return nn.Sequential(SamePad(), nn.Conv2d(cin, cout, 3, stride, 0, bias=False))

  class Basic(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.c1 = conv3x3(cin, cout, stride)
      self.b1 = nn.BatchNorm2d(cout)
      self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.b2 = nn.BatchNorm2d(cout)
      self.proj = None
      if stride != 1 or cin != cout:
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                  nn.BatchNorm2d(cout))

    def forward(self, x):
      out = torch.relu(self.b1(self.c1(x)))
      out = self.b2(self.c2(out))
      return torch.relu(out + (x if self.proj is None else self.proj(x)))

  class Normalize(nn.Module):

    def __init__(self):
      super().__init__()
      self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1))
      self.register_buffer('std', torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
      return (x - self.mean) / self.std

  layers = [Normalize(), nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU()]
  cin = width
  for k in range(4):
    for i in range(2):
      layers.append(Basic(cin, width * 2**k, 2 if (k > 0 and i == 0) else 1))
      cin = width * 2**k
  return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def _classifier_path(tree, path=()):
  """The keys leading to the sub-tree of a DefendPP / Classifier parameter collection that holds
  E0 .. E3 and the head (a plain run's classifier sits one level down, under its module name)."""
  if 'E0' in tree and 'head' in tree:
    return path
  for key, value in tree.items():
    if hasattr(value, 'items'):
      found = _classifier_path(value, (*path, key))
      if found is not None:
        return found
  return None


def load_jax_variables(net, variables) -> None:
  """Copies the weights and BatchNorm statistics of a trained JAX ResNet-18 (the
  defendpp_jax Classifier, CIFAR stem, basic blocks; `variables` its whole collection, e.g. a
  plain run's Defence.variables) into `net`, a `resnet18(...)` of the same width and padding,
  which then computes the same function (inference mode): HWIO kernels become OIHW, the
  head's (in, out) kernel becomes (out, in)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  path = _classifier_path(variables['params'])
  if path is None:
    raise ValueError('load_jax_variables: no ResNet classifier (E0 .. E3, head) in the '
                     'variables')
  params, stats = variables['params'], variables['batch_stats']
  for key in path:
    params, stats = params[key], stats[key]

  def put(tensor, value, transpose=None):
    value = np.asarray(value, np.float32)
    value = value.transpose(transpose) if transpose else value
    if tuple(tensor.shape) != value.shape:
      raise ValueError(f'load_jax_variables: shape {value.shape} for a tensor of '
                       f'{tuple(tensor.shape)}: another width or architecture?')
    with torch.no_grad():  # (a writable copy: JAX's arrays are read-only)
      tensor.copy_(torch.from_numpy(np.array(value, order='C')))

  def conv(module, p):
    module = module[-1] if isinstance(module, torch.nn.Sequential) else module  # SamePad
    put(module.weight, p['kernel'], (3, 2, 0, 1))

  def batch_norm(module, p, s):
    put(module.weight, p['scale'])
    put(module.bias, p['bias'])
    put(module.running_mean, s['mean'])
    put(module.running_var, s['var'])

  layers = list(net)
  stem_p, stem_s = params['E0'], stats['E0']
  conv(layers[1], stem_p['stem'])
  batch_norm(layers[2], stem_p['stem_bn'], stem_s['stem_bn'])
  blocks = [m for m in layers if hasattr(m, 'c1')]
  if len(blocks) != 8:
    raise ValueError(f'load_jax_variables: {len(blocks)} residual blocks in net, 8 expected')
  for i, block in enumerate(blocks):
    p, s = params[f'E{i // 2}'][f'block{i % 2}'], stats[f'E{i // 2}'][f'block{i % 2}']
    conv(block.c1, p['Conv_0'])
    batch_norm(block.b1, p['BatchNorm_0'], s['BatchNorm_0'])
    conv(block.c2, p['Conv_1'])
    batch_norm(block.b2, p['BatchNorm_1'], s['BatchNorm_1'])
    if block.proj is not None:
      conv(block.proj[0], p['proj'])
      batch_norm(block.proj[1], p['proj_bn'], s['proj_bn'])
  head = layers[-1]
  put(head.weight, params['head']['kernel'], (1, 0))
  put(head.bias, params['head']['bias'])
