"""Class colours: palettes, label maps to RGB, label overlays (pure NumPy).

Label maps are integer arrays with `IGNORE_LABEL` (drawn black, or showing
the image in `overlay`); images are uint8 (float images are taken to be in
[0, 1]).
"""

from __future__ import annotations

import colorsys

import numpy as np

from jaxda.types import IGNORE_LABEL

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

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


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
  image = as_uint8_image(image)
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


def as_uint8_image(image: np.ndarray) -> np.ndarray:
  """uint8 passes through; floats are taken to be in [0, 1]."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  if np.issubdtype(image.dtype, np.floating):
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
  raise ValueError(
      f'images must be uint8 or float in [0, 1], got {image.dtype}.')
