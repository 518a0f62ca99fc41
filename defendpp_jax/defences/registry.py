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

import os
from typing import Any, Callable

import jax
import ml_collections

from defendpp_jax import data as data_lib
from defendpp_jax.defences import base
from defendpp_jax.defences import classifier
from defendpp_jax.defences import comdefend
from defendpp_jax.defences import defense_gan
from defendpp_jax.defences import hgd
from defendpp_jax.defences import jpeg
from defendpp_jax.defences import noisy_layers
from defendpp_jax.defences import quilting
from defendpp_jax.defences import randomized
from defendpp_jax.defences import squeezing
from defendpp_jax.defences import tv_min
from defendpp_jax.nn import denoisers
from defendpp_jax.nn import ensemble as ensemble_lib
from defendpp_jax.runs import saved

Builder = Callable[[ml_collections.ConfigDict, str, data_lib.Dataset, Any], base.Defence]


def _classifier_run(config, workdir, ds, trained) -> base.Defence:
  """The run's own classifier: plain, Defend++ (decoder dropped), adversarially trained, or
  trained by a training-time defence that deploys it as it is."""
  return classifier.classifier_defence(classifier.module_of(config, ds),
                                       _trained(config, workdir, trained), run_name(config))


def _protected_run(config) -> tuple[str, ml_collections.ConfigDict]:
  """(workdir, config) of the classifier run a defence protects."""
  cls_dir = config.defense.classifier_workdir
  if not cls_dir:
    raise ValueError(f'config.defense.name={config.defense.name!r} needs '
                     'config.defense.classifier_workdir (the classifier it protects)')
  cls_config = saved.config_of_run(cls_dir)
  if cls_config.defense.name != 'none':
    raise ValueError(f'config.defense.classifier_workdir={cls_dir!r} is a '
                     f'{cls_config.defense.name} run, not a classifier run')
  return cls_dir, cls_config


def protected_classifier(config, ds) -> base.Defence:
  """The classifier a pre-processing defence protects (config.defense.classifier_workdir),
  on the kernels of config.model.conv."""
  cls_dir, cls_config = protected_run(config)
  return build(cls_config, cls_dir, ds)


def protected_run(config):
  """(workdir, config) of the protected run, its convolutions on config.model.conv's kernels
  (the weights are the run's; the kernels only change the speed and float rounding)."""
  cls_dir, cls_config = _protected_run(config)
  cls_config.model.conv = config.model.conv
  return cls_dir, cls_config


def _in_front(pre: base.Preprocessor):
  """The builder of `pre(config, ds)` deployed in front of the protected classifier."""
  def builder(config, workdir, ds, trained):
    del workdir, trained  # nothing is trained
    return base.preprocess(pre(config, ds), protected_classifier(config, ds), run_name(config))
  return builder


def default_bits(dataset: str) -> int:
  """Xu et al.'s bit depths: 1 on MNIST, 5 on CIFAR-10 (and 8-bit-like 5 elsewhere)."""
  return 1 if dataset in ('mnist', 'digits') else 5


def _bits(config) -> int:
  return config.defense.bit_depth.bits or default_bits(config.data.name)


def _feature_squeezing(config, workdir, ds, trained) -> base.Defence:
  del workdir, trained
  fs = config.defense.feature_squeezing
  names = tuple(fs.squeezers) or (f'bit_depth_{default_bits(config.data.name)}', 'median_2')
  n_test, n_cal = len(ds.test_labels), fs.calibration_examples
  n_eval = config.eval.num_examples or n_test
  if not 0 < n_cal <= n_test - n_eval:
    raise ValueError(
        f'config.defense.feature_squeezing.calibration_examples={n_cal}: the detector is '
        f'calibrated on the last test images, disjoint from the {n_eval} evaluated; the split '
        f'has {n_test} (lower config.eval.num_examples or the calibration examples)')
  return squeezing.squeezing_detector(
      protected_classifier(config, ds), squeezing.squeezers_of(names), ds.test_images[-n_cal:],
      fs.false_positive_rate, fs.penalty_weight, run_name(config), config.eval.batch_size)


def _quilting(config, ds) -> base.Preprocessor:
  q = config.defense.quilting
  db = quilting.patch_database(ds.train_images, q.num_patches, jax.random.key(q.seed), q.patch)
  return quilting.quilting(db, k=q.k, patch=q.patch, overlap=q.overlap)


def _resize_pad(config, workdir, ds, trained) -> base.Defence:
  del workdir, trained
  rp = config.defense.resize_pad
  return base.averaged(base.preprocess(randomized.resize_pad(rp.max_scale),
                                       protected_classifier(config, ds)),
                       rp.passes, run_name(config))


def _sap(config, workdir, ds, trained) -> base.Defence:
  del workdir, trained
  cls_dir, cls_config = protected_run(config)
  variables, _ = saved.restore_variables(cls_dir)
  sc = config.defense.sap
  return noisy_layers.sap(classifier.module_of(cls_config, ds), variables, run_name(config),
                          sc.after, sc.samples_factor)


def _rse(config, workdir, ds, trained) -> base.Defence:
  trained = _trained(config, workdir, trained)
  rc = config.defense.rse
  return noisy_layers.rse(classifier.module_of(config, ds), trained, run_name(config),
                          rc.input_std, rc.inner_std, rc.passes)


def _comdefend(config, workdir, ds, trained) -> base.Defence:
  reformer = comdefend.build_reformer(config.defense.comdefend, ds.image_shape)
  params = (trained if trained is not None else saved.restore_variables(workdir)[0])['params']
  return base.preprocess(comdefend.preprocessor(reformer, params),
                         protected_classifier(config, ds), run_name(config))


def hgd_preprocessor(config, workdir, ds, trained=None) -> base.Preprocessor:
  """The trained HGD denoiser of `workdir` (or `trained`) as a pre-processor."""
  hc = config.defense.hgd
  denoiser = denoisers.build_denoiser(hc.arch, ds.image_shape[-1], tuple(hc.widths),
                                      config.model.conv)
  variables = trained if trained is not None else saved.restore_variables(workdir)[0]
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  return hgd.preprocessor(denoiser, variables, f'hgd-{hc.arch}-{hc.loss}', hc.residual_scale)


def _hgd(config, workdir, ds, trained) -> base.Defence:
  return base.preprocess(hgd_preprocessor(config, workdir, ds, trained),
                         protected_classifier(config, ds), run_name(config))


def projection_settings(config) -> defense_gan.ProjectionSettings:
  dg = config.defense.defense_gan
  return defense_gan.ProjectionSettings(dg.restarts, dg.steps, dg.proj_lr, dg.momentum,
                                        dg.decay_at, dg.decay_factor)


def defense_gan_generator(config, ds) -> defense_gan.Generator:
  dg = config.defense.defense_gan
  return defense_gan.Generator(tuple(ds.image_shape), dg.latent, dg.width)


def _defense_gan(config, workdir, ds, trained) -> base.Defence:
  """G(z*(x)) in front of the protected classifier, G the run's WGAN-GP generator."""
  variables = trained if trained is not None else saved.restore_variables(workdir)[0]
  pre = defense_gan.projection(defense_gan_generator(config, ds),
                               {'params': variables['params']['generator']},
                               projection_settings(config), run_name(config))
  return base.preprocess(pre, protected_classifier(config, ds), run_name(config))


def _trained(config, workdir, trained):
  """`trained`, or the latest checkpoint of `workdir` (checked to be this config's model)."""
  if trained is None:
    saved.check_same_classifier(config, workdir, '--workdir')
    if config.model.decoder != 'none':  # its reconstructions are analysed: the run's decoder
      saved.check_same_classifier(config, workdir, '--workdir', saved.DECODER_FIELDS,
                                  'the auto-encoders differ')
    _check_same_model(config, workdir)
    trained, _ = saved.restore_variables(workdir)
  return trained


# Training-time defences whose deployed network differs from the plain classifier's (convex
# residuals, Bayesian layers, an ensemble): their weights are never loaded as another's.
_OWN_NETWORK = ('parseval', 'adv_bnn', 'adp')


def _check_same_model(config, workdir) -> None:
  if not os.path.isfile(os.path.join(workdir, saved.SUMMARY)):
    return
  theirs, mine = saved.config_of_run(workdir).defense.name, config.defense.name
  if theirs != mine and (theirs in _OWN_NETWORK or mine in _OWN_NETWORK):
    raise ValueError(f'--workdir={workdir!r} was trained with config.defense.name={theirs!r}, '
                     f'the config given has {mine!r}: the networks differ (pass '
                     f'--config.defense.name={theirs})')


def _adp(config, workdir, ds, trained) -> base.Defence:
  """ADP's averaged ensemble (log of the members' mean softmax), attacked as a whole."""
  model = ensemble_lib.Ensemble(classifier.module_of(config, ds), config.defense.adp.members)
  apply = lambda v, x, key, bpda: model.apply(v, x, method='classify')
  return base.Defence(run_name(config), apply, _trained(config, workdir, trained))


def _adv_bnn(config, workdir, ds, trained) -> base.Defence:
  """Adv-BNN: the softmax averaged over `passes` draws of the Bayesian weights."""
  module = classifier.module_of(config, ds)

  def one_draw(v, x, key, bpda):
    del bpda
    if key is None:
      raise ValueError('adv_bnn is randomised: its logits need a key')
    return module.apply(v, x, method='classify', rngs={'noise': key})

  one = base.Defence(run_name(config), one_draw, _trained(config, workdir, trained),
                     randomised=True)
  return base.averaged(one, config.defense.adv_bnn.passes, run_name(config))


def _gaussian_noise(config, workdir, ds, trained) -> base.Defence:
  del workdir, trained  # nothing is trained
  return base.preprocess(randomized.gaussian_noise(config.defense.gaussian_noise.std),
                         protected_classifier(config, ds), run_name(config))


DEFENCES: dict[str, Builder] = {
    'none': _classifier_run,
    'comdefend': _comdefend,
    'gaussian_noise': _gaussian_noise,
    'jpeg': _in_front(lambda c, ds: jpeg.jpeg(c.defense.jpeg.quality, c.defense.jpeg.stand_in)),
    'bit_depth': _in_front(lambda c, ds: squeezing.bit_depth(_bits(c))),
    'median': _in_front(lambda c, ds: squeezing.median(c.defense.median.size)),
    'feature_squeezing': _feature_squeezing,
    'tv_min': _in_front(lambda c, ds: tv_min.tv_min(
        c.defense.tv_min.keep_prob, c.defense.tv_min.lam, c.defense.tv_min.iters)),
    'quilting': _in_front(_quilting),
    'resize_pad': _resize_pad,
    'sap': _sap,
    'rse': _rse,
    'hgd': _hgd,
    'defense_gan': _defense_gan,
    # training-time defences (training/training_defences.py)
    'distillation': _classifier_run,
    'parseval': _classifier_run,
    'cross_lipschitz': _classifier_run,
    'deep_defense': _classifier_run,
    'adp': _adp,
    'adv_bnn': _adv_bnn,
}
NAMES = tuple(DEFENCES)
# The training-time defences: each trains its own classifier (ADP: an ensemble of them).
TRAINING_TIME = ('distillation', 'parseval', 'cross_lipschitz', 'deep_defense', 'adp',
                 'adv_bnn')
# Runs that train one classifier (params['classifier']; the others train a pre-processor, an
# ensemble or nothing).
CLASSIFIER_RUNS = ('none', 'rse', 'distillation', 'parseval', 'cross_lipschitz',
                   'deep_defense', 'adv_bnn')
# Runs that train several classifiers together (params['member0'], ...).
ENSEMBLE_RUNS = ('adp',)
# Runs that train a pre-processor in front of a classifier run.
TRAINED_PREPROCESSORS = ('comdefend', 'hgd', 'defense_gan')
# Defences whose run trains nothing (deployed straight in front of their classifier).
UNTRAINED = tuple(n for n in NAMES
                  if n not in CLASSIFIER_RUNS + ENSEMBLE_RUNS + TRAINED_PREPROCESSORS)


def summary_examples(config: ml_collections.ConfigDict) -> int:
  """How many test images a run's train summary counts clean accuracy on (0 = all)."""
  if config.defense.name == 'defense_gan':
    return config.defense.defense_gan.summary_examples
  return 0


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
  d = config.defense
  names = {'jpeg': lambda: f'jpeg-q{d.jpeg.quality}',
           'bit_depth': lambda: f'bit_depth-{_bits(config)}',
           'median': lambda: f'median-{d.median.size}x{d.median.size}',
           'tv_min': lambda: f'tv_min-p{d.tv_min.keep_prob:g}-lam{d.tv_min.lam:g}',
           'quilting': lambda: f'quilting-k{d.quilting.k}-db{d.quilting.num_patches}',
           'resize_pad': lambda: f'resize_pad-x{d.resize_pad.passes}',
           'sap': lambda: f'sap-{d.sap.after}',
           'defense_gan': lambda: (f'defense_gan-w{d.defense_gan.width}-r{d.defense_gan.restarts}'
                                   f'xL{d.defense_gan.steps}'),
           'hgd': lambda: (f'hgd-{d.hgd.arch}-{d.hgd.loss}-w{d.hgd.widths[0]}' +
                           (f'-x{d.hgd.residual_scale:g}' if d.hgd.residual_scale != 1 else ''))}
  if name in names:
    return names[name]()
  if name not in CLASSIFIER_RUNS + ENSEMBLE_RUNS:
    return name
  label = f'{config.model.arch}-w{config.model.width}-{config.model.decoder}'
  if config.train.adversarial != 'none':
    label += f'-adv{config.train.adversarial}'
  suffix = {'rse': lambda: f'-rse-x{d.rse.passes}',
            'distillation': lambda: f'-distilled-T{d.distillation.temperature:g}' + (
                '-teacher' if d.distillation.role == 'teacher' else ''),
            'parseval': lambda: f'-parseval-b{d.parseval.beta:g}',
            'cross_lipschitz': lambda: f'-cross_lipschitz-{d.cross_lipschitz.weight:g}',
            'deep_defense': lambda: f'-deep_defense-{d.deep_defense.weight:g}',
            'adp': lambda: f'-adp-x{d.adp.members}',
            'adv_bnn': lambda: f'-bnn-x{d.adv_bnn.passes}'}
  return label + suffix.get(name, lambda: '')()
