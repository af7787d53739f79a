"""MiT (SegFormer encoder) state dicts -> `jaxda.models.mit.MiT` Flax params.

DAFormer, HRDA and MIC start from SegFormer's ImageNet-1k MiT weights
(METHODS.md §17.1), published as PyTorch files in two layouts:

* the original mmseg / SegFormer layout (`mit_b5.pth`): `patch_embed1.proj`,
  `patch_embed1.norm`, `block1.0.norm1`, `block1.0.attn.q`, `attn.kv` (keys
  and values fused), `attn.sr`, `attn.norm`, `attn.proj`, `norm2`,
  `mlp.fc1`, `mlp.dwconv.dwconv`, `mlp.fc2`, `norm1`..`norm4`, and an
  ImageNet classifier `head` (dropped);
* the transformers library's `SegformerModel`, in its checkpoint layout
  (transformers 4: `encoder.patch_embeddings.0.proj`,
  `encoder.block.0.0.layer_norm_1`, `attention.self.query/key/value/sr`,
  `attention.self.layer_norm`, `attention.output.dense`, `mlp.dense1/2`,
  `encoder.layer_norm.0`) and its in-memory layout (transformers 5:
  `stages.0.patch_embeddings`, `blocks.0.layernorm_before/after`,
  `attention.q_proj/k_proj/v_proj/o_proj`, `attention.sequence_reduction`,
  `stages.0.layer_norm`). A `segformer.` prefix is stripped.

Both are first renamed to the mmseg layout (`to_mmseg`), then converted:
conv OIHW -> HWIO (depth-wise (C, 1, 3, 3) -> (3, 3, 1, C)), Linear
(out, in) -> (in, out), LayerNorm weight -> scale. `export_mmseg` is the
inverse, so the importer round-trips. Pure NumPy; nothing here touches torch.

LayerNorm eps is not in a state dict: the original MiT uses 1e-6 in blocks and
stage-end norms (`MiT(ln_eps=1e-6)`, the default), the transformers port 1e-5
everywhere (`ln_eps=1e-5` reproduces its forward to 1e-5).
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

import numpy as np


class MiTImportError(ValueError):
  """A state dict that does not fit the MiT parameter tree."""


# transformers 4 checkpoint names -> mmseg (applied in order).
_HF4 = (
    (r'^encoder\.patch_embeddings\.(\d+)\.proj\.', 'patch_embed{s}.proj.'),
    (r'^encoder\.patch_embeddings\.(\d+)\.layer_norm\.',
     'patch_embed{s}.norm.'),
    (r'^encoder\.layer_norm\.(\d+)\.', 'norm{s}.'),
    (r'^encoder\.block\.(\d+)\.(\d+)\.layer_norm_1\.', 'block{s}.{j}.norm1.'),
    (r'^encoder\.block\.(\d+)\.(\d+)\.layer_norm_2\.', 'block{s}.{j}.norm2.'),
    (r'^encoder\.block\.(\d+)\.(\d+)\.attention\.self\.query\.',
     'block{s}.{j}.attn.q.'),
    (r'^encoder\.block\.(\d+)\.(\d+)\.attention\.self\.key\.',
     'block{s}.{j}.attn.k.'),
    (r'^encoder\.block\.(\d+)\.(\d+)\.attention\.self\.value\.',
     'block{s}.{j}.attn.v.'),
    (r'^encoder\.block\.(\d+)\.(\d+)\.attention\.self\.sr\.',
     'block{s}.{j}.attn.sr.'),
    (r'^encoder\.block\.(\d+)\.(\d+)\.attention\.self\.layer_norm\.',
     'block{s}.{j}.attn.norm.'),
    (r'^encoder\.block\.(\d+)\.(\d+)\.attention\.output\.dense\.',
     'block{s}.{j}.attn.proj.'),
    (r'^encoder\.block\.(\d+)\.(\d+)\.mlp\.dense1\.', 'block{s}.{j}.mlp.fc1.'),
    (r'^encoder\.block\.(\d+)\.(\d+)\.mlp\.dense2\.', 'block{s}.{j}.mlp.fc2.'),
    (r'^encoder\.block\.(\d+)\.(\d+)\.mlp\.dwconv\.dwconv\.',
     'block{s}.{j}.mlp.dwconv.dwconv.'),
)
# transformers 5 in-memory names -> mmseg.
_HF5 = (
    (r'^stages\.(\d+)\.patch_embeddings\.proj\.', 'patch_embed{s}.proj.'),
    (r'^stages\.(\d+)\.patch_embeddings\.layer_norm\.', 'patch_embed{s}.norm.'),
    (r'^stages\.(\d+)\.layer_norm\.', 'norm{s}.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.layernorm_before\.',
     'block{s}.{j}.norm1.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.layernorm_after\.',
     'block{s}.{j}.norm2.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.attention\.q_proj\.',
     'block{s}.{j}.attn.q.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.attention\.k_proj\.',
     'block{s}.{j}.attn.k.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.attention\.v_proj\.',
     'block{s}.{j}.attn.v.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.attention\.o_proj\.',
     'block{s}.{j}.attn.proj.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.attention\.sequence_reduction\.'
     r'sequence_reduction\.', 'block{s}.{j}.attn.sr.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.attention\.sequence_reduction\.'
     r'layer_norm\.', 'block{s}.{j}.attn.norm.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.mlp\.', 'block{s}.{j}.mlp.'),
)


def _rename(name: str) -> str | None:
  for rx, fmt in _HF4 + _HF5:
    m = re.match(rx, name)
    if m:
      g = m.groups()
      new = fmt.format(s=int(g[0]) + 1, j=g[1] if len(g) > 1 else '')
      return new + name[m.end():]
  return None


def to_mmseg(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Any supported layout -> mmseg MiT names (k and v fused into kv).

  Leading `module.`, `backbone.` and `segformer.` prefixes are stripped;
  names already in the mmseg layout are kept.
  """
  out: dict[str, np.ndarray] = {}
  for name, value in state_dict.items():
    arr = np.asarray(value)
    for prefix in ('module.', 'backbone.', 'segformer.'):
      if name.startswith(prefix):
        name = name[len(prefix):]
    new = _rename(name)
    out[new if new is not None else name] = arr
  for name in [n for n in out if re.search(r'\.attn\.k\.(weight|bias)$', n)]:
    v_name = name.replace('.attn.k.', '.attn.v.')
    if v_name not in out:
      raise MiTImportError(f'{name} without {v_name}')
    out[name.replace('.attn.k.', '.attn.kv.')] = np.concatenate(
        [out.pop(name), out.pop(v_name)], axis=0)
  return out


def _linear(p: str):
  return {'kernel': (f'{p}.weight', lambda w: w.T),
          'bias': (f'{p}.bias', lambda b: b)}


def _conv(p: str, bias: bool = True):
  d = {'kernel': (f'{p}.weight', lambda w: np.transpose(w, (2, 3, 1, 0)))}
  if bias:
    d['bias'] = (f'{p}.bias', lambda b: b)
  return d


def _norm(p: str):
  return {'scale': (f'{p}.weight', lambda w: w),
          'bias': (f'{p}.bias', lambda b: b)}


def _mapping(depths: tuple[int, ...], sr_ratios: tuple[int, ...]) -> dict:
  """Flax tree of (mmseg name, PyTorch -> Flax transform) leaves."""
  tree: dict[str, Any] = {}
  for s, depth in enumerate(depths, start=1):
    tree[f'patch_embed{s}_proj'] = _conv(f'patch_embed{s}.proj')
    tree[f'patch_embed{s}_norm'] = _norm(f'patch_embed{s}.norm')
    tree[f'norm{s}'] = _norm(f'norm{s}')
    for j in range(depth):
      p = f'block{s}.{j}'
      attn = {'q': _linear(f'{p}.attn.q'), 'kv': _linear(f'{p}.attn.kv'),
              'proj': _linear(f'{p}.attn.proj')}
      if sr_ratios[s - 1] > 1:
        attn['sr'] = _conv(f'{p}.attn.sr')
        attn['norm'] = _norm(f'{p}.attn.norm')
      tree[f'block{s}_{j}'] = {
          'norm1': _norm(f'{p}.norm1'), 'norm2': _norm(f'{p}.norm2'),
          'attn': attn,
          'mlp': {'fc1': _linear(f'{p}.mlp.fc1'),
                  'fc2': _linear(f'{p}.mlp.fc2'),
                  'dwconv': {'dwconv': _conv(f'{p}.mlp.dwconv.dwconv')}}}
  return tree


def infer_geometry(sd: Mapping[str, np.ndarray]
                   ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(depths, sr_ratios) read from an mmseg-layout state dict."""
  depths, srs = [], []
  s = 1
  while f'patch_embed{s}.proj.weight' in sd:
    blocks = {int(m.group(1)) for n in sd
              if (m := re.match(rf'^block{s}\.(\d+)\.', n))}
    depths.append(len(blocks))
    sr = sd.get(f'block{s}.0.attn.sr.weight')
    srs.append(int(sr.shape[-1]) if sr is not None else 1)
    s += 1
  if not depths:
    raise MiTImportError('no patch_embed1.proj.weight: not a MiT state dict')
  return tuple(depths), tuple(srs)


def import_mit(state_dict: Mapping[str, Any],
               drop_prefixes: tuple[str, ...] = ('head.', 'decode_head.',
                                                 'classifier.')
               ) -> dict[str, Any]:
  """State dict (any supported layout) -> `MiT` params (a nested dict).

  Args:
    state_dict: name -> array (torch tensors: call `.numpy()` first, or pass
      anything `np.asarray` accepts).
    drop_prefixes: names ignored (the ImageNet classifier, decode heads).

  Returns:
    The params tree of `jaxda.models.mit.MiT` (put it under
    `params['encoder']` of a `DAFormer`).

  Raises:
    MiTImportError: a tensor has no place in the tree, a leaf is missing, or
      a shape does not fit.
  """
  sd = {n: v for n, v in to_mmseg(state_dict).items()
        if not n.startswith(drop_prefixes)}
  depths, srs = infer_geometry(sd)
  used: set[str] = set()

  def fill(node):
    if isinstance(node, dict):
      return {k: fill(v) for k, v in node.items()}
    name, fn = node
    if name not in sd:
      raise MiTImportError(f'missing tensor {name}')
    used.add(name)
    arr = fn(np.asarray(sd[name], np.float32))
    return np.ascontiguousarray(arr)

  params = fill(_mapping(depths, srs))
  extra = sorted(set(sd) - used)
  if extra:
    raise MiTImportError(f'unused tensors: {extra[:10]}')
  return params


def export_mmseg(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """`MiT` params -> mmseg-layout state dict (the inverse of `import_mit`)."""
  depths = []
  s = 1
  while f'patch_embed{s}_proj' in params:
    depths.append(sum(1 for k in params if k.startswith(f'block{s}_')))
    s += 1
  srs = tuple(2 if 'sr' in params[f'block{i}_0']['attn'] else 1
              for i in range(1, len(depths) + 1))
  out: dict[str, np.ndarray] = {}

  def walk(tree, node):
    if isinstance(tree, dict):
      for k, v in tree.items():
        walk(v, node[k])
      return
    name, _ = tree
    arr = np.asarray(node, np.float32)
    if name.endswith('.weight') and arr.ndim == 4:
      arr = np.transpose(arr, (3, 2, 0, 1))
    elif name.endswith('.weight') and arr.ndim == 2:
      arr = arr.T
    out[name] = np.ascontiguousarray(arr)

  walk(_mapping(tuple(depths), srs), params)
  return out
