"""CBST / CRST class-wise thresholds and hard / soft pseudo-label selection.

Pure functions (no model calls, no Flax, no I/O), channels-last:
probabilities (B, H, W, C), label maps (B, H, W) int32 with `IGNORE_LABEL`
for "no pseudo-label", class-wise thresholds λ (C,). METHODS.md §6.

* Thresholds λ_k (§6.3) in two forms:
  - exact, host-side NumPy (`class_confidences`, `thresholds_from_confidences`,
    `class_thresholds`): memory O(number of subsampled pixels);
  - streaming (`init_threshold_histogram`, `update_threshold_histogram`,
    `thresholds_from_histogram`): a (C, num_bins) int32 count array updated
    batch by batch on device, memory O(C × bins), summable across batches and
    devices; λ agrees with the exact form to within one bin.
* Hard selection `select` (§6.1), CRST-LRENT soft labels `lrent_soft_labels`
  (§6.2), the portion schedule `target_portion`, and `ratios` (r = p / λ,
  which TPLD's voting and easy-image labels build on).
"""

import functools
import math
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.types import IGNORE_LABEL

# Default number of histogram bins per class. In logit space the bins are
# (logit(1 - 2**-24) + log(C - 1)) / 2048 ≈ 0.0095 wide for C = 19, i.e.
# ≈ 0.0024 in p at p = 0.5, ≈ 1e-6 at p = 0.9999, and finer than float32's
# own resolution above p ≈ 1 - 6e-6 (see `threshold_histogram_edges`).
DEFAULT_NUM_BINS = 2048

# Largest float32 below 1 is 1 - 2**-24: its logit is the top of the binned
# range. p == 1.0 (saturated softmax) lands in the top bin as well.
_TOP_LOGIT = math.log1p(-2.0**-24) - math.log(2.0**-24)


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


def _floor(num_classes: int, floor: Optional[float]) -> float:
  """The smallest binned confidence: 1/C, or `floor` where given (scores
  that are not a softmax, e.g. CBST-SP's prior x softmax, go below 1/C)."""
  if floor is None:
    return 1.0 / num_classes
  if not 0.0 < floor < 1.0:
    raise ValueError(f"floor must be in (0, 1), got {floor}")
  return float(floor)


def _logit_range(num_classes: int, num_bins: int,
                 floor: Optional[float] = None):
  """(lowest logit, bin width) of the histogram layout."""
  if num_classes < 2:
    raise ValueError(f"need at least 2 classes, got {num_classes}")
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}")
  if floor is None:
    # max_c p_c >= 1/C, and logit(1/C) = -log(C - 1).
    low = -math.log(num_classes - 1)
  else:
    low = math.log(_floor(num_classes, floor)) - math.log1p(-floor)
  return low, (_TOP_LOGIT - low) / num_bins


def threshold_histogram_edges(num_classes: int,
                              num_bins: int = DEFAULT_NUM_BINS,
                              floor: Optional[float] = None) -> np.ndarray:
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
    floor: lowest edge instead of 1/C (scores below 1/C: CBST-SP).

  Returns:
    (num_bins + 1,) float64 increasing edges, edges[0] = 1/C (or floor).
  """
  low, width = _logit_range(num_classes, num_bins, floor)
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
                     num_bins: int, floor: Optional[float] = None
                     ) -> jax.Array:
  """int32 bin index (same shape as `conf`) of argmax confidences."""
  low, width = _logit_range(num_classes, num_bins, floor)
  conf = conf.astype(jnp.float32)
  p = jnp.clip(conf, _floor(num_classes, floor), 1.0)
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


@functools.partial(jax.jit, static_argnames=("subsample", "floor"))
def update_threshold_histogram(
    hist: jax.Array,
    probs: jax.Array,
    *,
    subsample: int = 4,
    valid: Optional[jax.Array] = None,
    floor: Optional[float] = None,
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
    floor: histogram layout floor (`threshold_histogram_edges`); the same
      value must reach `thresholds_from_histogram`.

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
  flat_index = pred * num_bins + _confidence_bins(conf, num_classes, num_bins,
                                                  floor)
  counts = jnp.zeros(num_classes * num_bins, jnp.int32).at[
      flat_index.reshape(-1)].add(keep.reshape(-1).astype(jnp.int32))
  return hist + counts.reshape(num_classes, num_bins)


def thresholds_from_histogram(
    hist,
    portion: float,
    *,
    mxnet_leading_zero: bool = False,
    floor: Optional[float] = None,
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
    floor: the layout floor the histogram was filled with.

  Returns:
    (C,) float32 thresholds.
  """
  portion = _check_portion(portion)
  counts = np.asarray(hist).astype(np.int64)
  num_classes, num_bins = counts.shape
  edges = threshold_histogram_edges(num_classes, num_bins, floor)
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


def ratios(probs: jax.Array, thresholds: jax.Array) -> jax.Array:
  """r = p / λ in the promoted floating dtype (float32 unless x64 inputs)."""
  probs = jnp.asarray(probs)
  thresholds = jnp.asarray(thresholds)
  dtype = jnp.promote_types(jnp.result_type(probs, thresholds), jnp.float32)
  return probs.astype(dtype) / thresholds.astype(dtype)


def select(
    probs: jax.Array,
    thresholds: jax.Array,
    ignore_index: int = IGNORE_LABEL,
    inclusive: bool = True,
) -> jax.Array:
  """Hard CBST pseudo-labels (METHODS §6.1, CRST `label_selection`).

  label = argmax_k p_k / λ_k (first max on ties); `ignore_index` where
  max_k p_k / λ_k < 1. `inclusive=True` keeps pixels with p / λ == 1 exactly
  (CODE-QUIRK §6.1, option `select_inclusive`; the pixel that defines λ_k is
  then selected); False requires p / λ > 1 (the paper's p > λ). The keep
  test compares p with λ of the chosen class directly, not p / λ with 1:
  XLA rewrites a division by a broadcast λ as p * (1/λ), which is not
  correctly rounded, and dropped ~15% of the exact ties (found by
  tests/test_loss_properties.py).

  Args:
    probs: (B, H, W, C) probabilities.
    thresholds: (C,) λ.
    ignore_index: label of unselected pixels.
    inclusive: keep ties at p / λ == 1.

  Returns:
    (B, H, W) int32 labels.
  """
  r = ratios(probs, thresholds)
  label = jnp.argmax(r, axis=-1).astype(jnp.int32)
  dtype = r.dtype
  p = jnp.take_along_axis(jnp.asarray(probs).astype(dtype), label[..., None],
                          axis=-1)[..., 0]
  lam = jnp.asarray(thresholds).astype(dtype)[label]
  keep = p >= lam if inclusive else p > lam
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
