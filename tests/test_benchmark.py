"""The benchmark's convolution inventory (launch.benchmark --ops) matches the architectures."""

from launch import benchmark


def test_model_convs_counts_every_convolution():
  # ResNet-18: a stem conv, 8 basic blocks of 2 convs, 3 strided 1x1 projections.
  convs = benchmark.model_convs('resnet18', 4, (28, 28, 1), 2)
  assert sum(n for _, n in convs) == 1 + 16 + 3
  assert {c['w'][:2] for c, _ in convs} == {(3, 3), (1, 1)}
  # VGG16: 13 convolutions, all 3x3 stride 1.
  convs = benchmark.model_convs('vgg16', 4, (32, 32, 3), 2)
  assert sum(n for _, n in convs) == 13
  assert all(c['strides'] == (1, 1) and c['w'][:2] == (3, 3) for c, _ in convs)
  # Input shapes follow the network: the stem sees the image itself.
  assert any(c['x'] == (2, 32, 32, 3) for c, _ in convs)
