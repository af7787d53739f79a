"""Loss functions of the adaptation methods, as pure JAX functions.

Conventions shared by every function here:

* Class scores are channels-last: logits / probabilities have shape (..., C)
  with any leading dimensions, (B, H, W, C) for segmentation or (B, C) for
  classification. Per-pixel quantities (labels, masks, weights) have the
  leading shape (...).
* Hard labels are integers; `IGNORE_LABEL` (255, the default `ignore_index`)
  marks unlabelled pixels. Labels outside [0, C) are treated like
  `ignore_index` (the data layer is responsible for validating label maps; a
  loss cannot raise inside `jit`).
* Reductions are "sum over classes, mean over the contributing pixels". When
  no pixel contributes the loss is 0 (not NaN), so a batch whose pseudo-labels
  are all ignored leaves the parameters unchanged.
* Inputs of a lower precision than float32 (bf16, f16) are computed in
  float32; the scalar result then is float32.

References: METHODS.md §4.2 (adversarial losses), §5.1 (ADVENT entropy),
§6.2 (CRST regularisers), §7.1 (bootstrapping).
"""

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.types import IGNORE_LABEL

GanMode = Literal["vanilla", "ls"]
ApplyTo = Literal["labeled", "all"]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _as_float(x: jax.Array) -> jax.Array:
  """Casts to a floating dtype of at least float32 precision."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_per_pixel(name: str, array: jax.Array, leading: tuple) -> None:
  if tuple(array.shape) != tuple(leading):
    raise ValueError(
        f"{name} must have shape {tuple(leading)} (the class-less shape of "
        f"the scores), got {tuple(array.shape)}")


def _valid_labels(labels: jax.Array, num_classes: int,
                  ignore_index: int) -> jax.Array:
  """(...) bool: labels that name a class (not ignored, inside [0, C))."""
  return ((labels != ignore_index) & (labels >= 0) & (labels < num_classes))


def _one_hot_valid(labels: jax.Array, valid: jax.Array, num_classes: int,
                   dtype) -> jax.Array:
  """(..., C) one-hot of `labels`; all-zero rows where not `valid`."""
  safe = jnp.where(valid, labels, 0)
  return jax.nn.one_hot(safe, num_classes, dtype=dtype) * valid[..., None]


def _masked_mean(per_pixel: jax.Array, mask: jax.Array | None,
                 weights: jax.Array | None = None) -> jax.Array:
  """sum(mask * weights * per_pixel) / count(mask); 0 if the mask is empty.

  Args:
    per_pixel: (...) float losses; must be finite everywhere (also where
      masked out) so that gradients through `where` stay finite.
    mask: (...) pixels that count; non-zero means included. None: all.
    weights: optional (...) per-pixel factors; they scale the numerator only,
      the denominator is the number of included pixels.

  Returns:
    Scalar of the dtype of `per_pixel`.
  """
  if mask is None:
    mask = jnp.ones(per_pixel.shape, bool)
  mask = jnp.broadcast_to(jnp.asarray(mask) != 0, per_pixel.shape)
  if weights is not None:
    per_pixel = per_pixel * jnp.asarray(weights, per_pixel.dtype)
  total = jnp.sum(jnp.where(mask, per_pixel, 0.0))
  count = jnp.sum(mask).astype(per_pixel.dtype)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


# ---------------------------------------------------------------------------
# Cross-entropies
# ---------------------------------------------------------------------------


def softmax_cross_entropy(
    *,
    logits: jax.Array,
    labels: jax.Array,
    ignore_index: int = IGNORE_LABEL,
    weights: jax.Array | None = None,
) -> jax.Array:
  """Softmax cross-entropy with an ignore label (`CrossEntropy2d`, §4.2).

  loss = sum_{valid i} w_i * (-log softmax(logits_i)[label_i]) / n_valid,
  where valid means label != ignore_index and 0 <= label < C. Note that the
  denominator is the number of valid pixels, not the sum of the weights:
  weights down-weight pixels without renormalising the batch.

  Args:
    logits: (..., C) float scores, e.g. (B, H, W, C) or (B, C).
    labels: (...) integer labels.
    ignore_index: label value that contributes nothing.
    weights: optional (...) float per-pixel factors.

  Returns:
    Scalar float loss; 0 when no pixel is valid.
  """
  logits = _as_float(logits)
  labels = jnp.asarray(labels)
  _check_per_pixel("labels", labels, logits.shape[:-1])
  num_classes = logits.shape[-1]
  valid = _valid_labels(labels, num_classes, ignore_index)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  onehot = _one_hot_valid(labels, valid, num_classes, log_probs.dtype)
  nll = -jnp.sum(onehot * log_probs, axis=-1)
  return _masked_mean(nll, valid, weights)


def soft_cross_entropy(
    *,
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Cross-entropy against soft targets (CRST-LRENT training loss, §6.2).

  loss = mean over masked pixels of -sum_k t_k log softmax(logits)_k.
  Gradients flow into `targets` too; wrap them in `jax.lax.stop_gradient`
  when they are pseudo-labels.

  Args:
    logits: (..., C) float scores.
    targets: (..., C) float target distributions (rows may be all zero, which
      gives a zero loss that still counts in the mean when masked in).
    mask: optional (...) pixels that count (non-zero = included); None means
      every pixel.

  Returns:
    Scalar float loss; 0 when the mask is empty.
  """
  logits = _as_float(logits)
  if tuple(targets.shape) != tuple(logits.shape):
    raise ValueError(
        f"targets {targets.shape} must match logits {logits.shape}")
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  per_pixel = -jnp.sum(targets.astype(log_probs.dtype) * log_probs, axis=-1)
  return _masked_mean(per_pixel, mask)


# ---------------------------------------------------------------------------
# Adversarial losses (AdaptSegNet / ADVENT, §4.2)
# ---------------------------------------------------------------------------


def bce_with_logits(logits: jax.Array, target: jax.Array | float) -> jax.Array:
  """`torch.nn.BCEWithLogitsLoss()(x, full_like(x, target))`.

  Computed as -(t log σ(x) + (1-t) log σ(-x)), which is stable for large |x|.

  Args:
    logits: (...) float discriminator outputs.
    target: scalar label (or array broadcastable to `logits`) in [0, 1].

  Returns:
    Scalar float mean over all elements.
  """
  x = _as_float(logits)
  t = jnp.asarray(target, x.dtype)
  per_elem = -(t * jax.nn.log_sigmoid(x) + (1.0 - t) * jax.nn.log_sigmoid(-x))
  return jnp.mean(per_elem)


def lsgan_loss(outputs: jax.Array, target: jax.Array | float) -> jax.Array:
  """LS-GAN criterion (`--gan LS`): mean of (outputs - target)^2.

  Args:
    outputs: (...) float raw discriminator outputs (no sigmoid).
    target: scalar label (or array broadcastable to `outputs`).

  Returns:
    Scalar float mean over all elements.
  """
  x = _as_float(outputs)
  return jnp.mean(jnp.square(x - jnp.asarray(target, x.dtype)))


def _adversarial_criterion(gan: str):
  mode = gan.lower()  # Accept the original flags 'Vanilla' / 'LS' as well.
  if mode == "vanilla":
    return bce_with_logits
  if mode == "ls":
    return lsgan_loss
  raise ValueError(f"gan must be 'vanilla' or 'ls', got {gan!r}")


def generator_adv_loss(
    *,
    d_out: jax.Array,
    gan: GanMode = "vanilla",
    target_label: float = 0.0,
) -> jax.Array:
  """Adversarial term of the segmentation network (generator).

  AdaptSegNet/ADVENT convention: source = 0, target = 1, and the generator
  pushes D's outputs on *target* images towards the source label 0, hence
  the default `target_label=0.0` (the label the generator aims for).

  Args:
    d_out: (B, h, w, 1) (or any shape) discriminator logits on target inputs.
    gan: 'vanilla' (BCE-with-logits) or 'ls' (least squares).
    target_label: label the outputs are pushed towards.

  Returns:
    Scalar float loss.
  """
  return _adversarial_criterion(gan)(d_out, target_label)


def discriminator_loss(
    *,
    d_out_source: jax.Array,
    d_out_target: jax.Array,
    gan: GanMode = "vanilla",
    source_label: float = 0.0,
    target_label: float = 1.0,
) -> jax.Array:
  """Discriminator loss 0.5 * l(D(src), source) + 0.5 * l(D(tgt), target).

  The predictions fed to D must be under `stop_gradient` (the caller's job);
  this function only scores D's outputs.

  Args:
    d_out_source: (...) discriminator logits on source predictions.
    d_out_target: (...) discriminator logits on target predictions (shape may
      differ from the source one; each half is its own mean).
    gan: 'vanilla' (BCE-with-logits) or 'ls' (least squares).
    source_label: domain label of source inputs (AdaptSegNet: 0).
    target_label: domain label of target inputs (AdaptSegNet: 1).

  Returns:
    Scalar float loss.
  """
  criterion = _adversarial_criterion(gan)
  return (0.5 * criterion(d_out_source, source_label)
          + 0.5 * criterion(d_out_target, target_label))


# ---------------------------------------------------------------------------
# Entropy (ADVENT, §5.1) and CRST model regularisation (§6.2)
# ---------------------------------------------------------------------------


def weighted_self_information(probs: jax.Array,
                              eps: float = 1e-30) -> jax.Array:
  """ADVENT's map I = -p * log2(p + eps) / log2(C), element-wise.

  This C-channel map (not its sum) is the AdvEnt discriminator input.
  eps = 1e-30 as in ADVENT; it is a normal float32 number, so p = 0 gives
  exactly 0 and a finite gradient (-log2(eps) / log2(C)).

  Args:
    probs: (..., C) probabilities (softmax output), C >= 2.
    eps: added inside the log.

  Returns:
    (..., C) float map; its channel sum is the normalised entropy in [0, 1].
  """
  p = _as_float(probs)
  num_classes = p.shape[-1]
  if num_classes < 2:
    raise ValueError(f"need at least 2 classes, got {num_classes}")
  return -p * jnp.log2(p + eps) / np.log2(num_classes)


def entropy_map(probs: jax.Array, eps: float = 1e-30) -> jax.Array:
  """Per-pixel normalised entropy: channel sum of the self-information map.

  Args:
    probs: (..., C) probabilities, C >= 2.
    eps: added inside the log.

  Returns:
    (...) float entropies in [0, 1]: 1 for uniform p, 0 for one-hot p.
  """
  return jnp.sum(weighted_self_information(probs, eps), axis=-1)


def minent_loss(probs: jax.Array, mask: jax.Array | None = None,
                eps: float = 1e-30) -> jax.Array:
  """ADVENT MinEnt loss: mean over pixels of the normalised entropy.

  Equals ADVENT's `entropy_loss` = -sum P log2(P + 1e-30) / (N H W log2 C)
  when `mask` is None.

  Args:
    probs: (..., C) probabilities, e.g. (B, H, W, C).
    mask: optional (...) pixels that count (non-zero = included).
    eps: added inside the log.

  Returns:
    Scalar float loss; 0 when the mask is empty.
  """
  return _masked_mean(entropy_map(probs, eps), mask)


def mrkld_loss(*, logits: jax.Array, mask: jax.Array | None) -> jax.Array:
  """CRST-MRKLD regulariser: mean over masked pixels of -(1/K) sum_k log p_k.

  This is KL(uniform || p) up to the constant log K. The coefficient (paper
  α = 0.1, code α² = 0.01, option `mrkld_weight`) is applied by the caller.

  Args:
    logits: (..., K) float scores.
    mask: (...) pixels that count, CRST: pseudo-labelled target pixels
      (non-zero = included); None means every pixel.

  Returns:
    Scalar float loss; 0 when the mask is empty.
  """
  log_probs = jax.nn.log_softmax(_as_float(logits), axis=-1)
  return _masked_mean(-jnp.mean(log_probs, axis=-1), mask)


# ---------------------------------------------------------------------------
# Bootstrapping (Reed et al. 2014; TPLD Eq. 3, §7.1)
# ---------------------------------------------------------------------------


def _bootstrap(
    *,
    log_probs: jax.Array,
    log_targets_scale: jax.Array,
    prediction_term: jax.Array,
    labels: jax.Array,
    beta: jax.Array | float,
    apply_to: str,
    weights: jax.Array | None,
    ignore_index: int,
) -> jax.Array:
  """-sum_k [beta*onehot_k + (1-beta)*prediction_k] * (log p_k - s_k).

  Args:
    log_probs: (..., C) log-softmax.
    log_targets_scale: (C,) s_k = log lambda_k (zeros for Reed).
    prediction_term: (..., C) the bootstrapped prediction factor.
    labels: (...) integer labels.
    beta: weight of the label term.
    apply_to: 'labeled' or 'all'.
    weights: optional (...) per-pixel factors.
    ignore_index: unlabelled value.

  Returns:
    Scalar mean over the contributing pixels.
  """
  if apply_to not in ("labeled", "all"):
    raise ValueError(f"apply_to must be 'labeled' or 'all', got {apply_to!r}")
  labels = jnp.asarray(labels)
  _check_per_pixel("labels", labels, log_probs.shape[:-1])
  num_classes = log_probs.shape[-1]
  valid = _valid_labels(labels, num_classes, ignore_index)
  onehot = _one_hot_valid(labels, valid, num_classes, log_probs.dtype)
  beta = jnp.asarray(beta, log_probs.dtype)
  log_ratio = log_probs - log_targets_scale
  mix = beta * onehot + (1.0 - beta) * prediction_term
  per_pixel = -jnp.sum(mix * log_ratio, axis=-1)
  # Unlabelled pixels have no one-hot term; with apply_to='all' they keep the
  # (1 - beta) prediction term.
  mask = valid if apply_to == "labeled" else None
  return _masked_mean(per_pixel, mask, weights)


def tpld_bootstrap_loss(
    *,
    logits: jax.Array,
    labels: jax.Array,
    thresholds: jax.Array,
    beta: jax.Array | float,
    apply_to: ApplyTo = "labeled",
    stop_gradient_prediction: bool = True,
    weights: jax.Array | None = None,
    ignore_index: int = IGNORE_LABEL,
) -> jax.Array:
  """TPLD bootstrapped self-training loss (Eq. 3, SECONDARY transcription).

  Per pixel: -sum_k [beta * yhat_k + (1 - beta) * p_k/λ_k] * log(p_k/λ_k),
  with yhat the one-hot pseudo-label and λ the CBST class thresholds. Since
  log(p/λ) = log p - log λ, the label term has the gradient of ordinary CE.
  With λ ≡ 1 this is Reed's soft bootstrapping; with beta = 1 it is the
  masked CE shifted by the constant sum_k yhat_k log λ_k.

  Args:
    logits: (..., C) float scores.
    labels: (...) integer pseudo-labels; `ignore_index` (or any value outside
      [0, C)) marks unlabelled pixels.
    thresholds: (C,) class thresholds λ_k in (0, 1].
    beta: weight of the pseudo-label term (no published value; required).
    apply_to: 'labeled' averages over labelled pixels only; 'all' also
      includes unlabelled pixels, which contribute only the (1 - beta) term.
    stop_gradient_prediction: treat the factor p/λ inside the bracket as a
      fixed target (default, "as pseudo-label"). The loss value does not
      depend on this flag; only the gradient does.
    weights: optional (...) per-pixel factors (e.g. the weight of "easy
      image" labels); they scale the numerator, the denominator stays the
      number of contributing pixels.
    ignore_index: unlabelled value.

  Returns:
    Scalar float loss; 0 when no pixel contributes.
  """
  log_probs = jax.nn.log_softmax(_as_float(logits), axis=-1)
  thresholds = jnp.asarray(thresholds, log_probs.dtype)
  if thresholds.shape != (log_probs.shape[-1],):
    raise ValueError(f"thresholds must have shape ({log_probs.shape[-1]},), "
                     f"got {thresholds.shape}")
  log_thresholds = jnp.log(thresholds)
  ratio = jnp.exp(log_probs - log_thresholds)
  if stop_gradient_prediction:
    ratio = jax.lax.stop_gradient(ratio)
  return _bootstrap(
      log_probs=log_probs, log_targets_scale=log_thresholds,
      prediction_term=ratio, labels=labels, beta=beta, apply_to=apply_to,
      weights=weights, ignore_index=ignore_index)


def soft_bootstrap_loss(
    *,
    logits: jax.Array,
    labels: jax.Array,
    beta: jax.Array | float = 0.95,
    apply_to: ApplyTo = "labeled",
    stop_gradient_prediction: bool = True,
    weights: jax.Array | None = None,
    ignore_index: int = IGNORE_LABEL,
) -> jax.Array:
  """Reed et al. (2014) soft bootstrapping.

  Per pixel: -sum_k [beta * t_k + (1 - beta) * q_k] * log q_k, with t the
  one-hot label and q = softmax(logits).

  With `stop_gradient_prediction=False` the gradient is that of
  CE + (1 - beta) * entropy (Reed's "minimum entropy regularisation" view);
  the default True treats q as a fixed target, like TPLD's default.

  Args:
    logits: (..., C) float scores.
    labels: (...) integer labels; `ignore_index` or values outside [0, C)
      mark unlabelled pixels.
    beta: weight of the label term (Reed's default 0.95).
    apply_to: 'labeled' or 'all' (see `tpld_bootstrap_loss`).
    stop_gradient_prediction: whether q inside the bracket is a constant.
    weights: optional (...) per-pixel factors (numerator only).
    ignore_index: unlabelled value.

  Returns:
    Scalar float loss; 0 when no pixel contributes.
  """
  log_probs = jax.nn.log_softmax(_as_float(logits), axis=-1)
  probs = jnp.exp(log_probs)
  if stop_gradient_prediction:
    probs = jax.lax.stop_gradient(probs)
  return _bootstrap(
      log_probs=log_probs, log_targets_scale=jnp.zeros((), log_probs.dtype),
      prediction_term=probs, labels=labels, beta=beta, apply_to=apply_to,
      weights=weights, ignore_index=ignore_index)


def hard_bootstrap_loss(
    *,
    logits: jax.Array,
    labels: jax.Array,
    beta: jax.Array | float = 0.8,
    apply_to: ApplyTo = "labeled",
    weights: jax.Array | None = None,
    ignore_index: int = IGNORE_LABEL,
) -> jax.Array:
  """Reed et al. (2014) hard bootstrapping.

  Per pixel: -sum_k [beta * t_k + (1 - beta) * z_k] * log q_k, with t the
  one-hot label and z = onehot(argmax q) (first maximum on ties), which
  carries no gradient.

  Args:
    logits: (..., C) float scores.
    labels: (...) integer labels; `ignore_index` or values outside [0, C)
      mark unlabelled pixels.
    beta: weight of the label term (Reed's default 0.8).
    apply_to: 'labeled' or 'all' (see `tpld_bootstrap_loss`).
    weights: optional (...) per-pixel factors (numerator only).
    ignore_index: unlabelled value.

  Returns:
    Scalar float loss; 0 when no pixel contributes.
  """
  log_probs = jax.nn.log_softmax(_as_float(logits), axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(log_probs, axis=-1), log_probs.shape[-1],
                        dtype=log_probs.dtype)
  return _bootstrap(
      log_probs=log_probs, log_targets_scale=jnp.zeros((), log_probs.dtype),
      prediction_term=hard, labels=labels, beta=beta, apply_to=apply_to,
      weights=weights, ignore_index=ignore_index)
