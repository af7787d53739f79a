"""Figure plumbing shared by the `save_*` pictures: Agg figures, PNG output,
image grids, class legends, and the numbers printed in cell titles.

Figures use matplotlib's object-oriented API on an Agg canvas (no pyplot), so
rendering works headless and never switches an interactive backend.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import os

from matplotlib import figure as mpl_figure
from matplotlib import patches as mpl_patches
from matplotlib.backends import backend_agg
import numpy as np

from jaxda.types import IGNORE_LABEL

CELL_WIDTH_INCHES = 3.2
_DPI = 100


def new_figure(width: float, height: float) -> mpl_figure.Figure:
  fig = mpl_figure.Figure(figsize=(width, height), dpi=_DPI,
                          layout='constrained')
  backend_agg.FigureCanvasAgg(fig)
  return fig


def save(fig: mpl_figure.Figure, path: str | os.PathLike[str]) -> str:
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  fig.savefig(path, format='png', dpi=_DPI)
  fig.clear()  # Drop artists now rather than at garbage collection.
  return path


def check_batch(name: str, array, shape: tuple[int, ...]) -> np.ndarray:
  array = np.asarray(array)
  if array.shape != shape:
    raise ValueError(f'{name} has shape {array.shape}, expected {shape}.')
  return array


def grid_axes(fig: mpl_figure.Figure, rows: int, cols: int) -> np.ndarray:
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  return axes


def image_grid_figure(
    rows: int, cols: int, height: int, width: int, extra_height: float
) -> tuple[mpl_figure.Figure, np.ndarray]:
  """A figure of rows x cols image cells sized to the image aspect ratio."""
  cell_h = CELL_WIDTH_INCHES * height / width + 0.35  # + cell title.
  fig = new_figure(cols * CELL_WIDTH_INCHES, rows * cell_h + extra_height)
  return fig, grid_axes(fig, rows, cols)


def add_class_legend(
    fig: mpl_figure.Figure,
    class_ids: Sequence[int],
    palette: np.ndarray,
    class_names: Sequence[str],
    show_ignore: bool,
) -> None:
  """A legend below the grid with one swatch per class id shown."""
  handles = [
      mpl_patches.Patch(
          facecolor=palette[k] / 255.0,
          edgecolor='0.3',
          label=class_names[k] if k < len(class_names) else f'class {k}',
      )
      for k in class_ids
  ]
  if show_ignore:
    handles.append(
        mpl_patches.Patch(facecolor='black', edgecolor='0.3',
                          label='ignore / unlabelled')
    )
  if not handles:
    return
  ncol = max(1, min(len(handles), int(fig.get_figwidth() / 1.6)))
  fig.legend(handles=handles, loc='outside lower center', ncol=ncol,
             fontsize=8, frameon=False)


def legend_rows(num_entries: int, fig_width: float) -> float:
  """Inches to reserve below the grid for a legend of `num_entries`."""
  ncol = max(1, int(fig_width / 1.6))
  return 0.3 * math.ceil(num_entries / ncol) + 0.2


def present_classes(arrays: Sequence[np.ndarray]) -> tuple[list[int], bool]:
  ids = np.unique(np.concatenate([np.asarray(a).ravel() for a in arrays]))
  has_ignore = bool(np.any(ids == IGNORE_LABEL))
  return [int(k) for k in ids if k != IGNORE_LABEL], has_ignore


def density(labels: np.ndarray) -> float:
  return float(np.mean(labels != IGNORE_LABEL))


def accuracy(pred: np.ndarray, target: np.ndarray) -> float:
  """Agreement on pixels labelled in both; NaN if there are none."""
  both = (pred != IGNORE_LABEL) & (target != IGNORE_LABEL)
  if not np.any(both):
    return float('nan')
  return float(np.mean(pred[both] == target[both]))


def percent(x: float) -> str:
  return 'n/a' if math.isnan(x) else f'{100 * x:.1f}%'
