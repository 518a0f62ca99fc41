"""The base config of every run, with the training-time defences' fields documented here.

  python -m launch.train --config=configs/base.py:mnist --workdir=W \
      --config.data.data_dir=../shared/data/mnist --config.defense.name=parseval \
      --config.model.decoder=none
  python -m launch.evaluate --config=configs/base.py:mnist --workdir=W \
      --config.defense.name=parseval --config.model.decoder=none

The argument is a dataset (`mnist`, `cifar10`, `digits`: the paper's settings of
configs/mnist.py / cifar10.py), optionally followed by `,smoke` (a seconds-long run); none =
the dataset-free defaults of defendpp_jax/runs/config.py. Every field, with its default and a
comment, is in that file; the defences' under `config.defense` in defendpp_jax/runs/
defence_fields.py.

Training-time defences (`config.defense.name`; each trains its own classifier, the classifier
of config.model with `config.model.decoder=none`, through `launch.train`, and is evaluated by
`launch.evaluate` on its workdir; results: docs/DEFENCES.md):

- `distillation` (Papernot et al. 2016): `config.defense.distillation.temperature` (100, as
  Carlini's reference), `.teacher_workdir` ('' = the run trains its teacher in WORKDIR/teacher),
  `.role` (student | teacher), `.loss_scale` (the CE at T multiplied by it: 1 = Carlini's
  reference; T gives the logits the gradient magnitude of training at T = 1, which the `cpu`
  budget's one epoch needs). Deployed at temperature 1.
- `parseval` (Cisse et al. 2017): `config.defense.parseval.beta` (the retraction
  W <- (1 + beta) W - beta W W^T W after every step), `.row_fraction` (the rows sampled per
  layer); convex residual aggregations.
- `cross_lipschitz` (Hein & Andriushchenko 2017): `config.defense.cross_lipschitz.weight`
  (lambda of lambda / (n K^2) sum over class pairs of ||grad f_l - grad f_m||^2),
  `.projections` (0 = exact, from all K input gradients; P > 0 = its unbiased estimate from P
  random projections, P backward passes instead of K).
- `deep_defense` (Yan et al. 2018): fine-tunes `config.train.init_from`;
  `config.defense.deep_defense.weight` (lambda, 15), `.c` (25), `.d` (5), `.steps` (the unrolled
  DeepFool steps), `.overshoot`, `.examples` (0 = the regulariser on the whole batch; m = on m
  examples drawn at random from each batch, an unbiased estimate at m / batch of the cost),
  `.norm_eps` (DeepFool's norm guard ||w + eps||; -1 = the reference's in [0, 1] pixel units:
  1.275e-3 on MNIST, 2.55e-3 on CIFAR-10; 0 = unguarded).
- `adp` (Pang et al. 2019): `config.defense.adp.members` (3), `.alpha` (2, ensemble entropy),
  `.beta` (0.5, log-det diversity); deployed and attacked as the averaged ensemble.
- `adv_bnn` (Liu et al. 2019): `config.defense.adv_bnn.prior_sigma`, `.kl_weight` (alpha of
  CE + alpha KL / N), `.passes` (weight draws averaged at test time), `.optimizer` (`adam`, the
  reference's, at `.learning_rate` 0.01 with x0.1 at 40 / 70 / 90% of the run; or `sgd`,
  config.train's); with
  `config.train.adversarial=pgd` (Adv-BNN) or `none` (the plain BNN).
- `rse` (Liu et al. 2018, randomised, trained with its noise): `config.defense.rse.input_std`,
  `.inner_std`, `.passes`.
- Adversarial training is not a defence name but a training term: `config.train.adversarial`
  (none | fgsm | pgd | ddn) with its eps and steps under `config.train`.
"""

from defendpp_jax.runs import config as presets

DATASETS = ('mnist', 'cifar10', 'digits')


def get_config(arg: str | None = None):
  parts = [p for p in (arg or '').split(',') if p]
  dataset = parts.pop(0) if parts and parts[0] in DATASETS else None
  if len(parts) > 1 or (parts and parts[0] != 'smoke'):
    raise ValueError(f'configs/base.py: unknown argument {arg!r} (expected a dataset among '
                     f'{DATASETS}, optionally followed by ",smoke")')
  config = presets.dataset_config(dataset) if dataset else presets.get_base_config()
  return presets.apply_arg(config, parts[0] if parts else None)
