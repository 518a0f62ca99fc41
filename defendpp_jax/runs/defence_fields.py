"""The fields of `config.defense`: which defence a run deploys, and each defence's own fields.

Usage:
  config.defense = defence_config()       # inside runs.config.get_base_config

Each defence's fields live under config.defense.<name> (docs/DEFENCES.md, docs/HGD.md).
"""

from __future__ import annotations

import ml_collections


def defence_config() -> ml_collections.ConfigDict:
  # The deployed defence (defendpp_jax.defences.registry): 'none' = the run's own classifier
  # (plain, Defend++, adversarially trained); a pre-processing defence sits in front of the
  # classifier trained in `classifier_workdir`. Each defence's own fields live under
  # config.defense.<name>.
  d = ml_collections.ConfigDict()
  # none | comdefend | gaussian_noise | jpeg | bit_depth | median | feature_squeezing | tv_min
  # | quilting | resize_pad | sap | rse | hgd | distillation | parseval | cross_lipschitz |
  # deep_defense | adp | adv_bnn | defense_gan (docs/DEFENCES.md, docs/HGD.md). rse and the
  # training-time defences (distillation ... adv_bnn) train their own classifier; comdefend,
  # hgd and defense_gan train a pre-processor; the others need no training.
  d.name = 'none'
  d.classifier_workdir = ''
  # ComDefend (Jia et al. 2019): the run trains the reformer alone on clean images (Adam, as its
  # authors) and deploys it in front of the classifier.
  d.comdefend = ml_collections.ConfigDict()
  d.comdefend.width = 16           # channels x width/16; 16 = published
  d.comdefend.code_channels = 12
  d.comdefend.noise_std = 20.0     # Gaussian noise on the code in training
  d.comdefend.code_weight = 1e-4   # loss = MSE + code_weight * mean(code^2)
  d.comdefend.learning_rate = 1e-2 # Adam(b1=0.5, b2=0.999), constant
  d.comdefend.conv = 'auto'        # convolution kernels, as config.model.conv
  # Additive Gaussian noise on the input at test time (a randomised pre-processor, no training):
  # the simplest randomised defence, and the reference case of the EOT view.
  d.gaussian_noise = ml_collections.ConfigDict()
  d.gaussian_noise.std = 0.1
  # The survey's input transformations (Guo et al. 2018, Xu et al. 2018) in front of the
  # classifier of classifier_workdir. JPEG: the forward pass is Pillow's codec; its BPDA
  # stand-in (view bpda) is a differentiable JAX JPEG or the identity.
  d.jpeg = ml_collections.ConfigDict()
  d.jpeg.quality = 75
  d.jpeg.stand_in = 'differentiable'   # differentiable | identity
  d.bit_depth = ml_collections.ConfigDict()
  d.bit_depth.bits = 0             # 0 = per dataset: 1 MNIST, 5 CIFAR-10 (Xu et al.)
  d.median = ml_collections.ConfigDict()
  d.median.size = 2                # window size x size (2 or 3 in Xu et al.)
  # The feature-squeezing detector: score = max over squeezers of ||softmax(f(x)) -
  # softmax(f(squeeze(x)))||_1, rejected over the threshold of `false_positive_rate` on the last
  # `calibration_examples` test images (disjoint from the first eval.num_examples evaluated).
  d.feature_squeezing = ml_collections.ConfigDict()
  d.feature_squeezing.squeezers = ()   # () = per dataset: bit_depth_1 / _5, median_2
  d.feature_squeezing.false_positive_rate = 0.05
  d.feature_squeezing.calibration_examples = 1000
  # The detector-aware attack (He et al. 2017): loss - weight * relu(score - 0.8 threshold).
  d.feature_squeezing.penalty_weight = 10.0
  # Total-variance minimisation: pixels kept with keep_prob, then argmin ||mask (u - x)||^2 +
  # lam TV(u), `iters` split-Bregman iterations.
  d.tv_min = ml_collections.ConfigDict()
  d.tv_min.keep_prob = 0.5
  d.tv_min.lam = 0.03
  d.tv_min.iters = 100
  # Image quilting: a database of num_patches patch x patch patches of training images (seeded),
  # tiles with `overlap`, a random one of the k nearest database patches per tile.
  d.quilting = ml_collections.ConfigDict()
  d.quilting.num_patches = 20000
  d.quilting.k = 10
  d.quilting.patch = 5
  d.quilting.overlap = 2
  d.quilting.seed = 0
  # Random resize & pad (Xie et al. 2018): a random size in [s, S), zero-padded to S = round(
  # max_scale s) (331 / 299 as published); the softmax averaged over `passes` draws.
  d.resize_pad = ml_collections.ConfigDict()
  d.resize_pad.max_scale = 331 / 299
  d.resize_pad.passes = 1
  # Stochastic activation pruning (Dhillon et al. 2018) inside the classifier of
  # classifier_workdir: after every activation (or 'conv': every convolution's output, as the
  # obfuscated-gradients reference), samples_factor x the layer's size draws with replacement.
  d.sap = ml_collections.ConfigDict()
  d.sap.after = 'activation'
  d.sap.samples_factor = 2.0
  # Random self-ensemble (Liu et al. 2018): the run trains its classifier with Gaussian noise
  # before every convolution (input_std on the pixels in [0, 1]: their 0.4 on [-1, 1] inputs;
  # inner_std inside), on at test time, the softmax averaged over `passes` noisy passes.
  d.rse = ml_collections.ConfigDict()
  d.rse.input_std = 0.2
  d.rse.inner_std = 0.1
  d.rse.passes = 10
  # HGD (Liao et al. 2018): a denoiser D (DUNET, or DAE = DUNET without its lateral
  # connections) trained in front of the frozen classifier of classifier_workdir (the target),
  # deployed as f(D(x)). loss: pixel (L1 to x: the paper's pixel-guided denoiser) | fgd (L1 on
  # the target's top feature map) | lgd (L1 on its logits) | cgd (its cross-entropy). widths:
  # the 5 feed-forward widths (the paper's 64-128-256-256-256; the feedback path uses the
  # first 4).
  d.hgd = ml_collections.ConfigDict()
  d.hgd.arch = 'dunet'
  d.hgd.loss = 'lgd'              # the paper's default HGD (the code's: fgd)
  d.hgd.widths = (64, 128, 256, 256, 256)
  d.hgd.learning_rate = 1e-3      # Adam; x lr_decay_factor at each fraction
  d.hgd.lr_decay_fractions = (0.6, 0.9)   # of the run's steps (official code)
  d.hgd.lr_decay_factor = 0.1
  # The training set, crafted once and stored at `trainset` ('' = WORKDIR/hgd_trainset.npz):
  # `train_images` clean training images (0 = all; a seeded subset of `train_classes`, () =
  # every class) x `variants` (defences.hgd.VARIANTS), the ensemble = the target + the
  # classifier runs of `ensemble_workdirs`.
  d.hgd.trainset = ''
  d.hgd.ensemble_workdirs = ()
  d.hgd.train_images = 0
  d.hgd.train_classes = ()
  d.hgd.variants = ('clean', 'noise', 'fgsm_target', 'fgsm_ensemble',
                                 'ifgsm2_ensemble', 'ifgsm4_ensemble', 'ifgsm8_ensemble')
  d.hgd.seed = 0
  # The classifier run the training set's attacks target ('' = classifier_workdir): a denoiser
  # guided by another classifier can learn from the same crafted set (the paper's Table 5 / 9).
  d.hgd.crafted_on = ''
  # Deployed D(x) = x + residual_scale x (D's predicted negative noise): 1 = HGD; 2 = the
  # paper's "PGD x2" (Appendix B, Table 8).
  d.hgd.residual_scale = 1.0
  # ----- Training-time defences: each trains its own classifier through launch.train -----
  # Defensive distillation (Papernot et al. 2016, Carlini's reference): a teacher trained with
  # the softmax at `temperature`, a student (the same architecture) trained at that temperature
  # on the teacher's soft labels, deployed at temperature 1. teacher_workdir '' = the run trains
  # its teacher first in WORKDIR/teacher (same config, hard labels at the temperature).
  d.distillation = ml_collections.ConfigDict()
  d.distillation.temperature = 100.0
  d.distillation.teacher_workdir = ''
  d.distillation.role = 'student'   # student | teacher (the run WORKDIR/teacher trains)
  # The CE at the temperature is multiplied by it: 1 = Carlini's reference (whose gradient on
  # the logits is 1 / T of training at T = 1); `temperature` restores that magnitude.
  d.distillation.loss_scale = 1.0
  # Parseval networks (Cisse et al. 2017): after every step the retraction W <- (1 + beta) W -
  # beta W W^T W on every convolution (as a (out, k*k*in) matrix) and dense kernel, on a random
  # `row_fraction` of its rows; the residual aggregations are convex (x + F(x)) / 2.
  d.parseval = ml_collections.ConfigDict()
  d.parseval.beta = 0.0003
  d.parseval.row_fraction = 0.3
  # Cross-Lipschitz regularisation (Hein & Andriushchenko 2017): loss = CE + weight x
  # (1 / (n K^2)) sum over class pairs of ||grad_x f_l - grad_x f_m||^2 on the logits.
  d.cross_lipschitz = ml_collections.ConfigDict()
  d.cross_lipschitz.weight = 0.01
  # 0: the exact sum from all K input gradients (K backward passes per example); P > 0: its
  # unbiased estimate from P random projections 2K ||J^T C v||^2 (P backward passes).
  d.cross_lipschitz.projections = 0
  # Deep Defense (Yan et al. 2018): fine-tunes a trained classifier (config.train.init_from)
  # with weight x mean R(||r|| / ||x||), r = `steps` unrolled DeepFool steps inside the loss,
  # R = exp(-c t) on correctly classified and exp(d t) on misclassified examples.
  d.deep_defense = ml_collections.ConfigDict()
  d.deep_defense.weight = 15.0
  d.deep_defense.c = 25.0
  d.deep_defense.d = 5.0
  d.deep_defense.steps = 5
  d.deep_defense.overshoot = 0.02
  # DeepFool's norm guard ||w + norm_eps|| (norm_eps added to every entry of the input gradient
  # w); -1 = the reference's guard for config.data.name in [0, 1] pixel units
  # (regularisers.DEEPFOOL_NORM_EPS: MNIST 5e-6 x 255, CIFAR-10 1e-5 x 255); 0 = unguarded.
  d.deep_defense.norm_eps = -1.0
  # 0: the regulariser on every example of a batch (as the reference); m > 0: on m examples
  # drawn at random from each batch without replacement (an unbiased estimate of the batch
  # mean at m / batch of the unrolled DeepFool's cost).
  d.deep_defense.examples = 0
  # ADP (Pang et al. 2019): `members` classifiers (config.model) trained jointly: sum of their
  # CE - alpha x ensemble entropy - beta x log-det diversity of the normalised non-maximal
  # predictions; deployed (and attacked) as the averaged ensemble.
  d.adp = ml_collections.ConfigDict()
  d.adp.members = 3
  d.adp.alpha = 2.0
  d.adp.beta = 0.5
  # Adv-BNN (Liu et al. 2019): Bayes-by-backprop convolutions and head (mean, log sigma; prior
  # N(0, prior_sigma^2)), loss CE + kl_weight x KL / N_train (the authors' alpha 0.02), with
  # config.train.adversarial (pgd = Adv-BNN; none = the plain BNN); deployed as the softmax
  # averaged over `passes` weight draws (the authors' 50; randomised: attacked with EOT). No
  # weight decay on the log sigmas. optimizer: adam = the reference's (Adam at learning_rate,
  # no weight decay, x 0.1 at 40%, 70% and 90% of the run: its 80 / 60 / 40 / 20 epochs);
  # sgd = config.train's SGD and schedule (weight decay on the means only).
  d.adv_bnn = ml_collections.ConfigDict()
  d.adv_bnn.prior_sigma = 0.1
  d.adv_bnn.kl_weight = 0.02
  d.adv_bnn.passes = 10
  d.adv_bnn.optimizer = 'adam'
  d.adv_bnn.learning_rate = 0.01
  # Defense-GAN (Samangouei et al. 2018): the run trains a WGAN-GP on the training images
  # (Adam(learning_rate, b1, b2) for both nets, critic_steps critic updates per generator
  # update, each on its own batch; gradient penalty gp_weight) and deploys x -> f(G(z*)), z* the
  # best of `restarts` x `steps` momentum steps on ||G(z) - x||^2 (proj_lr x decay_factor after
  # decay_at of the steps), in front of the classifier of classifier_workdir. The train
  # summary's clean accuracy is on the first summary_examples test images (the projection
  # costs restarts x steps generator passes per image; 0 = all).
  d.defense_gan = ml_collections.ConfigDict()
  d.defense_gan.latent = 128
  d.defense_gan.width = 64        # the nets' base channels (DCGAN-sized; cpu budget: 16)
  d.defense_gan.critic_steps = 5
  d.defense_gan.gp_weight = 10.0
  d.defense_gan.learning_rate = 1e-4
  d.defense_gan.b1 = 0.5
  d.defense_gan.b2 = 0.9
  d.defense_gan.restarts = 10
  d.defense_gan.steps = 200
  d.defense_gan.proj_lr = 10.0
  d.defense_gan.momentum = 0.7
  d.defense_gan.decay_at = 0.8
  d.defense_gan.decay_factor = 0.1
  d.defense_gan.summary_examples = 500
  return d
