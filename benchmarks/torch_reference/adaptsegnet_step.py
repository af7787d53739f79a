"""AdaptSegNet's multi-level train iteration in PyTorch, as the original runs.

`wasidennis/AdaptSegNet:train_gta2cityscapes_multi.py` (METHODS.md §4.3),
one iteration with `iter_size = 1`:

1. zero the three optimisers' gradients and set the poly learning rates;
2. D frozen (`requires_grad = False`); source forward, bilinear upsampling
   (`align_corners=True`) of both heads to the input size,
   `CE(main) + lambda_seg * CE(aux)` (ignore 255), backward;
3. target forward, upsampling, `D_l(softmax(pred_l))` per level, BCE towards
   the *source* label 0, `sum_l lambda_adv_l * L_adv_l`, backward;
4. D unfrozen; on the detached source predictions BCE towards 0, halved,
   backward; on the detached target predictions BCE towards 1, halved,
   backward;
5. `optimizer.step()` (SGD, momentum, weight decay, 10× LR on `layer5` /
   `layer6`) and each D's `Adam.step()`.

Differences from the script, none of which changes the update: the
iteration is a class instead of a loop body, BatchNorm may be put in eval
mode (`bn_mode='frozen'`, jaxda's paper preset; the script keeps
`model.train()`, i.e. `bn_mode='train'`), and the models may be converted to
`torch.channels_last` (PyTorch's faster CPU layout; the benchmark's
baseline). Used by `benchmarks/train_step_bench.py` (timing and equal-loss
check against jaxda on the same weights).
"""

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_LABEL = 255
SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0


def poly_lr(base_lr: float, i_iter: int, max_iter: int, power: float) -> float:
  """`lr_poly` of the original: base_lr * (1 - i / max_iter) ** power."""
  return base_lr * ((1 - float(i_iter) / max_iter) ** power)


class AdaptSegNetStep:
  """One AdaptSegNet multi-level iteration; call it once per step.

  Args:
    model: `ResNetMulti` (multi-level) returning `(aux, main)` logits.
    discriminators: {'main': D2, 'aux': D1} `FCDiscriminator`s.
    learning_rate: segmenter base LR (heads get `head_lr_mult` times it).
    momentum: SGD momentum.
    weight_decay: SGD (coupled L2) weight decay.
    head_lr_mult: LR multiplier of `layer5` / `layer6`.
    learning_rate_d: discriminators' Adam LR.
    betas: discriminators' Adam betas.
    power: poly exponent of both schedules.
    max_iter: poly schedule length.
    lambda_seg: weight of the aux-head CE.
    lambda_adv: {'main': lambda_adv_target2, 'aux': lambda_adv_target1}.
    bn_mode: 'train' (the script's `model.train()`) or 'frozen' (BN in eval
      mode: running statistics, never updated).
    channels_last: convert the models to `torch.channels_last`.
  """

  def __init__(self, model: nn.Module, discriminators: Mapping[str, nn.Module],
               *, learning_rate: float = 2.5e-4, momentum: float = 0.9,
               weight_decay: float = 5e-4, head_lr_mult: float = 10.0,
               learning_rate_d: float = 1e-4,
               betas: tuple[float, float] = (0.9, 0.99), power: float = 0.9,
               max_iter: int = 250_000, lambda_seg: float = 0.1,
               lambda_adv: Mapping[str, float] | None = None,
               bn_mode: str = 'frozen', channels_last: bool = True):
    if bn_mode not in ('train', 'frozen'):
      raise ValueError(f'bn_mode {bn_mode!r} not in (train, frozen)')
    self.model = model
    self.discriminators = dict(discriminators)
    self.channels_last = channels_last
    if channels_last:
      self.model.to(memory_format=torch.channels_last)
      for d in self.discriminators.values():
        d.to(memory_format=torch.channels_last)
    self.model.train()
    if bn_mode == 'frozen':
      for m in self.model.modules():
        if isinstance(m, nn.BatchNorm2d):
          m.eval()
    self.lambda_seg = lambda_seg
    self.lambda_adv = dict(lambda_adv or {'main': 0.001, 'aux': 0.0002})
    self.power = power
    self.max_iter = max_iter
    self.learning_rate = learning_rate
    self.head_lr_mult = head_lr_mult
    self.learning_rate_d = learning_rate_d
    # `model.optim_parameters(args)`: backbone at lr, heads at 10 lr; only
    # parameters that require gradients (BN affine ones do not).
    heads = [m for name in ('layer5', 'layer6')
             if (m := getattr(model, name, None)) is not None]
    head_ids = {id(p) for m in heads for p in m.parameters()}
    backbone = [p for p in model.parameters()
                if p.requires_grad and id(p) not in head_ids]
    head = [p for m in heads for p in m.parameters() if p.requires_grad]
    self.optimizer = torch.optim.SGD(
        [{'params': backbone, 'lr': learning_rate},
         {'params': head, 'lr': learning_rate * head_lr_mult}],
        lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    self.optimizers_d = {
        level: torch.optim.Adam(d.parameters(), lr=learning_rate_d,
                                betas=betas)
        for level, d in self.discriminators.items()}
    self.bce = nn.BCEWithLogitsLoss()
    self.ce = nn.CrossEntropyLoss(ignore_index=IGNORE_LABEL)

  def _layout(self, x: torch.Tensor) -> torch.Tensor:
    return (x.contiguous(memory_format=torch.channels_last)
            if self.channels_last else x)

  def _set_d_grad(self, flag: bool) -> None:
    for d in self.discriminators.values():
      for p in d.parameters():
        p.requires_grad = flag

  def _predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
    aux, main = self.model(self._layout(images))
    size = images.shape[2:]
    # nn.Upsample(mode='bilinear', align_corners=True) of the original.
    up = lambda p: F.interpolate(p, size=size, mode='bilinear',
                                 align_corners=True)
    return {'main': up(main), 'aux': up(aux)}

  def __call__(self, i_iter: int, images: torch.Tensor, labels: torch.Tensor,
               images_t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Runs one iteration and updates every model in place.

    Args:
      i_iter: iteration number (for the poly schedules).
      images: (B, 3, H, W) float32 source images.
      labels: (B, H, W) int64 source labels (255 ignored).
      images_t: (B, 3, H, W) float32 target images.

    Returns:
      Detached scalar losses: 'loss' (seg + weighted adv, the generator
      objective), 'seg_loss', 'ce_main', 'ce_aux', 'adv_main', 'adv_aux',
      'disc_main', 'disc_aux' (each D's 0.5 (L_src + L_tgt)).
    """
    self.optimizer.zero_grad()
    lr = poly_lr(self.learning_rate, i_iter, self.max_iter, self.power)
    self.optimizer.param_groups[0]['lr'] = lr
    self.optimizer.param_groups[1]['lr'] = lr * self.head_lr_mult
    lr_d = poly_lr(self.learning_rate_d, i_iter, self.max_iter, self.power)
    for opt in self.optimizers_d.values():
      opt.zero_grad()
      opt.param_groups[0]['lr'] = lr_d

    # Train G: D fixed.
    self._set_d_grad(False)
    pred = self._predict(images)
    out = {f'ce_{k}': self.ce(v, labels) for k, v in pred.items()}
    seg = out['ce_main'] + self.lambda_seg * out['ce_aux']
    seg.backward()
    pred_t = self._predict(images_t)
    adv = 0.0
    for level, d in self.discriminators.items():
      d_out = d(F.softmax(pred_t[level], dim=1))
      out[f'adv_{level}'] = self.bce(
          d_out, torch.full_like(d_out, SOURCE_LABEL))
      adv = adv + self.lambda_adv[level] * out[f'adv_{level}']
    adv.backward()

    # Train D on the detached predictions.
    self._set_d_grad(True)
    for level, d in self.discriminators.items():
      d_out = d(F.softmax(pred[level].detach(), dim=1))
      loss_src = self.bce(d_out, torch.full_like(d_out, SOURCE_LABEL)) / 2
      loss_src.backward()
      d_out = d(F.softmax(pred_t[level].detach(), dim=1))
      loss_tgt = self.bce(d_out, torch.full_like(d_out, TARGET_LABEL)) / 2
      loss_tgt.backward()
      out[f'disc_{level}'] = loss_src + loss_tgt

    self.optimizer.step()
    for opt in self.optimizers_d.values():
      opt.step()
    out['seg_loss'] = seg
    out['loss'] = seg + adv
    return {k: v.detach() for k, v in out.items()}
