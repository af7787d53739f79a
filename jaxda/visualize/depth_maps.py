"""Depth pictures: predicted vs ground-truth depth and the relative error."""

from __future__ import annotations

import matplotlib
from matplotlib import colors as mpl_colors
import numpy as np

from jaxda.visualize import figures


def save_depth_grid(path: str, images: np.ndarray, pred: np.ndarray,
                    depth: np.ndarray, *, max_depth: float,
                    title: str = "") -> str:
  """Rows of [image | predicted depth | ground truth | abs-rel error].

  Depth uses one log colour scale for every panel; invalid ground-truth
  pixels (sky, beyond range) are grey in the ground-truth and error panels.

  Args:
    path: PNG to write.
    images: uint8 (N, H, W, 3).
    pred: (N, H, W) predicted depth.
    depth: (N, H, W) ground truth, <= 0 invalid.
    max_depth: top of the colour scale.
    title: figure title.

  Returns:
    ``path``.
  """
  n, h, w = images.shape[:3]
  valid = depth > 0
  norm = mpl_colors.LogNorm(vmin=1.0, vmax=max_depth)
  cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="0.6")
  err_cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.6")
  err = np.where(valid, np.abs(pred - depth) / np.where(valid, depth, 1.0),
                 np.nan)
  cell = 2.2
  fig = figures.new_figure(4 * cell * w / h + 1.5, n * cell + 0.5)
  axes = fig.subplots(n, 4, squeeze=False)
  for i in range(n):
    axes[i, 0].imshow(images[i])
    im = axes[i, 1].imshow(pred[i], cmap=cmap, norm=norm)
    axes[i, 2].imshow(np.where(valid[i], depth[i], np.nan), cmap=cmap,
                      norm=norm)
    em = axes[i, 3].imshow(err[i], cmap=err_cmap, vmin=0.0, vmax=0.5)
    for ax, name in zip(axes[i], ("target image", "predicted depth",
                                  "ground truth", "abs-rel error")):
      ax.set_title(name, fontsize=8)
      ax.set_axis_off()
  fig.colorbar(im, ax=axes[:, :3], shrink=0.6, label="depth (camera heights)")
  fig.colorbar(em, ax=axes[:, 3], shrink=0.6, label="|d - d*| / d*")
  if title:
    fig.suptitle(title, fontsize=9)
  return figures.save(fig, path)
