"""AdaptSegNet: multi-level output-space adversarial adaptation.

Run:
  python -m experiments.adaptsegnet --config=experiments/configs/adaptsegnet.py
Variants (``VARIANTS``; comma-separated, any order, e.g.
``:paper,single_ls``):

* ``paper``: the published protocol (METHODS.md §4.4): R101, GTA5 720x1280 /
  Cityscapes 512x1024, batch 1, multi-level λ_adv 0.001 / 0.0002 (BCE), BN
  in train mode (the published runs' ``model.train()``), 4 ASPP branches.
* ``code``: the released code where it differs: ASPP's early return sums 2
  of the 4 branches (also needed to import its released weights); BN in
  train mode. ``faithful`` is the same (older name).
* ``single_ls``: single-level LS-GAN (λ_adv 0.01 on the main output, λ_seg 0).
* ``vgg``: DeepLab-v2 VGG-16 (single output, no 10x head LR; METHODS.md
  §3.3); ``paper,vgg`` targets 35.0 (single-level).
* ``synthia``: SYNTHIA -> Cityscapes; ``tiny``: smoke test.

``paper`` targets GTA5 -> Cityscapes 42.4 mIoU (multi-level, R101);
``paper,single_ls`` 44.1; single-level BCE 41.4; SYNTHIA -> Cityscapes 46.7
mIoU* (13 classes, UNVERIFIED). METHODS.md §14.1, §14.3. Real data and weights
for ``paper``: experiments/configs/common.py.
"""

from experiments.configs import common


def _paper(c):
  common.COMMON["paper"].apply(c)
  c.model.bn_mode = "train"  # METHODS.md §3.6: the published runs
  c.model.aspp_branches_used = 4


def _single_ls(c):
  c.model.multi_level = False
  c.loss.lambda_seg_aux = 0.0
  c.adversarial.gan = "ls"
  c.adversarial.lambda_adv_main = 0.01
  c.adversarial.lambda_adv_aux = 0.0


def _code(c):
  c.model.bn_mode = "train"
  c.model.aspp_branches_used = 2


VARIANTS = common.variants(
    paper=common.Variant(_paper, "published protocol: R101, GTA5 720x1280 /"
                         " Cityscapes 512x1024, BN train, 4 ASPP branches",
                         common.PROTOCOL),
    code=common.Variant(_code, "released code: 2 ASPP branches, BN train",
                        conflicts=("faithful",)),
    faithful=common.Variant(_code, "same as code (older name)",
                            conflicts=("code",)),
    single_ls=common.Variant(_single_ls, "single-level LS-GAN, λ_adv 0.01"),
    vgg=common.VGG,
    synthia=common.SYNTHIA,
)
PUBLISHED = {"paper": "42.4", "paper,code": "42.4 (released model: 42.35)",
             "paper,single_ls": "44.1", "paper,vgg": "35.0 (single-level)",
             "paper,synthia": "46.7 mIoU* (UNVERIFIED)"}


def get_config(variant: str = ""):
  c = common.get_base_config()
  c.method = "adaptsegnet"
  return common.apply_variant(c, variant, VARIANTS)
