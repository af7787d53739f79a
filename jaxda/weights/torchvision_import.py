"""torchvision ResNet state dicts -> jaxda classifier weights (METHODS.md §9).

The Office recipes (thuml, tllib) start from torchvision's ImageNet
ResNet-50; this maps its state dict (`conv1`, `bn1`, `layerX.Y.convZ`,
`layerX.Y.bnZ`, `layerX.Y.downsample.{0,1}`, `fc`) onto
`jaxda.models.torchvision_resnet.TorchvisionResNet`, the v1.5 geometry
(stride on the 3×3) those weights were trained with.

* With `fc` dropped (`--drop=fc`) the tree sits under `feature_extractor/`,
  the path of `ImageClassifier`'s backbone, so `config.model.init_weights`
  fills G_f and leaves the bottleneck, classifier and discriminators random,
  as the originals do.
* With `fc` kept, the tree is the standalone ImageNet classifier
  (`TorchvisionResNet(num_classes=1000)`), for checking a conversion end to
  end; it does not load into an `ImageClassifier`.

`convert_file` is the CLI's entry point for every arch (others go to
`jaxda.weights.torch_import`): it names the file in every error and refuses
the two confusions the names cannot catch: a torchvision file (an ImageNet
`fc`, no DeepLab head) given a DeepLab/Caffe ResNet arch, whose stride sits
on the 1×1 (the shapes fit, the function does not), and a DeepLab file
given a torchvision arch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.models import torchvision_resnet
from jaxda.weights import mit_import
from jaxda.weights import torch_import

WeightImportError = torch_import.WeightImportError

# arch -> (blocks per stage, base width). The width is fixed by the arch so
# weights of another width are refused with the tensor names.
ARCHS = {'torchvision_resnet50': ((3, 4, 6, 3), 64),
         'torchvision_resnet_tiny': ((1, 1, 1, 1), 8)}
# SegFormer's ImageNet MiT encoder (any of B0..B5 and the tiny test size:
# the geometry is read from the file), for DAFormer / MIC's
# `config.model.init_weights`; it lands under the DAFormer net's `encoder`.
MIT_ARCH = 'mit'
MIT_MODULE = 'encoder'
ALL_ARCHS = (*torch_import.ARCHS, *ARCHS, MIT_ARCH)

# Path of the classifier's backbone in `jaxda.models.ImageClassifier`.
FEATURE_EXTRACTOR = 'feature_extractor'

# DeepLab/Caffe ResNet archs of `torch_import` (stride on the 1×1).
_CAFFE_RESNETS = tuple(a for a in torch_import.ARCHS
                       if a.startswith(('resnet', 'deeplabv2_r')))

_RULES = ((r'^(conv1|bn1|fc)$', r'\1'),
          (r'^(layer[1-4])\.(\d+)\.(conv\d|bn\d)$', r'\1/\2/\3'),
          (r'^(layer[1-4])\.(\d+)\.downsample\.0$', r'\1/\2/downsample_conv'),
          (r'^(layer[1-4])\.(\d+)\.downsample\.1$', r'\1/\2/downsample_bn'))


def looks_torchvision(state_dict: Mapping[str, Any], raw_names=()) -> bool:
  """An ImageNet `fc` (no wrapper `Scale.`, no DeepLab `layer5`/`layer6`)."""
  names = set(state_dict)
  if any(n.startswith('Scale.') for n in raw_names):
    return False
  return 'fc.weight' in names and not any(
      n.startswith(('layer5.', 'layer6.')) for n in names)


def _leaf(path: str, param: str, value: np.ndarray):
  if param == 'weight':
    if value.ndim == 4:
      return 'params', path + '/kernel', torch_import.conv_kernel(value)
    if value.ndim == 2:
      return 'params', path + '/kernel', value.T
    return 'params', path + '/scale', value
  if param == 'bias':
    return 'params', path + '/bias', value
  if param in ('running_mean', 'running_var'):
    return 'batch_stats', path + '/' + param[len('running_'):], value
  return None


def _expected(arch: str, num_classes: int) -> dict[tuple[str, str], tuple]:
  stages, width = ARCHS[arch]
  model = torchvision_resnet.TorchvisionResNet(stages, width, num_classes)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  return {(c, '/'.join(str(k.key) for k in p)): tuple(leaf.shape)
          for c, tree in variables.items()
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def convert_torchvision(state_dict: Mapping[str, Any], arch: str, *,
                        drop_prefixes: Sequence[str] = ()
                        ) -> dict[str, dict[str, Any]]:
  """Converts a torchvision ResNet state dict (see the module docstring).

  Returns:
    {'params': tree, 'batch_stats': tree} of float32 arrays, under
    `feature_extractor/` when `fc` is dropped, standalone otherwise.

  Raises:
    WeightImportError: unknown arch, a DeepLab file, a tensor no leaf takes,
      a leaf no tensor fills, or a shape mismatch (another width or depth).
  """
  if arch not in ARCHS:
    raise WeightImportError(f'unknown torchvision arch {arch!r}; known:'
                            f' {tuple(ARCHS)}')
  raw = list(state_dict)
  state_dict = torch_import.strip_prefixes(state_dict)
  if any(n.startswith('Scale.') for n in raw) or any(
      n.startswith(('layer5.', 'layer6.')) for n in state_dict):
    raise WeightImportError(
        f'this is a DeepLab/Caffe ResNet (Scale. prefix or layer5/layer6'
        f' heads), not torchvision: use --arch=resnet50/resnet101, not {arch}')
  drop = tuple(p.rstrip('.') for p in drop_prefixes)
  kept = {n: np.asarray(v) for n, v in state_dict.items()
          if not any(n == p or n.startswith(p + '.') for p in drop)}
  num_classes = kept['fc.weight'].shape[0] if 'fc.weight' in kept else 0
  expected = _expected(arch, num_classes)
  converted, unmatched, mismatched = {}, [], []
  for name, value in kept.items():
    module, _, param = name.rpartition('.')
    if param == 'num_batches_tracked':
      continue
    path = next((re.sub(p, r, module) for p, r in _RULES
                 if re.match(p, module)), None)
    leaf = _leaf(path, param, value) if path is not None else None
    if leaf is None or leaf[:2] not in expected:
      unmatched.append(f'{name} {tuple(value.shape)}')
      continue
    if leaf[2].shape != expected[leaf[:2]]:
      mismatched.append(f'{name}: {tuple(value.shape)} -> {leaf[2].shape},'
                        f' {arch} needs {expected[leaf[:2]]}')
      continue
    converted[leaf[:2]] = leaf[2].astype(np.float32)
  missing = sorted(f'{c}/{p}' for c, p in expected if (c, p) not in converted)
  problems = []
  if mismatched:
    problems.append(f'{len(mismatched)} shape mismatches (weights of another'
                    ' width or depth?): ' + '; '.join(mismatched[:5]))
  if unmatched:
    problems.append(f'{len(unmatched)} tensors match no {arch} leaf: '
                    + ', '.join(sorted(unmatched)[:5]))
  if missing:
    problems.append(f'{len(missing)} {arch} leaves have no tensor: '
                    + ', '.join(missing[:5]))
  if problems:
    raise WeightImportError(f'state dict does not fit arch {arch!r}: '
                            + ' | '.join(problems))
  prefix = '' if num_classes else FEATURE_EXTRACTOR + '/'
  out = {'params': {}, 'batch_stats': {}}
  for (collection, path), array in converted.items():
    *parents, name = (prefix + path).split('/')
    node = out[collection]
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = array
  return out


def convert_file(path: str, arch: str, drop_prefixes: Sequence[str] = ()
                 ) -> tuple[dict[str, dict[str, Any]], int]:
  """Reads and converts `path` for any arch of `ALL_ARCHS`.

  Returns:
    (weights, number of tensors in the file).

  Raises:
    WeightImportError: one line naming `path` (wrong arch, width, names).
  """
  state_dict = torch_import.load_torch_file(path)
  try:
    if arch == MIT_ARCH:
      try:
        encoder = mit_import.import_mit(
            state_dict, drop_prefixes=('head.', 'decode_head.', 'classifier.',
                                       *drop_prefixes))
      except mit_import.MiTImportError as e:
        raise WeightImportError(
            f'not a MiT encoder in the mmseg or transformers layout: {e}'
        ) from None
      return ({'params': {MIT_MODULE: encoder}, 'batch_stats': {}},
              len(state_dict))
    if arch in ARCHS:
      return convert_torchvision(state_dict, arch,
                                 drop_prefixes=drop_prefixes), len(state_dict)
    if arch in _CAFFE_RESNETS and looks_torchvision(
        torch_import.strip_prefixes(state_dict), state_dict):
      raise WeightImportError(
          f'this is a torchvision ResNet (ImageNet fc, stride on the 3x3);'
          f' --arch={arch} is the DeepLab/Caffe layout: use'
          ' --arch=torchvision_resnet50 --drop=fc (classifiers)')
    return torch_import.convert_state_dict(
        state_dict, arch, drop_prefixes=drop_prefixes), len(state_dict)
  except WeightImportError as e:
    raise WeightImportError(f'{path}: {e}'.replace('\n', ' ')) from None
