"""DAFormer (Hoyer et al., CVPR 2022), HRDA (ECCV 2022) and MIC (CVPR 2023):
EMA-teacher self-training with ClassMix, on DeepLab-v2 or SegFormer MiT.

Run:
  python -m experiments.daformer --config=experiments/configs/daformer.py
  python -m experiments.daformer --config=experiments/configs/daformer.py:mic
  python -m experiments.daformer --config=experiments/configs/daformer.py:hrda
  python -m experiments.daformer \
      --config=experiments/configs/daformer.py:hrda,mic
Variants (``VARIANTS``; comma-separated, any order): ``tiny``, ``paper``
(DAFormer: MiT-B5 + DAFormer head, GTA5 720x1280 / Cityscapes 512x1024,
512x512 crops, batch 2, AdamW 6e-5 with the head at x10, 1500 warm-up steps
then poly over 40k, EMA 0.999, tau 0.968, pseudo-weight margins 15 / 120
rows, rare-class sampling T 0.01, thing-class feature distance 0.005),
``mic`` (MIC: masked target images, 64-px blocks, ratio 0.7, lambda 1),
``hrda`` (HRDA: every student pass sees a 0.5x context view of the crop and
a full-resolution detail crop of half its side, fused by a learned
class-wise scale attention; loss 0.9 CE(fused) + 0.1 CE(detail); pseudo
labels and evaluation: context over the whole image + detail windows slid
at half their size, averaged, fused). With ``paper``, HRDA's protocol: GTA5
1440x2560 / Cityscapes 1024x2048, 1024x1024 crops, 512x512 detail crops
(offsets as the released code), pseudo-weight margins 30 / 240 / 30 / 30,
RCS min crop ratio 2.0.

``paper`` targets GTA5 -> Cityscapes 68.3 mIoU (DAFormer, MiT-B5);
``paper,mic`` 70.6 (MIC on DAFormer, UNVERIFIED); ``paper,hrda`` 73.8 (HRDA);
``paper,hrda,mic`` 75.9 (MIC(HRDA)). All start from the ImageNet MiT-B5
weights: ``python -m experiments.import_weights
--torch=mit_b5.pth --arch=mit --out=DIR`` (the original file or a
transformers SegFormer state dict), then ``--config.model.init_weights=DIR``.

The CPU default trains the tiny DeepLab-v2 (the papers' DeepLab-v2 runs use
the same recipe) from scratch on the embedded benchmark: MiT-B0 is about 14x
its parameters and a from-scratch Transformer learns little in a few minutes
of CPU; ``--config.daformer.network=mit_b0`` runs it.
"""

import ml_collections

from experiments.configs import common

# HRDA's high-resolution protocol (METHODS.md §17.4): GTA5 fit to 2560x1440,
# Cityscapes 2048x1024 (H x W).
HRDA_GTA5_SIZE = (1440, 2560)
HRDA_CITYSCAPES_SIZE = (1024, 2048)

def daformer_config() -> ml_collections.ConfigDict:
  """The ``config.daformer`` fields (CPU defaults; ``paper`` below)."""
  d = ml_collections.ConfigDict()
  # Network: '' = config.model.name (DeepLab-v2); 'mit_b0'..'mit_b5',
  # 'mit_tiny' = SegFormer MiT + DAFormer head (config.model.name unused).
  d.network = ""
  d.decoder_dim = 256  # DAFormer head embedding / fusion channels (MiT)
  d.drop_path_rate = 0.1  # MiT stochastic depth (student passes only)
  d.dropout = 0.1  # DAFormer head Dropout2d (student passes only)
  # 'adamw': DAFormer's AdamW (heads x optim.head_lr_mult, no decay on
  # norms), warm-up then poly (optim.power); 'task': config.optim's SGD/Adam.
  d.optimizer = "adamw"
  d.warmup_steps = 100  # linear warm-up steps (paper 1500)
  d.warmup_ratio = 1e-6  # LR factor at step 0 of the warm-up
  d.adam_b1 = 0.9  # AdamW beta1
  d.adam_b2 = 0.999  # AdamW beta2
  d.ema_alpha = 0.99  # teacher momentum (paper 0.999 over 40k steps)
  d.teacher_bn = "batch"  # teacher BN: 'batch' (original) or 'running'
  d.pseudo_threshold = 0.968  # tau: confident teacher pixels
  d.pseudo_weight_scope = "batch"  # share of confident pixels per 'batch'/'image'
  d.pseudo_margins = (0, 0, 0, 0)  # weight-0 rows/cols (top, bottom, left, right)
  d.mix_pool = "batch"  # ClassMix classes drawn from the 'batch' or 'image'
  d.mix_include_ignore = True  # the ignore label is pasted as a class
  d.color_jitter_strength = 0.2  # ColorJitter(s, s, s, s) of mixed images
  d.color_jitter_skip_prob = 0.2  # jitter runs iff u > this (original's p)
  d.blur = True  # Gaussian blur with probability 1/2
  d.fd_lambda = 0.0  # thing-class ImageNet feature distance (MiT; paper 0.005)
  d.fd_classes = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)  # Cityscapes things
  d.fd_min_ratio = 0.75  # majority share of a feature cell's label
  d.mask_lambda = 0.0  # MIC masked-target loss weight (method mic: 1)
  d.mask_block = 64  # MIC mask block side in pixels
  d.mask_ratio = 0.7  # MIC share of masked blocks
  d.rcs = False  # rare-class sampling of the source stream
  d.rcs_temperature = 0.01  # RCS T
  d.rcs_min_pixels = 3000  # pixels of a class an image needs to be drawn for it
  d.rcs_min_crop_ratio = 0.5  # crop must hold min_pixels * this of the class
  d.hrda = False  # HRDA: context + detail crops, scale attention (`hrda`)
  d.hrda_context_scale = 0.5  # context view scale (only 0.5: HRDA's [1, 0.5])
  # Detail crop (h, w): pixels, or fractions (<= 1) of the training crop
  # (HRDA: 512x512 of 1024x1024).
  d.hrda_detail_crop = (0.5, 0.5)
  d.hrda_hr_loss_weight = 0.1  # detail CE weight; the fused CE gets 1 - it
  d.hrda_attention_classwise = True  # one attention map per class (else one)
  d.hrda_attention_embed_dim = 256  # MiT attention head width (DeepLab: ASPP)
  # Inference detail windows' stride (h, w): pixels, or fractions (<= 1) of
  # the detail crop (HRDA: 256 = half of 512).
  d.hrda_sliding_stride = (0.5, 0.5)
  # Detail offsets k * os / scale up to the far border ('full') or as the
  # released code, randint(0, (margin + 1) // k) * k, never touching it.
  d.hrda_crop_max_offset = "full"
  # One backward per loss, gradients summed (the original's order): one
  # pass's activations alive at a time; False: one backward of the summed
  # loss (the same gradients, every pass alive at once).
  d.per_loss_backward = True
  d.debug_every = 0  # steps between debug pictures (0: at the end; -1: none)
  return d


def _hrda(c):
  c.daformer.hrda = True


def _mic(c):
  c.method = "mic"
  c.daformer.mask_lambda = 1.0
  if c.data.height < 256:  # CPU sizes: blocks in proportion to 512 crops
    c.daformer.mask_block = 8


def _paper(c):
  common.COMMON["paper"].apply(c)
  d = c.daformer
  common.set_sizes(c, common.GTA5_SIZE, common.CITYSCAPES_SIZE)
  c.data.crop_height = c.data.crop_width = 512
  c.data.normalization = "imagenet"
  c.data.flip = True
  c.model.bn_mode = "train"  # mmseg model.train(); MiT's head BNs
  c.model.multi_level = False
  c.model.upsample_align_corners = False
  c.batch_size = 2
  c.num_steps = 40_000
  c.optim.learning_rate = 6e-5
  c.optim.schedule_steps = -1
  c.optim.power = 1.0
  c.optim.weight_decay = 0.01
  c.optim.head_lr_mult = 10.0
  c.loss.lambda_seg_aux = 0.0
  c.log_every = 50
  c.checkpoint_every = 4000
  d.network = "mit_b5"
  d.warmup_steps = 1500
  d.ema_alpha = 0.999
  d.pseudo_margins = (15, 120, 0, 0)
  d.fd_lambda = 0.005
  d.rcs = True
  d.rcs_min_pixels = 3000
  d.rcs_min_crop_ratio = 0.5
  d.debug_every = 1000
  if c.daformer.mask_lambda > 0:  # MIC after the method switch
    d.mask_block = 64
  if d.hrda:  # HRDA's protocol (METHODS.md §17.4): twice the resolution
    common.set_sizes(c, HRDA_GTA5_SIZE, HRDA_CITYSCAPES_SIZE)
    c.data.crop_height = c.data.crop_width = 1024
    d.hrda_detail_crop = (512, 512)
    d.hrda_sliding_stride = (256, 256)
    d.hrda_crop_max_offset = "code"
    d.hrda_attention_embed_dim = 256
    d.pseudo_margins = (30, 240, 30, 30)
    d.rcs_min_crop_ratio = 2.0
    # Context + detail views of every pass: 24.6 GiB in float32 without
    # recomputing the MiT blocks, over a 24 GB GPU (benchmarks/NOTES.md).
    c.model.remat = True


def _tiny(c):
  common.COMMON["tiny"].apply(c)
  d = c.daformer
  c.data.height, c.data.width = 16, 32
  c.data.num_train_images = 8
  c.data.num_val_images = 4
  c.batch_size = 4
  c.model.multi_level = False
  c.model.conv_impl = "lax"  # XLA's conv: compiles ~1.5x faster at this size
  c.eval.host_batch_size = 4
  d.warmup_steps = 1
  d.rcs_min_pixels = 8
  if d.network:
    d.network = "mit_tiny"
    d.decoder_dim = 16
  if d.mask_lambda > 0:
    d.mask_block = 4
  if d.hrda:  # sides multiples of 16 (DeepLab stride 8 / context 0.5)
    c.data.height, c.data.width = 32, 64
    d.hrda_detail_crop = d.hrda_sliding_stride = (0.5, 0.5)
    d.hrda_attention_embed_dim = 16


VARIANTS = common.variants(
    paper=common.Variant(
        _paper, "DAFormer protocol: MiT-B5, GTA5 720x1280 / Cityscapes"
        " 512x1024, 512 crops, batch 2, AdamW 6e-5 warm-up + poly, 40k"
        " steps, RCS, feature distance", common.PROTOCOL),
    mic=common.Variant(_mic, "MIC: masked target images (lambda 1)",
                       common.METHOD),
    hrda=common.Variant(
        _hrda, "HRDA: 0.5x context + full-resolution detail crops, scale"
        " attention, sliding-window inference", common.METHOD),
)
VARIANTS["tiny"] = common.Variant(_tiny, common.COMMON["tiny"].doc,
                                  common.SHRINK)
PUBLISHED = {"paper": "68.3", "paper,mic": "70.6 (UNVERIFIED)", "paper,hrda": "73.8",
             "paper,hrda,mic": "75.9"}


def get_config(variant: str = ""):
  c = common.get_base_config()
  c.method = "daformer"
  c.daformer = daformer_config()
  c.num_steps = 1200
  c.model.multi_level = False  # one output, as DAFormer's heads
  c.loss.lambda_seg_aux = 0.0
  c.optim.learning_rate = 1e-3  # AdamW from scratch (paper 6e-5, pretrained)
  c.optim.power = 1.0  # poly exponent after the warm-up
  c.optim.weight_decay = 0.01  # AdamW decoupled decay
  c.optim.head_lr_mult = 10.0
  return common.apply_variant(c, variant, VARIANTS)
