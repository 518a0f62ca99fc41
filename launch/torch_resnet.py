"""The CIFAR-style ResNet-18 of defendpp_jax.models written in PyTorch (optional dependency,
requirements-bench.txt), for launch.benchmark --compare=torch and launch.torch_reference."""

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
