"""TPLD phase 1: sliding-window voting densification of pseudo-labels.

`densify` (METHODS.md §7.2) fills unlabelled pixels whose own ratio
r = p / λ plus their neighbours' votes clear 1, in one jitted kernel for
the whole batch and all classes. Pure JAX: no model calls, no Flax, no I/O.
TPLD has no official code: the voting semantics follow the parametrised
reconstruction of METHODS.md §7 (every open choice is an argument).
"""

import functools

import jax
import jax.numpy as jnp

from jaxda.methods.self_training.thresholds import ratios
from jaxda.types import IGNORE_LABEL

_POOLINGS = ("sum", "mean", "max", "count")
_COMBINES = ("convex", "additive")


def _top_classes(r: jax.Array,
                 top_k: int) -> tuple[list[jax.Array], list[jax.Array]]:
  """Candidate classes of every pixel and their ratios, best first.

  Ties in r go to the lower class index. For k <= 4, k argmax/max passes
  (earlier picks masked out with -inf, which never beats an r >= 0): faster
  than `lax.top_k` on CPU, and `max` gives each candidate's r without a
  gather; `lax.top_k` (same documented tie order) serves larger k.

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
  replace one 2-D window, which XLA:CPU runs slower than two 1-D passes.
  Class planes before H, W (instead of channels-last) make every window
  run along contiguous rows of one plane, the faster layout on CPU.

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
# computed inline, because `take_along_axis` would materialise a (..., 4)
# int32 index array per read (time and temporary memory). Flat indices need
# fewer than `_FLAT_INDEX_LIMIT` elements; larger arrays fall back to
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
    ignore_index: int = IGNORE_LABEL,
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
  faster at small windows because it never touches the C - top_k classes
  no pixel could take. Computes in the dtype of
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

  r = ratios(probs, thresholds)
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
