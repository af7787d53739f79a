"""Classification pictures: image grids titled with prediction / truth."""

from __future__ import annotations

from collections.abc import Sequence
import math
import os

import numpy as np

from jaxda.visualize.figures import check_batch, grid_axes, new_figure, save
from jaxda.visualize.palette import as_uint8_image


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
  predictions = check_batch('predictions', predictions, (n,))
  labels = check_batch('labels', labels, (n,))
  shown = min(n, max_images)
  if shown < 1:
    raise ValueError('Nothing to draw: empty batch.')
  cols = min(columns, shown)
  rows = math.ceil(shown / cols)
  cell = 1.3
  fig = new_figure(cols * cell, rows * (cell + 0.25) + 0.4 * bool(title))
  axes = grid_axes(fig, rows, cols)
  for i, ax in enumerate(axes.flat):
    if i >= shown:
      ax.set_axis_off()
      continue
    pred, true = int(predictions[i]), int(labels[i])
    ax.imshow(as_uint8_image(images[i]), interpolation='nearest')
    ax.set_title(f'{class_names[pred]} / {class_names[true]}', fontsize=8,
                 color='black' if pred == true else 'red')
  if title:
    fig.suptitle(f'{title}\n(prediction / ground truth)', fontsize=9)
  return save(fig, path)
