"""Pseudo-labelling for CBST / CRST / TPLD, as pure functions.

Everything here maps softmax probabilities to pseudo-labels; no model calls,
no Flax, no I/O. Layout is channels-last: probabilities (B, H, W, C), label
maps (B, H, W) int32 with 255 (`ignore_index`) for "no pseudo-label",
class-wise thresholds λ (C,).

Contents (METHODS.md §6, §7):

* CBST/CRST class-wise thresholds λ_k (§6.3), in two forms:
  - exact, host-side NumPy (`class_confidences`, `thresholds_from_confidences`,
    `class_thresholds`): memory O(number of subsampled pixels);
  - streaming (`init_threshold_histogram`, `update_threshold_histogram`,
    `thresholds_from_histogram`): a (C, num_bins) int32 count array updated
    batch by batch on device, memory O(C × bins), summable across batches and
    devices; λ agrees with the exact form to within one bin.
* Hard selection `select` (§6.1) and CRST-LRENT soft labels
  `lrent_soft_labels` (§6.2); the portion schedule `target_portion`.
* TPLD phase 1 voting densification `densify` (§7.2): one vectorised
  `lax.reduce_window` over (B, H, W, C) per iteration.
* TPLD phase 2 image confidence, easy/hard split and easy-image labels
  (§7.3): `image_confidence`, `easy_hard_split`, `easy_image_labels`.
* Diagnostics: `label_density`, `label_precision`.

TPLD has no official code: the voting and confidence semantics follow the
parametrised reconstruction of METHODS.md §7 (every open choice is an
argument).
"""

import functools
import math
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255

# Default number of histogram bins per class. In logit space the bins are
# (logit(1 - 2**-24) + log(C - 1)) / 2048 ≈ 0.0095 wide for C = 19, i.e.
# ≈ 0.0024 in p at p = 0.5, ≈ 1e-6 at p = 0.9999, and finer than float32's
# own resolution above p ≈ 1 - 6e-6 (see `threshold_histogram_edges`).
DEFAULT_NUM_BINS = 2048

# Largest float32 below 1 is 1 - 2**-24: its logit is the top of the binned
# range. p == 1.0 (saturated softmax) lands in the top bin as well.
_TOP_LOGIT = math.log1p(-2.0**-24) - math.log(2.0**-24)

_POOLINGS = ("sum", "mean", "max", "count")
_COMBINES = ("convex", "additive")


# ---------------------------------------------------------------------------
# CBST / CRST class-wise thresholds: exact (NumPy) form
# ---------------------------------------------------------------------------


def _check_portion(portion: float) -> float:
  portion = float(portion)
  if not 0.0 <= portion <= 1.0:
    raise ValueError(f"portion must be in [0, 1], got {portion}")
  return portion


def class_confidences(
    probs,
    *,
    subsample: int = 4,
    kc_value: str = "conf",
    valid=None,
) -> List[np.ndarray]:
  """Per-class confidence lists used to pick λ_k (CRST `val`, METHODS §6.3).

  Per image: pred = argmax p, conf = max p (float32). For each class c, the
  confidences of the pixels predicted as c, in row-major order, keeping every
  `subsample`-th value starting at index 0 (`v[0::subsample]`, per image per
  class, as in CRST). With `kc_value='prob'`: p[..., c] over all pixels,
  subsampled the same way.

  Args:
    probs: (B, H, W, C) softmax probabilities (NumPy or JAX array).
    subsample: stride of the per-image, per-class subsampling (CRST DS_RATE
      = 4; 1 keeps everything).
    kc_value: 'conf' (default) or 'prob'.
    valid: optional (B, H, W) bool; False pixels (e.g. padding) are dropped
      before the subsampling, so a right/bottom-padded image gives the same
      lists as the unpadded one.

  Returns:
    List of C float32 1-D arrays (images concatenated in batch order).
  """
  if subsample < 1:
    raise ValueError(f"subsample must be >= 1, got {subsample}")
  if kc_value not in ("conf", "prob"):
    raise ValueError(f"unknown kc_value {kc_value!r}")
  probs = np.asarray(probs, np.float32)
  num_classes = probs.shape[-1]
  chunks = [[] for _ in range(num_classes)]
  for b in range(probs.shape[0]):
    p = probs[b].reshape(-1, num_classes)
    if valid is not None:
      p = p[np.asarray(valid[b], bool).reshape(-1)]
    if kc_value == "conf":
      pred = p.argmax(axis=-1)
      conf = p.max(axis=-1)
      for c in range(num_classes):
        chunks[c].append(conf[pred == c][0::subsample])
    else:
      for c in range(num_classes):
        chunks[c].append(p[:, c][0::subsample])
  return [np.concatenate(ch) if ch else np.zeros(0, np.float32)
          for ch in chunks]


def thresholds_from_confidences(
    conf_lists: Sequence[np.ndarray],
    portion: float,
    *,
    mxnet_leading_zero: bool = False,
) -> np.ndarray:
  """λ_k from per-class confidence lists (CRST `kc_parameters`, policy 'cb').

  Sorted descending, n_sel = floor(len × portion); λ_k = sorted[n_sel - 1]
  (the n_sel-th largest) if n_sel > 0, else 1.0 (also for classes never
  predicted). `np.partition` finds the same order statistic in O(len).

  Args:
    conf_lists: C 1-D arrays (from `class_confidences`, possibly concatenated
      over many batches).
    portion: target portion p in [0, 1].
    mxnet_leading_zero: CBST MXNet quirk (METHODS §6.3.4): every non-empty
      list gets an extra 0.0 and thresholds equal to 0 become 1.0.

  Returns:
    (C,) float32 thresholds.
  """
  portion = _check_portion(portion)
  thr = np.ones(len(conf_lists), np.float32)
  for c, vals in enumerate(conf_lists):
    vals = np.asarray(vals, np.float32).reshape(-1)
    if vals.size == 0:
      continue
    if mxnet_leading_zero:
      vals = np.concatenate([np.zeros(1, np.float32), vals])
    # Python float product, as in CRST (`math.floor(len * portion)`).
    n_sel = int(math.floor(vals.size * portion))
    if n_sel > 0:
      # The n_sel-th largest is the (size - n_sel)-th smallest.
      kth = vals.size - n_sel
      thr[c] = np.partition(vals, kth)[kth]
  if mxnet_leading_zero:
    thr[thr == 0] = 1.0
  return thr


def class_thresholds(
    probs,
    portion: float,
    *,
    subsample: int = 4,
    kc_value: str = "conf",
    mxnet_leading_zero: bool = False,
    valid=None,
) -> np.ndarray:
  """Exact CBST/CRST class-wise thresholds λ_k (METHODS §6.3), host-side.

  `thresholds_from_confidences(class_confidences(probs, ...), portion)`. The
  exact oracle for the streaming histogram form. For data that does not fit
  in one array, call `class_confidences` per batch, concatenate per class and
  call `thresholds_from_confidences`.

  Args:
    probs: (B, H, W, C) softmax probabilities.
    portion: target portion p in [0, 1] (see `target_portion`).
    subsample: per-image, per-class subsampling stride (CRST: 4).
    kc_value: 'conf' (default) or 'prob'.
    mxnet_leading_zero: CBST MXNet quirk (default False: CRST semantics).
    valid: optional (B, H, W) bool mask of pixels to use.

  Returns:
    (C,) float32 thresholds; 1.0 for classes never predicted or n_sel = 0.
  """
  lists = class_confidences(probs, subsample=subsample, kc_value=kc_value,
                            valid=valid)
  return thresholds_from_confidences(
      lists, portion, mxnet_leading_zero=mxnet_leading_zero)


# ---------------------------------------------------------------------------
# CBST / CRST class-wise thresholds: streaming histogram form
# ---------------------------------------------------------------------------


def _logit_range(num_classes: int, num_bins: int):
  """(lowest logit, bin width) of the histogram layout."""
  if num_classes < 2:
    raise ValueError(f"need at least 2 classes, got {num_classes}")
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}")
  # max_c p_c >= 1/C, and logit(1/C) = -log(C - 1).
  low = -math.log(num_classes - 1)
  return low, (_TOP_LOGIT - low) / num_bins


def threshold_histogram_edges(num_classes: int,
                              num_bins: int = DEFAULT_NUM_BINS) -> np.ndarray:
  """Bin edges of the threshold histogram in probability space.

  Bins are uniform in logit space z = log(p / (1 - p)) between logit(1/C)
  (the smallest possible argmax confidence) and logit(1 - 2**-24) (the
  largest float32 below 1): equal-width bins in p would waste resolution at
  low confidences and lump together the p > 0.999 values where the
  thresholds of a trained network usually lie. Bin j holds confidences in
  [edges[j], edges[j + 1]); values below edges[0] are counted in bin 0 and
  values >= edges[-1] (including p == 1) in the top bin.

  Args:
    num_classes: C >= 2.
    num_bins: bins per class.

  Returns:
    (num_bins + 1,) float64 increasing edges, edges[0] = 1/C.
  """
  low, width = _logit_range(num_classes, num_bins)
  z = low + width * np.arange(num_bins + 1, dtype=np.float64)
  return 1.0 / (1.0 + np.exp(-z))


def init_threshold_histogram(num_classes: int,
                             num_bins: int = DEFAULT_NUM_BINS) -> jax.Array:
  """Empty streaming-threshold histogram.

  The histogram is a plain (C, num_bins) int32 count array, so histograms of
  different batches, hosts or devices combine by addition (`h1 + h2`,
  `jax.lax.psum`). Its layout (`threshold_histogram_edges`) is a function of
  its shape only. Counts are int32: each class may hold at most 2**31 - 1
  subsampled pixels (e.g. ~4000 Cityscapes-size maps of one class at
  subsample 4).

  Args:
    num_classes: C >= 2.
    num_bins: bins per class (`DEFAULT_NUM_BINS`).

  Returns:
    (C, num_bins) int32 zeros.
  """
  _logit_range(num_classes, num_bins)  # validates the arguments
  return jnp.zeros((num_classes, num_bins), jnp.int32)


def _confidence_bins(conf: jax.Array, num_classes: int,
                     num_bins: int) -> jax.Array:
  """int32 bin index (same shape as `conf`) of argmax confidences."""
  low, width = _logit_range(num_classes, num_bins)
  conf = conf.astype(jnp.float32)
  p = jnp.clip(conf, 1.0 / num_classes, 1.0)
  # logit via log1p: 1 - p is exact for p >= 0.5 (Sterbenz), so values a few
  # float32 ulps below 1 still get distinct, accurate logits. p == 1 -> +inf.
  z = jnp.log(p) - jnp.log1p(-p)
  idx = jnp.floor((z - low) / width)
  return jnp.clip(idx, 0, num_bins - 1).astype(jnp.int32)


def _subsample_mask(pred: jax.Array, valid: jax.Array, num_classes: int,
                    subsample: int) -> jax.Array:
  """(B, N) bool: every `subsample`-th valid pixel of each class per image.

  The rank of a pixel among the valid pixels of its predicted class (in
  row-major order) is a running count; one class at a time keeps the
  transient memory at O(B × N) instead of O(B × N × C) for a one-hot cumsum.
  """
  if subsample == 1:
    return valid

  def body(c, keep):
    is_c = (pred == c) & valid
    rank = jnp.cumsum(is_c.astype(jnp.int32), axis=1) - 1
    return keep | (is_c & (rank % subsample == 0))

  return jax.lax.fori_loop(0, num_classes, body, jnp.zeros_like(valid))


@functools.partial(jax.jit, static_argnames=("subsample",))
def update_threshold_histogram(
    hist: jax.Array,
    probs: jax.Array,
    *,
    subsample: int = 4,
    valid: Optional[jax.Array] = None,
) -> jax.Array:
  """Adds one batch of argmax confidences to the threshold histogram.

  Same selection as `class_confidences(kc_value='conf')`: per image, per
  predicted class, every `subsample`-th valid pixel in row-major order.
  Jitted; runs on device; the result is `hist` plus this batch's counts, so
  it can also be called with a zero histogram per shard and summed.

  Args:
    hist: (C, num_bins) int32 counts (`init_threshold_histogram`).
    probs: (B, H, W, C) softmax probabilities.
    subsample: per-image, per-class subsampling stride (static).
    valid: optional (B, H, W) bool mask of pixels to count.

  Returns:
    (C, num_bins) int32 updated counts.
  """
  num_classes, num_bins = hist.shape
  if probs.shape[-1] != num_classes:
    raise ValueError(
        f"probs has {probs.shape[-1]} classes, histogram {num_classes}")
  if subsample < 1:
    raise ValueError(f"subsample must be >= 1, got {subsample}")
  batch = probs.shape[0]
  flat = probs.reshape(batch, -1, num_classes)
  pred = jnp.argmax(flat, axis=-1).astype(jnp.int32)
  conf = jnp.max(flat, axis=-1)
  if valid is None:
    valid = jnp.ones(pred.shape, bool)
  else:
    valid = valid.reshape(pred.shape).astype(bool)
  keep = _subsample_mask(pred, valid, num_classes, subsample)
  flat_index = pred * num_bins + _confidence_bins(conf, num_classes, num_bins)
  counts = jnp.zeros(num_classes * num_bins, jnp.int32).at[
      flat_index.reshape(-1)].add(keep.reshape(-1).astype(jnp.int32))
  return hist + counts.reshape(num_classes, num_bins)


def thresholds_from_histogram(
    hist,
    portion: float,
    *,
    mxnet_leading_zero: bool = False,
) -> np.ndarray:
  """λ_k from a streaming histogram (host-side, on a (C, bins) array).

  Mirrors `thresholds_from_confidences`: n_sel = floor(count × portion) per
  class; λ_k is the lower edge of the bin holding the n_sel-th largest
  confidence, so λ_hist <= λ_exact and both lie in the same bin (up to
  float32 rounding of values on a bin edge). Taking the lower edge keeps at
  least the requested portion when the thresholds are used in `select`.
  n_sel = 0 and never-predicted classes give 1.0, as in the exact form.
  Computed in NumPy int64 / float64 so that n_sel is exact for any count.

  Args:
    hist: (C, num_bins) counts (JAX or NumPy), e.g. summed over devices.
    portion: target portion p in [0, 1].
    mxnet_leading_zero: CBST MXNet quirk, as in `thresholds_from_confidences`.

  Returns:
    (C,) float32 thresholds.
  """
  portion = _check_portion(portion)
  counts = np.asarray(hist).astype(np.int64)
  num_classes, num_bins = counts.shape
  edges = threshold_histogram_edges(num_classes, num_bins)
  # at_least[c, j] = number of confidences of class c in bins >= j.
  at_least = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]
  thr = np.ones(num_classes, np.float32)
  for c in range(num_classes):
    total = int(at_least[c, 0])
    if total == 0:
      continue
    length = total + 1 if mxnet_leading_zero else total
    n_sel = int(math.floor(length * portion))
    if n_sel == 0 or n_sel > total:
      # n_sel > total only with the leading zero: λ = 0, reset to 1.0.
      continue
    # The n_sel-th largest lies in the highest bin j with at_least >= n_sel.
    j = int(np.nonzero(at_least[c] >= n_sel)[0][-1])
    thr[c] = edges[j]
  return thr


# ---------------------------------------------------------------------------
# Selection and CRST soft labels
# ---------------------------------------------------------------------------


def _ratios(probs: jax.Array, thresholds: jax.Array) -> jax.Array:
  """r = p / λ in the promoted floating dtype (float32 unless x64 inputs)."""
  probs = jnp.asarray(probs)
  thresholds = jnp.asarray(thresholds)
  dtype = jnp.promote_types(jnp.result_type(probs, thresholds), jnp.float32)
  return probs.astype(dtype) / thresholds.astype(dtype)


def select(
    probs: jax.Array,
    thresholds: jax.Array,
    ignore_index: int = IGNORE_INDEX,
    inclusive: bool = True,
) -> jax.Array:
  """Hard CBST pseudo-labels (METHODS §6.1, CRST `label_selection`).

  label = argmax_k p_k / λ_k (first max on ties); `ignore_index` where
  max_k p_k / λ_k < 1. `inclusive=True` keeps pixels with p / λ == 1 exactly
  (CODE-QUIRK §6.1, option `select_inclusive`; the pixel that defines λ_k is
  then selected); False requires p / λ > 1 (the paper's p > λ). In float32,
  p / λ >= 1 holds exactly when p >= λ (division is correctly rounded).

  Args:
    probs: (B, H, W, C) probabilities.
    thresholds: (C,) λ.
    ignore_index: label of unselected pixels.
    inclusive: keep ties at p / λ == 1.

  Returns:
    (B, H, W) int32 labels.
  """
  r = _ratios(probs, thresholds)
  label = jnp.argmax(r, axis=-1).astype(jnp.int32)
  best = jnp.max(r, axis=-1)
  keep = best >= 1 if inclusive else best > 1
  return jnp.where(keep, label, ignore_index).astype(jnp.int32)


def lrent_soft_labels(
    probs: jax.Array,
    thresholds: jax.Array,
    alpha: float = 0.25,
):
  """CRST-LRENT soft pseudo-labels (METHODS §6.2).

  soft_k ∝ (p_k / λ_k)^(1/α), normalised over k (computed as a softmax of
  (log p - log λ) / α, which cannot underflow for small α). A pixel is kept
  iff Σ_k [-soft_k log(p_k + ε) + α soft_k log(soft_k + ε)] <
  Σ_k [-soft_k log(λ_k + ε)], ε = 1e-32. The target is `soft` where kept and
  the all-zero vector elsewhere (CRST `SoftGTA5StMineDataSet`); the hard
  label of a kept pixel is argmax soft = argmax p / λ.

  Args:
    probs: (B, H, W, C) probabilities.
    thresholds: (C,) λ.
    alpha: LRENT α (CRST lrent.sh: 0.25).

  Returns:
    (targets (B, H, W, C) float, keep (B, H, W) bool).
  """
  probs = jnp.asarray(probs)
  dtype = jnp.promote_types(probs.dtype, jnp.float32)
  p = probs.astype(dtype)
  lam = jnp.asarray(thresholds).astype(dtype)
  eps = 1e-32
  soft = jax.nn.softmax((jnp.log(p) - jnp.log(lam)) / alpha, axis=-1)
  reg = jnp.sum(-soft * jnp.log(p + eps)
                + alpha * soft * jnp.log(soft + eps), axis=-1)
  sel = jnp.sum(-soft * jnp.log(lam + eps), axis=-1)
  keep = reg < sel
  return soft * keep[..., None].astype(dtype), keep


def target_portion(round_index: int,
                   init: float = 0.2,
                   step: float = 0.05,
                   max_portion: float = 0.5) -> float:
  """Target portion of self-training round `round_index` (METHODS §6.3.5).

  min(init + round_index × step, max_portion); CRST: 0.2 / 0.05 / 0.5 (CBST
  GTA5 starts at 0.15).
  """
  return min(init + step * round_index, max_portion)


# ---------------------------------------------------------------------------
# TPLD phase 1: voting densification
# ---------------------------------------------------------------------------


def _top_classes(r: jax.Array,
                 top_k: int) -> tuple[list[jax.Array], list[jax.Array]]:
  """Candidate classes of every pixel and their ratios, best first.

  Ties in r go to the lower class index. For small k, k argmax/max passes
  (earlier picks masked out with -inf, which never beats an r >= 0) are
  ~5x faster than `lax.top_k` on CPU, and `max` gives each candidate's r
  without a gather; `lax.top_k` has the same documented tie order and
  serves larger k.

  Args:
    r: (B, H, W, C) ratios p / λ.
    top_k: number of candidates, 1 <= top_k <= C.

  Returns:
    (classes, ratios): two lists of `top_k` (B, H, W) arrays, int32 class
    ids and r at those classes, in candidate rank order.
  """
  if top_k > 4:
    values, picks = jax.lax.top_k(r, top_k)
    picks = picks.astype(jnp.int32)
    return ([picks[..., j] for j in range(top_k)],
            [values[..., j] for j in range(top_k)])
  class_ids = jnp.arange(r.shape[-1], dtype=jnp.int32)
  classes, ratios = [], []
  masked = r
  for j in range(top_k):
    pick = jnp.argmax(masked, axis=-1).astype(jnp.int32)
    classes.append(pick)
    ratios.append(jnp.max(masked, axis=-1))
    if j + 1 < top_k:
      masked = jnp.where(class_ids == pick[..., None], -jnp.inf, masked)
  return classes, ratios


_DENSIFY_IMPLS = ("auto", "reduce_window", "shifted")


def _pool_planes(votes: jax.Array, window: int, pooling: str) -> jax.Array:
  """Zero-padded window × window pool of (B, C, H, W) class planes.

  Sum and max are separable, so two 1-D `reduce_window`s (along W, then H)
  replace one 2-D window, which XLA:CPU runs ~5x slower than a 1-D pass.
  Class planes before H, W (instead of channels-last) make every window
  run along contiguous rows of one plane; on CPU building V, both passes
  and the candidate reads are each ~1.3-2x faster in this layout.

  Args:
    votes: (B, C, H, W) votes V (>= 0).
    window: odd window side.
    pooling: 'max' takes maxima; every other pooling sums.

  Returns:
    (B, C, H, W) pooled votes (not yet divided by window²).
  """
  if window == 1:
    return votes
  half = window // 2
  zero = jnp.zeros((), votes.dtype)
  # V >= 0, so padding with the init value 0 is also right for 'max'.
  reducer = jax.lax.max if pooling == "max" else jax.lax.add
  for axis in (3, 2):
    dims = [1, 1, 1, 1]
    dims[axis] = window
    pad = [(0, 0)] * 4
    pad[axis] = (half, half)
    votes = jax.lax.reduce_window(votes, zero, reducer, tuple(dims),
                                  (1, 1, 1, 1), tuple(pad))
  return votes


def _pool_candidates(current: jax.Array, value: jax.Array,
                     candidates: list[jax.Array], window: int,
                     pooling: str) -> list[jax.Array]:
  """Window pool of the votes for each pixel's candidate classes only.

  P_k at a pixel is the pool over its window of V_k, and V_k at a
  neighbour is non-zero only if that neighbour is labelled k. So for a
  candidate k of the centre pixel, P_k = Σ (or max) over the window's
  offsets of [label(neighbour) == k] · value(neighbour). That reads two
  (B, H, W) maps per offset instead of pooling all C class planes: window² ·
  top_k compare-selects per pixel against ~2·window·C for the separable
  class-plane pool, and no (B, C, H, W) temporary. The offsets unroll into
  one elementwise XLA fusion over shifted slices of the padded maps.

  Args:
    current: (B, H, W) int32 labels (anything outside [0, C) never votes).
    value: (B, H, W) the vote each labelled pixel casts (r at its label;
      ignored for 'count').
    candidates: `top_k` (B, H, W) int32 candidate classes.
    window: odd window side.
    pooling: 'max' takes maxima; 'count' counts matches; else sums values.

  Returns:
    `top_k` (B, H, W) pooled votes (not yet divided by window²).
  """
  half = window // 2
  height, width = current.shape[1:]
  pad = ((0, 0), (half, half), (half, half))
  # -1 is no class: padding never matches a candidate (zero padding).
  padded_labels = jnp.pad(current, pad, constant_values=-1)
  padded_values = jnp.pad(value, pad)
  zero = jnp.zeros((), value.dtype)
  pooled = [None] * len(candidates)
  for dy in range(window):
    for dx in range(window):
      lab = padded_labels[:, dy:dy + height, dx:dx + width]
      val = padded_values[:, dy:dy + height, dx:dx + width]
      for j, k in enumerate(candidates):
        match = lab == k
        if pooling == "count":
          vote = match.astype(value.dtype)
        else:
          vote = jnp.where(match, val, zero)
        if pooled[j] is None:
          pooled[j] = vote
        elif pooling == "max":
          pooled[j] = jnp.maximum(pooled[j], vote)
        else:
          pooled[j] = pooled[j] + vote
  return pooled


# Reads of one class per pixel are 1-D gathers with an int32 flat index
# computed inline: `take_along_axis` materialises a (..., 4) int32 index
# array per read (4 MB at 2×256×512×19), which costs ~10% of the kernel and
# 8 MB of its temporary memory. Flat indices need fewer than
# `_FLAT_INDEX_LIMIT` elements; larger arrays fall back to
# `take_along_axis`. Indices come from argmax / clip: `promise_in_bounds`.
_FLAT_INDEX_LIMIT = 2**31


def _read_channel(x: jax.Array, classes: jax.Array) -> jax.Array:
  """x[b, h, w, classes[b, h, w]]: (B, H, W, C), (B, H, W) -> (B, H, W)."""
  if x.size >= _FLAT_INDEX_LIMIT:
    return jnp.take_along_axis(x, classes[..., None], axis=-1,
                               mode="promise_in_bounds")[..., 0]
  pixel = jnp.arange(classes.size, dtype=jnp.int32).reshape(classes.shape)
  return x.reshape(-1).at[pixel * x.shape[-1] + classes].get(
      mode="promise_in_bounds")


def _read_planes(planes: jax.Array, classes: jax.Array) -> jax.Array:
  """planes[b, classes[b, h, w], h, w]: (B, C, H, W), (B, H, W) -> (B, H, W)."""
  if planes.size >= _FLAT_INDEX_LIMIT:
    return jnp.take_along_axis(planes, classes[:, None], axis=1,
                               mode="promise_in_bounds")[:, 0]
  batch, num_classes, height, width = planes.shape
  plane = (jnp.arange(batch, dtype=jnp.int32)[:, None, None] * num_classes
           + classes)
  pixel = jnp.arange(height * width, dtype=jnp.int32).reshape(height, width)
  return planes.reshape(-1).at[plane * (height * width) + pixel].get(
      mode="promise_in_bounds")


@functools.partial(
    jax.jit,
    static_argnames=("window", "num_iters", "pooling", "combine", "top_k",
                     "ignore_index", "impl"))
def densify(
    probs: jax.Array,
    labels: jax.Array,
    thresholds: jax.Array,
    *,
    window: int = 3,
    alpha: float = 0.7,
    num_iters: int = 3,
    pooling: str = "sum",
    combine: str = "convex",
    top_k: int = 2,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "auto",
) -> jax.Array:
  """TPLD sliding-window voting densification (METHODS §7.2).

  r = p / λ. Each iteration (Jacobi: reads the previous iteration's labels):

  * V_k = r_k where the pixel is labelled k, else 0 ('count': 1 / 0);
  * P_k = window × window pool of V_k, zero padding: 'sum', 'mean' (sum /
    window², padding counted), 'max', 'count' (sum of indicators / window²);
  * s_k = α r_k + (1 - α) P_k ('convex') or r_k + α P_k ('additive');
  * an unlabelled pixel takes k* = argmax of s over its `top_k` classes by r
    (ties in r -> lower class index; ties in s -> higher-ranked candidate)
    iff s_k* > 1 (strict). Labelled pixels never change.

  One kernel for the whole batch and all classes; the iterations run in a
  `lax.fori_loop`. Loop-invariant work is hoisted: the candidates and their
  r (they depend on r only), and r at each pixel's own label. The loop
  carries two (B, H, W) maps, the labels and that own-label r, so votes are
  built from them without re-reading the (B, H, W, C) ratios. The window
  pool has two implementations (`impl`): 'reduce_window' lays V out as
  (B, C, H, W) class planes, pools them with two 1-D `lax.reduce_window`s
  (`_pool_planes`) and reads back the `top_k` candidate planes
  (`_read_planes`); 'shifted' pools only the candidates' votes, as sums
  over the window's offsets of matching neighbours (`_pool_candidates`),
  ~4x faster on CPU at 3x3 / top 2 / 19 classes because it never touches
  the C - top_k classes no pixel could take. Computes in the dtype of
  p / λ (float64 under x64 with float64 inputs).

  Args:
    probs: (B, H, W, C) probabilities.
    labels: (B, H, W) int initial labels (e.g. `select`), `ignore_index`
      where unlabelled.
    thresholds: (C,) λ.
    window: odd window side (static).
    alpha: α (traced; no recompilation when it changes).
    num_iters: voting iterations (static); 0 returns `labels`.
    pooling: 'sum' | 'mean' | 'max' | 'count' (static).
    combine: 'convex' | 'additive' (static).
    top_k: number of competing classes (static), 1 <= top_k <= C.
    ignore_index: unlabelled marker (static).
    impl: 'reduce_window' (all class planes pooled by two 1-D
      `lax.reduce_window`s), 'shifted' (only the `top_k` candidates'
      votes, summed over the window's offsets: `_pool_candidates`) or
      'auto' (static): 'shifted' when window² · top_k <= 2 · window · C,
      which holds for the defaults (3x3, top 2) at any C >= 3. Both give
      the same labels up to float summation order.

  Returns:
    (B, H, W) int32 densified labels.
  """
  if window < 1 or window % 2 != 1:
    raise ValueError(f"window must be a positive odd integer, got {window}")
  if pooling not in _POOLINGS:
    raise ValueError(f"unknown pooling {pooling!r}")
  if combine not in _COMBINES:
    raise ValueError(f"unknown combine {combine!r}")
  if num_iters < 0:
    raise ValueError(f"num_iters must be >= 0, got {num_iters}")
  num_classes = probs.shape[-1]
  if not 1 <= top_k <= num_classes:
    raise ValueError(f"top_k must be in [1, {num_classes}], got {top_k}")
  if impl not in _DENSIFY_IMPLS:
    raise ValueError(f"impl must be one of {_DENSIFY_IMPLS}, got {impl!r}")
  # 'auto': the candidate-only window when it touches fewer values per
  # pixel than pooling every class plane (two 1-D passes over C planes).
  use_shifts = impl == "shifted" or (
      impl == "auto" and window * window * top_k <= 2 * window * num_classes)
  labels = labels.astype(jnp.int32)
  if num_iters == 0:
    return labels

  r = _ratios(probs, thresholds)
  zero = jnp.zeros((), r.dtype)
  # Candidates depend on r only: computed once, `top_k` (B, H, W) maps each.
  cand_classes, cand_ratios = _top_classes(r, top_k)
  # r at the pixel's own label: the value it votes with. Labels outside
  # [0, C) (e.g. ignore_index) match no class plane in `vote`, so the
  # clipped read is never used for them.
  own = _read_channel(r, jnp.clip(labels, 0, num_classes - 1))
  class_planes = jnp.arange(num_classes, dtype=jnp.int32)[:, None, None]

  def vote(_, state):
    current, value = state
    if use_shifts:
      pooled_cands = _pool_candidates(current, value, cand_classes, window,
                                      pooling)
    else:
      is_k = current[:, None] == class_planes  # (B, C, H, W)
      votes = is_k.astype(r.dtype) if pooling == "count" else jnp.where(
          is_k, value[:, None], zero)
      pooled = _pool_planes(votes, window, pooling)
      pooled_cands = [_read_planes(pooled, k) for k in cand_classes]
    best_class = best_score = best_ratio = None
    for k, r_k, p_k in zip(cand_classes, cand_ratios, pooled_cands):
      if pooling in ("mean", "count"):
        p_k = p_k / (window * window)
      if combine == "convex":
        score = alpha * r_k + (1.0 - alpha) * p_k
      else:
        score = r_k + alpha * p_k
      if best_score is None:
        best_class, best_score, best_ratio = k, score, r_k
      else:
        # Strict: equal scores keep the higher-ranked candidate.
        better = score > best_score
        best_class = jnp.where(better, k, best_class)
        best_ratio = jnp.where(better, r_k, best_ratio)
        best_score = jnp.where(better, score, best_score)
    assign = (current == ignore_index) & (best_score > 1)
    return (jnp.where(assign, best_class, current),
            jnp.where(assign, best_ratio, value))

  return jax.lax.fori_loop(0, num_iters, vote, (labels, own))[0]


# ---------------------------------------------------------------------------
# TPLD phase 2: image confidence, easy/hard split, easy-image labels
# ---------------------------------------------------------------------------


def image_confidence(
    probs: jax.Array,
    thresholds: jax.Array,
    *,
    count_source: str = "argmax",
    strict: bool = True,
    ignore_index: int = IGNORE_INDEX,
    valid: Optional[jax.Array] = None,
) -> jax.Array:
  """TPLD image confidence conf_t (METHODS §7.3, Eq. 6).

  conf_t = (1/K') Σ_{k present} (N_t^{k*} / N_t^k) / λ_k, with N_t^k the
  pixels predicted (argmax p) as k and K' the number of such classes.
  `count_source='argmax'`: N_t^{k*} counts those with p_k > λ_k (`strict`)
  or p_k >= λ_k. `count_source='pseudo'`: N_t^{k*} counts CBST pseudo-labels
  equal to k (`select`, inclusive; `strict` is not used, as in the
  reference). An image without (valid) pixels scores 0.

  Args:
    probs: (B, H, W, C) probabilities.
    thresholds: (C,) λ.
    count_source: 'argmax' or 'pseudo'.
    strict: p > λ (True) or p >= λ (False) for 'argmax'.
    ignore_index: label used for unselected pixels in 'pseudo' mode.
    valid: optional (B, H, W) bool; only valid pixels are counted.

  Returns:
    (B,) float confidences.
  """
  if count_source not in ("argmax", "pseudo"):
    raise ValueError(f"unknown count_source {count_source!r}")
  probs = jnp.asarray(probs)
  thresholds = jnp.asarray(thresholds)
  num_classes = probs.shape[-1]
  dtype = jnp.promote_types(probs.dtype, jnp.float32)
  if valid is None:
    valid = jnp.ones(probs.shape[:-1], bool)
  class_ids = jnp.arange(num_classes)
  pred = jnp.argmax(probs, axis=-1)
  predicted = (pred[..., None] == class_ids) & valid[..., None]
  n_k = jnp.sum(predicted, axis=(1, 2), dtype=jnp.int32)  # (B, C)
  if count_source == "argmax":
    p_pred = jnp.max(probs, axis=-1)
    thr_pred = thresholds[pred]
    confident = p_pred > thr_pred if strict else p_pred >= thr_pred
    n_star = jnp.sum(predicted & confident[..., None], axis=(1, 2),
                     dtype=jnp.int32)
  else:
    pseudo = select(probs, thresholds, ignore_index=ignore_index)
    labelled = (pseudo[..., None] == class_ids) & valid[..., None]
    n_star = jnp.sum(labelled, axis=(1, 2), dtype=jnp.int32)
  present = n_k > 0
  lam = thresholds.astype(dtype)
  ratios = jnp.where(
      present,
      n_star.astype(dtype) / jnp.maximum(n_k, 1).astype(dtype) / lam, 0.0)
  num_present = jnp.sum(present, axis=-1)
  return jnp.where(num_present > 0,
                   jnp.sum(ratios, axis=-1) / jnp.maximum(num_present, 1),
                   0.0).astype(dtype)


def easy_hard_split(confidences: jax.Array, q: float = 0.3) -> jax.Array:
  """Easy-image mask: the top int(N × q) images by confidence (METHODS §7.3).

  Ranking is descending and stable (equal scores: lower index first).

  Args:
    confidences: (N,) image confidences (`image_confidence`).
    q: easy fraction (TPLD: 0.3).

  Returns:
    (N,) bool, True for easy images.
  """
  confidences = jnp.asarray(confidences)
  n = confidences.shape[0]
  n_easy = int(n * q)
  order = jnp.argsort(-confidences, stable=True)
  return jnp.zeros(n, bool).at[order[:n_easy]].set(True)


def easy_image_labels(
    probs: jax.Array,
    thresholds: jax.Array,
    *,
    gamma: float = 2.0,
):
  """Full pseudo-labels of easy images, TPLD Eq. 7 in 'weight' mode.

  Every pixel gets k* = argmax_k p_k / λ_k (first max on ties) with weight 1
  where p_k* >= λ_k* (the pixels `select` keeps) and (p_k* / λ_k*)^γ below,
  which calibrates the low, noisy values further down.

  Args:
    probs: (B, H, W, C) probabilities.
    thresholds: (C,) λ.
    gamma: γ (TPLD: 2).

  Returns:
    (labels (B, H, W) int32, weights (B, H, W) float32).
  """
  r = _ratios(probs, thresholds)
  label = jnp.argmax(r, axis=-1).astype(jnp.int32)
  best = jnp.max(r, axis=-1)
  weight = jnp.where(best >= 1, 1.0, best ** gamma)
  return label, weight.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------


def label_density(labels: jax.Array,
                  ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """Fraction of pixels carrying a pseudo-label.

  Args:
    labels: (B, H, W) int labels.
    ignore_index: unlabelled marker.

  Returns:
    float32 scalar in [0, 1].
  """
  return jnp.mean(jnp.asarray(labels) != ignore_index, dtype=jnp.float32)


def label_precision(labels: jax.Array,
                    ground_truth: jax.Array,
                    ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """Fraction of pseudo-labelled pixels (with valid ground truth) correct.

  Args:
    labels: (B, H, W) int pseudo-labels.
    ground_truth: (B, H, W) int labels, `ignore_index` where unknown.
    ignore_index: marker in both maps.

  Returns:
    float32 scalar; NaN when no pixel is both pseudo-labelled and has
    valid ground truth (undefined precision, so that averaging over images
    with `jnp.nanmean` skips it rather than counting it as 0).
  """
  labels = jnp.asarray(labels)
  ground_truth = jnp.asarray(ground_truth)
  counted = (labels != ignore_index) & (ground_truth != ignore_index)
  correct = counted & (labels == ground_truth)
  num = jnp.sum(counted, dtype=jnp.float32)
  return jnp.where(num > 0, jnp.sum(correct, dtype=jnp.float32) / num,
                   jnp.nan)
