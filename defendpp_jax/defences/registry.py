"""`config.defense.name` -> the deployed Defence of a run: the one door training and evaluation use.

Usage:
  defence = build(config, workdir, ds)                  # from the run's latest checkpoint
  defence = build(config, workdir, ds, trained=state.variables)   # from weights in memory
  name = run_name(config)                                # 'resnet18-w16-pyramid', 'comdefend-w2'

Each builder takes (config, workdir, ds, trained) and returns a Defence; a defence's own config
fields live under config.defense.<name>. A pre-processing defence is deployed in front of the
classifier run named by config.defense.classifier_workdir (itself built through this registry
from that run's saved config).
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from defendpp_jax import data as data_lib
from defendpp_jax.defences import base
from defendpp_jax.defences import classifier
from defendpp_jax.defences import comdefend
from defendpp_jax.defences import randomized
from defendpp_jax.runs import saved

Builder = Callable[[ml_collections.ConfigDict, str, data_lib.Dataset, Any], base.Defence]


def _classifier_run(config, workdir, ds, trained) -> base.Defence:
  """The run's own classifier: plain, Defend++ (decoder dropped), adversarially trained."""
  if trained is None:
    saved.check_same_classifier(config, workdir, '--workdir')
    trained, _ = saved.restore_variables(workdir)
  return classifier.classifier_defence(classifier.module_of(config, ds), trained,
                                       run_name(config))


def protected_classifier(config, ds) -> base.Defence:
  """The classifier a pre-processing defence protects (config.defense.classifier_workdir)."""
  cls_dir = config.defense.classifier_workdir
  if not cls_dir:
    raise ValueError(f'config.defense.name={config.defense.name!r} needs '
                     'config.defense.classifier_workdir (the classifier it protects)')
  cls_config = saved.config_of_run(cls_dir)
  if cls_config.defense.name != 'none':
    raise ValueError(f'config.defense.classifier_workdir={cls_dir!r} is a '
                     f'{cls_config.defense.name} run, not a classifier run')
  return build(cls_config, cls_dir, ds)


def _comdefend(config, workdir, ds, trained) -> base.Defence:
  reformer = comdefend.build_reformer(config.defense.comdefend, ds.image_shape)
  params = (trained if trained is not None else saved.restore_variables(workdir)[0])['params']
  return base.preprocess(comdefend.preprocessor(reformer, params),
                         protected_classifier(config, ds), run_name(config))


def _gaussian_noise(config, workdir, ds, trained) -> base.Defence:
  del workdir, trained  # nothing is trained
  return base.preprocess(randomized.gaussian_noise(config.defense.gaussian_noise.std),
                         protected_classifier(config, ds), run_name(config))


DEFENCES: dict[str, Builder] = {
    'none': _classifier_run,
    'comdefend': _comdefend,
    'gaussian_noise': _gaussian_noise,
}
NAMES = tuple(DEFENCES)
# Defences whose run trains nothing (deployed straight in front of their classifier).
UNTRAINED = ('gaussian_noise',)


def build(config: ml_collections.ConfigDict, workdir: str, ds: data_lib.Dataset,
          trained: Any = None) -> base.Defence:
  """The Defence `config` deploys, with the weights of `workdir` (or `trained`)."""
  name = config.defense.name
  if name not in DEFENCES:
    raise ValueError(f'config.defense.name={name!r} is not one of {NAMES}')
  return DEFENCES[name](config, workdir, ds, trained)


def run_name(config: ml_collections.ConfigDict) -> str:
  """A short name of what a run deploys, e.g. 'resnet18-w16-pyramid' or 'comdefend-w4'."""
  name = config.defense.name
  if name == 'comdefend':
    return f'comdefend-w{config.defense.comdefend.width}'
  if name == 'gaussian_noise':
    return f'gaussian_noise-std{config.defense.gaussian_noise.std:g}'
  if name != 'none':
    return name
  label = f'{config.model.arch}-w{config.model.width}-{config.model.decoder}'
  if config.train.adversarial != 'none':
    label += f'-adv{config.train.adversarial}'
  return label
