"""Intermediate activations of a model at named layers, optionally matched.

``ActivationTaps`` wraps any Linen model (the DeepLab-v2 segmenter here, a
classifier later) without changing its parameter tree: it runs the model's
own ``apply`` inside a Flax method interceptor (``nn.intercept_methods``)
that, for every submodule whose path is in ``layers`` (e.g.
``'backbone/layer2'``, ``'aspp_main'``, paths as in the parameter tree):

1. ``sow``s the raw output into the ``'intermediates'`` collection,
2. replaces it by its Gaussian-matched version
   (``jaxda.methods.gam.matching.gaussian_match``) when matching is on, so
   every later layer sees the matched activation (this is what makes it
   AdaBN-like),
3. ``sow``s what flows on as ``'matched'``.

The statistics live in ``batch_stats['activation_stats'][key]`` beside the
BatchNorm running statistics (the AdaBN relation: they are normalisation
statistics of the target network): ``source_mean/var`` (the frozen source
model on source data, constants) and ``target_mean/var`` (running average of
the target model on target data, used at inference). Because they sit in
``batch_stats``, checkpoints, warm starts and every evaluation path that
calls ``apply(variables, x, train_bn=False)`` pick them up unchanged.
"""

from __future__ import annotations

import dataclasses
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxda.methods.gam import matching as am
from jaxda.models import forward as forward_lib

STATS_KEY = "activation_stats"
MATCH_MODES = ("none", "batch", "running")


def layer_key(path: str) -> str:
  """Dict key of a layer path: ``'backbone/layer2'`` -> ``'backbone_layer2'``.

  Checkpoint writers treat ``/`` as a path separator, so keys avoid it.
  """
  return path.replace("/", "_")


def network_field(models) -> str:
  """Name of the network field of a task's models dataclass.

  The first field by convention: ``segmenter`` (``Models``), ``classifier``
  (``ClassificationModels``); the one GAM wraps in taps.
  """
  return dataclasses.fields(models)[0].name


def split_stats(batch_stats: dict) -> tuple[dict, dict]:
  """``(model batch_stats, activation stats)`` of a combined collection."""
  batch_stats = dict(batch_stats or {})
  act = batch_stats.pop(STATS_KEY, {})
  return batch_stats, act


def source_stats(act_stats: dict) -> dict:
  """``{key: ChannelStats}`` of the source model from the stored dicts."""
  return {k: am.ChannelStats(v["source_mean"], v["source_var"])
          for k, v in act_stats.items()}


def target_stats(act_stats: dict) -> dict:
  """``{key: ChannelStats}`` running target statistics."""
  return {k: am.ChannelStats(v["target_mean"], v["target_var"])
          for k, v in act_stats.items()}


def pack_stats(source: dict, target: dict) -> dict:
  """Inverse of ``source_stats`` / ``target_stats``: the stored dicts."""
  return {k: {"source_mean": source[k].mean, "source_var": source[k].var,
              "target_mean": target[k].mean, "target_var": target[k].var}
          for k in source}


@dataclasses.dataclass(frozen=True)
class ActivationTaps:
  """A model plus taps (and Gaussian matching) at named layers.

  Not a Flax module itself: it exposes ``init`` / ``apply`` with the
  wrapped module's signature, so it can stand wherever the segmenter does,
  and parameter paths stay those of ``module``.

  Attributes:
    module: the wrapped Linen model.
    layers: submodule paths (``'/'``-joined) whose ``__call__`` output is
      tapped; each must return one array (B, ..., C).
    gaussian_matching: replace tapped outputs by their Gaussian-matched
      version (per ``match`` mode); False taps only.
    eps: variance epsilon of the matching.
  """
  module: nn.Module
  layers: tuple[str, ...]
  gaussian_matching: bool = True
  eps: float = am.EPSILON

  @property
  def keys(self) -> tuple[str, ...]:
    return tuple(layer_key(p) for p in self.layers)

  def init(self, rng: jax.Array, x: jax.Array, **kwargs) -> dict:
    """Initialises the model; activation statistics start as identity.

    Source and target statistics are both mean 0, variance 1, so matching is
    the identity until the caller stores real statistics.

    Args:
      rng: PRNG key.
      x: example input, e.g. (1, H, W, 3).
      **kwargs: forwarded to ``module.init``.

    Returns:
      Variables ``{'params', 'batch_stats'}`` with
      ``batch_stats['activation_stats'][key]`` of (C,) arrays per layer.
    """
    variables = dict(self.module.init(rng, x, **kwargs))
    shapes = jax.eval_shape(
        lambda v: self.apply_with_taps(v, x, match="none")[1]["raw"],
        variables)
    stats = {}
    for k, s in shapes.items():
      c = s.shape[-1]
      zeros, ones = jnp.zeros((c,), jnp.float32), jnp.ones((c,), jnp.float32)
      stats[k] = {"source_mean": zeros, "source_var": ones,
                  "target_mean": zeros, "target_var": ones}
    variables["batch_stats"] = dict(variables.get("batch_stats", {}),
                                    **{STATS_KEY: stats})
    return variables

  def apply(self, variables: dict, x: jax.Array, *, train_bn: bool = False,
            mutable=False, **kwargs):
    """The wrapped model's ``apply``, matched with the running statistics.

    Same signature and return convention as ``module.apply`` (what
    ``jaxda.methods.base.forward`` and evaluation call): outputs, or
    ``(outputs, mutated)`` when ``mutable`` is given.
    """
    match = "running" if self.gaussian_matching else "none"
    outputs, _, stats = self.apply_with_taps(variables, x, train_bn=train_bn,
                                             match=match, **kwargs)
    if mutable:
      return outputs, {"batch_stats": stats}
    return outputs

  def apply_with_taps(self, variables: dict, x: jax.Array, *,
                      train_bn: bool = False, match: str = "running",
                      **kwargs):
    """Runs the model and returns its tapped activations.

    Args:
      variables: ``{'params', 'batch_stats'}`` as made by ``init``.
      x: (B, ...) input.
      train_bn: forwarded to the model (BatchNorm batch statistics and
        running-statistics update); the activation statistics are never
        updated here (see ``jaxda.methods.gam.matching.ema_stats``).
      match: ``'none'`` (taps only), ``'batch'`` (target statistics of this
        batch, gradients through them, as BatchNorm in training) or
        ``'running'`` (the stored target statistics, for inference).
      **kwargs: forwarded to ``module.apply``.

    Returns:
      ``(outputs, taps, batch_stats)``: the model outputs; ``taps`` with
      ``'raw'`` and ``'matched'`` dicts ``{key: (B, ..., C)}`` (equal when
      ``match='none'``); the (possibly BN-updated) combined batch_stats.
    """
    if match not in MATCH_MODES:
      raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}")
    model_stats, act_stats = split_stats(variables.get("batch_stats"))
    wanted = dict(zip(self.layers, self.keys))
    src = source_stats(act_stats)
    tgt = target_stats(act_stats)

    def interceptor(next_fun, args, kw, context):
      y = next_fun(*args, **kw)
      path = "/".join(context.module.path)
      if context.method_name != "__call__" or path not in wanted:
        return y
      key = wanted[path]
      context.module.sow("intermediates", "raw", y)
      if match == "batch":
        y = am.gaussian_match(y, am.channel_stats(y), src[key], self.eps)
      elif match == "running":
        y = am.gaussian_match(y, tgt[key], src[key], self.eps)
      context.module.sow("intermediates", "matched", y)
      return y

    inner = {"params": variables["params"], "batch_stats": model_stats}
    mutable = ["intermediates"] + (["batch_stats"] if train_bn else [])
    with nn.intercept_methods(interceptor):
      outputs, mutated = self.module.apply(inner, x, train_bn=train_bn,
                                           mutable=mutable, **kwargs)
    taps = {"raw": {}, "matched": {}}
    for path, key in wanted.items():
      node = mutated.get("intermediates", {})
      for part in path.split("/"):
        if part not in node:
          raise ValueError(
              f"layer {path!r} was never called; tappable paths are module"
              " paths of the model, e.g. 'backbone/layer2' or 'aspp_main'")
        node = node[part]
      taps["raw"][key] = node["raw"][0]
      taps["matched"][key] = node["matched"][0]
    new_model_stats = forward_lib.running_stats(
        mutated.get("batch_stats", model_stats))
    stats = dict(new_model_stats, **{STATS_KEY: act_stats}) if act_stats \
        else dict(new_model_stats)
    return outputs, taps, stats
