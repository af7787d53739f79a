"""DAFormer / MIC debug pictures, as the original's ``debug_img_interval``.

One row per example of a training batch: source image and label, target
image, the teacher's pseudo label (titled with its confidence weight), the
ClassMix image (after colour jitter / blur), its mixed label and paste mask,
the student's predictions on the mixed and on the target image and, with
MIC, the masked target image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxda import parallel
from jaxda import visualize
from jaxda.methods import base
from jaxda.methods.daformer import ema_step
from jaxda.visualize import figures

MAX_ROWS = 2


def make_debug_fn(models: base.Models, config):
  """``fn(state, batch, rng) -> {name: array}`` of the first ``MAX_ROWS``
  examples (traceable)."""
  align = config.model.upsample_align_corners

  def predict(state, images):
    outputs, _ = base.forward(models, state.params, state.batch_stats, images,
                              bn_mode=config.model.bn_mode, labelled=False,
                              training=False)
    logits = ema_step.logits_of({"main": outputs["main"]}, images.shape[1:3],
                                align_corners=align)["main"]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def fn(state, batch, rng):
    inputs = ema_step.mixed_inputs(models, config, state, batch, rng)
    src, tgt = batch["source"], batch["target"]
    out = {"source": src["image"], "source_label": src["label"],
           "target": tgt["image"],
           "pseudo_label": inputs["pseudo_label"],
           "pseudo_weight": jnp.max(inputs["pseudo_weight"], axis=(1, 2)),
           "mixed_image": inputs["mixed_image"],
           "mixed_label": inputs["mixed_label"],
           "mix_mask": inputs["mix_mask"],
           "student_mixed": predict(state, inputs["mixed_image"]),
           "student_target": predict(state, tgt["image"])}
    if "masked_image" in inputs:
      out["masked_image"] = inputs["masked_image"]
    return {k: v[:MAX_ROWS] for k, v in out.items()}

  return fn


def to_uint8(images: np.ndarray, mode: str) -> np.ndarray:
  """Normalised float images back to uint8 RGB (``data.normalization``)."""
  mean, std, bgr = ema_step.normalization_stats(mode)
  x = np.asarray(images, np.float32) * np.asarray(std) + np.asarray(mean)
  if bgr:
    x = x[..., ::-1]
  return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def save_grid(path: str, out: dict[str, np.ndarray], *, mode: str,
              class_names, title: str) -> str:
  """Draws ``make_debug_fn``'s output (one row per example)."""
  palette = visualize.default_palette(len(class_names))
  rows, h, w = out["source_label"].shape
  labels = lambda x: visualize.colorize(np.asarray(x, np.int64), palette)
  gray = lambda m: np.repeat(
      np.round(np.asarray(m, np.float32) * 255).astype(np.uint8)[..., None],
      3, axis=-1)
  columns = [
      ("source", lambda i: to_uint8(out["source"][i], mode)),
      ("source label", lambda i: labels(out["source_label"][i])),
      ("target", lambda i: to_uint8(out["target"][i], mode)),
      ("teacher pseudo label", lambda i: labels(out["pseudo_label"][i])),
      ("mixed (augmented)", lambda i: to_uint8(out["mixed_image"][i], mode)),
      ("mixed label", lambda i: labels(out["mixed_label"][i])),
      ("paste mask", lambda i: gray(out["mix_mask"][i])),
      ("student on mixed", lambda i: labels(out["student_mixed"][i])),
      ("student on target", lambda i: labels(out["student_target"][i])),
  ]
  if "masked_image" in out:
    columns.append(("MIC masked target",
                    lambda i: to_uint8(out["masked_image"][i], mode)))
  shown = [out[k] for k in ("source_label", "pseudo_label", "mixed_label",
                            "student_mixed", "student_target")]
  class_ids, has_ignore = figures.present_classes(shown)
  width = len(columns) * figures.CELL_WIDTH_INCHES
  fig, axes = figures.image_grid_figure(
      rows, len(columns), h, w,
      figures.legend_rows(len(class_ids) + has_ignore, width) + 0.4)
  for i in range(rows):
    for ax, (name, picture) in zip(axes[i], columns):
      ax.imshow(picture(i), interpolation="nearest")
      if name == "teacher pseudo label":
        name += f"\nweight {float(out['pseudo_weight'][i]):.3f}"
      ax.set_title(name, fontsize=9)
  fig.suptitle(title)
  figures.add_class_legend(fig, class_ids, palette, class_names, has_ignore)
  return figures.save(fig, path)


class Drawer:
  """Draws the grid of a host batch; compiles its function once."""

  def __init__(self, run):
    self.run = run
    self._fn = None

  def draw(self, state, host_batch, step: int, *, final: bool = False
           ) -> dict[str, str]:
    """Writes ``pictures/daformer_debug[_step<N>].png``; ``{name: path}``."""
    run = self.run
    if host_batch is None:
      return {}
    if self._fn is None:
      repl, data = (parallel.replicated(run.mesh),
                    parallel.batch_sharded(run.mesh))
      self._fn = jax.jit(make_debug_fn(run.models, run.config),
                         in_shardings=(repl, data, repl),
                         out_shardings=repl)
    batch = parallel.shard_batch(host_batch, run.mesh)
    rng = jax.random.fold_in(jax.random.key(run.config.seed + 7919), step)
    with jax.transfer_guard_device_to_host("allow"):
      out = jax.device_get(self._fn(state, batch, rng))
    if not run.is_main:
      return {}
    name = "daformer_debug" if final else f"daformer_debug_step{step}"
    path = save_grid(
        run.path("pictures", f"{name}.png"), out,
        mode=run.config.data.normalization, class_names=run.class_names,
        title=f"{run.config.method} after {step} steps")
    return {name: str(path)}

