"""AdaptSegNet: multi-level output-space adversarial adaptation.

Run:
  python -m experiments.adaptsegnet --config=experiments/configs/adaptsegnet.py
Variants (comma-separated): ``tiny``, ``paper`` (the originals' multi-level
settings: λ_adv 0.001 / 0.0002, BCE), ``single_ls`` (single-level LS-GAN,
λ_adv 0.01 on the main output, λ_seg 0), ``faithful`` (the originals'
quirks: BatchNorm in train mode, 2-branch ASPP), e.g. ``:paper,single_ls``.

``paper`` targets GTA5 -> Cityscapes 42.4 mIoU (multi-level, R101);
``paper,single_ls`` 44.1; single-level BCE 41.4; SYNTHIA -> Cityscapes 46.7
mIoU* (13 classes, UNVERIFIED). METHODS.md §14.1, §14.3. Real data and weights
for ``paper``: experiments/configs/common.py.
"""

from experiments.configs import common


def _single_ls(c):
  c.model.multi_level = False
  c.loss.lambda_seg_aux = 0.0
  c.adversarial.gan = "ls"
  c.adversarial.lambda_adv_main = 0.01
  c.adversarial.lambda_adv_aux = 0.0


def _faithful(c):
  c.model.bn_mode = "train"
  c.model.aspp_branches_used = 2


def get_config(variant: str = ""):
  c = common.get_base_config()
  c.method = "adaptsegnet"
  return common.apply_variant(
      c, variant, {"single_ls": _single_ls, "faithful": _faithful})
