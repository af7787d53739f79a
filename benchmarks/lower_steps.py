"""Lowers every method's train step for cpu, cuda and tpu; counts the ops.

  python -m benchmarks.lower_steps --platforms=cpu,cuda,tpu --out DIR [--tiny]

For every method in `jaxda.methods.METHODS` and every phase (its `make_step`
plus `phase_steps`), builds the models and optimisers from the method's
default config (`experiments/configs/<name>.py`, `tiny` variant with
--tiny, else `paper`) at a small spatial size, makes the state abstractly
(`jax.eval_shape` through the method's own state hook: the loop's
`create_state`, GAM's `driver.create_state`), jits the step over the mesh
(`parallel.jit_step`) and lowers it with abstract inputs for each platform
(`jitted.trace(*args).lower(lowering_platforms=(p,))`): no data, no
parameters, no accelerator needed. Counts in the StableHLO text:
`stablehlo.convolution`, `stablehlo.dot_general` and custom_call targets.

Config variants that change the step's program (``VARIANT_STEPS``:
DAFormer's and MIC's ``hrda``) are lowered too, as ``method:variant``.

Writes DIR/lowering.json
``{method[:phase or variant]: {platform: {"ok", "error", "convolutions",
"dots", "custom_calls"}}}`` and prints a table. Under conv_impl='auto' a
cuda/tpu segmentation step should have convolutions and no Winograd/tap dot
chains (`jaxda.models.kernels.platform`).

``--paper_size --memory`` builds the step at the preset's own crop and batch
on one device and compiles the cpu lowering: its ``memory_analysis()``
(arguments, outputs, temporaries, donated aliases, bytes; their total also
in GiB) goes into the
cpu entry. XLA:CPU's buffer assignment stands in for a GPU's where none is
lent (the paper presets' "fits in 24 GB" check):

  python -m benchmarks.lower_steps --platforms=cpu --methods=daformer,mic \
      --paper_size --memory --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import sys
import time
import types
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp

PLATFORMS = ("cpu", "cuda", "tpu")
# No data is read: the head sizes come from these class counts.
NUM_CLASSES = {"segmentation": 19, "depth": 19, "normals": 19,
               "classification": 10}
# Config module and variant of a method that has no config file of its own.
CONFIG_OF = {"minent": ("advent", "minent"), "gam_cls": ("gam", "digits"),
             "anchor_normals": ("anchor", "normals"),
             "mic": ("daformer", "mic")}
# Variants lowered besides the default ("method:variant"): they build other
# networks or passes (HRDA: context / detail passes, attention head).
VARIANT_STEPS = {"daformer": ("hrda",), "mic": ("hrda",)}
# State creation hook per method (default: the loop's create_state).
_STATE_HOOKS = {"gam": "jaxda.methods.gam.driver",
                "gam_cls": "jaxda.methods.gam.driver",
                "daformer": "jaxda.methods.daformer.ema_driver",
                "mic": "jaxda.methods.daformer.ema_driver"}


def load_config(name: str, tiny: bool, height: int, width: int,
                variant: str = "", paper_size: bool = False):
  """The method's default config at a small size (batch: one per device),
  plus ``variant`` (one of ``VARIANT_STEPS[name]``). With ``paper_size``,
  the preset's own training crop and batch instead (for memory analysis)."""
  module, extra = CONFIG_OF.get(name, (name, ""))
  variant = ",".join(v for v in ("tiny" if tiny else "paper", extra, variant)
                     if v)
  config = importlib.import_module(
      f"experiments.configs.{module}").get_config(variant)
  if paper_size:  # the step as the preset trains it: its crop, its batch
    if config.data.get("crop_height", 0) and config.data.get("crop_width", 0):
      config.data.height = config.data.crop_height
      config.data.width = config.data.crop_width
    config.data.crop_height = config.data.crop_width = 0
    for role in ("source", "target"):  # sizes from config.data
      if role in config:
        config[role].height = config[role].width = 0
    config.num_devices = 1
    return config
  config.data.height, config.data.width = height, width
  config.data.crop_height = config.data.crop_width = 0
  if config.get("daformer", {}).get("hrda", False):  # paper: 512 px of 1024
    for role in ("source", "target"):  # HRDA sizes its views from these
      config[role].height = config[role].width = 0
    config.daformer.hrda_detail_crop = (0.5, 0.5)
    config.daformer.hrda_sliding_stride = (0.5, 0.5)
  config.num_devices = -1
  config.batch_size = jax.device_count()
  return config


def _fake_run(config, method):
  """A `jaxda.train.loop.Run` with models and optimisers, no data."""
  from jaxda import parallel  # pylint: disable=g-import-not-at-top
  from jaxda import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from jaxda.train import loop  # pylint: disable=g-import-not-at-top

  task = tasks_lib.get_task(method.task)
  names = tuple(f"c{i}" for i in range(NUM_CLASSES[method.task]))
  data = {"target_val": types.SimpleNamespace(class_names=names)}
  built = task.build(config, method, data)
  return loop.Run(config=config, workdir="", mesh=parallel.make_mesh(),
                  method=method, task=task, models=built["models"],
                  data=data, class_names=names, writer=None,
                  checkpointer=None, tx=built["tx"],
                  labels_fn=built["labels_fn"], disc_tx=built["disc_tx"],
                  start_time=time.time())


@contextlib.contextmanager
def _abstract_init():
  """`parallel.init_replicated` returns shapes (`jax.eval_shape`) instead."""
  from jaxda import parallel  # pylint: disable=g-import-not-at-top
  with mock.patch.object(parallel, "init_replicated",
                         lambda init_fn, mesh: jax.eval_shape(init_fn)):
    yield


def abstract_state(name: str, run):
  """`(run, state)`: the state's shapes via the method's own state hook."""
  from jaxda.train import loop  # pylint: disable=g-import-not-at-top
  hook = _STATE_HOOKS.get(name)
  with _abstract_init():
    if hook is None:
      return run, loop.create_state(run)
    driver = importlib.import_module(hook)
    run = driver.build_models(run)
    return run, driver.create_state(run)


def abstract_batch(method, config, num_classes: int) -> dict:
  """ShapeDtypeStructs of the paired batch the method's step reads."""
  b, h, w = config.batch_size, config.data.height, config.data.width
  sds = jax.ShapeDtypeStruct
  image = sds((b, h, w, 3), jnp.float32)
  index = sds((b,), jnp.int32)
  classification = method.task == "classification"
  label = sds((b,) if classification else (b, h, w), jnp.int32)
  source = {"image": image, "label": label, "index": index}
  if method.task == "depth":
    source["depth"] = sds((b, h, w), jnp.float32)
  if method.task == "normals":
    source["normals"] = sds((b, h, w, 3), jnp.float32)
  target = {"image": image, "index": index}
  if method.target_labels in ("ground_truth", "anchor"):
    target["label"] = label
  if method.target_labels == "pseudo":
    target.update(pl_label=sds((b, h, w), jnp.uint8),
                  pl_weight=sds((b, h, w), jnp.float32),
                  is_easy=sds((b,), jnp.bool_),
                  thresholds=sds((b, num_classes), jnp.float32))
  batch = {}
  if method.uses_source_images:
    batch["source"] = source
  if method.uses_target_images or method.target_labels != "none":
    batch["target"] = target
  return batch


def count_ops(text: str) -> dict[str, Any]:
  """Convolution and dot_general counts, custom_call target names (sorted,
  unique) of StableHLO text."""
  calls = set(re.findall(r"stablehlo\.custom_call\s*@([\w.$-]+)", text))
  calls.update(re.findall(r'call_target_name\s*=\s*"([^"]+)"', text))
  return {"convolutions": len(re.findall(r"stablehlo\.convolution\b", text)),
          "dots": len(re.findall(r"stablehlo\.dot_general\b", text)),
          "custom_calls": sorted(calls)}


def phases(method) -> dict[str, Any]:
  """``{'': make_step, phase name: factory, ...}``."""
  return {"": method.make_step, **dict(method.phase_steps)}


def lower_method(name: str, platforms, *, tiny: bool, height: int,
                 width: int, conv_impl: str | None = None,
                 only_phase: str | None = None,
                 variant: str = "", paper_size: bool = False,
                 memory: bool = False) -> dict[str, dict]:
  """``{name[:phase]: {platform: result}}`` for one registry entry; with
  ``variant``, ``{name:variant: ...}`` of its first phase. With ``memory``,
  the lowering for the platform that runs (``running_platform()``) is
  compiled and its ``memory_analysis()`` recorded."""
  from jaxda import parallel  # pylint: disable=g-import-not-at-top
  from jaxda.methods import METHODS  # pylint: disable=g-import-not-at-top
  method = METHODS[name]
  out = {}
  if variant:
    only_phase = ""
  try:
    config = load_config(name, tiny, height, width, variant, paper_size)
    if conv_impl is not None:
      config.model.conv_impl = conv_impl
    run = _fake_run(config, method)
    run, state = abstract_state(name, run)
    batch = abstract_batch(method, config, run.num_classes)
    rng = jax.eval_shape(lambda: jax.random.key(0))
  except Exception as e:  # pylint: disable=broad-except
    error = f"set-up: {type(e).__name__}: {e}".splitlines()[0]
    for phase in phases(method):
      if only_phase is not None and phase != only_phase:
        continue
      key = f"{name}:{phase or variant}" if phase or variant else name
      out[key] = {p: _failed(error) for p in platforms}
    return out
  for phase, make in phases(method).items():
    if only_phase is not None and phase != only_phase:
      continue
    key = f"{name}:{phase or variant}" if phase or variant else name
    out[key] = {}
    try:
      step = make(run.models, config, run.tx, run.disc_tx)
      traced = parallel.jit_step(step, run.mesh).trace(state, batch, rng)
    except Exception as e:  # pylint: disable=broad-except
      error = f"trace: {type(e).__name__}: {e}".splitlines()[0]
      out[key] = {p: _failed(error) for p in platforms}
      continue
    for platform in platforms:
      try:
        lowered = traced.lower(lowering_platforms=(platform,))
        out[key][platform] = {"ok": True, "error": "",
                              **count_ops(lowered.as_text())}
        if memory and platform == running_platform():
          out[key][platform].update(
              compiled_memory(lowered, config, batch))
      except Exception as e:  # pylint: disable=broad-except
        out[key][platform] = _failed(
            f"lower: {type(e).__name__}: {e}".splitlines()[0])
  return out


def running_platform() -> str:
  """The lowering platform of this process's backend ('cpu', 'cuda', ...)."""
  return {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())


def compiled_memory(lowered, config, batch) -> dict[str, Any]:
  """XLA's buffer assignment of the compiled step (on this backend): argument / output /
  temporary / donated-alias bytes and their total (what one device holds
  while the step runs), the compile time, and the sizes it was built at."""
  from jaxda import parallel  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  compiled = lowered.compile()
  m = compiled.memory_analysis()
  gib = 2.0 ** 30
  sizes = {k: int(getattr(m, f"{k}_size_in_bytes"))
           for k in ("argument", "output", "temp", "alias")}
  total = parallel.compiled_bytes(compiled)  # the loop's own measure
  images = {r: list(b["image"].shape) for r, b in batch.items()}
  return {"compile_s": round(time.time() - t0, 1),
          **{f"{k}_bytes": v for k, v in sizes.items()},
          "total_bytes": total, "total_gib": round(total / gib, 3),
          "images": images,
          "network": config.get("daformer", {}).get("network", "")
                     or config.model.get("name", "")}


def _failed(error: str) -> dict[str, Any]:
  return {"ok": False, "error": error[:500], "convolutions": 0, "dots": 0,
          "custom_calls": []}


def table(results: dict[str, dict], platforms) -> str:
  """One row per step, `convs/dots` (or FAIL) per platform."""
  width = max([len(k) for k in results] + [4])
  lines = [f"{'step':<{width}}  " + "  ".join(f"{p:>14}" for p in platforms)]
  for key, per in results.items():
    cells = []
    for p in platforms:
      r = per.get(p)
      cells.append("-" if r is None else
                   f"{r['convolutions']}c/{r['dots']}d" if r["ok"] else "FAIL")
    lines.append(f"{key:<{width}}  " + "  ".join(f"{c:>14}" for c in cells))
  errors = [f"  {k} [{p}]: {r['error']}" for k, per in results.items()
            for p, r in per.items() if not r["ok"]]
  return "\n".join(lines + (["errors:"] + errors if errors else []))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--platforms", default=",".join(PLATFORMS))
  parser.add_argument("--out", required=True)
  parser.add_argument("--tiny", action="store_true",
                      help="tiny models (default: the paper models)")
  parser.add_argument("--methods", default="",
                      help="comma-separated subset (default: all)")
  parser.add_argument("--height", type=int, default=0,
                      help="image height (default 32 tiny, 64 paper)")
  parser.add_argument("--width", type=int, default=0)
  parser.add_argument("--conv_impl", default=None,
                      help="override config.model.conv_impl")
  parser.add_argument("--paper_size", action="store_true",
                      help="the preset's own crop and batch, one device")
  parser.add_argument("--memory", action="store_true",
                      help="compile the lowering for this backend; record its"
                      " memory analysis in lowering.json")
  args = parser.parse_args(argv)
  from jaxda.methods import METHODS  # pylint: disable=g-import-not-at-top
  platforms = tuple(p for p in args.platforms.split(",") if p)
  names = [n for n in args.methods.split(",") if n] or list(METHODS)
  height = args.height or (32 if args.tiny else 64)
  width = args.width or 2 * height
  results = {}
  os.makedirs(args.out, exist_ok=True)
  for name in names:
    t0 = time.time()
    kw = dict(tiny=args.tiny, height=height, width=width,
              conv_impl=args.conv_impl, paper_size=args.paper_size,
              memory=args.memory)
    for variant in ("",) + tuple(VARIANT_STEPS.get(name, ())):
      results.update(lower_method(name, platforms, variant=variant, **kw))
      # Rewritten after every step: a long paper-model sweep (a MiT-B5
      # compile takes half an hour on 2 cores) leaves what it has done.
      with open(os.path.join(args.out, "lowering.json"), "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    print(f"{name}: {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
  print(table(results, platforms))
  failed = [k for k, per in results.items()
            if not all(r["ok"] for r in per.values())]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
