"""Config checks shared by training and evaluation: fail fast, naming the field.

Usage:
  validate_config(config)
"""

from __future__ import annotations

import jax
import ml_collections

from defendpp_jax import data as data_lib
from defendpp_jax import frequency
from defendpp_jax import nn as dnn
from defendpp_jax import protocol
from defendpp_jax.attacks import core as attack_core
from defendpp_jax.attacks import specs
from defendpp_jax.defences import hgd
from defendpp_jax.defences import registry

SCHEDULES = ('joint', 'alternating')
# oblivious = grey_box (crafted on the classifier behind the pre-processor; HGD's name for it)
THREAT_MODELS = ('white_box', 'grey_box', 'oblivious', 'transfer')
OBLIVIOUS = ('grey_box', 'oblivious')


def _choice(config, path: str, choices) -> None:
  value = config
  for part in path.split('.'):
    value = value[part]
  if value not in choices:
    raise ValueError(f'config.{path}={value!r} is not one of {tuple(choices)}')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the field on a config value that cannot run."""
  choices = {'data.name': data_lib.DATASETS, 'model.arch': dnn.ARCHS,
             'model.decoder': dnn.DECODERS, 'model.conv': dnn.CONV_BACKENDS,
             'model.padding': dnn.PADDINGS, 'loss.targets': frequency.TARGET_KINDS,
             'train.schedule': SCHEDULES, 'train.adversarial': protocol.ADVERSARIAL,
             'defense.name': registry.NAMES, 'defense.comdefend.conv': dnn.CONV_BACKENDS,
             'eval.threat_model': THREAT_MODELS, 'eval.view': specs.VIEWS,
             'defense.hgd.arch': hgd.ARCHS, 'defense.hgd.loss': hgd.LOSSES}
  for path, allowed in choices.items():
    _choice(config, path, allowed)
  if config.eval.apgd_loss not in attack_core.LOSSES:
    raise ValueError(f'config.eval.apgd_loss={config.eval.apgd_loss!r} is not one of '
                     f'{attack_core.LOSSES}')
  tm = config.eval.threat_model
  if tm in OBLIVIOUS and config.defense.name in registry.CLASSIFIER_RUNS + registry.ENSEMBLE_RUNS:
    raise ValueError(f"config.eval.threat_model={tm!r} needs a pre-processing defence "
                     "(e.g. config.defense.name='comdefend' or 'hgd'): without one nothing is "
                     "hidden")
  if tm in OBLIVIOUS and config.eval.view not in ('auto', 'oblivious'):
    raise ValueError(f"config.eval.threat_model={tm!r} is the oblivious view; it "
                     f"contradicts config.eval.view={config.eval.view!r}")
  if config.eval.threat_model == 'transfer' and not config.eval.source_workdir:
    raise ValueError("config.eval.threat_model='transfer' needs config.eval.source_workdir: "
                     'the trained run the adversarials are crafted on')
  max_shared = 5 if config.model.arch == 'vgg16' else 4
  if not 1 <= config.model.shared_blocks <= max_shared:
    raise ValueError(f'config.model.shared_blocks={config.model.shared_blocks} must be in '
                     f'[1, {max_shared}] for {config.model.arch}')
  positive = {'model.width': config.model.width, 'train.batch_size': config.train.batch_size,
              'train.learning_rate': config.train.learning_rate,
              'eval.batch_size': config.eval.batch_size,
              'eval.eot_samples': config.eval.eot_samples,
              'eval.eot_chunk': config.eval.eot_chunk, 'eval.draws': config.eval.draws}
  for name, value in positive.items():
    if not value > 0:
      raise ValueError(f'config.{name} must be > 0, got {value}')
  non_negative = {'train.num_epochs': config.train.num_epochs,
                  'loss.lambda_ms': config.loss.lambda_ms,
                  'loss.full_scale_weight': config.loss.full_scale_weight,
                  'train.noise_std': config.train.noise_std,
                  'train.precise_bn_batches': config.train.get('precise_bn_batches', 0),
                  'train.weight_decay': config.train.weight_decay,
                  'eval.check_examples': config.eval.get('check_examples', 0)}
  for name, value in non_negative.items():
    if not value >= 0:
      raise ValueError(f'config.{name} must be >= 0, got {value}')
  num_devices = jax.device_count()
  if config.train.batch_size % num_devices:
    raise ValueError(f'config.train.batch_size={config.train.batch_size} is not divisible by '
                     f'the {num_devices} devices')
