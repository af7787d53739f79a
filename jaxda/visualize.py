"""Pictures for segmentation UDA: predictions, pseudo labels, curves, maps.

Colour helpers (`default_palette`, `colorize`, `overlay`) are pure NumPy.  The
`save_*` functions render PNG files with matplotlib's object-oriented API on
an Agg canvas: no pyplot, so importing this module never switches the
backend of an interactive session, works headless, and leaves no open figure
behind (each figure is a local object, freed on return).

Conventions: images are uint8 (N, H, W, 3) (float images are taken to be in
[0, 1]); label maps are integer (N, H, W) with 255 = ignore, drawn black.
Every `save_*` function creates missing parent directories and returns the
path it wrote.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
import math
import os

import matplotlib
from matplotlib import colors as mpl_colors
from matplotlib import figure as mpl_figure
from matplotlib import patches as mpl_patches
from matplotlib.backends import backend_agg
import numpy as np
from PIL import Image

IGNORE_LABEL = 255

# Cityscapes trainId colours (cityscapesScripts `labels.py`), in the order
# road, sidewalk, building, wall, fence, pole, light, sign, vegetation,
# terrain, sky, person, rider, car, truck, bus, train, motorcycle, bicycle.
CITYSCAPES_PALETTE = np.array(
    [
        [128, 64, 128],
        [244, 35, 232],
        [70, 70, 70],
        [102, 102, 156],
        [190, 153, 153],
        [153, 153, 153],
        [250, 170, 30],
        [220, 220, 0],
        [107, 142, 35],
        [152, 251, 152],
        [70, 130, 180],
        [220, 20, 60],
        [255, 0, 0],
        [0, 0, 142],
        [0, 0, 70],
        [0, 60, 100],
        [0, 80, 100],
        [0, 0, 230],
        [119, 11, 32],
    ],
    dtype=np.uint8,
)

_IGNORE_COLOR = np.zeros(3, np.uint8)
_CELL_WIDTH_INCHES = 3.2
_DPI = 100
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


# ----------------------------------------------------------------------------
# Colours.
# ----------------------------------------------------------------------------


def default_palette(num_classes: int) -> np.ndarray:
  """Returns one RGB colour per class.

  The first 19 are the Cityscapes colours; further classes get hues spaced
  by the golden ratio (so neighbouring class ids differ strongly), with
  alternating saturation/value.  No class is black: black means ignore.

  Args:
    num_classes: number of classes C >= 0.

  Returns:
    uint8 array of shape (C, 3).  Deterministic.
  """
  if num_classes < 0:
    raise ValueError(f'num_classes must be >= 0, got {num_classes}.')
  colours = list(CITYSCAPES_PALETTE[:num_classes])
  for i in range(num_classes - len(colours)):
    hue = (0.13 + i * _GOLDEN_RATIO_CONJUGATE) % 1.0
    saturation = (0.85, 0.55)[i % 2]
    value = (0.95, 0.75, 0.6)[(i // 2) % 3]
    rgb = colorsys.hsv_to_rgb(hue, saturation, value)
    colours.append(np.round(np.array(rgb) * 255).astype(np.uint8))
  return np.array(colours, dtype=np.uint8).reshape(num_classes, 3)


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """Maps class ids to colours; ignore (255) becomes black.

  Args:
    labels: integer array (H, W) (any shape works) of ids in [0, C) or 255.
    palette: uint8 (C, 3).

  Returns:
    uint8 array (H, W, 3).

  Raises:
    ValueError: if a label is neither a valid class id nor 255.
  """
  labels = np.asarray(labels)
  palette = np.asarray(palette, np.uint8)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be integers, got {labels.dtype}.')
  valid = labels != IGNORE_LABEL
  bad = valid & ((labels < 0) | (labels >= len(palette)))
  if np.any(bad):
    raise ValueError(
        f'labels outside [0, {len(palette)}) and not {IGNORE_LABEL}: '
        f'{np.unique(labels[bad])[:10].tolist()}'
    )
  out = np.zeros(labels.shape + (3,), np.uint8)
  out[valid] = palette[labels[valid]]
  return out


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray,
    alpha: float = 0.5,
) -> np.ndarray:
  """Blends label colours over an image; ignore pixels show the image.

  out = floor((1 - alpha) * image + alpha * colour + 0.5) where labelled,
  image
  where the label is 255.

  Args:
    image: uint8 (H, W, 3) (float in [0, 1] also accepted).
    labels: integer (H, W), class ids or 255.
    palette: uint8 (C, 3).
    alpha: weight of the label colour in [0, 1].

  Returns:
    uint8 array (H, W, 3).
  """
  image = _as_uint8_image(image)
  labels = np.asarray(labels)
  if image.shape[:2] != labels.shape:
    raise ValueError(
        f'image {image.shape} and labels {labels.shape} differ in (H, W).'
    )
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha must be in [0, 1], got {alpha}.')
  colour = colorize(labels, palette).astype(np.float64)
  blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colour
  # Round half up (not NumPy's half-to-even) so 126.5 -> 127 as a reader
  # computing by hand would expect.
  blended = np.clip(np.floor(blended + 0.5), 0, 255).astype(np.uint8)
  return np.where((labels == IGNORE_LABEL)[..., None], image, blended)


def _as_uint8_image(image: np.ndarray) -> np.ndarray:
  """uint8 passes through; floats are taken to be in [0, 1]."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  if np.issubdtype(image.dtype, np.floating):
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
  raise ValueError(
      f'images must be uint8 or float in [0, 1], got {image.dtype}.')


# ----------------------------------------------------------------------------
# Figure plumbing.
# ----------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> mpl_figure.Figure:
  fig = mpl_figure.Figure(figsize=(width, height), dpi=_DPI,
                          layout='constrained')
  backend_agg.FigureCanvasAgg(fig)
  return fig


def _save(fig: mpl_figure.Figure, path: str | os.PathLike[str]) -> str:
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  fig.savefig(path, format='png', dpi=_DPI)
  fig.clear()  # Drop artists now rather than at garbage collection.
  return path


def _check_batch(name: str, array, shape: tuple[int, ...]) -> np.ndarray:
  array = np.asarray(array)
  if array.shape != shape:
    raise ValueError(f'{name} has shape {array.shape}, expected {shape}.')
  return array


def _grid_axes(fig: mpl_figure.Figure, rows: int, cols: int) -> np.ndarray:
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  return axes


def _image_grid_figure(
    rows: int, cols: int, height: int, width: int, extra_height: float
) -> tuple[mpl_figure.Figure, np.ndarray]:
  """A figure of rows x cols image cells sized to the image aspect ratio."""
  cell_h = _CELL_WIDTH_INCHES * height / width + 0.35  # + cell title.
  fig = _new_figure(cols * _CELL_WIDTH_INCHES, rows * cell_h + extra_height)
  return fig, _grid_axes(fig, rows, cols)


def _add_class_legend(
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


def _legend_rows(num_entries: int, fig_width: float) -> float:
  """Inches to reserve below the grid for a legend of `num_entries`."""
  ncol = max(1, int(fig_width / 1.6))
  return 0.3 * math.ceil(num_entries / ncol) + 0.2


def _present_classes(arrays: Sequence[np.ndarray]) -> tuple[list[int], bool]:
  ids = np.unique(np.concatenate([np.asarray(a).ravel() for a in arrays]))
  has_ignore = bool(np.any(ids == IGNORE_LABEL))
  return [int(k) for k in ids if k != IGNORE_LABEL], has_ignore


def _density(labels: np.ndarray) -> float:
  return float(np.mean(labels != IGNORE_LABEL))


def _accuracy(pred: np.ndarray, target: np.ndarray) -> float:
  """Agreement on pixels labelled in both; NaN if there are none."""
  both = (pred != IGNORE_LABEL) & (target != IGNORE_LABEL)
  if not np.any(both):
    return float('nan')
  return float(np.mean(pred[both] == target[both]))


def _percent(x: float) -> str:
  return 'n/a' if math.isnan(x) else f'{100 * x:.1f}%'


# ----------------------------------------------------------------------------
# Segmentation grids.
# ----------------------------------------------------------------------------


def save_segmentation_grid(
    path: str | os.PathLike[str],
    images: np.ndarray,
    predictions: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray,
    class_names: Sequence[str],
    *,
    title: str | None = None,
    max_rows: int = 4,
) -> str:
  """Rows of [image | prediction overlaid | ground truth], plus a legend.

  The prediction cell is titled with its pixel accuracy on labelled pixels;
  the legend lists the classes that occur in the rows shown.

  Args:
    path: PNG file to write.
    images: uint8 (N, H, W, 3).
    predictions: integer (N, H, W) class ids (255 allowed).
    labels: integer (N, H, W) ground truth, 255 = ignore.
    palette: uint8 (C, 3), e.g. `default_palette(C)`.
    class_names: C names for the legend.
    title: optional figure title.
    max_rows: at most this many examples (the first ones) are drawn.

  Returns:
    `path` as a string.
  """
  images = np.asarray(images)
  n, h, w = images.shape[:3]
  predictions = _check_batch('predictions', predictions, (n, h, w))
  labels = _check_batch('labels', labels, (n, h, w))
  rows = min(n, max_rows)
  if rows < 1:
    raise ValueError('Nothing to draw: empty batch.')
  class_ids, has_ignore = _present_classes([predictions[:rows], labels[:rows]])
  width = 3 * _CELL_WIDTH_INCHES
  fig, axes = _image_grid_figure(
      rows, 3, h, w,
      _legend_rows(len(class_ids) + has_ignore, width) + 0.4 * bool(title))
  for i in range(rows):
    acc = _accuracy(predictions[i], labels[i])
    cells = [
        (_as_uint8_image(images[i]), 'image'),
        (overlay(images[i], predictions[i], palette),
         f'prediction (pixel acc {_percent(acc)})'),
        (colorize(labels[i], palette), 'ground truth'),
    ]
    for ax, (picture, cell_title) in zip(axes[i], cells):
      ax.imshow(picture, interpolation='nearest')
      ax.set_title(cell_title, fontsize=9)
  if title:
    fig.suptitle(title)
  _add_class_legend(fig, class_ids, palette, class_names, has_ignore)
  return _save(fig, path)


def save_pseudo_label_grid(
    path: str | os.PathLike[str],
    images: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    ground_truth: np.ndarray | None,
    palette: np.ndarray,
    class_names: Sequence[str],
    *,
    title: str | None = None,
    max_rows: int = 4,
) -> str:
  """Rows of [image | pseudo labels before voting | after voting | GT].

  Unlabelled (255) pixels are black.  Each pseudo-label cell is titled with
  its density (fraction of labelled pixels) and, when ground truth is given,
  its accuracy on pixels labelled in both.

  Args:
    path: PNG file to write.
    images: uint8 (N, H, W, 3).
    before: integer (N, H, W) pseudo labels before densification, 255 = none.
    after: integer (N, H, W) pseudo labels after voting, 255 = none.
    ground_truth: integer (N, H, W) or None (then the GT column is dropped).
    palette: uint8 (C, 3).
    class_names: C names for the legend.
    title: optional figure title.
    max_rows: at most this many examples are drawn.

  Returns:
    `path` as a string.
  """
  images = np.asarray(images)
  n, h, w = images.shape[:3]
  before = _check_batch('before', before, (n, h, w))
  after = _check_batch('after', after, (n, h, w))
  if ground_truth is not None:
    ground_truth = _check_batch('ground_truth', ground_truth, (n, h, w))
  rows = min(n, max_rows)
  if rows < 1:
    raise ValueError('Nothing to draw: empty batch.')
  shown = [before[:rows], after[:rows]]
  if ground_truth is not None:
    shown.append(ground_truth[:rows])
  class_ids, has_ignore = _present_classes(shown)
  cols = 3 + (ground_truth is not None)
  width = cols * _CELL_WIDTH_INCHES
  fig, axes = _image_grid_figure(
      rows, cols, h, w,
      _legend_rows(len(class_ids) + has_ignore, width) + 0.4 * bool(title))
  for i in range(rows):
    cells = [(_as_uint8_image(images[i]), 'image')]
    for name, pseudo in (('before voting', before[i]),
                         ('after voting', after[i])):
      cell_title = f'{name}\ndensity {_percent(_density(pseudo))}'
      if ground_truth is not None:
        acc = _accuracy(pseudo, ground_truth[i])
        cell_title += f', acc {_percent(acc)}'
      cells.append((colorize(pseudo, palette), cell_title))
    if ground_truth is not None:
      cells.append((colorize(ground_truth[i], palette),
                    f'ground truth\ndensity '
                    f'{_percent(_density(ground_truth[i]))}'))
    for ax, (picture, cell_title) in zip(axes[i], cells):
      ax.imshow(picture, interpolation='nearest')
      ax.set_title(cell_title, fontsize=9)
  if title:
    fig.suptitle(title)
  _add_class_legend(fig, class_ids, palette, class_names, has_ignore)
  return _save(fig, path)


# ----------------------------------------------------------------------------
# Curves, heat maps, confusion matrices.
# ----------------------------------------------------------------------------


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
  fig = _new_figure(4.2 * cols, 2.8 * rows + 0.4 * bool(title))
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
  return _save(fig, path)


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
  fig, axes = _image_grid_figure(rows, 3, h, w, 0.4 * bool(title))
  mappable = None
  for i in range(rows):
    image = _as_uint8_image(images[i])
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
  return _save(fig, path)


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
  fig = _new_figure(size + 1.0, size + 0.4 * bool(title))
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
  return _save(fig, path)


# ----------------------------------------------------------------------------
# Classification grids.
# ----------------------------------------------------------------------------


def save_classification_grid(
    path: str | os.PathLike[str],
    images: np.ndarray,
    predictions: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    title: str | None = None,
    max_images: int = 16,
    columns: int = 8,
) -> str:
  """A grid of images titled 'pred / true', wrong predictions in red.

  Args:
    path: PNG file to write.
    images: uint8 (N, H, W, 3).
    predictions: integer (N,) predicted classes.
    labels: integer (N,) ground truth.
    class_names: C names.
    title: optional figure title.
    max_images: at most this many (the first) images are drawn.
    columns: images per row.

  Returns:
    `path` as a string.
  """
  images = np.asarray(images)
  n = len(images)
  predictions = _check_batch('predictions', predictions, (n,))
  labels = _check_batch('labels', labels, (n,))
  shown = min(n, max_images)
  if shown < 1:
    raise ValueError('Nothing to draw: empty batch.')
  cols = min(columns, shown)
  rows = math.ceil(shown / cols)
  cell = 1.3
  fig = _new_figure(cols * cell, rows * (cell + 0.25) + 0.4 * bool(title))
  axes = _grid_axes(fig, rows, cols)
  for i, ax in enumerate(axes.flat):
    if i >= shown:
      ax.set_axis_off()
      continue
    pred, true = int(predictions[i]), int(labels[i])
    ax.imshow(_as_uint8_image(images[i]), interpolation='nearest')
    ax.set_title(f'{class_names[pred]} / {class_names[true]}', fontsize=8,
                 color='black' if pred == true else 'red')
  if title:
    fig.suptitle(f'{title}\n(prediction / ground truth)', fontsize=9)
  return _save(fig, path)
