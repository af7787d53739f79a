"""Segmentation pictures: prediction grids and pseudo-label grids."""

from __future__ import annotations

from collections.abc import Sequence
import os

import numpy as np

from jaxda.visualize.figures import (
    CELL_WIDTH_INCHES, accuracy, add_class_legend, check_batch, density,
    image_grid_figure, legend_rows, percent, present_classes, save)
from jaxda.visualize.palette import as_uint8_image, colorize, overlay


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
  predictions = check_batch('predictions', predictions, (n, h, w))
  labels = check_batch('labels', labels, (n, h, w))
  rows = min(n, max_rows)
  if rows < 1:
    raise ValueError('Nothing to draw: empty batch.')
  class_ids, has_ignore = present_classes([predictions[:rows], labels[:rows]])
  width = 3 * CELL_WIDTH_INCHES
  fig, axes = image_grid_figure(
      rows, 3, h, w,
      legend_rows(len(class_ids) + has_ignore, width) + 0.4 * bool(title))
  for i in range(rows):
    acc = accuracy(predictions[i], labels[i])
    cells = [
        (as_uint8_image(images[i]), 'image'),
        (overlay(images[i], predictions[i], palette),
         f'prediction (pixel acc {percent(acc)})'),
        (colorize(labels[i], palette), 'ground truth'),
    ]
    for ax, (picture, cell_title) in zip(axes[i], cells):
      ax.imshow(picture, interpolation='nearest')
      ax.set_title(cell_title, fontsize=9)
  if title:
    fig.suptitle(title)
  add_class_legend(fig, class_ids, palette, class_names, has_ignore)
  return save(fig, path)


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
  before = check_batch('before', before, (n, h, w))
  after = check_batch('after', after, (n, h, w))
  if ground_truth is not None:
    ground_truth = check_batch('ground_truth', ground_truth, (n, h, w))
  rows = min(n, max_rows)
  if rows < 1:
    raise ValueError('Nothing to draw: empty batch.')
  shown = [before[:rows], after[:rows]]
  if ground_truth is not None:
    shown.append(ground_truth[:rows])
  class_ids, has_ignore = present_classes(shown)
  cols = 3 + (ground_truth is not None)
  width = cols * CELL_WIDTH_INCHES
  fig, axes = image_grid_figure(
      rows, cols, h, w,
      legend_rows(len(class_ids) + has_ignore, width) + 0.4 * bool(title))
  for i in range(rows):
    cells = [(as_uint8_image(images[i]), 'image')]
    for name, pseudo in (('before voting', before[i]),
                         ('after voting', after[i])):
      cell_title = f'{name}\ndensity {percent(density(pseudo))}'
      if ground_truth is not None:
        acc = accuracy(pseudo, ground_truth[i])
        cell_title += f', acc {percent(acc)}'
      cells.append((colorize(pseudo, palette), cell_title))
    if ground_truth is not None:
      cells.append((colorize(ground_truth[i], palette),
                    f'ground truth\ndensity '
                    f'{percent(density(ground_truth[i]))}'))
    for ax, (picture, cell_title) in zip(axes[i], cells):
      ax.imshow(picture, interpolation='nearest')
      ax.set_title(cell_title, fontsize=9)
  if title:
    fig.suptitle(title)
  add_class_legend(fig, class_ids, palette, class_names, has_ignore)
  return save(fig, path)
