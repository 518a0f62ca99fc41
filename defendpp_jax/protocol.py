"""Per-dataset budgets of the evaluation protocol (paper Sec. 4.1) and of adversarial training.

Usage:
  eps = linf_eps('mnist')            # 0.2, the paper's FGSM eps; 0.05 on CIFAR-10
"""

from __future__ import annotations

# Paper Sec. 4.1: FGSM eps 0.2 / 0.05 / 0.01 for MNIST / CIFAR-10 / ImageNet; digits as MNIST.
LINF_EPS = {'mnist': 0.2, 'digits': 0.2, 'cifar10': 0.05, 'imagenet': 0.01}
# L2 thresholds at which the minimal-norm attacks are also read as bounded attacks.
L2_THRESHOLDS = {'mnist': (1.0, 1.5, 2.0, 2.4), 'digits': (1.0, 1.5, 2.0, 2.4),
                 'cifar10': (0.25, 0.5, 1.0), 'imagenet': (0.5, 1.0, 2.0)}
# The accuracy-vs-eps sweep (paper Fig. 6).
EPS_GRID = {'mnist': tuple(round(0.1 * i, 1) for i in range(1, 11)),
            'digits': tuple(round(0.1 * i, 1) for i in range(1, 11)),
            'cifar10': (0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3),
            'imagenet': (0.002, 0.005, 0.01, 0.02, 0.05)}
# Adversarial training (config.train.adversarial): Goodfellow (FGSM), Madry (PGD), Rony (DDN).
ADVERSARIAL = ('none', 'fgsm', 'pgd', 'ddn')
# Rony et al.'s DDN adversarial-training L2 budgets.
DDN_MAX_NORM = {'mnist': 2.4, 'digits': 2.4, 'cifar10': 1.0}


# ImageNet-style folders (config.data.name='imagefolder') follow ImageNet's budgets.
for _table in (LINF_EPS, L2_THRESHOLDS, EPS_GRID):
  _table['imagefolder'] = _table['imagenet']


def linf_eps(dataset: str, configured: float = 0.0) -> float:
  """`configured` if set (> 0), else the paper's L-inf eps of `dataset`."""
  return configured or LINF_EPS.get(dataset, 0.05)


def l2_thresholds(dataset: str, configured=()) -> tuple[float, ...]:
  return tuple(configured) or L2_THRESHOLDS.get(dataset, (0.5, 1.0))


def eps_grid(dataset: str, configured=()) -> tuple[float, ...]:
  return tuple(configured) or EPS_GRID.get(dataset, (0.01, 0.05, 0.1))


def ddn_max_norm(dataset: str, configured: float = 0.0) -> float:
  return configured or DDN_MAX_NORM.get(dataset, 1.0)
