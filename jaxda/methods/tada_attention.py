"""TADA's transferable attention and entropy terms (METHODS.md §9), pure JAX.

Wang et al., "Transferable Attention for Domain Adaptation", AAAI 2019; no
official code exists, so the forms follow the paper's equations:

* local attention (Eq. 3): ``w = 1 - H(d̂)`` per region, d̂ the region
  discriminator's domain probability, H the binary entropy (natural log);
* residual attended feature (Eq. 4): ``h = (1 + w) * f``;
* global attention (Eq. 6): ``m = 1 + H(d̂)`` per image from the global
  (bottleneck) discriminator;
* attentive entropy (Eq. 7): ``mean_i m_i * H(softmax(logits_i))``.

With natural logs H ∈ [0, ln 2], so w ∈ [1 - ln 2, 1] ≈ [0.307, 1] and
m ∈ [1, 1 + ln 2]. Discriminators output one logit z, d̂ = σ(z). No Flax, no
config, no I/O.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOCAL_ATTENTION_FORMS = ("1-H", "H", "none")


def binary_entropy_from_logits(logits: jax.Array) -> jax.Array:
  """Entropy H(σ(z)) of a Bernoulli given its logit, in nats.

  Computed as ``σ(z) softplus(-z) + σ(-z) softplus(z)`` (= -p log p -
  (1-p) log(1-p)), finite for any finite z, 0 in the limit |z| → ∞ and
  ln 2 at z = 0.

  Args:
    logits: (...) float discriminator logits.

  Returns:
    (...) float32 entropies in [0, ln 2].
  """
  z = jnp.asarray(logits, jnp.float32)
  p = jax.nn.sigmoid(z)
  return p * jax.nn.softplus(-z) + (1.0 - p) * jax.nn.softplus(z)


def local_attention(region_logits: jax.Array, form: str = "1-H") -> jax.Array:
  """Transferable local attention weights w (Eq. 3).

  Args:
    region_logits: (B, K) logits of the K region discriminators.
    form: ``'1-H'`` (paper Eq. 3 verbatim, default), ``'H'`` (the reading
      where hard-to-discriminate regions weigh more) or ``'none'`` (w = 0:
      no local attention, plain pooling).

  Returns:
    (B, K) float32 weights: ``1 - H`` in [1 - ln 2, 1], ``H`` in
    [0, ln 2], or zeros.
  """
  if form not in LOCAL_ATTENTION_FORMS:
    raise ValueError(f"local attention form must be one of "
                     f"{LOCAL_ATTENTION_FORMS}, got {form!r}")
  h = binary_entropy_from_logits(region_logits)
  if form == "1-H":
    return 1.0 - h
  if form == "H":
    return h
  return jnp.zeros_like(h)


def residual_attend(features: jax.Array, weights: jax.Array) -> jax.Array:
  """Residual attended features ``h^k = (1 + w^k) f^k`` (Eq. 4).

  The residual form (after Residual Attention Networks) means a weight of
  0 leaves a region unchanged instead of erasing it.

  Args:
    features: (B, K, C) region features.
    weights: (B, K) attention weights.

  Returns:
    (B, K, C) attended features, dtype of ``features``.
  """
  if features.shape[:2] != weights.shape:
    raise ValueError(f"weights {weights.shape} do not match the regions of "
                     f"features {features.shape}")
  return (features * (1.0 + weights[..., None])).astype(features.dtype)


def global_attention(domain_logits: jax.Array) -> jax.Array:
  """Transferable global attention ``m = 1 + H(d̂)`` (Eq. 6).

  Args:
    domain_logits: (B,) logits of the global discriminator.

  Returns:
    (B,) float32 weights in [1, 1 + ln 2].
  """
  return 1.0 + binary_entropy_from_logits(domain_logits)


def prediction_entropy(logits: jax.Array) -> jax.Array:
  """Shannon entropy (nats) of ``softmax(logits)`` per example.

  Args:
    logits: (B, C) class logits.

  Returns:
    (B,) float32 entropies in [0, ln C].
  """
  log_p = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def attentive_entropy(logits: jax.Array, weights: jax.Array) -> jax.Array:
  """Attentive entropy loss L_h (Eq. 7): ``mean_i m_i H(p_i)``.

  Args:
    logits: (B, C) class logits of source and target images together.
    weights: (B,) global attention m (usually detached by the caller).

  Returns:
    Scalar float32.
  """
  return jnp.mean(weights * prediction_entropy(logits))
