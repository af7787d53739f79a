"""The paper protocols, read from the presets: README "Paper protocols".

``python -m experiments.protocols`` prints the table; ``table()`` builds it
from every segmentation entry point's ``PUBLISHED`` presets (config module
constants), so the README table and the presets cannot drift
(``tests/test_protocols.py`` compares them).
"""

from __future__ import annotations

import importlib

# Segmentation entry points with `paper` presets, in README order.
ENTRY_POINTS = ("source_only", "oracle", "adaptsegnet", "advent", "cbst",
                "crst", "tpld")
COLUMNS = ("preset", "source H×W", "target H×W", "batch", "steps",
           "optimiser", "LR, schedule", "BN", "ASPP", "λ", "selection",
           "eval scales", "published (§14)")


def presets() -> list[tuple[str, str, str]]:
  """``(entry point, variant, published number)`` of every row."""
  rows = []
  for name in ENTRY_POINTS:
    module = importlib.import_module(f"experiments.configs.{name}")
    for variant, published in module.PUBLISHED.items():
      rows.append((name, variant, published))
  return rows


def _size(config, role):
  h = config[role].get("height", 0) or config.data.height
  w = config[role].get("width", 0) or config.data.width
  crop = (config.data.get("crop_height", 0), config.data.get("crop_width", 0))
  return f"{h}×{w}" + (f", crop {crop[0]}×{crop[1]}" if all(crop) else "")


def _lambdas(config, method) -> str:
  """The loss weights that matter for the method (from its facts)."""
  parts = []
  if "self_training" in config:
    st = config.self_training
    parts.append(f"MRKLD {st.mrkld_weight:g}")
    if st.target_loss == "lrent":
      parts.append(f"LRENT α {st.lrent_alpha:g}")
    else:
      parts.append(f"β {st.beta:g}" if st.target_loss == "bootstrap"
                   else "CE")
    if st.phase2_rounds:
      parts.append(f"phase-2 adv {st.lambda_adv:g},"
                   f" source {st.phase2_source_weight:g}")
    return ", ".join(parts)
  multi = config.model.multi_level
  if method.discriminator_inputs != "none":
    adv = config.adversarial
    parts.append(f"adv {adv.lambda_adv_main:g}"
                 + (f" / {adv.lambda_adv_aux:g}" if multi else "")
                 + f" ({adv.gan})")
  elif method.uses_target_images and method.target_labels == "none":
    ent = config.minent
    parts.append(f"ent {ent.lambda_ent_main:g}"
                 + (f" / {ent.lambda_ent_aux:g}" if multi else ""))
  if multi:
    parts.append(f"seg aux {config.loss.lambda_seg_aux:g}")
  return ", ".join(parts) or "—"


def row(entry_point: str, variant: str, published: str) -> list[str]:
  """One table row for ``experiments.<entry_point>:<variant>``."""
  from jaxda import methods  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"experiments.configs.{entry_point}")
  c = module.get_config(variant)
  method = methods.get_method(c.method)
  o = c.optim
  steps = f"{c.num_steps:,}"
  if "self_training" in c:
    st = c.self_training
    steps += f" ({st.phase1_rounds}+{st.phase2_rounds} rounds)"
  if o.power:
    sched = o.schedule_steps if o.schedule_steps != -1 else c.num_steps
    lr = f"{o.learning_rate:g}, poly {o.power:g} over {sched:,}"
  else:
    lr = f"{o.learning_rate:g}, constant"
  scales = ", ".join(f"{s:g}" for s in c.eval.scales)
  if c.eval.flip:
    scales += " + flip"
  return [
      f"`{entry_point}:{variant}`",
      _size(c, "source") if method.uses_source_images else "—",
      _size(c, "target"),
      str(c.batch_size), steps,
      f"{o.optimizer.upper()} m {o.momentum:g}, wd {o.weight_decay:g},"
      f" heads ×{o.head_lr_mult:g}",
      lr, c.model.bn_mode, str(c.model.aspp_branches_used),
      _lambdas(c, method), c.eval.selection, scales, published]


def table() -> str:
  """The README table (Markdown)."""
  lines = ["| " + " | ".join(COLUMNS) + " |",
           "|" + "---|" * len(COLUMNS)]
  for entry_point, variant, published in presets():
    lines.append("| " + " | ".join(row(entry_point, variant, published))
                 + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(table())
