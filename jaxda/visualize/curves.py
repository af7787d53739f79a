"""Training curves, heat maps (entropy / attention) and confusion matrices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
import os

import matplotlib
from matplotlib import colors as mpl_colors
import numpy as np
from PIL import Image

from jaxda.visualize.figures import image_grid_figure, new_figure, save
from jaxda.visualize.palette import as_uint8_image


def save_training_curves(
    path: str | os.PathLike[str],
    history: Mapping[str, Sequence[tuple[int, float]]],
    *,
    names: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
  """One subplot per metric against the step, x axis shared.

  Args:
    path: PNG file to write.
    history: name -> [(step, value), ...], e.g. `writers.read_history(dir)`.
    names: metrics to draw, in this order; default all, sorted by name.
    title: optional figure title.

  Returns:
    `path` as a string.
  """
  names = sorted(history) if names is None else list(names)
  missing = [name for name in names if name not in history]
  if missing:
    raise ValueError(f'No history for {missing}; have {sorted(history)}.')
  if not names:
    raise ValueError('Nothing to draw: empty history.')
  cols = min(3, len(names))
  rows = math.ceil(len(names) / cols)
  fig = new_figure(4.2 * cols, 2.8 * rows + 0.4 * bool(title))
  axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
  for ax, name in zip(axes.flat, names):
    points = sorted(history[name])
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    # Markers only when sparse (e.g. eval metrics), where lines mislead.
    ax.plot(steps, values, marker='o' if len(points) <= 30 else None,
            markersize=3, linewidth=1.2)
    ax.set_title(name, fontsize=10)
    ax.grid(True, alpha=0.3)
  for ax in axes[-1]:
    ax.set_xlabel('step')
  for ax in axes.flat[len(names):]:
    ax.set_visible(False)
  # Hidden axes do not get the shared x labels; give them to the row above.
  for ax in axes.flat[len(names) - cols:len(names)]:
    ax.xaxis.set_tick_params(labelbottom=True)
    ax.set_xlabel('step')
  if title:
    fig.suptitle(title)
  return save(fig, path)


def save_heatmap_grid(
    path: str | os.PathLike[str],
    images: np.ndarray,
    maps: np.ndarray,
    *,
    title: str | None = None,
    cmap: str = 'viridis',
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.5,
    max_rows: int = 4,
) -> str:
  """Rows of [image | map | map overlaid on image] for entropy/attention maps.

  All rows share one colour scale (default: min/max over the rows shown),
  so rows are comparable; a colour bar gives the values.  Maps at a lower
  resolution than the images (feature-level attention) are resized
  bilinearly.

  Args:
    path: PNG file to write.
    images: uint8 (N, H, W, 3).
    maps: float (N, h, w); NaN pixels are drawn transparent.
    title: optional figure title.
    cmap: matplotlib colormap name.
    vmin: lower end of the colour scale.
    vmax: upper end of the colour scale.
    alpha: weight of the colour map in the overlay column.
    max_rows: at most this many examples are drawn.

  Returns:
    `path` as a string.
  """
  images = np.asarray(images)
  maps = np.asarray(maps, np.float32)
  n, h, w = images.shape[:3]
  if maps.ndim != 3 or maps.shape[0] != n:
    raise ValueError(f'maps must be ({n}, h, w), got {maps.shape}.')
  rows = min(n, max_rows)
  if rows < 1:
    raise ValueError('Nothing to draw: empty batch.')
  maps = np.stack([_resize_map(m, h, w) for m in maps[:rows]])
  finite = maps[np.isfinite(maps)]
  lo = float(finite.min()) if vmin is None and finite.size else vmin
  hi = float(finite.max()) if vmax is None and finite.size else vmax
  lo = 0.0 if lo is None else lo
  hi = lo + 1.0 if hi is None or hi <= lo else hi
  norm = mpl_colors.Normalize(vmin=lo, vmax=hi)
  colormap = matplotlib.colormaps[cmap]
  fig, axes = image_grid_figure(rows, 3, h, w, 0.4 * bool(title))
  mappable = None
  for i in range(rows):
    image = as_uint8_image(images[i])
    coloured = colormap(norm(np.nan_to_num(maps[i], nan=lo)))[..., :3]
    weight = alpha * np.isfinite(maps[i])[..., None]
    blended = (1 - weight) * image / 255.0 + weight * coloured
    axes[i, 0].imshow(image)
    mappable = axes[i, 1].imshow(maps[i], cmap=colormap, norm=norm)
    axes[i, 2].imshow(np.clip(blended, 0.0, 1.0))
    for ax, cell_title in zip(axes[i], ('image', 'map', 'overlay')):
      ax.set_title(cell_title, fontsize=9)
  fig.colorbar(mappable, ax=axes, shrink=0.8, location='right')
  if title:
    fig.suptitle(title)
  return save(fig, path)


def _resize_map(values: np.ndarray, height: int, width: int) -> np.ndarray:
  if values.shape == (height, width):
    return values
  resized = Image.fromarray(values.astype(np.float32), mode='F').resize(
      (width, height), Image.Resampling.BILINEAR)
  return np.asarray(resized, np.float32)


def save_confusion_matrix(
    path: str | os.PathLike[str],
    confusion: np.ndarray,
    class_names: Sequence[str],
    *,
    title: str | None = None,
) -> str:
  """Row-normalised confusion matrix (rows: ground truth, cols: prediction).

  Cell (i, j) shows the fraction of class-i pixels predicted as j, so the
  diagonal is per-class recall.  Classes with no ground-truth pixels get a
  grey row.  Percentages are printed in the cells when C <= 30.

  Args:
    path: PNG file to write.
    confusion: (C, C) counts, `confusion[gt, pred]`.
    class_names: C names.
    title: optional figure title.

  Returns:
    `path` as a string.
  """
  confusion = np.asarray(confusion, np.float64)
  c = confusion.shape[0]
  if confusion.shape != (c, c):
    raise ValueError(f'confusion must be square, got {confusion.shape}.')
  if len(class_names) != c:
    raise ValueError(f'{len(class_names)} class names for {c} classes.')
  totals = confusion.sum(axis=1, keepdims=True)
  with np.errstate(invalid='ignore', divide='ignore'):
    normalised = np.where(totals > 0, confusion / totals, np.nan)
  size = max(4.0, 0.42 * c + 2.0)
  fig = new_figure(size + 1.0, size + 0.4 * bool(title))
  ax = fig.subplots()
  colormap = matplotlib.colormaps['Blues'].with_extremes(bad='0.85')
  image = ax.imshow(normalised, cmap=colormap, vmin=0.0, vmax=1.0,
                    interpolation='nearest')
  ax.set_xticks(range(c), labels=class_names, rotation=60, ha='right',
                rotation_mode='anchor', fontsize=8)
  ax.set_yticks(range(c), labels=class_names, fontsize=8)
  ax.set_xlabel('prediction')
  ax.set_ylabel('ground truth')
  if c <= 30:
    for i in range(c):
      for j in range(c):
        value = normalised[i, j]
        if np.isnan(value):
          continue
        ax.text(j, i, f'{100 * value:.0f}', ha='center', va='center',
                fontsize=7 if c > 12 else 9,
                color='white' if value > 0.5 else 'black')
  fig.colorbar(image, ax=ax, shrink=0.8, label='fraction of row')
  if title:
    fig.suptitle(title)
  return save(fig, path)
