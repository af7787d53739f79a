"""Shared config of the classification methods (source-only, oracle, DANN,
TADA) on the embedded digits benchmark.

Every field has one comment. Variants (``--config=...py:tiny``), combined
with commas:

* ``''`` (default): MNIST -> scikit-learn digits, small CNN, CPU-sized.
* ``'mnist_m'``: MNIST -> MNIST-M-style target (digits on photo patches);
  the same as ``--config.target.shift=mnist_m``.

Target shifts (``--config.target.shift``, ``TARGET_SHIFTS``): ``default``
(scikit-learn digits), ``mnist_m`` (photo patches), ``mnist_texture``
(procedural colour textures); ``target.name`` follows the shift until it
is set.
* ``'tiny'``: a few steps on a handful of images (tests, smoke runs).
* ``'resnet50'``: ResNet-50 at 224x224 (K = 49 regions), the paper's
  network; from scratch (no ImageNet weights ship with jaxda).
* ``'paper'``: torchvision's ResNet-50 (``torchvision_resnet50``) and the
  thuml Office recipe (``_paper``; UNVERIFIED details, METHODS.md §9):
  resize 256, crop 224 + flip (centre crop for evaluation), batch 32 + 32,
  joint-batch BatchNorm,
  Nesterov SGD, bottleneck 256, 1024-1024 discriminators, backbone at 0.1x
  LR, 20k steps. ImageNet init: ``python -m experiments.import_weights
  --torch=resnet50-0676ba61.pth --arch=torchvision_resnet50 --drop=fc
  --out=DIR`` then ``--config.model.init_weights=DIR`` (without it the
  network trains from scratch: far below the published numbers).
* ``'tllib'``: tllib's GRL warm-up (alpha 1, max_iters 1000) instead of the
  paper's γ = 10 ramp, and its LR decay (1 + 0.001 i)^-0.75 (with
  ``paper``: tllib's DANN recipe).
"""

import ml_collections

from experiments.configs import common
from jaxda.data import registry
from jaxda.data.embedded import digits

# MNIST -> these digits targets (jaxda.data.embedded.digits.TARGET_SHIFTS).
TARGET_SHIFTS = tuple(digits.TARGET_SHIFTS)


def get_base_config() -> ml_collections.ConfigDict:
  """The CPU default: small CNN on MNIST -> sklearn digits."""
  c = ml_collections.ConfigDict()
  c.task = "classification"  # 'segmentation' | 'classification' (run loop)
  c.method = "source_only_cls"  # registry name in jaxda.methods.METHODS
  c.seed = 0  # parameter init and data order; runs are deterministic in it
  # Training steps; chosen on the development shift mnist_m (TADA needs
  # more than the 1500 steps used until this default changed)
  c.num_steps = 4500
  c.batch_size = 32  # global batch per domain (source and target each; tllib)
  c.num_devices = -1  # -1: all visible devices; else the first N

  c.source = ml_collections.ConfigDict()
  c.source.name = "mnist"  # 'mnist' | 'digits' | 'mnist_m' (jaxda.data.digits)
  c.source.data_dir = ""  # cache directory (default ~/.cache/jaxda)
  c.target = ml_collections.ConfigDict()
  # Digits target shift: 'default' (digits) | 'mnist_m' | 'mnist_texture';
  # target.name follows it until target.name is set
  c.target.shift = "default"
  # as source.name; from target.shift until set
  c.target.name = common.follow_shift(c.target, registry.digits_name)
  c.target.data_dir = ""  # as source.data_dir

  c.data = ml_collections.ConfigDict()
  c.data.height = 28  # image height after resizing
  c.data.width = 28  # image width after resizing
  c.data.num_train_images = -1  # images per domain (train); -1 = all
  c.data.num_val_images = -1  # target val images; -1 = all
  c.data.seed = 0  # split / MNIST-M patch seed (fixed across runs)
  c.data.normalization = "unit"  # 'unit' | 'imagenet' | 'caffe_bgr'
  c.data.flip = False  # random horizontal mirror (wrong for digits)
  c.data.crop_height = 0  # random training crop (0 = none; Office: 224)
  c.data.crop_width = 0  # its width

  c.model = ml_collections.ConfigDict()
  c.model.name = "small_cnn"  # jaxda.models.CLASSIFIER_NAMES
  c.model.bottleneck_dim = 128  # bottleneck width D (thuml: 256)
  c.model.bn_mode = "source"  # 'frozen' | 'train' | 'source' (base.BN_MODES)
  c.model.bn_joint = False  # DANN/TADA: one BN pass over source + target
  c.model.init_checkpoint = ""  # workdir of a run to warm-start from
  c.model.init_weights = ""  # import_weights --arch=torchvision_resnet50 --drop=fc --out DIR

  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = "sgd"  # 'sgd' (DANN, thuml) or 'adam'
  c.optim.learning_rate = 0.01  # μ0 (DANN: 0.01)
  c.optim.momentum = 0.9  # SGD momentum
  c.optim.nesterov = False  # Nesterov momentum (tllib: True)
  c.optim.weight_decay = 5e-4  # coupled L2 (PyTorch weight_decay)
  c.optim.lr_schedule = "inv"  # 'inv' = μ0 / (1 + α p)^β, or 'constant'
  c.optim.inv_alpha = 10.0  # α of the inv schedule (DANN: 10)
  c.optim.inv_beta = 0.75  # β of the inv schedule (DANN: 0.75)
  c.optim.schedule_steps = -1  # steps defining progress p; -1 = num_steps
  c.optim.backbone_lr_mult = 1.0  # G_f LR multiplier (pretrained: 0.1)
  c.optim.frozen_regexes = ()  # param-path regexes never updated

  c.adversarial = ml_collections.ConfigDict()
  c.adversarial.lambda_adv = 1.0  # λ on the domain losses (TADA: 1.0)
  c.adversarial.grl_schedule = "paper"  # 'paper' | 'tllib' | 'constant'
  c.adversarial.grl_gamma = 10.0  # γ of the paper ramp 2/(1+e^-γp) - 1
  c.adversarial.grl_max = 1.0  # value the GRL coefficient ramps to
  c.adversarial.tllib_max_iters = 1000  # tllib warm-up length
  c.adversarial.domain_label_source = 1  # source label (TADA, tllib: 1)
  # Global D input (DANN, TADA): 'bottleneck' or 'pooled' (the flattened
  # conv features, the DANN paper's digits placement)
  c.adversarial.dann_features = "bottleneck"
  c.adversarial.disc_hidden = (256, 256)  # global D hidden widths
  c.adversarial.disc_lr_mult = 1.0  # D LR multiplier (thuml pretrained: 10)

  c.tada = ml_collections.ConfigDict()
  c.tada.gamma_entropy = 0.1  # γ on the attentive entropy L_h (paper 0.1)
  c.tada.lambda_local = 1.0  # weight of L_l inside λ (L_g + λ_l L_l)
  c.tada.local_attention_form = "1-H"  # '1-H' (Eq. 3) | 'H' | 'none'
  c.tada.stop_gradient_attention = True  # detach w and m (False = TA3N)
  c.tada.region_hidden = (64,)  # hidden widths of each region D
  # Multiplier of L_g's reversed gradient into the network (0: no global
  # adversarial term for the features; the global D still trains, a probe)
  c.tada.lambda_global = 1.0
  c.tada.global_attention = True  # m = 1 + H(d̂) on L_h; False: m = 1
  # Region Ds' gradient x this (their loss is a mean over K regions, so
  # each gets 1/K); the reversed gradient into the features is unchanged
  c.tada.local_disc_grad_scale = 1.0

  c.eval = ml_collections.ConfigDict()
  # Evaluation batch (rounded to the devices); 0 = auto: on GPU/TPU the
  # largest that fits the device's memory, on CPU eval.host_batch_size.
  c.eval.batch_size = 0
  c.eval.host_batch_size = 500  # auto on CPU (no device memory reported)
  c.eval.num_pictures = 16  # target images drawn in the pictures

  c.log_every = 100  # steps between metric logs (and NaN checks)
  c.checkpoint_every = 500  # steps between checkpoints
  c.max_checkpoints = 2  # checkpoints kept
  return c


def _tiny(c):
  c.num_steps = 4
  c.batch_size = 8
  c.data.num_train_images = 32
  c.data.num_val_images = 16
  c.model.bottleneck_dim = 16
  c.adversarial.disc_hidden = (16,)
  c.tada.region_hidden = (8,)
  c.eval.host_batch_size = 8
  c.eval.num_pictures = 4
  c.log_every = 2
  c.checkpoint_every = 2


def _mnist_m(c):
  c.target.shift = "mnist_m"


def _resnet50(c):
  c.model.name = "resnet50"
  c.adversarial.dann_features = "bottleneck"  # thuml/tllib's G_d input
  c.data.height = 224
  c.data.width = 224
  c.data.normalization = "imagenet"


def _paper(c):
  """The thuml Office recipe (DANN/TADA code of that group, METHODS.md §9,
  §12): ImageNet ResNet-50 (torchvision layout; --config.model.init_weights
  from experiments.import_weights --arch=torchvision_resnet50 --drop=fc),
  resize 256 -> random crop 224 + flip, ImageNet normalisation, SGD 0.01
  momentum 0.9 Nesterov, weight decay 1e-3, backbone at 0.1x, inv schedule
  (α 10, β 0.75), batch 32 per domain, BatchNorm in train mode over the
  joint source + target batch, bottleneck 256, 1024-1024 discriminators at
  the head LR; evaluation on the centre 224 crop.
  """
  _resnet50(c)
  c.model.name = "torchvision_resnet50"
  c.data.height = 256
  c.data.width = 256
  c.data.crop_height = 224
  c.data.crop_width = 224
  c.data.flip = True
  c.batch_size = 32
  c.num_steps = 20_000
  c.model.bottleneck_dim = 256
  c.model.bn_mode = "train"
  c.model.bn_joint = True
  c.optim.learning_rate = 0.01
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 1e-3
  c.optim.inv_alpha = 10.0
  c.optim.inv_beta = 0.75
  c.optim.backbone_lr_mult = 0.1
  c.adversarial.disc_hidden = (1024, 1024)
  c.adversarial.disc_lr_mult = 1.0  # thuml: lr_mult 10 = the new layers'
  c.tada.region_hidden = (256,)
  c.log_every = 100
  c.checkpoint_every = 2000


def _tllib(c):
  """tllib's DANN recipe: its GRL warm-up (alpha 1, max_iters 1000) and LR
  0.01 (1 + 0.001 i)^-0.75 over 20 epochs x 1000 iterations. Not
  reproduced: tllib's bottleneck and discriminator BatchNorm layers."""
  c.adversarial.grl_schedule = "tllib"
  c.optim.schedule_steps = 20_000
  c.optim.inv_alpha = 0.001 * 20_000  # (1 + 0.001 i) at p = i / 20000


VARIANTS = {"tiny": _tiny, "mnist_m": _mnist_m, "resnet50": _resnet50,
            "paper": _paper, "tllib": _tllib}


def apply_variant(c: ml_collections.ConfigDict, variant: str):
  """Applies comma-separated presets of ``VARIANTS`` left to right."""
  for token in [t.strip() for t in (variant or "").split(",") if t.strip()]:
    if token not in VARIANTS:
      raise ValueError(f"unknown config variant {token!r}; known: "
                       + ", ".join(sorted(VARIANTS)))
    VARIANTS[token](c)
  return c
