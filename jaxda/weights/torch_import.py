"""PyTorch state dicts -> jaxda Flax `params` / `batch_stats` trees.

METHODS.md §3.1 asks for an importer from the originals' state-dict names to
the Flax tree, because every released DeepLab init and AdaptSegNet / ADVENT
model is a PyTorch file, and a source-only run far below 36.6 mIoU usually
means the weights were not loaded. The conversion is pure NumPy; only
`load_torch_file` touches PyTorch (the optional extra `torch`), lazily.

Supported architectures (`ARCHS`) and their state-dict names:

* ``deeplabv2_r101`` / ``deeplabv2_r50`` / ``deeplabv2_tiny`` ->
  `jaxda.models.DeepLabV2`: AdaptSegNet / ADVENT `ResNetMulti` (`conv1`,
  `bn1`, `layerX.Y.convZ`, `layerX.Y.bnZ`, `layerX.Y.downsample.{0,1}`,
  `layer5` aux and `layer6` main `conv2d_list.i`). A file with `layer5` but
  no `layer6` is AdaptSegNet's single-level `deeplab.py`, whose `layer5` is
  the main head. The number of classes, the width and whether there is an
  aux head are read from the tensors.
* ``resnet101`` / ``resnet50`` / ``resnet_tiny``: the backbone alone
  (`conv1`, `bn1`, `layer1-4`), placed under `backbone/` of `DeepLabV2`;
  loads partially into a segmenter (`config.model.init_weights`). Heads in
  the file (`fc`, the DeepLab init's 21-class `layer5`) must be dropped
  explicitly (`drop_prefixes`), as the originals skip `layer5` for 19
  classes. Not for torchvision ResNets: their stride sits on the 3×3 conv
  (v1.5), the names fit but the geometry does not.
* ``vgg16`` -> `jaxda.models.VGG16`: torchvision `vgg16()` (`features.N`,
  `classifier.{0,3,6}`). Without `classifier` (dropped) the target is the
  convs under `backbone/` alone, which also initialise `DeepLabV2VGG`
  (AdaptSegNet's VGG init).
* ``deeplabv2_vgg16`` -> `jaxda.models.DeepLabV2VGG`: AdaptSegNet's
  `DeeplabVGG` (`features.{0..27}` without the pools, `features.29/31` =
  fc6/fc7, `classifier.conv2d_list.i`).
* ``fc_discriminator`` -> `jaxda.models.FCDiscriminator` (`conv1-4`,
  `classifier`).

Layout changes: conv weights OIHW -> HWIO, Linear (out, in) -> (in, out)
(VGG fc6 rows also from PyTorch's (C, H, W) flatten order to channels-last
(H, W, C)), BN `weight` -> `scale`, `running_mean` / `running_var` ->
`batch_stats` `mean` / `var`, `num_batches_tracked` ignored. Leading
`module.` (DataParallel) and `Scale.` (the DeepLab Caffe init) are stripped.
Every tensor must land on a leaf and every leaf must be filled, else
`WeightImportError` lists the names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.models import deeplab
from jaxda.models import discriminator
from jaxda.models import vgg

# Prefixes that wrappers add in front of every name.
WRAPPER_PREFIXES = ('module.', 'Scale.')

# Bottleneck blocks per layer of the ResNet archs (the `_tiny` ones match
# `jaxda.models`' 'deeplabv2_tiny', for tests and smoke runs).
_RESNET_STAGES = {
    'deeplabv2_r101': (3, 4, 23, 3), 'deeplabv2_r50': (3, 4, 6, 3),
    'deeplabv2_tiny': (1, 1, 1, 1), 'resnet101': (3, 4, 23, 3),
    'resnet50': (3, 4, 6, 3), 'resnet_tiny': (1, 1, 1, 1)}
ARCHS = (*_RESNET_STAGES, 'vgg16', 'deeplabv2_vgg16', 'fc_discriminator')

# torchvision `vgg16().features` indices of the 13 convs, and the same convs
# in AdaptSegNet's DeeplabVGG (pool4 removed shifts conv5 down by one).
_TV_VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_DEEPLAB_VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 23, 25, 27)

# How many names an error message lists before summarising.
_MAX_LISTED = 25


class WeightImportError(ValueError):
  """A state dict does not fit the requested jaxda architecture."""


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Removes leading `module.` / `Scale.` wrappers from every name.

  Args:
    state_dict: {name: array}.

  Returns:
    {stripped name: array}.

  Raises:
    WeightImportError: two names collide after stripping.
  """
  out = {}
  for name, value in state_dict.items():
    short = name
    while short.startswith(WRAPPER_PREFIXES):
      short = short.split('.', 1)[1]
    if short in out:
      raise WeightImportError(
          f'{name!r} and another tensor both become {short!r} after'
          f' stripping {WRAPPER_PREFIXES}')
    out[short] = value
  return out


def _module_rules(arch: str, names: Iterable[str]
                  ) -> list[tuple[str, str]]:
  """(regex, replacement) pairs mapping a PyTorch module path to a Flax one.

  The first matching rule wins; a module path no rule matches is unmatched.
  """
  names = list(names)
  if arch in _RESNET_STAGES:
    rules = [(r'^(conv1|bn1)$', r'backbone/\1'),
             (r'^(layer[1-4])\.(\d+)\.(conv\d|bn\d)$', r'backbone/\1/\2/\3'),
             (r'^(layer[1-4])\.(\d+)\.downsample\.0$',
              r'backbone/\1/\2/downsample_conv'),
             (r'^(layer[1-4])\.(\d+)\.downsample\.1$',
              r'backbone/\1/\2/downsample_bn')]
    if arch.startswith('deeplabv2'):
      has_layer6 = any(n.startswith('layer6.') for n in names)
      # AdaptSegNet's single-level deeplab.py names its only head layer5.
      layer5 = 'aspp_aux' if has_layer6 else 'aspp_main'
      rules += [(r'^layer5\.conv2d_list\.(\d+)$', layer5 + r'/branch_\1'),
                (r'^layer6\.conv2d_list\.(\d+)$', r'aspp_main/branch_\1')]
    return rules
  if arch == 'vgg16':
    rules = [(rf'^features\.{i}$', f'backbone/{conv}')
             for i, conv in zip(_TV_VGG_CONVS, vgg.CONV_NAMES)]
    return rules + [(r'^classifier\.0$', 'fc6'), (r'^classifier\.3$', 'fc7'),
                    (r'^classifier\.6$', 'fc8')]
  if arch == 'deeplabv2_vgg16':
    rules = [(rf'^features\.{i}$', f'backbone/{conv}')
             for i, conv in zip(_DEEPLAB_VGG_CONVS, vgg.CONV_NAMES)]
    return rules + [(r'^features\.29$', 'backbone/fc6'),
                    (r'^features\.31$', 'backbone/fc7'),
                    (r'^classifier\.conv2d_list\.(\d+)$',
                     r'aspp_main/branch_\1')]
  if arch == 'fc_discriminator':
    return [(r'^(conv[1-4]|classifier)$', r'\1')]
  raise WeightImportError(f'unknown arch {arch!r}; known: {ARCHS}')


def _flax_module_path(module: str, rules: Sequence[tuple[str, str]]
                      ) -> str | None:
  for pattern, replacement in rules:
    if re.match(pattern, module):
      return re.sub(pattern, replacement, module)
  return None


# --------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """PyTorch conv weight (O, I, kh, kw) -> Flax kernel (kh, kw, I, O)."""
  return np.transpose(weight, (2, 3, 1, 0))


def dense_kernel(weight: np.ndarray,
                 chw: tuple[int, int, int] | None = None) -> np.ndarray:
  """PyTorch Linear weight (O, I) -> Flax kernel (I, O).

  Args:
    weight: (O, I) weight.
    chw: if the layer reads a flattened (C, H, W) map (torchvision's
      `torch.flatten(x, 1)` of NCHW), its shape; the rows are reordered to
      the channels-last (H, W, C) flatten order.

  Returns:
    (I, O) kernel.
  """
  if chw is None:
    return weight.T
  c, h, w = chw
  out = weight.shape[0]
  return weight.reshape(out, c, h, w).transpose(2, 3, 1, 0).reshape(
      h * w * c, out)


def _leaf(module_path: str, param: str, value: np.ndarray, arch: str
          ) -> tuple[str, str, np.ndarray] | None:
  """(collection, Flax path, converted array), or None for unknown names."""
  if param == 'weight':
    if value.ndim == 4:
      return 'params', module_path + '/kernel', conv_kernel(value)
    if value.ndim == 2:
      chw = None
      if arch == 'vgg16' and module_path == 'fc6' and value.shape[1] % 49 == 0:
        # fc6 reads the 7×7 adaptive-pooled map (other widths fail the
        # shape check with the tensor's name).
        chw = (value.shape[1] // 49, 7, 7)
      return 'params', module_path + '/kernel', dense_kernel(value, chw)
    if value.ndim == 1:  # BatchNorm affine weight.
      return 'params', module_path + '/scale', value
    return None
  if param == 'bias':
    return 'params', module_path + '/bias', value
  if param == 'running_mean':
    return 'batch_stats', module_path + '/mean', value
  if param == 'running_var':
    return 'batch_stats', module_path + '/var', value
  return None


# --------------------------------------------------------------------------
# Target trees
# --------------------------------------------------------------------------


def _first(state_dict: Mapping[str, np.ndarray], *names: str) -> np.ndarray:
  for name in names:
    if name in state_dict:
      return np.asarray(state_dict[name])
  raise WeightImportError(
      f'cannot infer the architecture size: none of {names} in the state'
      f' dict (first names: {sorted(state_dict)[:5]})')


def _backbone_only(arch: str, names: Iterable[str]) -> bool:
  """Whether the target is only the `backbone/` subtree.

  True for the `resnet*` archs and for `vgg16` without its classifier
  (ImageNet convs for `DeepLabV2VGG`).
  """
  if arch.startswith('resnet'):
    return True
  return arch == 'vgg16' and not any(n.startswith('classifier.')
                                     for n in names)


def build_model(arch: str, state_dict: Mapping[str, np.ndarray]):
  """The jaxda module a converted `state_dict` of `arch` belongs to.

  Sizes the architecture name does not fix (width, number of classes, VGG
  hidden width, aux head present) are read from the tensors.

  Args:
    arch: one of `ARCHS`.
    state_dict: stripped {name: array}.

  Returns:
    `(module, input_channels)`: an unbound Flax module and the channels its
    input has (3 for images, C for the discriminator).
  """
  if arch not in ARCHS:
    raise WeightImportError(f'unknown arch {arch!r}; known: {ARCHS}')
  if arch == 'fc_discriminator':
    w = _first(state_dict, 'conv1.weight')
    return discriminator.FCDiscriminator(ndf=w.shape[0]), w.shape[1]
  if arch == 'vgg16':
    base_width = _first(state_dict, 'features.0.weight').shape[0]
    if _backbone_only(arch, state_dict):
      return vgg.VGG16(num_classes=1, base_width=base_width, hidden_dim=1), 3
    return vgg.VGG16(
        num_classes=_first(state_dict, 'classifier.6.weight').shape[0],
        base_width=base_width,
        hidden_dim=_first(state_dict, 'classifier.0.weight').shape[0]), 3
  if arch == 'deeplabv2_vgg16':
    return vgg.DeepLabV2VGG(
        num_classes=_first(state_dict,
                           'classifier.conv2d_list.0.weight').shape[0],
        base_width=_first(state_dict, 'features.0.weight').shape[0]), 3
  stages = _RESNET_STAGES[arch]
  base_width = _first(state_dict, 'conv1.weight').shape[0]
  if arch.startswith('resnet'):
    # The backbone of a segmenter; its head is not part of the target.
    return deeplab.DeepLabV2(num_classes=1, stage_sizes=stages,
                             base_width=base_width, multi_level=False), 3
  main = 'layer6' if any(n.startswith('layer6.') for n in state_dict) else (
      'layer5')
  return deeplab.DeepLabV2(
      num_classes=_first(state_dict,
                         f'{main}.conv2d_list.0.weight').shape[0],
      stage_sizes=stages, base_width=base_width,
      multi_level=main == 'layer6' and any(
          n.startswith('layer5.') for n in state_dict)), 3


def expected_shapes(arch: str, state_dict: Mapping[str, np.ndarray]
                    ) -> dict[tuple[str, str], tuple[int, ...]]:
  """{(collection, 'a/b/leaf'): shape} of the jaxda variables to fill."""
  model, channels = build_model(arch, state_dict)
  # Parameter shapes do not depend on the spatial size (the VGG classifier
  # pools adaptively to 7×7), so a small input keeps tracing cheap.
  x = jax.ShapeDtypeStruct((1, 64, 64, channels), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  backbone_only = _backbone_only(arch, state_dict)
  shapes = {}
  for collection, tree in variables.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      name = '/'.join(str(k.key) for k in path)
      if backbone_only and not name.startswith('backbone/'):
        continue
      shapes[(collection, name)] = tuple(leaf.shape)
  return shapes


# --------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------


def _listing(names: Sequence[str]) -> str:
  shown = ', '.join(names[:_MAX_LISTED])
  more = len(names) - _MAX_LISTED
  return shown + (f', ... ({more} more)' if more > 0 else '')


def _to_nested(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def convert_state_dict(state_dict: Mapping[str, Any], arch: str, *,
                       drop_prefixes: Sequence[str] = ()
                       ) -> dict[str, dict[str, Any]]:
  """Converts a PyTorch state dict to jaxda variables.

  Args:
    state_dict: {name: array-like}; wrapper prefixes are stripped first.
    arch: one of `ARCHS`.
    drop_prefixes: module prefixes (after stripping) whose tensors are
      discarded on purpose, e.g. ('layer5',) for the DeepLab init's 21-class
      head or ('fc',) / ('classifier',) for an ImageNet classifier.

  Returns:
    {'params': nested dict, 'batch_stats': nested dict} of float32 NumPy
    arrays with the jaxda model's paths (`batch_stats` is empty for models
    without BatchNorm).

  Raises:
    WeightImportError: unknown arch, a tensor no leaf takes, a leaf no tensor
      fills, or a shape mismatch; the message lists every offending name.
  """
  state_dict = strip_prefixes(state_dict)
  drop = tuple(p.rstrip('.') for p in drop_prefixes)
  kept = {n: np.asarray(v) for n, v in state_dict.items()
          if not any(n == p or n.startswith(p + '.') for p in drop)}
  expected = expected_shapes(arch, kept)
  rules = _module_rules(arch, kept)
  converted: dict[tuple[str, str], np.ndarray] = {}
  sources: dict[tuple[str, str], str] = {}
  unmatched, mismatched = [], []
  for name, value in kept.items():
    module, _, param = name.rpartition('.')
    if param == 'num_batches_tracked':
      continue
    path = _flax_module_path(module, rules)
    leaf = _leaf(path, param, value, arch) if path is not None else None
    if leaf is None or (leaf[0], leaf[1]) not in expected:
      unmatched.append(f'{name} {tuple(value.shape)}')
      continue
    collection, flax_path, array = leaf
    want = expected[(collection, flax_path)]
    if array.shape != want:
      mismatched.append(
          f'{name}: PyTorch shape {tuple(value.shape)} -> {array.shape}, but'
          f' jaxda {collection} {flax_path!r} has shape {want}')
      continue
    converted[(collection, flax_path)] = array.astype(np.float32)
    sources[(collection, flax_path)] = name
  # Params first: they say more about what is missing than BN statistics.
  missing = [f'{c}/{p}' for c, p in sorted(expected, key=lambda k: (
      k[0] != 'params', k)) if (c, p) not in converted]
  problems = []
  if mismatched:
    problems.append(f'{len(mismatched)} shape mismatches: '
                    + '; '.join(mismatched[:_MAX_LISTED]))
  if unmatched:
    problems.append(
        f'{len(unmatched)} tensors match no jaxda {arch} leaf (pass'
        f' drop_prefixes / --drop for heads you do not want): '
        + _listing(sorted(unmatched)))
  if missing:
    problems.append(f'{len(missing)} jaxda {arch} leaves have no tensor: '
                    + _listing(missing))
  if problems:
    raise WeightImportError(f'state dict does not fit arch {arch!r}: '
                            + ' | '.join(problems))
  out = {'params': {}, 'batch_stats': {}}
  for collection in out:
    out[collection] = _to_nested(
        {p: v for (c, p), v in converted.items() if c == collection})
  return out


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def load_torch_file(path: str) -> dict[str, np.ndarray]:
  """Reads a state dict from a PyTorch file or an `.npz`.

  PyTorch files are read with `torch.load(weights_only=True)` (no pickled
  code runs); a checkpoint dict holding the weights under 'state_dict' or
  'model' is unwrapped.

  Args:
    path: `.pth` / `.pt` / `.bin` file, or `.npz` with one array per name.

  Returns:
    {name: NumPy array}; floating tensors as float32.

  Raises:
    WeightImportError: missing file, PyTorch not installed, or no tensors.
  """
  if not os.path.isfile(path):
    raise WeightImportError(f'weights file {path} does not exist')
  if path.endswith('.npz'):
    with np.load(path) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WeightImportError(
        f'reading the PyTorch file {path} needs PyTorch: pip install'
        ' "jaxda[torch]" (or save the state dict as .npz with'
        ' numpy.savez where PyTorch is installed)') from None
  obj = torch.load(path, map_location='cpu', weights_only=True)
  for key in ('state_dict', 'model'):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise WeightImportError(
        f'{path} holds a {type(obj).__name__}, not a state dict')
  out = {}
  for name, tensor in obj.items():
    if isinstance(tensor, torch.Tensor):
      tensor = tensor.detach().cpu()
      if tensor.is_floating_point():
        tensor = tensor.float()
      out[name] = tensor.numpy()
  if not out:
    raise WeightImportError(f'{path} holds no tensors')
  return out


def file_sha256(path: str) -> str:
  """Hex SHA-256 of a file (weights provenance)."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def save_converted(weights: Mapping[str, Any], out_dir: str,
                   provenance: Mapping[str, Any]) -> str:
  """Writes converted variables as an Orbax checkpoint (step 0).

  The layout is a run's: `OUT/checkpoints/0/`, which
  `jaxda.checkpoint.load_weights` reads, so `config.model.init_weights` (and,
  for a complete segmenter, `config.model.init_checkpoint`) can point at
  OUT. `OUT/import_info.json` records the provenance.

  Args:
    weights: {'params': tree, 'batch_stats': tree}.
    out_dir: output directory (created; must not hold a checkpoint yet).
    provenance: JSON-serialisable facts (source file, hash, arch, ...).

  Returns:
    The checkpoint directory.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(os.path.abspath(out_dir), 'checkpoints')
  if os.path.isdir(directory) and os.listdir(directory):
    raise WeightImportError(f'{directory} already holds a checkpoint; choose'
                            ' an empty --out')
  tree = {'params': weights['params']}
  if weights.get('batch_stats'):
    tree['batch_stats'] = weights['batch_stats']
  with ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=True)) as mgr:
    mgr.save(0, args=ocp.args.StandardSave(tree))
    mgr.wait_until_finished()
  with open(os.path.join(out_dir, 'import_info.json'), 'w',
            encoding='utf-8') as f:
    json.dump(dict(provenance), f, indent=2, sort_keys=True)
  return directory


# --------------------------------------------------------------------------
# Partial initialisation
# --------------------------------------------------------------------------


def overlay(target: Any, loaded: Any, what: str, source: str
            ) -> tuple[Any, list[str]]:
  """Replaces the leaves of `target` that `loaded` has; keeps the others.

  Used for `config.model.init_weights`: a converted backbone fills the
  segmenter's backbone while its heads keep their random init, as in the
  originals (which skip the init file's `layer5`).

  Args:
    target: the initialised tree (e.g. `state.params`), jax arrays.
    loaded: a nested dict of arrays with a subset of `target`'s paths.
    what: collection name for messages ('params' / 'batch_stats').
    source: where `loaded` came from, for messages.

  Returns:
    `(tree, kept)`: `target`'s structure with the loaded values (same dtype
    and sharding as the leaves they replace), and the paths that kept their
    initial value.

  Raises:
    WeightImportError: `loaded` has a path `target` lacks, or a shape
      differs.
  """
  def flat(tree):
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

  t_flat = jax.tree_util.tree_flatten_with_path(target)[0]
  l_flat = flat(loaded)
  t_names = ['/'.join(str(getattr(k, 'key', k)) for k in path)
             for path, _ in t_flat]
  extra = sorted(set(l_flat) - set(t_names))
  if extra:
    raise WeightImportError(
        f'{source}: {len(extra)} {what} leaves are not in the configured'
        f' model (wrong --arch or config.model.*): {_listing(extra)}')
  out, kept, bad = [], [], []
  for name, (_, leaf) in zip(t_names, t_flat):
    if name not in l_flat:
      kept.append(name)
      out.append(leaf)
      continue
    value = np.asarray(l_flat[name])
    if value.shape != leaf.shape:
      bad.append(f'{name}: file {value.shape}, model {leaf.shape}')
      continue
    out.append(jax.device_put(value.astype(leaf.dtype), leaf.sharding))
  if bad:
    raise WeightImportError(
        f'{source}: {what} shape mismatches (check config.model.* and the'
        f' number of classes): ' + '; '.join(bad[:_MAX_LISTED]))
  return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(target), out), kept
