"""Shared config fragments: the embedded CPU benchmark and paper presets.

Every field has one comment. Method configs import ``get_base_config`` and
override; ``variant`` strings (``--config=...py:tiny``) pick presets. Each
method config lists its presets in ``VARIANTS`` (README's entry-point table
holds the same names); they combine with commas in any order
(``:paper,single_ls`` = ``:single_ls,paper``: method switches apply first,
then the protocol, then its modifiers, then ``tiny``), and a repeated,
unknown or conflicting combination is a one-line ``ValueError``.

* ``''`` (default): the embedded synthetic benchmark, CPU-sized.
* ``'tiny'``: a few steps on a handful of small images (tests, smoke runs).
* ``'paper'``: the published protocol: DeepLab-v2 ResNet-101, GTA5 at
  720x1280 and Cityscapes at 512x1024 (``config.source/target.height/
  width``), batch 1, the originals' optimiser; needs real data. README
  "Paper protocols" lists every method's (``python -m
  experiments.protocols``).
* ``'synthia'``: SYNTHIA -> Cityscapes (16 classes); ``'vgg'``: DeepLab-v2
  VGG-16 (where the method config offers them).

  The published benchmark (each method's config names the number its
  ``paper`` run targets; README "Published vs jaxda"):

    --config.source.name=gta5 --config.source.data_dir=GTA5_ROOT
    --config.target.name=cityscapes --config.target.data_dir=CITYSCAPES_ROOT
    (SYNTHIA -> Cityscapes: ``synthia`` and ``cityscapes16``)
    --config.model.init_weights=W

  with the layouts of jaxda/data/{gta5,cityscapes,synthia}.py and W made
  once from the originals' DeepLab init (ImageNet+COCO, METHODS.md §3.1):
  ``python -m experiments.import_weights --arch=resnet101 --drop=layer5
  --torch=DeepLab_resnet_pretrained_init-f81d91e8.pth --out=W``.
"""

import dataclasses
from typing import Any, Callable

import ml_collections

from jaxda.data import errors as data_errors
from jaxda.data import registry
from jaxda.data.embedded import synthetic
from jaxda.train import exceptions

# The embedded benchmark's named target shifts (jaxda.data.embedded.shifts),
# README "Target shifts"; `--config.target.shift=NAME` picks one.
TARGET_SHIFTS = synthetic.SHIFTS
DEFAULT_SHIFT = synthetic.DEFAULT_SHIFT
# The one shift method defaults may be tuned on; every shift is reported.
DEVELOPMENT_SHIFT = synthetic.DEVELOPMENT_SHIFT


def get_base_config() -> ml_collections.ConfigDict:
  """The CPU default: tiny DeepLab-v2 on the embedded benchmark."""
  c = ml_collections.ConfigDict()
  c.method = "source_only"  # registry name in jaxda.methods.METHODS
  c.seed = 0  # parameter init and data order; runs are deterministic in it
  c.num_steps = 1200  # training steps (AdaptSegNet: NUM_STEPS_STOP)
  c.batch_size = 8  # global batch per domain; divisible by the devices
  c.num_devices = -1  # -1: all visible devices; else the first N
  c.grad_accum_steps = 1  # batches per optimiser update (optax.MultiSteps)

  # Multi-process runs (README "Multi-host and TPU pods"); "" / 0 / -1 fall
  # back to the JAX_* environment variables named here.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # process 0's "host:port"
  c.distributed.num_processes = 0  # 0: JAX_NUM_PROCESSES or 1; -1: JAX detects
  c.distributed.process_id = -1  # this process's rank; -1: JAX_PROCESS_ID/auto
  c.distributed.local_device_ids = ""  # "0,1"; "": JAX_LOCAL_DEVICE_IDS or all
  c.distributed.initialization_timeout = 300  # s to wait for every process

  c.source = ml_collections.ConfigDict()
  # 'synthetic' (embedded), 'folder', or a real data set read from data_dir
  # in its distributed layout: 'gta5', 'synthia', 'cityscapes',
  # 'cityscapes16' (jaxda.data.sources; README "Real datasets")
  c.source.name = "synthetic"
  c.source.data_dir = ""  # folder root; for 'synthetic' the cache dir
  # Per-domain training size (originals: GTA5 720x1280, SYNTHIA 760x1280,
  # Cityscapes 512x1024); 0 = the shared config.data size.
  c.source.height = 0  # source image height after resizing; 0 = data.height
  c.source.width = 0  # source image width after resizing; 0 = data.width
  # Real data: a file naming one image stem per line restricts the train
  # split to those images (CRST's 19,984-image GTA5 list); '' = all.
  c.source.list_file = ""
  c.target = ml_collections.ConfigDict()
  # Embedded target shift: 'default' | 'texture' | 'weather' | 'sensor' |
  # 'layout' (TARGET_SHIFTS); target.name follows it until target.name is set
  c.target.shift = DEFAULT_SHIFT
  # as source.name; 'synthetic' or 'synthetic:<shift>' from target.shift
  c.target.name = follow_shift(c.target, registry.synthetic_name)
  c.target.data_dir = ""  # as source.data_dir
  c.target.height = 0  # target train/val input height; 0 = data.height
  c.target.width = 0  # target train/val input width; 0 = data.width
  c.target.list_file = ""  # as source.list_file (CRST: 505-image ClsConfSet)

  c.data = ml_collections.ConfigDict()
  c.data.height = 64  # training/eval image height after resizing
  c.data.width = 128  # training/eval image width after resizing
  c.data.num_train_images = 800  # synthetic: images per domain (train)
  c.data.num_val_images = 200  # synthetic: target val images
  c.data.seed = 0  # synthetic benchmark generator seed (fixed across runs)
  c.data.normalization = "unit"  # 'unit' | 'imagenet' | 'caffe_bgr'
  c.data.flip = False  # random horizontal mirror (originals: none)
  c.data.scale_min = 1.0  # random scale lower bound (CRST 0.5; 1 = off)
  c.data.scale_max = 1.0  # random scale upper bound (CRST 1.5)
  c.data.scale_step = 0.0  # scale grid spacing (CRST 0.1); 0 = continuous
  c.data.crop_height = 0  # random crop height after scaling; 0 = no crop
  c.data.crop_width = 0  # random crop width (CRST 1024); 0 = no crop
  # Host input: batches built ahead by a thread while the step runs (0 =
  # in the loop), and threads decoding upcoming batches (about host cores - 2
  # on a GPU/TPU host; benchmarks/input_pipeline.py measures the rate).
  c.data.prefetch = 2
  c.data.decode_workers = 1
  c.data.resize_mismatched_labels = False  # real data: resize, not fail

  c.model = ml_collections.ConfigDict()
  c.model.name = "deeplabv2_tiny"  # jaxda.models.SEGMENTER_NAMES
  c.model.multi_level = True  # aux ASPP head on layer3 (AdaptSegNet multi)
  c.model.aspp_branches_used = 4  # 2 reproduces AdaptSegNet's early return
  c.model.bn_mode = "source"  # 'frozen' | 'train' (originals) | 'source'
  c.model.upsample_align_corners = True  # originals: align_corners=True
  c.model.compute_dtype = "float32"  # or 'bfloat16' (params, losses: f32)
  c.model.remat = False  # recompute backbone blocks in backward (memory)
  # 'gated': recompute each block only once its output cotangent exists
  # (jaxda.models.remat; frozen BN); 'jax': nn.remat, which XLA:CPU
  # schedules all at once (no memory saved there).
  c.model.remat_impl = "gated"
  c.model.conv_impl = "auto"  # 'auto' | 'lax' | 'dot' | 'taps' (models.conv)
  c.model.init_checkpoint = ""  # workdir of a run to warm-start from
  c.model.init_weights = ""  # experiments.import_weights --out DIR (partial OK; init_checkpoint wins)

  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = "sgd"  # 'sgd' (originals) or 'adam'
  c.optim.learning_rate = 0.02  # base LR (originals: 2.5e-4, pretrained)
  c.optim.momentum = 0.9  # SGD momentum
  c.optim.weight_decay = 5e-4  # coupled L2 (PyTorch weight_decay)
  c.optim.power = 0.9  # poly exponent; 0 = constant LR
  c.optim.schedule_steps = -1  # poly length; -1 = num_steps
  c.optim.head_lr_mult = 10.0  # ASPP heads' LR multiplier
  c.optim.frozen_regexes = ()  # extra param-path regexes never updated
  c.optim.decay_every = 0  # LR x decay_factor every this many steps; 0 = off
  c.optim.decay_factor = 1.0  # that staircase factor

  c.loss = ml_collections.ConfigDict()
  c.loss.lambda_seg_aux = 0.1  # weight of the aux-head CE

  c.adversarial = ml_collections.ConfigDict()
  c.adversarial.gan = "vanilla"  # 'vanilla' (BCE) or 'ls' (LS-GAN)
  c.adversarial.lambda_adv_main = 0.01  # λ_adv on the main output
  c.adversarial.lambda_adv_aux = 0.002  # λ_adv on the aux output
  c.adversarial.ndf = 32  # FC discriminator width (originals: 64)
  c.adversarial.learning_rate = 1e-4  # D Adam LR
  c.adversarial.b1 = 0.9  # D Adam beta1
  c.adversarial.b2 = 0.99  # D Adam beta2

  c.minent = ml_collections.ConfigDict()
  c.minent.lambda_ent_main = 0.001  # MinEnt weight, main output
  c.minent.lambda_ent_aux = 0.0002  # MinEnt weight, aux output

  c.eval = ml_collections.ConfigDict()
  # Evaluation / pseudo-label batch (rounded to the devices); 0 = auto: on
  # GPU/TPU the largest that fits the device's memory (tasks/splits.py),
  # on CPU eval.host_batch_size.
  c.eval.batch_size = 0
  c.eval.host_batch_size = 32  # auto on CPU (no device memory reported)
  c.eval.num_pictures = 4  # target images drawn in the prediction picture
  c.eval.full_resolution = True  # real data: score at the labels' size
  # 'last' (the last iterate; no target labels used). The originals report
  # 'best_on_target_val' (ADVENT TEST.MODE best: selection on target val
  # labels, METHODS.md §3.10): evaluated every eval.every steps, the best
  # reported and labelled so (jaxda.train.selection; single-phase loop).
  c.eval.selection = "last"
  c.eval.every = 0  # steps between selection evaluations; 0: checkpoint_every
  c.eval.scales = (1.0,)  # input scales whose logits are averaged (CRST 0.9, 1, 1.2)
  c.eval.flip = False  # also average the mirrored input's logits (CRST)

  c.log_every = 50  # steps between metric logs (and NaN checks)
  c.checkpoint_every = 200  # steps between checkpoints
  c.max_checkpoints = 2  # checkpoints kept
  return c




def follow_shift(target: ml_collections.ConfigDict,
                 name_of: Callable[[str], str]):
  """``target.name``'s value: ``name_of(target.shift)``, read lazily, so a
  ``--config.target.shift=NAME`` override picks the data set; setting
  ``target.name`` itself (a real data set) replaces the link.

  An unknown shift is a one-line ``ConfigError`` listing the known ones,
  raised when the name is first read (data loading).
  """
  def name(shift):
    try:
      return name_of(shift)
    except data_errors.DataError as e:
      raise exceptions.ConfigError(f"config.target.shift: {e}") from None
  # pylint: disable-next=protected-access
  return target.get_ref("shift")._apply_op(name)  # ml-collections==1.1.0


# --------------------------------------------------------------------------
# Variants: named presets that compose
# --------------------------------------------------------------------------

# Application order of a variant's kind: whatever the user's order, presets
# apply method switches first, then the protocol, then its modifiers, then
# ``tiny`` (which shrinks whatever was chosen), so ``a,b`` == ``b,a``.
METHOD, PROTOCOL, MODIFIER, SHRINK = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Variant:
  """A named preset: ``apply(config)`` changes the config in place."""
  apply: Callable[[ml_collections.ConfigDict], Any]
  doc: str  # one line: what it sets (README entry-point table, --help)
  kind: int = MODIFIER  # METHOD | PROTOCOL | MODIFIER | SHRINK
  conflicts: tuple[str, ...] = ()  # variants it cannot combine with


def variant_names(variants: dict[str, Variant]) -> tuple[str, ...]:
  """The documented variants of an entry point, in README order."""
  return tuple(variants)


def apply_variant(c: ml_collections.ConfigDict, variant: str,
                  extra: dict | None = None):
  """Applies comma-separated presets (``'tiny'``, ``'paper,single_ls'``).

  Args:
    c: the config, changed in place.
    variant: preset names separated by commas.
    extra: the entry point's presets: ``{name: Variant}`` (they compose:
      any order gives the same config, a conflicting or repeated name is a
      ``ValueError``), or legacy ``{name: fn(config)}`` applied left to right
      with ``tiny`` / ``paper`` from here.

  Returns:
    ``c``.
  """
  extra = extra or {}
  tokens = [t.strip() for t in (variant or "").split(",") if t.strip()]
  if extra and all(isinstance(v, Variant) for v in extra.values()):
    return _compose(c, tokens, extra)
  for token in tokens:
    if token in extra:
      extra[token](c)
    elif token in COMMON:
      COMMON[token].apply(c)
    else:
      raise ValueError(
          f"unknown config variant {token!r}; known: "
          + ", ".join(sorted(set(COMMON) | set(extra))))
  return c


def _compose(c, tokens, variants):
  unknown = [t for t in tokens if t not in variants]
  if unknown:
    raise ValueError(f"unknown config variant {unknown[0]!r}; known:"
                     f" {', '.join(variants)}")
  repeated = sorted({t for t in tokens if tokens.count(t) > 1})
  if repeated:
    raise ValueError(f"config variant {repeated[0]!r} given twice")
  for i, a in enumerate(tokens):
    for b in tokens[i + 1:]:
      if b in variants[a].conflicts or a in variants[b].conflicts:
        raise ValueError(f"config variants {a!r} and {b!r} conflict (they set"
                         " the same fields differently); pick one")
  order = list(variants)
  for token in sorted(tokens, key=lambda t: (variants[t].kind,
                                             order.index(t))):
    variants[token].apply(c)
  return c


def _tiny(c):
  c.num_steps = 4
  c.batch_size = 8
  c.data.height = 32
  c.data.width = 64
  # One shared tiny size (a paper preset's per-domain sizes are dropped).
  for role in ("source", "target"):
    c[role].height = c[role].width = 0
  c.data.crop_height = c.data.crop_width = 0
  c.data.num_train_images = 16
  c.data.num_val_images = 8
  c.adversarial.ndf = 8
  c.log_every = 2
  c.checkpoint_every = 2
  c.eval.host_batch_size = 8
  c.eval.num_pictures = 2


# GTA5 -> Cityscapes at the originals' sizes (METHODS.md §3.7, §4.4, §5.3):
# GTA5 720x1280, Cityscapes 512x1024 (H x W); SYNTHIA: ``synthia`` variant.
GTA5_SIZE = (720, 1280)
SYNTHIA_SIZE = (760, 1280)
CITYSCAPES_SIZE = (512, 1024)


def set_sizes(c, source, target):
  """Per-domain training sizes ``(h, w)``; ``data`` keeps the target's."""
  c.source.height, c.source.width = source
  c.target.height, c.target.width = target
  c.data.height, c.data.width = target


def _paper(c):
  # METHODS.md §3.9, §4.4: DeepLab-v2 R101, batch 1, GTA5 720x1280 and
  # Cityscapes 512x1024, SGD 2.5e-4 poly over 250k, stop at 150k, D Adam
  # 1e-4 (0.9, 0.99); BN frozen (the methods that ran model.train() say so).
  c.model.name = "deeplabv2_resnet101"
  c.model.bn_mode = "frozen"
  set_sizes(c, GTA5_SIZE, CITYSCAPES_SIZE)
  c.data.normalization = "caffe_bgr"
  c.batch_size = 1
  c.num_steps = 150_000
  c.optim.learning_rate = 2.5e-4
  c.optim.schedule_steps = 250_000
  c.adversarial.ndf = 64
  c.adversarial.lambda_adv_main = 0.001
  c.adversarial.lambda_adv_aux = 0.0002
  c.log_every = 100
  c.checkpoint_every = 5000


def _synthia(c):
  # SYNTHIA -> Cityscapes (16 classes; the summary adds the 13-class mIoU*).
  c.source.name = "synthia"
  c.target.name = "cityscapes16"
  if c.source.height:  # A paper-size run: SYNTHIA's own size.
    c.source.height, c.source.width = SYNTHIA_SIZE


def _vgg(c):
  # DeepLab-v2 VGG-16 (METHODS.md §3.3): one output, no BatchNorm, no 10x
  # head LR; init: torchvision ImageNet VGG-16 (`experiments.import_weights
  # --arch=vgg16 --drop=classifier`) as config.model.init_weights.
  c.model.name = "deeplabv2_vgg16"
  c.model.multi_level = False
  c.loss.lambda_seg_aux = 0.0
  c.adversarial.lambda_adv_aux = 0.0
  c.minent.lambda_ent_aux = 0.0
  c.optim.head_lr_mult = 1.0


COMMON = {
    "tiny": Variant(_tiny, "a few steps on a handful of small images (tests,"
                    " smoke runs)", SHRINK),
    "paper": Variant(_paper, "the published protocol (README \"Paper"
                     " protocols\"); needs real data", PROTOCOL),
}
VGG = Variant(_vgg, "DeepLab-v2 VGG-16 backbone (single output, no 10x"
              " head LR)", MODIFIER)
SYNTHIA = Variant(_synthia, "SYNTHIA -> Cityscapes (16 classes); with"
                  " `paper`, SYNTHIA at 760x1280", MODIFIER)


def variants(**method_variants: Variant) -> dict[str, Variant]:
  """``tiny``, ``paper`` and the method's own variants (README order)."""
  return {**COMMON, **method_variants}
