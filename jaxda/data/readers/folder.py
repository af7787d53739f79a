"""Segmentation data sets stored as a plain folder of PNG files.

Layout::

  DIR/classes.txt              one class name per line; line i is class id i
  DIR/train/images/NAME.png    RGB images (.png, .jpg or .jpeg)
  DIR/train/labels/NAME.png    class-id maps with the same stem: one channel
                               (mode L or P), pixel value = class id, 255 =
                               ignore; may be absent for unlabelled target
                               training data
  DIR/val/images/...           same for the validation split
  DIR/val/labels/...

Grayscale and RGBA images are accepted and converted to RGB (alpha is
dropped, not composited); 16-bit grayscale is scaled to 8 bits. Labels must
be lossless single-channel PNGs: colour-coded labels are rejected with a
message saying so. Every problem raises `DataError` with a one-line message
naming the file and the fix.
"""

import dataclasses
import os

import numpy as np
from PIL import Image

from jaxda import types
from jaxda.data import errors
from jaxda.data.readers import common

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
LABEL_EXTENSION = '.png'
SPLITS = ('train', 'val')


@dataclasses.dataclass(frozen=True)
class FolderData:
  """One split of a folder data set.

  Attributes:
    images: uint8 (N, H, W, 3) RGB.
    labels: uint8 (N, H, W) class ids (255 = ignore), or None if unlabelled.
    class_names: tuple of C names; class id i is class_names[i].
    stems: tuple of N file stems, in the (sorted) order of the arrays.
  """
  images: np.ndarray
  labels: np.ndarray | None
  class_names: tuple[str, ...]
  stems: tuple[str, ...]


def read_class_names(data_dir):
  """Reads `data_dir/classes.txt` (one name per line) into a tuple."""
  path = os.path.join(data_dir, 'classes.txt')
  if not os.path.isfile(path):
    raise errors.DataError(
        f'missing class list {path}: create it with one class name per line '
        '(line i names class id i)')
  with open(path, encoding='utf-8') as f:
    names = tuple(line.strip() for line in f.read().splitlines())
  # Trailing blank lines are harmless; blank lines in the middle would shift
  # every later class id, so they are an error.
  while names and not names[-1]:
    names = names[:-1]
  if not names:
    raise errors.DataError(f'class list {path} is empty: write one class '
                           'name per line')
  if '' in names:
    raise errors.DataError(
        f'class list {path} has a blank line at line '
        f'{names.index("") + 1}: remove it (line i names class id i)')
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise errors.DataError(f'class list {path} repeats names {dup}: class '
                           'names must be unique')
  if len(names) >= types.IGNORE_LABEL:
    raise errors.DataError(
        f'class list {path} has {len(names)} classes: at most '
        f'{types.IGNORE_LABEL} fit in uint8 labels with '
        f'{types.IGNORE_LABEL} = ignore')
  return names


def _list_stems(directory, extensions):
  """Maps stem -> file name for files in `directory` with `extensions`."""
  found = {}
  for name in sorted(os.listdir(directory)):
    stem, ext = os.path.splitext(name)
    if ext.lower() in extensions and os.path.isfile(
        os.path.join(directory, name)):
      if stem in found:
        raise errors.DataError(
            f'two files with stem {stem!r} in {directory} ({found[stem]}, '
            f'{name}): keep one')
      found[stem] = name
  return found


def _open(path, what):
  return common.open_image(path, what, fix='re-export or remove it')


def _read_image(path):
  """Reads an image as uint8 (H, W, 3) RGB, converting gray/RGBA/palette."""
  img = _open(path, 'image')
  if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    # 16-bit grayscale: scale to 8 bits before replicating channels.
    arr = np.asarray(img).astype(np.float64)
    arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    return np.repeat(arr[..., None], 3, axis=-1)
  if img.mode != 'RGB':
    img = img.convert('RGB')
  return np.asarray(img, dtype=np.uint8)


def _read_label(path, num_classes):
  """Reads a class-id PNG as uint8 (H, W) and checks its values."""
  img = _open(path, 'label')
  if img.mode not in ('L', 'P', 'I', 'I;16', 'I;16B', 'I;16L'):
    raise errors.DataError(
        f'label {path} has mode {img.mode}; labels must be single-channel '
        'PNGs of class ids (mode L or P), not colour images: map colours to '
        'ids first')
  # For mode P, np.asarray gives palette indices, which are the class ids.
  arr = np.asarray(img)
  values = np.unique(arr)
  bad = values[((values >= num_classes) & (values != types.IGNORE_LABEL)) |
               (values < 0)]
  if bad.size:
    shown = ', '.join(str(int(v)) for v in bad[:10])
    more = f' and {bad.size - 10} more' if bad.size > 10 else ''
    raise errors.DataError(
        f'label {path} has values {shown}{more} outside [0, {num_classes}) '
        f'(classes.txt lists {num_classes} classes; {types.IGNORE_LABEL} = '
        'ignore): fix the label or classes.txt')
  return arr.astype(np.uint8)


def _resize(arr, height, width, resample):
  if arr.shape[:2] == (height, width):
    return arr
  return np.asarray(Image.fromarray(arr).resize((width, height), resample))


def read_folder(data_dir, split, *, require_labels, height=None, width=None,
                num_images=None):
  """Reads one split of a folder data set (layout in the module docstring).

  Args:
    data_dir: root directory holding classes.txt and the split folders.
    split: 'train' or 'val' (any sub-directory name is accepted).
    require_labels: if True, a missing labels/ folder is an error; if False
      and labels/ is absent, `labels` is None. If labels/ exists, every image
      needs a label either way.
    height: output height H; images are resized bicubically and labels by
      nearest neighbour. None keeps the native size (all images must then
      have the same size).
    width: output width W; must be given together with `height`.
    num_images: if given, only the first `num_images` files in sorted stem
      order are read.

  Returns:
    FolderData with images uint8 (N, H, W, 3), labels uint8 (N, H, W) or
    None, class names and stems.

  Raises:
    DataError: on any missing, malformed or inconsistent file.
  """
  if (height is None) != (width is None):
    raise ValueError('give both height and width, or neither')
  if not os.path.isdir(data_dir):
    raise errors.DataError(
        f'data directory {data_dir} does not exist: create it with '
        'classes.txt and <split>/images, <split>/labels folders')
  class_names = read_class_names(data_dir)
  split_dir = os.path.join(data_dir, split)
  image_dir = os.path.join(split_dir, 'images')
  label_dir = os.path.join(split_dir, 'labels')
  if not os.path.isdir(image_dir):
    raise errors.DataError(
        f'missing image folder {image_dir}: put the {split!r} images there '
        f'(or choose another split; found {sorted(os.listdir(data_dir))})')
  image_files = _list_stems(image_dir, IMAGE_EXTENSIONS)
  if not image_files:
    raise errors.DataError(
        f'no images found in {image_dir}: add {"/".join(IMAGE_EXTENSIONS)} '
        'files')
  stems = sorted(image_files)
  if num_images is not None:
    if num_images < 1 or num_images > len(stems):
      raise errors.DataError(
          f'asked for {num_images} images but {image_dir} holds '
          f'{len(stems)}: lower num_images')
    stems = stems[:num_images]

  label_files = None
  if os.path.isdir(label_dir):
    label_files = _list_stems(label_dir, (LABEL_EXTENSION,))
    orphans = sorted(set(label_files) - set(image_files))
    if orphans:
      raise errors.DataError(
          f'label {os.path.join(label_dir, label_files[orphans[0]])} has no '
          f'image in {image_dir} ({len(orphans)} such labels): add the image '
          'or remove the label')
    missing = [s for s in stems if s not in label_files]
    if missing:
      raise errors.DataError(
          f'image {os.path.join(image_dir, image_files[missing[0]])} has no '
          f'label {os.path.join(label_dir, missing[0] + LABEL_EXTENSION)} '
          f'({len(missing)} images lack labels): add the label PNGs or '
          'remove the images')
  elif require_labels:
    raise errors.DataError(
        f'missing label folder {label_dir}: labels are required for this '
        f'split; add class-id PNGs named like the images in {image_dir}')

  images, labels = [], []
  first_path = None
  for stem in stems:
    image_path = os.path.join(image_dir, image_files[stem])
    image = _read_image(image_path)
    if label_files is not None:
      label_path = os.path.join(label_dir, label_files[stem])
      label = _read_label(label_path, len(class_names))
      if label.shape != image.shape[:2]:
        raise errors.DataError(
            f'label {label_path} is {label.shape[1]}x{label.shape[0]} (WxH) '
            f'but image {image_path} is {image.shape[1]}x{image.shape[0]}: '
            'labels must match their image pixel for pixel')
    if height is not None:
      image = _resize(image, height, width, Image.BICUBIC)
      if label_files is not None:
        label = _resize(label, height, width, Image.NEAREST)
    elif first_path is None:
      first_path = image_path
    elif image.shape != images[0].shape:
      raise errors.DataError(
          f'image {image_path} is {image.shape[1]}x{image.shape[0]} (WxH) '
          f'but {first_path} is {images[0].shape[1]}x{images[0].shape[0]}: '
          'pass height and width to resize all images to one size')
    images.append(image)
    if label_files is not None:
      labels.append(label)
  return FolderData(
      images=np.stack(images),
      labels=np.stack(labels) if label_files is not None else None,
      class_names=class_names,
      stems=tuple(stems))


def export_folder(out_dir, split, images, labels, class_names, *,
                  stems=None):
  """Writes arrays in the folder layout read by `read_folder`.

  Writes `out_dir/classes.txt` (or checks that an existing one matches),
  `out_dir/split/images/STEM.png` and, if `labels` is given,
  `out_dir/split/labels/STEM.png`.

  Args:
    out_dir: root directory (created if missing).
    split: split folder name, e.g. 'train' or 'val'.
    images: uint8 (N, H, W, 3) RGB.
    labels: uint8 (N, H, W) class ids in [0, C) or 255, or None.
    class_names: sequence of C class names.
    stems: optional N file stems; default '00000', '00001', ...

  Returns:
    The split directory that was written.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f'images must be uint8 (N, H, W, 3), got '
                     f'{images.dtype} {images.shape}')
  class_names = tuple(str(c) for c in class_names)
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != images.shape[:3]:
      raise ValueError(f'labels shape {labels.shape} does not match images '
                       f'{images.shape[:3]}')
    bad = np.unique(labels[(labels >= len(class_names)) &
                           (labels != types.IGNORE_LABEL)])
    if bad.size or labels.min(initial=0) < 0:
      raise ValueError(f'labels hold values {bad[:10].tolist()} outside '
                       f'[0, {len(class_names)}) and != '
                       f'{types.IGNORE_LABEL}')
    labels = labels.astype(np.uint8)
  if stems is None:
    stems = [f'{i:05d}' for i in range(len(images))]
  if len(stems) != len(images) or len(set(stems)) != len(stems):
    raise ValueError('stems must be unique and one per image')

  os.makedirs(out_dir, exist_ok=True)
  classes_path = os.path.join(out_dir, 'classes.txt')
  if os.path.exists(classes_path):
    existing = read_class_names(out_dir)
    if existing != class_names:
      raise errors.DataError(
          f'{classes_path} lists {list(existing)} but the data has classes '
          f'{list(class_names)}: export to an empty directory')
  else:
    with open(classes_path, 'w', encoding='utf-8') as f:
      f.write(''.join(name + '\n' for name in class_names))
  split_dir = os.path.join(out_dir, split)
  os.makedirs(os.path.join(split_dir, 'images'), exist_ok=True)
  if labels is not None:
    os.makedirs(os.path.join(split_dir, 'labels'), exist_ok=True)
  for i, stem in enumerate(stems):
    Image.fromarray(images[i]).save(
        os.path.join(split_dir, 'images', stem + '.png'))
    if labels is not None:
      Image.fromarray(labels[i]).save(
          os.path.join(split_dir, 'labels', stem + LABEL_EXTENSION))
  return split_dir
