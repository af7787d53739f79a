"""Activation-statistics pictures (GAM / DAM's per-layer report)."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxda.visualize import figures


def save_report_picture(path: str, report: dict[str, Any]) -> str:
  """Bar charts per layer: mean gap, std gap, discriminator accuracy (PNG).

  Args:
    path: PNG to write.
    report: ``{'before': {layer: gaps}, 'after': {layer: gaps},
      'discriminator_accuracy': {layer: {'first_log', 'last_log'}}}`` as
      ``jaxda.methods.gam.driver`` builds it.

  Returns:
    ``path``.
  """
  before, after = report["before"], report["after"]
  keys = list(before)
  x = np.arange(len(keys))
  fig = figures.new_figure(13, 3.6)
  axes = fig.subplots(1, 3)
  bars = (("before (source model)", before, ""),
          ("after, layer output", after, "_raw"),
          ("after, matched (D input)", after, ""))
  for ax, stat in zip(axes[:2], ("mean_gap", "std_gap")):
    for i, (label, rep, suffix) in enumerate(bars):
      ax.bar(x + (i - 1) * 0.27, [rep[k][stat + suffix] for k in keys], 0.27,
             label=label)
    ax.set_title(f"target vs source {stat.replace('_', ' ')} (source std)")
    ax.set_xticks(x, keys, rotation=20, fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
  axes[0].legend(fontsize=8)
  acc = report.get("discriminator_accuracy") or {}
  ax = axes[2]
  if acc:
    ks = [k for k in keys if k in acc]
    xs = np.arange(len(ks))
    ax.bar(xs - 0.2, [acc[k]["first_log"] for k in ks], 0.4,
           label="first logged window")
    ax.bar(xs + 0.2, [acc[k]["last_log"] for k in ks], 0.4,
           label="last logged window")
    ax.axhline(0.5, color="k", linewidth=0.8, linestyle="--")
    ax.set_xticks(xs, ks, rotation=20, fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
  ax.set_title("discriminator accuracy (0.5 = confused)")
  return figures.save(fig, path)
