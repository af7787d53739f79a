"""DANN: domain-adversarial training with a gradient reversal layer (§12).

Ganin & Lempitsky (ICML 2015, JMLR 2016). One minimisation of

    L_y(source) + λ L_d(GRL(G_b(G_f(x)), coeff_p)),   x ∈ source ∪ target

where the discriminator G_d (an MLP) minimises L_d and the GRL hands the network
``-coeff_p`` times the discriminator's gradient. Both updates come from one
gradient: the discriminator's with its own optimiser, the network's with
``tx``.

``coeff_p`` follows ``config.adversarial.grl_schedule``:

* ``'paper'``: ``max * (2 / (1 + exp(-γ p)) - 1)``, p = step / steps,
  γ = 10 (DANN, JAN);
* ``'tllib'``: tllib's ``WarmStartGradientReverseLayer`` (alpha 1, lo 0,
  hi = max, max_iters 1000): ``max * (2 / (1 + exp(-i / 1000)) - 1)``;
* ``'constant'``: ``max`` from the first step.

What G_d sees is ``config.adversarial.dann_features``: ``'bottleneck'``
(G_b's output, the thuml/tllib recipe for ResNet-50 and TADA's global
discriminator) or ``'pooled'`` (the feature extractor's output, flattened
or averaged: where the DANN paper attaches G_d in its digits networks).

The LR annealing μ0 / (1 + α p)^β is ``config.optim.lr_schedule = 'inv'``
(``jaxda.optim.inv_schedule``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxda import losses
from jaxda import ops
from jaxda.methods import base
from jaxda.methods import classification_steps as classification

GRL_SCHEDULES = ("paper", "tllib", "constant")
DANN_FEATURES = ("bottleneck", "pooled")


def grl_coefficient(step: jax.Array | int, total_steps: int, *,
                    schedule: str = "paper", gamma: float = 10.0,
                    max_value: float = 1.0,
                    tllib_max_iters: int = 1000) -> jax.Array:
  """GRL coefficient at ``step`` (a pure function of the step).

  Args:
    step: current step (int scalar, may be traced).
    total_steps: steps of the run; progress p = clip(step / total, 0, 1).
    schedule: one of ``GRL_SCHEDULES`` (see the module docstring).
    gamma: γ of the paper ramp.
    max_value: value the ramp tends to (λ_max).
    tllib_max_iters: tllib's ``max_iters``.

  Returns:
    float32 scalar in [0, max_value].
  """
  step = jnp.asarray(step, jnp.float32)
  if schedule == "paper":
    p = jnp.clip(step / float(max(total_steps, 1)), 0.0, 1.0)
    return max_value * (2.0 / (1.0 + jnp.exp(-gamma * p)) - 1.0)
  if schedule == "tllib":
    return max_value * (
        2.0 / (1.0 + jnp.exp(-step / float(tllib_max_iters))) - 1.0)
  if schedule == "constant":
    return jnp.asarray(max_value, jnp.float32)
  raise ValueError(f"unknown GRL schedule {schedule!r}; use one of"
                   f" {GRL_SCHEDULES}")


def schedule_steps(config) -> int:
  """Steps that define training progress p (``optim.schedule_steps`` or
  ``num_steps``)."""
  sched = config.optim.schedule_steps
  return int(config.num_steps if sched in (-1, None) else sched)


def coefficient_fn(config):
  """``step -> coeff_p`` from ``config.adversarial``."""
  a = config.adversarial
  total = schedule_steps(config)
  return lambda step: grl_coefficient(
      step, total, schedule=a.grl_schedule, gamma=a.grl_gamma,
      max_value=a.grl_max, tllib_max_iters=a.tllib_max_iters)


def make_step(models: classification.ClassificationModels, config, tx,
              disc_tx):
  """DANN step ``(state, batch, rng) -> (state, metrics)``."""
  bn_mode = config.model.bn_mode
  source_label = config.adversarial.domain_label_source
  lambda_adv = config.adversarial.lambda_adv
  coefficient = coefficient_fn(config)
  d_features = config.adversarial.dann_features
  if d_features not in DANN_FEATURES:
    raise ValueError(f"config.adversarial.dann_features must be one of"
                     f" {DANN_FEATURES}, got {d_features!r}")

  def step(state, batch, rng):
    del rng
    src, tgt = batch["source"], batch["target"]
    d = classification.domain_labels(src["image"].shape[0],
                                     tgt["image"].shape[0], source_label)
    coeff = coefficient(state.step)

    def loss_fn(params, disc_params):
      f_s, f_t, stats = classification.extract_both(
          models, params, state.batch_stats, src["image"], tgt["image"],
          bn_mode=bn_mode, joint=bool(config.model.get("bn_joint", False)))
      out = classification.classify(models, params,
                                    jnp.concatenate([f_s, f_t]))
      logits_s = out["logits"][:src["image"].shape[0]]
      ce = classification.cross_entropy(logits_s, src["label"])
      d_logits = models.discriminator.apply(
          {"params": disc_params["global"]},
          ops.gradient_reversal(out[d_features], coeff))
      l_d = losses.bce_with_logits(d_logits, d)
      metrics = {"ce": ce, "domain_loss": l_d,
                 "train_acc": classification.accuracy(logits_s, src["label"]),
                 "disc_acc": classification.domain_accuracy(d_logits, d)}
      return ce + lambda_adv * l_d, (stats, metrics)

    new_state, metrics = classification.minimize_with_discriminators(
        state, tx, disc_tx, loss_fn)
    return new_state, dict(metrics, grl_coeff=coeff)

  return step


def config_problems(config) -> list[str]:
  """Invalid ``config.adversarial`` values of DANN (and TADA), one line each."""
  a = config.adversarial
  problems = []
  if a.grl_schedule not in GRL_SCHEDULES:
    problems.append(
        f"config.adversarial.grl_schedule must be one of {GRL_SCHEDULES}")
  if a.dann_features not in DANN_FEATURES:
    problems.append(
        f"config.adversarial.dann_features must be one of {DANN_FEATURES}")
  if a.domain_label_source not in (0, 1):
    problems.append("config.adversarial.domain_label_source must be 0 or 1")
  return problems


def discriminator_features(config) -> str:
  """The global discriminator's input: ``adversarial.dann_features``."""
  return config.adversarial.dann_features


DANN = base.Method(
    name="dann", make_step=make_step, task="classification",
    discriminator_inputs="features",
    discriminator_features=discriminator_features,
    config_problems=config_problems, single_process=True)
