"""TADA: transferable local + global attention (Wang et al., AAAI 2019, §9).

No official code exists; this is a reimplementation from the paper's
equations (``jaxda.attention`` holds the math). One iteration, on the
concatenated source + target batch (n = B_s + B_t):

1. G_f gives the last conv map f (n, h, w, C), split into K = h·w regions.
2. Region discriminator G_d^k sees GRL(f^k) (its own parameters per k,
   vectorised): local adversarial loss L_l = mean_{i,k} BCE(G_d^k(f_i^k), d_i)
   (Eq. 2), local attention w = 1 - H(d̂) (Eq. 3, ``local_attention_form``)
   and the attended map h = (1 + w) f (Eq. 4).
3. h is pooled, passed through G_b and G_y. The global discriminator G_d
   sees GRL(G_b(h)): L_g (Eq. 5) and global attention m = 1 + H(d̂) (Eq. 6).
   (Its input is DANN's, ``adversarial.dann_features``: G_b(h), or the
   pooled h itself with ``'pooled'``.)
4. Attentive entropy over source and target, L_h = mean_i m_i H(p_i) (Eq. 7);
   source CE L_y (Eq. 8).
5. Objective (Eq. 9-10) as one minimisation with GRLs:
   L_y + γ L_h + λ (L_g + λ_l L_l); the discriminators minimise, the network
   gets their reversed gradients (coefficient ramp as DANN's).

Options (METHODS.md §13 #21): ``tada.local_attention_form`` ('1-H' =
paper Eq. 3 verbatim; 'H'; 'none'), ``tada.stop_gradient_attention``
(default True, a project choice; False = TA3N: gradients flow through w and
m). With form 'none', λ_l = 0 and γ = 0 the step is exactly DANN's.

Ablation switches (``experiments/configs/tada.py`` variants ``local_only``,
``global_only``, ``entropy_only``): ``tada.lambda_global`` scales L_g's
reversed gradient into the network (0: the features get nothing from L_g,
while the global discriminator keeps training on them as a probe, so
``disc_acc`` still says how separable the bottleneck features are);
``tada.global_attention`` False makes m = 1 (plain entropy).
``tada.local_disc_grad_scale`` s multiplies the region discriminators'
gradient (the mean over K regions gives each 1/K of it) without changing
the reversed gradient into the features (their GRL runs at coeff / s).

Logged per step: ``disc_acc`` (global D, source + target),
``local_disc_acc`` (mean over the K region discriminators and the source +
target images) and ``local_disc_acc_max`` (the best single region's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxda.methods import tada_attention as attention
from jaxda import losses
from jaxda import models as models_lib
from jaxda import ops
from jaxda.methods import base
from jaxda.methods import classification_steps as classification
from jaxda.methods import dann


def uses_local(config) -> bool:
  """Whether region discriminators exist (attention or local loss on)."""
  return (config.tada.local_attention_form != "none"
          or config.tada.lambda_local != 0.0)


def attend(models: classification.ClassificationModels, local_params,
           feature_map: jax.Array, *, coeff: jax.Array, form: str,
           stop_gradient: bool):
  """Region discriminators + residual local attention on a conv map.

  Args:
    models: the modules (``region_discriminators`` set).
    local_params: parameters of the K region discriminators.
    feature_map: (n, h, w, C) last conv map.
    coeff: GRL coefficient (scalar).
    form: ``attention.LOCAL_ATTENTION_FORMS`` entry.
    stop_gradient: detach the attention weights.

  Returns:
    ``(attended_map, region_logits, weights)``: (n, h, w, C), (n, K),
    (n, K) with K = h·w in row-major (y, x) order.
  """
  n, h, w, c = feature_map.shape
  regions = feature_map.reshape(n, h * w, c)
  region_logits = models.region_discriminators.apply(
      {"params": local_params}, ops.gradient_reversal(regions, coeff))
  att_in = (jax.lax.stop_gradient(region_logits) if stop_gradient
            else region_logits)
  weights = attention.local_attention(att_in, form)
  attended = attention.residual_attend(regions, weights)
  return attended.reshape(n, h, w, c), region_logits, weights


def make_step(models: classification.ClassificationModels, config, tx,
              disc_tx):
  """TADA step ``(state, batch, rng) -> (state, metrics)``."""
  bn_mode = config.model.bn_mode
  source_label = config.adversarial.domain_label_source
  lambda_adv = config.adversarial.lambda_adv
  t = config.tada
  local = uses_local(config)
  lambda_global = float(t.get("lambda_global", 1.0))
  use_global_attention = bool(t.get("global_attention", True))
  # Region Ds learn from s·L_l through a GRL of coeff / s: the features get
  # the same reversed gradient, each region D s times its 1/K share.
  local_scale = float(t.get("local_disc_grad_scale", 1.0))
  coefficient = dann.coefficient_fn(config)
  global_input = dann.discriminator_features(config)  # as DANN's G_d

  def step(state, batch, rng):
    del rng
    src, tgt = batch["source"], batch["target"]
    n_s = src["image"].shape[0]
    d = classification.domain_labels(n_s, tgt["image"].shape[0], source_label)
    coeff = coefficient(state.step)

    def loss_fn(params, disc_params):
      f_s, f_t, stats = classification.extract_both(
          models, params, state.batch_stats, src["image"], tgt["image"],
          bn_mode=bn_mode, joint=bool(config.model.get("bn_joint", False)))
      fmap = jnp.concatenate([f_s, f_t])
      metrics = {}
      l_local = 0.0
      if local:
        fmap, region_logits, w = attend(
            models, disc_params["local"], fmap, coeff=coeff / local_scale,
            form=t.local_attention_form,
            stop_gradient=t.stop_gradient_attention)
        # Mean over n images and K regions = (1 / (K n)) Σ_k Σ_i (Eq. 2).
        l_local = losses.bce_with_logits(region_logits, d[:, None])
        region_acc = jnp.mean(
            (region_logits >= 0.0) == (d[:, None] >= 0.5), axis=0)
        metrics.update(local_loss=l_local, local_attention=jnp.mean(w),
                       local_disc_acc=jnp.mean(region_acc),
                       local_disc_acc_max=jnp.max(region_acc))
      out = classification.classify(models, params, fmap)
      g_logits = models.discriminator.apply(
          {"params": disc_params["global"]},
          ops.gradient_reversal(out[global_input], coeff * lambda_global))
      l_global = losses.bce_with_logits(g_logits, d)
      if use_global_attention:
        m = attention.global_attention(
            jax.lax.stop_gradient(g_logits) if t.stop_gradient_attention
            else g_logits)
      else:
        m = jnp.ones_like(g_logits, jnp.float32)
      l_ent = attention.attentive_entropy(out["logits"], m)
      ce = classification.cross_entropy(out["logits"][:n_s], src["label"])
      total = (ce + t.gamma_entropy * l_ent
               + lambda_adv * (l_global
                               + t.lambda_local * local_scale * l_local))
      metrics.update(
          ce=ce, domain_loss=l_global, entropy_loss=l_ent,
          global_attention=jnp.mean(m),
          train_acc=classification.accuracy(out["logits"][:n_s],
                                            src["label"]),
          disc_acc=classification.domain_accuracy(g_logits, d))
      return total, (stats, metrics)

    new_state, metrics = classification.minimize_with_discriminators(
        state, tx, disc_tx, loss_fn)
    return new_state, dict(metrics, grl_coeff=coeff)

  return step


def make_attention_fn(models: classification.ClassificationModels, config):
  """``fn(state, images) -> (N, h, w)`` local attention maps (evaluation).

  Uses running BatchNorm statistics; the weights are those the training
  step would multiply the regions by (``1 - H`` by default).
  """
  form = config.tada.local_attention_form

  def fn(state, images):
    fmap, _ = classification.extract_features(
        models, state.params, state.batch_stats, images,
        bn_mode=config.model.bn_mode, labelled=False, training=False)
    _, _, w = attend(models, state.disc_params["local"], fmap,
                     coeff=jnp.float32(0.0), form=form, stop_gradient=True)
    return w.reshape(fmap.shape[:3])

  return fn


def make_region_discriminators(config):
  """TADA's per-region discriminators, or None when no term uses them."""
  if not uses_local(config):
    return None
  return models_lib.RegionDiscriminators(
      hidden=tuple(config.tada.region_hidden))


def attention_maps(models: classification.ClassificationModels, config):
  """``(fn, title)`` of the local attention pictures (task pictures)."""
  return (make_attention_fn(models, config),
          f"TADA local attention w = {config.tada.local_attention_form}"
          " on target val")


def config_problems(config) -> list[str]:
  """DANN's checks plus the attention form."""
  problems = dann.config_problems(config)
  if config.tada.local_attention_form not in attention.LOCAL_ATTENTION_FORMS:
    problems.append("config.tada.local_attention_form must be one of"
                    f" {attention.LOCAL_ATTENTION_FORMS}")
  if float(config.tada.get("local_disc_grad_scale", 1.0)) <= 0.0:
    problems.append("config.tada.local_disc_grad_scale must be > 0")
  if float(config.tada.get("lambda_global", 1.0)) < 0.0:
    problems.append("config.tada.lambda_global must be >= 0, got"
                    f" {config.tada.lambda_global}")
  return problems


TADA = base.Method(
    name="tada", make_step=make_step, task="classification",
    discriminator_inputs="features",
    discriminator_features=dann.discriminator_features,
    make_region_discriminators=make_region_discriminators,
    attention_maps=attention_maps, config_problems=config_problems,
    single_process=True)
