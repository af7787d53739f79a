"""GAM / DAM: deep activation matching (Huang, Huang, Krähenbühl, ECCV 2018).

With no ``model.init_checkpoint`` it first trains a source-only base model
(the source-only default recipe) in ``workdir/base_source_only``, then
adapts a copy of it to the target: Gaussian i.i.d. matching at the tapped
layers, one LS-GAN discriminator per tapped layer, weight drift
λ‖θ_t − θ_s‖² to the frozen source model. Prints and saves per-layer
source/target activation statistics before and after adaptation.

Run:
  python -m experiments.gam --config=experiments/configs/gam.py
Variants (comma-separated): ``tiny``, ``gaussian_only`` (no
discriminators), ``disc_only`` (no Gaussian matching), ``code_drift`` (the
released digits code's drift: weight 1.0 on per-variable means), ``code``
(that drift and no Gaussian matching: the released code), ``paper``
(DeepLab-v2 R101 at 512x1024; the paper itself used ERFNet; needs
``model.init_checkpoint`` from ``experiments.source_only:paper``).

``digits`` (with ``tiny``, ``code``, ``mnist_m``, ``gaussian_only``,
``disc_only``, ``bench``: 1500 + 1500 steps, the embedded digits pair's
length when GAM was measured; DANN and TADA now train 4500): DAM's released digits setting on the classification task
(LeNet, fc3/fc4 discriminators, ADDA optimiser; ``digits_config``), source
MNIST -> target scikit-learn digits by default (``--config.source.name`` /
``--config.target.name`` for mnist / usps / svhn files). Targets (released
code, README rerun): MNIST -> USPS ~95 %, USPS -> MNIST ~98 %,
SVHN -> MNIST ~74 % (METHODS.md §14.5). ``summary.json`` holds
``target.accuracy`` and the frozen source model's
``source_model.target.accuracy``.

The segmentation code of the paper was never released: layers, their
weights, discriminator architecture and optimisers are jaxda's choices
(METHODS.md §10, every one a field below, recorded in ``summary.json``).

Measured on the embedded benchmark (seeds 0, 1, 2, 600 steps from the
source-only base): target mIoU 33.27 ± 2.47 vs 22.94 ± 0.76 for the base;
``gaussian_only`` 26.75 ± 2.29; ``disc_only`` 11.04 ± 4.25 (the same
adversarial weights without matching wreck the network).

``paper`` has no published target: DAM's segmentation numbers (ERFNet) were not
obtained (METHODS.md §14.5-14.6); compare with jaxda's own source-only R101
run. Real data and weights for ``paper``: experiments/configs/common.py.
"""

import ml_collections

from experiments.configs import classification_common
from experiments.configs import common


def gam_config() -> ml_collections.ConfigDict:
  """The ``gam`` block."""
  g = ml_collections.ConfigDict()
  # Paper: after ERFNet layers 4, 8, 12, 17 of 17; here four points spread
  # through the tiny DeepLab-v2 (stride-4 layer1 ... the main logits).
  g.layers = ("backbone/layer1", "backbone/layer2", "backbone/layer4",
              "aspp_main")  # tapped module paths (parameter-tree paths)
  g.layer_weights = (1.0, 1.0, 1.0, 1.0)  # adversarial weight per layer
  g.gaussian_matching = True  # Gaussian i.i.d. matching at the layers
  g.discriminators = True  # per-layer activation discriminators
  g.drift_weight = 0.1  # λ of ‖θ_t − θ_s‖² (paper 0.1; released code 1.0)
  g.drift_reduction = "sum"  # 'sum' (paper) | 'mean_per_variable' (code)
  g.source_weight = 0.0  # source CE on the target model (DAM/ADDA: none)
  g.stats_momentum = 0.9  # running target statistics (BatchNorm momentum)
  g.disc_features = (64, 64)  # hidden widths of each layer's discriminator
  g.base_steps = 1200  # source-only steps when no init_checkpoint is given
  g.base_learning_rate = 0.02  # LR of that source-only base run
  # Optimiser of the base run: the source-only default recipe.
  g.base_optim = common.get_base_config().optim
  g.report_images = 200  # target images in the activation report
  g.eval_at_start = True  # target score of the matched source model, step 0
  g.disc_negative_slope = 0.2  # LeakyReLU slope of the discriminators (0: ReLU)
  g.require_init_checkpoint = False  # refuse to train a base model (paper)
  return g


def _gaussian_only(c):
  c.gam.discriminators = False


def _disc_only(c):
  c.gam.gaussian_matching = False


def _code_drift(c):
  c.gam.drift_weight = 1.0
  c.gam.drift_reduction = "mean_per_variable"


def _code(c):
  """The released digits code: its drift and no Gaussian matching."""
  _code_drift(c)
  c.gam.gaussian_matching = False


def _tiny(c):
  common.apply_variant(c, "tiny")
  c.gam.base_steps = 2
  c.gam.layers = ("backbone/layer2", "aspp_main")
  c.gam.layer_weights = (1.0, 1.0)
  c.gam.disc_features = (8,)
  c.gam.report_images = 8
  c.gam.eval_at_start = False


def _paper(c):
  common.apply_variant(c, "paper")
  # A DeepLab-v2 R101 source model takes hours; train it on purpose.
  c.gam.require_init_checkpoint = True
  c.gam.layers = ("backbone/layer1", "backbone/layer2", "backbone/layer3",
                  "aspp_main")
  c.gam.disc_features = (256, 256)


def digits_config() -> ml_collections.ConfigDict:
  """DAM's digits setting (``RsEnts/DAM_release`` on ADDA, METHODS.md §10).

  LeNet (fc3 = the classifier's 500-wide ReLU bottleneck, fc4 = its 10
  logits), MLP discriminators 500-500 + ReLU on fc3 (weight 0.1) and fc4
  (1.0), vanilla GAN with ADDA's inverted labels, Adam 2e-4 / beta1 0.5,
  batch 128, 10k steps; the source model: Adam 1e-3, batch 128, 10k steps.
  Drift and Gaussian matching in the paper's form (0.1 on the sum, matching
  on); ``code`` switches to the released code's form.
  """
  c = classification_common.get_base_config()
  c.method = "gam_cls"
  c.gam = gam_config()
  g = c.gam
  g.layers = ("bottleneck", "classifier")  # LeNet fc3 (after ReLU), fc4
  g.layer_weights = (0.1, 1.0)  # scale_feature 0.1 on fc3 (released code)
  g.disc_features = (500, 500)  # adda/adversary.py
  g.disc_negative_slope = 0.0  # ReLU
  g.base_steps = 10_000  # source pre-training (ADDA: 10k iterations)
  g.base_learning_rate = 1e-3  # ADDA source training: Adam 1e-3
  base_optim = ml_collections.ConfigDict(c.optim.to_dict())
  base_optim.optimizer = "adam"
  base_optim.lr_schedule = "constant"
  base_optim.weight_decay = 0.0
  base_optim.adam_b1 = 0.9
  g.base_optim = base_optim
  g.report_images = 500
  c.num_steps = 10_000  # adaptation iterations (ADDA: 10k)
  c.batch_size = 128  # per domain (ADDA)
  c.model.name = "lenet"
  c.model.bottleneck_dim = 500  # fc3
  c.optim.optimizer = "adam"
  c.optim.learning_rate = 2e-4  # ADDA adaptation
  c.optim.adam_b1 = 0.5  # ADDA: Adam(lr, 0.5)
  c.optim.lr_schedule = "constant"
  c.optim.weight_decay = 0.0  # the drift term replaces L2 decay
  c.adversarial.gan = "vanilla"  # ADDA: softmax CE, inverted labels
  c.adversarial.disc_lr_mult = 1.0  # D: the same Adam as the target net
  c.log_every = 500
  c.checkpoint_every = 2000
  return c


# GAM's source model and its adaptation get 1500 steps each: the digits
# benchmark's length when GAM was measured (DANN and TADA now train 4500,
# classification_common; GAM's rows in README say which length they ran).
_BENCH_STEPS = 1500


def _digits_bench(c):
  """1500 source + 1500 adaptation steps (ADDA's 10k + 10k: ~45 min a run
  on 2 CPU cores, extrapolated); the optimisers and batch stay ADDA's."""
  c.gam.base_steps = _BENCH_STEPS
  c.num_steps = _BENCH_STEPS


def _digits_tiny(c):
  classification_common.apply_variant(c, "tiny")
  c.gam.base_steps = 2
  c.gam.disc_features = (8,)
  c.gam.report_images = 8
  c.model.bottleneck_dim = 16


_DIGITS_VARIANTS = {"tiny": _digits_tiny, "code": _code,
                    "bench": _digits_bench,
                    "gaussian_only": _gaussian_only, "disc_only": _disc_only,
                    "code_drift": _code_drift,
                    "mnist_m": lambda c: classification_common.apply_variant(
                        c, "mnist_m")}


def get_config(variant: str = ""):
  tokens = [t.strip() for t in (variant or "").split(",") if t.strip()]
  if "digits" in tokens:
    c = digits_config()
    for token in tokens:
      if token == "digits":
        continue
      if token not in _DIGITS_VARIANTS:
        raise ValueError(f"unknown gam digits variant {token!r}; known:"
                         f" digits, {', '.join(sorted(_DIGITS_VARIANTS))}")
      _DIGITS_VARIANTS[token](c)
    return c
  c = common.get_base_config()
  c.method = "gam"
  c.gam = gam_config()
  c.num_steps = 600  # adaptation steps
  c.adversarial.gan = "ls"  # LS-GAN for segmentation (paper)
  c.adversarial.learning_rate = 1e-4  # discriminators' Adam LR
  c.optim.learning_rate = 0.001  # target network LR (SGD, poly)
  c.optim.weight_decay = 0.0  # the drift term replaces L2 decay
  return common.apply_variant(
      c, variant, {"tiny": _tiny, "gaussian_only": _gaussian_only,
                   "disc_only": _disc_only, "code_drift": _code_drift,
                   "code": _code,
                   "paper": _paper})
