"""Training augmentation at paper scale: random scale and crop; normalisation.

What the originals did (METHODS.md §3.7):

* AdaptSegNet / ADVENT: no augmentation. AdaptSegNet's `--random-mirror`
  and `--random-scale` flags exist but its data sets never read them: they
  did nothing. Faithful presets keep `scale_min = scale_max = 1`, no crop,
  `flip=False`.
* CRST: random scale 0.5-1.5 in steps of 0.1, random mirror, 512x1024
  (H x W) crops. CBST: scale 0.7-1.3, crops of 500.

Mirroring is `pipeline.train_batches(flip=True)` (`config.data.flip`); this
module adds scale and crop as a wrapper around any batch stream, drawing
every example's scale and crop offset from a generator keyed by (seed,
step), so a resumed run sees the same crops. It works on the normalised
float images: padding with 0 is then padding with the mean colour (CRST pads
images with the mean and labels with ignore).

Normalisation must match the weights a backbone starts from
(`NORMALIZATION_FOR_WEIGHTS`): the Caffe-converted DeepLab-v2 weights
(AdaptSegNet, ADVENT) expect BGR minus the Caffe mean, unscaled;
torchvision ImageNet weights expect RGB in [0, 1] standardised with the
ImageNet mean / std.
"""

import numpy as np
from PIL import Image

from jaxda import types

# Init weights -> `pipeline.normalize` mode.
NORMALIZATION_FOR_WEIGHTS = {
    'caffe_deeplab': 'caffe_bgr',  # DeepLab_resnet_pretrained_init (Caffe).
    'caffe_vgg16': 'caffe_bgr',  # Caffe VGG-16 (AdaptSegNet VGG variant).
    'torchvision': 'imagenet',  # torchvision ResNet-50/101, VGG-16.
    'scratch': 'unit',  # Random init (the CPU benchmarks).
}
_SALT = 0x7363616C  # Keeps scale/crop draws apart from order and flips.


def normalization_for(weights):
  """The normalisation mode the given init weights expect.

  Args:
    weights: a key of `NORMALIZATION_FOR_WEIGHTS`.

  Returns:
    'caffe_bgr', 'imagenet' or 'unit'.
  """
  try:
    return NORMALIZATION_FOR_WEIGHTS[weights]
  except KeyError:
    raise ValueError(f'unknown weights {weights!r}; use one of '
                     f'{sorted(NORMALIZATION_FOR_WEIGHTS)}') from None


def is_active(scale_min, scale_max, crop_size):
  """True if scale or crop would change a batch."""
  return (scale_min, scale_max) != (1.0, 1.0) or bool(crop_size)


def draw_scales(rng, n, scale_min, scale_max, scale_step):
  """n scale factors: uniform in [min, max], or on a grid of `scale_step`."""
  if scale_step > 0:
    grid = np.arange(scale_min, scale_max + scale_step / 2, scale_step)
    return grid[rng.integers(0, len(grid), n)]
  return rng.uniform(scale_min, scale_max, n)


def _resize_float(x, size):
  """float32 (H, W, C) -> (h, w, C), bilinear (PIL mode 'F' per channel)."""
  chans = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c]),
                                      mode='F').resize(
                                          (size[1], size[0]),
                                          Image.Resampling.BILINEAR))
           for c in range(x.shape[-1])]
  return np.stack(chans, axis=-1)


def _resize_nearest(x, size):
  """(H, W, ...) -> (h, w, ...) nearest neighbour (PIL's pixel centres)."""
  h, w = x.shape[:2]
  rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(int),
                    h - 1)
  cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(int),
                    w - 1)
  return x[rows][:, cols]


def scale_crop_example(arrays, scale, crop_size, offset_u, fill):
  """Scales one example's spatial arrays and crops them to `crop_size`.

  Args:
    arrays: dict name -> (H, W, ...) array; 'image' (float, bilinear), the
      rest nearest neighbour.
    scale: scale factor s; the example is resized to round(s H) x round(s W).
    crop_size: (h, w) output size.
    offset_u: two uniforms in [0, 1) picking the crop's top-left corner.
    fill: dict name -> value padded in where the scaled example is smaller
      than the crop (image 0 = mean colour, labels 255).

  Returns:
    dict name -> (h, w, ...) arrays.
  """
  h0, w0 = next(iter(arrays.values())).shape[:2]
  size = (max(1, int(round(h0 * scale))), max(1, int(round(w0 * scale))))
  out = {}
  ch, cw = crop_size
  pad_h, pad_w = max(ch, size[0]), max(cw, size[1])
  top = int(offset_u[0] * (pad_h - ch + 1))
  left = int(offset_u[1] * (pad_w - cw + 1))
  for name, x in arrays.items():
    if size != (h0, w0):
      x = (_resize_float(x.astype(np.float32), size) if name == 'image'
           else _resize_nearest(x, size))
    padded = np.full((pad_h, pad_w) + x.shape[2:], fill[name], x.dtype)
    padded[:size[0], :size[1]] = x
    out[name] = padded[top:top + ch, left:left + cw]
  return out


def scale_crop_batches(batches, *, seed, start_step=0, scale_min=1.0,
                       scale_max=1.0, scale_step=0.0, crop_size=None):
  """Wraps a batch stream with random scale and crop (module docstring).

  Args:
    batches: iterator of dicts with 'image' float32 (B, H, W, 3) and
      optionally 'label' (B, H, W) and other per-example arrays; those whose
      shape[1:3] is (H, W) are transformed like the label (nearest,
      padded with `types.IGNORE_LABEL` if integer, else 0), the rest pass
      through. Images are resized bilinearly by Pillow (which low-pass
      filters when it shrinks; CRST's cv2.resize does not).
    seed: non-negative int.
    start_step: the step of the first batch (for resumed runs).
    scale_min: smallest scale factor.
    scale_max: largest scale factor.
    scale_step: grid spacing of the factors (CRST 0.1); 0 = continuous.
    crop_size: (h, w) output size; None keeps (H, W).

  Yields:
    the same dicts with spatial arrays of shape (B, h, w, ...).
  """
  step = start_step
  for batch in batches:
    image = batch['image']
    n, height, width = image.shape[:3]
    crop = (height, width) if not crop_size else tuple(crop_size)
    rng = np.random.default_rng([seed, _SALT, step])
    scales = draw_scales(rng, n, scale_min, scale_max, scale_step)
    offsets = rng.random((n, 2))
    spatial = [k for k, v in batch.items()
               if isinstance(v, np.ndarray) and v.ndim >= 3
               and v.shape[1:3] == (height, width)]
    fill = {k: (types.IGNORE_LABEL
                if k != 'image' and batch[k].dtype.kind in 'iu' else 0)
            for k in spatial}
    outs = [scale_crop_example({k: batch[k][i] for k in spatial}, scales[i],
                               crop, offsets[i], fill) for i in range(n)]
    new = dict(batch)
    for k in spatial:
      new[k] = np.stack([o[k] for o in outs])
    yield new
    step += 1


def from_config(batches, config, *, seed, start_step=0):
  """`scale_crop_batches` with the `config.data` options, or `batches`.

  Reads `config.data.scale_min`, `scale_max`, `scale_step`, `crop_height`,
  `crop_width` (absent fields: no augmentation, so configs without them keep
  their behaviour).
  """
  data = config.data
  scale_min = float(data.get('scale_min', 1.0))
  scale_max = float(data.get('scale_max', 1.0))
  crop = (int(data.get('crop_height', 0)), int(data.get('crop_width', 0)))
  crop = crop if all(crop) else None
  if not is_active(scale_min, scale_max, crop):
    return batches
  if not 0 < scale_min <= scale_max:
    raise ValueError(f'need 0 < scale_min <= scale_max, got {scale_min}, '
                     f'{scale_max}')
  return scale_crop_batches(
      batches, seed=seed, start_step=start_step, scale_min=scale_min,
      scale_max=scale_max, scale_step=float(data.get('scale_step', 0.0)),
      crop_size=crop)
