"""Round driver of CBST / CRST / TPLD self-training.

A run is ``phase1_rounds + phase2_rounds`` rounds of ``num_steps / rounds``
steps each, on one global step counter (so checkpoints and resume work as in
every other run). Each round:

1. **Pseudo-labelling pass** over the target train set with the model as it
   is at the round start: pass A accumulates the streaming per-class
   confidence histogram on device and turns it into the class thresholds λ_k
   for the round's portion (CBST schedule ``min(init + r*step, max)``); pass B
   selects CBST labels (argmax p/λ where max p/λ >= 1) and, in phase 1,
   densifies them with TPLD voting; in phase 2 it scores images
   (``image_confidence``), splits easy/hard and gives easy images full labels
   weighted by (p/λ)^γ below the threshold.
   The labels are written to ``pseudo_labels/round_<r>.npz`` before any step
   of the round, so a resumed round trains on exactly the same labels.
2. **Training** with the phase's step (``jaxda.methods.self_training.steps``:
   the method's ``make_step`` in phase 1, ``phase_steps['phase2']`` in
   phase 2; only a method with a phase-2 step may have phase-2 rounds).
3. **Evaluation** on the target val split and a diagnostics record: λ_k,
   density before/after voting, pseudo-label precision against ground truth
   (when the target train split has labels; they are read for this report
   only and never reach a batch), easy/hard counts, target mIoU.

Every round also records **unsupervised adaptation signals**, which need no
target label (``jaxda.methods.self_training.progress``): pass A's
probabilities give the mean normalised prediction entropy on the target
train set and its predicted-class shares, compared with the source label
shares (total variation drift, collapsed classes); the new pseudo labels
are compared with the previous round's (agreement). They describe the model
*entering* the round (round 0: the base model). The driver logs one line per
round, stores them in ``summary.json['adaptation_signals']`` and logs (and
stores as ``adaptation_warning``) ``progress.no_progress``'s one-line
warning when they show no progress.

The CBST / CRST recipe (``recipe``): per-round source shares, multi-view
scoring, rare-class mining, CBST-SP priors, CRST-LRENT soft labels. With
``self_training.target_bn_stats`` each round starts by re-estimating the
BatchNorm statistics on the target (``target_statistics``, AdaBN).

With no ``model.init_checkpoint`` the driver first trains (or reuses) a
base model (``self_training.base_method``: source-only as in the papers, or
AdaptSegNet) in ``workdir/base_<method>``. Every round needs >= 1 step.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxda import parallel
from jaxda import visualize
from jaxda.data import pipeline
from jaxda.methods import base
from jaxda.methods.self_training.densify import densify
from jaxda.methods.self_training import progress
from jaxda.methods.self_training import recipe
from jaxda.methods.self_training import target_statistics
from jaxda.methods.self_training import warm_base
from jaxda.methods.self_training.easy_hard import (
    easy_hard_split, easy_image_labels, image_confidence, label_density,
    label_precision)
from jaxda.methods.self_training.thresholds import (
    init_threshold_histogram, lrent_soft_labels, select, target_portion,
    thresholds_from_histogram, update_threshold_histogram)
from jaxda.tasks import evaluation
from jaxda.tasks import splits
from jaxda.train import loop as train_loop
from jaxda.train.exceptions import ConfigError
from jaxda.types import IGNORE_LABEL


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def rounds_and_steps(config, method: base.Method) -> tuple[int, int, int]:
  """``(phase1_rounds, phase2_rounds, steps_per_round)``, validated.

  Phase-2 rounds need a method with a phase-2 step
  (``method.phase_steps['phase2']``).
  """
  st = config.self_training
  recipe.check(config)
  r1, r2 = int(st.phase1_rounds), int(st.phase2_rounds)
  if r1 < 0 or r2 < 0 or r1 + r2 == 0:
    raise ConfigError(
        "self_training.phase1_rounds + phase2_rounds must be >= 1")
  if r2 and "phase2" not in method.phase_steps:
    raise ConfigError(
        f"method {method.name!r} has no phase-2 step; set"
        " --config.self_training.phase2_rounds=0")
  if config.num_steps < r1 + r2:
    raise ConfigError(
        f"num_steps={config.num_steps} gives a round no steps; self-training"
        f" needs >= 1 step per round ({r1 + r2} rounds)")
  if config.num_steps % (r1 + r2):
    raise ConfigError(
        f"num_steps={config.num_steps} must be divisible by the {r1 + r2}"
        " rounds (num_steps is split evenly over rounds)")
  return r1, r2, config.num_steps // (r1 + r2)


# --------------------------------------------------------------------------
# Pseudo-labelling pass
# --------------------------------------------------------------------------


def _logits_batches(run, state, images):
  """Yields global low-resolution logits (B, h, w, C) (a tuple of them, one
  per view, with ``self_training.score_scales`` / ``score_flip``), global
  mask (B,), this process's host mask (B / P,) and the input size (H, W),
  over this process's ``images`` (its share)."""
  logits_jit = parallel.jit_inference(
      evaluation.make_logits_fn(run.models,
                                bn_mode=run.config.model.bn_mode), run.mesh
  ) if recipe.single_view(run.config) else recipe.make_view_logits(run)
  for batch in parallel.process_eval_batches(
      images, None, global_batch_size=splits.eval_batch_size(run),
      mode=run.config.data.normalization,
      make_batches=pipeline.eval_batches):
    keep = batch["mask"]
    sharded = parallel.shard_batch(
        {"image": batch["image"], "mask": keep}, run.mesh)
    yield (logits_jit(state, sharded["image"]), sharded["mask"], keep,
           batch["image"].shape[1:3])


def _probs_jit(run, size):
  if not recipe.single_view(run.config):
    return recipe.make_view_probs(run, size)
  return jax.jit(functools.partial(
      evaluation.probs_from_logits, size=tuple(size),
      align_corners=run.config.model.upsample_align_corners))


_signal_sums = jax.jit(progress.batch_signal_sums)
_lrent = jax.jit(lrent_soft_labels, static_argnames="alpha")


def make_pseudo_labels(run, state, round_index: int, phase: int,
                       ground_truth: np.ndarray | None, *,
                       source_hist: np.ndarray | None = None,
                       previous_labels: np.ndarray | None = None
                       ) -> dict[str, Any]:
  """Runs the two-pass labelling of one round.

  Multi-process: each process feeds only its share of the target images
  (``run.data``) into global batches, so every image is labelled once, by
  the process that owns it. The threshold histogram is updated by a jitted
  function of the global batch, i.e. XLA sums the per-device (and so the
  per-process) histograms: every process gets the global λ_k. The per-image
  outputs are then gathered in image order (``gather_process_rows``) and
  the easy/hard split is taken over all images, as in one process. (The
  exact form, ``thresholds.class_thresholds``, needs every confidence in one
  host array; it is the oracle in tests, not used here.)

  Pass A also sums, on device, the target entropy and predicted-class
  counts (``progress.batch_signal_sums``); the diagnostics get the
  adaptation signals (`adaptation_signals`): entropy and predicted shares
  always, drift and collapsed classes against ``source_hist`` (C,) and
  agreement with ``previous_labels`` (N, H, W) (last round's ``pl_label``)
  when given.

  Returns:
    dict with ``pl_label`` (N, H, W) uint8, ``pl_weight`` (N, H, W) float32,
    ``is_easy`` (N,) bool, ``thresholds`` (C,) float32, ``before`` (N, H, W)
    uint8 CBST labels, and ``diagnostics`` (JSON-able); N is the whole
    target train split, on every process.
  """
  st = run.config.self_training
  images = run.data["target_train"].images  # this process's share
  c = run.num_classes
  portion = target_portion(round_index, st.portion_init, st.portion_step,
                           st.portion_max)

  # Pass A: streaming thresholds, O(C x bins) memory on device. The network
  # runs once: pass A keeps the output-stride logits in host memory (this
  # process's rows), pass B puts one batch at a time back on the devices
  # and redoes only the upsampling and softmax (bit-identical to a second
  # forward); the devices never hold more than one batch of the target set.
  # CBST-SP: thresholds and labels use prior x p; the signals the softmax.
  hist = parallel.replicate(init_threshold_histogram(c, st.num_bins),
                            run.mesh)
  floor = recipe.histogram_floor(run.config)
  cached, sums, counts = [], [], []
  probs_jit = prior_fn = None
  for logits, mask, keep, size in _logits_batches(run, state, images):
    if probs_jit is None:
      probs_jit = _probs_jit(run, size)
      prior_fn = recipe.make_prior_fn(run,
                                      recipe.load_spatial_prior(run, size))
    probs = probs_jit(logits)
    valid = jnp.broadcast_to(mask[:, None, None], probs.shape[:3])
    scores = probs if prior_fn is None else prior_fn(probs)
    hist = update_threshold_histogram(hist, scores, subsample=st.subsample,
                                      valid=valid, floor=floor)
    # Global sums (C + 2 numbers a batch), fetched once after the pass.
    sums.append(_signal_sums(probs, valid))
    if prior_fn is not None:
      counts.append(recipe.count_predictions(scores, valid))
    cached.append((jax.tree.map(lambda x: parallel.local_rows(x, run.mesh),
                                logits), keep))
  thresholds = np.asarray(thresholds_from_histogram(
      jax.device_get(hist), portion, floor=floor), np.float32)
  lrent = st.target_loss == "lrent" and phase == 1
  soft_out = recipe.SoftLabelWriter(recipe.soft_path(run, round_index),
                                    len(images)) if lrent else None

  # Pass B: labels, densification, image confidence.
  lam = jnp.asarray(thresholds)
  before, after, conf, full, full_w = [], [], [], [], []
  rows = lambda x: parallel.local_rows(x, run.mesh)
  for host_logits, keep in cached:
    probs = probs_jit(parallel.shard_batch(host_logits, run.mesh))
    if prior_fn is not None:
      probs = prior_fn(probs)
    cbst = select(probs, lam)
    dense = cbst
    if lrent:  # CRST-LRENT: soft targets; hard = argmax where kept
      soft, kept = _lrent(probs, lam, alpha=float(st.lrent_alpha))
      dense = jnp.where(kept, jnp.argmax(soft, -1), IGNORE_LABEL)
      soft_out.add(rows(soft)[keep].astype(np.float16))
    elif st.voting and (phase == 1 or st.phase2_hard_labels == "voted"):
      dense = densify(probs, cbst, lam, window=st.window, alpha=st.alpha,
                      num_iters=st.num_iters, pooling=st.pooling,
                      combine=st.combine, top_k=st.top_k)
    before.append(rows(cbst)[keep])
    after.append(rows(dense)[keep])
    if phase == 2:
      conf.append(rows(image_confidence(
          probs, lam, count_source=st.get("confidence_count", "argmax"),
          strict=st.get("confidence_strict", True)))[keep])
      labels, weights = easy_image_labels(probs, lam, gamma=st.gamma)
      full.append(rows(labels)[keep])
      full_w.append(rows(weights)[keep])
  if soft_out is not None:
    soft_out.close()
  n = int(parallel.sum_over_processes(np.asarray(len(images))))
  # Every process's rows, in image order, on every process.
  whole = lambda parts, dtype: parallel.gather_process_rows(
      np.concatenate(parts).astype(dtype), n)
  before = whole(before, np.uint8)
  after = whole(after, np.uint8)
  diag: dict[str, Any] = {
      "round": round_index, "phase": phase, "portion": float(portion),
      "thresholds": {name: float(v) for name, v in
                     zip(run.class_names, thresholds)},
      "density_cbst": float(label_density(before)),
  }
  diag.update(adaptation_signals(
      run.class_names, jax.device_get(sums), source_hist))
  if float(st.get("mine_chance", 0.0)):  # rare-class mining (§6.5)
    predicted = (sum(np.asarray(x, np.int64) for x in jax.device_get(counts))
                 if counts else sum(np.asarray(b["predicted"], np.int64)
                                    for b in jax.device_get(sums)))
    diag.update(recipe.mining_ids(run.config, predicted))
  if lrent:
    diag["pseudo_labels"] = "lrent"
  if phase == 1:
    labels, weights = after, np.ones(after.shape, np.float32)
    weights[after == IGNORE_LABEL] = 0.0
    is_easy = np.ones((n,), bool)
    diag["density_voted"] = float(label_density(after))
    if ground_truth is not None:
      diag["precision_cbst"] = float(label_precision(before, ground_truth))
      diag["precision_voted"] = float(label_precision(after, ground_truth))
  else:
    conf = whole(conf, np.float32)
    is_easy = np.asarray(easy_hard_split(jnp.asarray(conf),
                                         st.easy_fraction))
    full = whole(full, np.uint8)
    full_w = whole(full_w, np.float32)
    if st.phase2_hard_labels == "voted":
      # Hard images keep the phase-1 (CBST + voting) labels besides the
      # adversarial term; 'none' leaves them to the adversary alone.
      hard_labels, hard_w = after, (after != IGNORE_LABEL).astype(np.float32)
    elif st.phase2_hard_labels == "none":
      hard_labels = np.full_like(after, IGNORE_LABEL)
      hard_w = np.zeros(after.shape, np.float32)
    else:
      raise ValueError("self_training.phase2_hard_labels must be 'none' or"
                       f" 'voted', got {st.phase2_hard_labels!r}")
    easy3 = is_easy[:, None, None]
    labels = np.where(easy3, full, hard_labels).astype(np.uint8)
    weights = np.where(easy3, full_w, hard_w).astype(np.float32)
    after = labels
    diag.update(num_easy=int(is_easy.sum()), num_hard=int((~is_easy).sum()),
                confidence_easy_min=float(conf[is_easy].min()) if
                is_easy.any() else None)
    if ground_truth is not None:
      diag["precision_cbst"] = float(label_precision(before, ground_truth))
      diag["precision_easy_full"] = float(label_precision(
          full[is_easy], ground_truth[is_easy])) if is_easy.any() else None
      diag["precision_hard_cbst"] = float(label_precision(
          before[~is_easy], ground_truth[~is_easy])) if (~is_easy).any() \
          else None
  if previous_labels is not None:
    diag.update(progress.label_agreement(previous_labels, labels))
  return {"pl_label": labels, "pl_weight": weights, "is_easy": is_easy,
          "thresholds": thresholds, "before": before, "after": after,
          "diagnostics": diag}


# --------------------------------------------------------------------------
# Unsupervised adaptation signals
# --------------------------------------------------------------------------

# Keys of a round's diagnostics that are adaptation signals.
SIGNAL_KEYS = ("target_entropy", "class_drift", "num_source_classes",
               "num_collapsed", "collapsed_classes", "agreement",
               "labelled_both", "predicted_share", "warning")


def adaptation_signals(class_names, sums: list[dict],
                       source_hist: np.ndarray | None) -> dict[str, Any]:
  """The label-free signals of one pass, from pass A's per-batch sums."""
  entropy = sum(float(b["entropy_sum"]) for b in sums)
  pixels = sum(int(b["pixels"]) for b in sums)
  predicted = sum((np.asarray(b["predicted"], np.int64) for b in sums),
                  np.zeros(len(class_names), np.int64))
  out = {"target_entropy": entropy / pixels if pixels else 0.0,
         "predicted_share": {n: round(float(v), 5) for n, v in zip(
             class_names, progress.class_shares(predicted))}}
  if source_hist is not None:
    collapsed = progress.collapsed_classes(predicted, source_hist)
    out.update(class_drift=progress.class_drift(predicted, source_hist),
               num_source_classes=int((progress.class_shares(source_hist)
                                       > progress.SOURCE_MIN_SHARE).sum()),
               num_collapsed=int(len(collapsed)),
               collapsed_classes=[class_names[k] for k in collapsed])
  return out


def source_histogram(run, max_images: int = 256) -> np.ndarray | None:
  """Source label histogram (C,) over at most ``max_images`` evenly spaced
  rows of each process's share, summed over processes; None without
  source labels."""
  domain = run.data.get("source_train")
  labels = None if domain is None else domain.labels
  if labels is None:
    return None
  n = len(labels)
  rows = np.unique(np.linspace(0, n - 1, min(n, max_images)).astype(int))
  hist = np.zeros(run.num_classes, np.int64)
  for i in range(0, len(rows), 16):  # bounded memory for lazy real data
    hist += progress.label_histogram(labels[rows[i:i + 16]],
                                     run.num_classes)
  return parallel.sum_over_processes(hist)


def _format_signals(diag: dict[str, Any]) -> str:
  line = (f"round {diag['round']} signals (no target labels): target entropy"
          f" {diag['target_entropy']:.3f}")
  if "class_drift" in diag:
    names = ", ".join(diag["collapsed_classes"]) or "none"
    line += (f", class drift vs source {diag['class_drift']:.3f} (TV),"
             f" collapsed classes {diag['num_collapsed']}"
             f"/{diag.get('num_source_classes', '?')} ({names})")
  if "agreement" in diag:
    line += (f", pseudo labels {100 * diag['agreement']:.1f}% unchanged"
             f" from round {diag['round'] - 1} on the"
             f" {100 * diag['labelled_both']:.1f}% labelled in both")
  return line


def _labels_path(run, r: int) -> str:
  return run.path("pseudo_labels", f"round_{r}.npz")


def save_pseudo_labels(run, r: int, data: dict[str, Any]) -> None:
  """Atomic write (tmp + rename) on the main process."""
  if not run.is_main:
    return
  os.makedirs(run.path("pseudo_labels"), exist_ok=True)
  tmp = _labels_path(run, r) + ".tmp.npz"
  np.savez_compressed(
      tmp, **{k: v for k, v in data.items() if k != "diagnostics"},
      diagnostics=np.asarray(json.dumps(data["diagnostics"])))
  os.replace(tmp, _labels_path(run, r))


def load_pseudo_labels(run, r: int) -> dict[str, Any] | None:
  path = _labels_path(run, r)
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    data = {k: f[k] for k in f.files}
  data["diagnostics"] = json.loads(str(data["diagnostics"]))
  return data


# --------------------------------------------------------------------------
# Rounds
# --------------------------------------------------------------------------


def _format_round(diag: dict[str, Any]) -> str:
  def pct(key):
    v = diag.get(key)
    return "n/a" if v is None else f"{100 * v:.1f}%"
  line = (f"round {diag['round']} (phase {diag['phase']}, portion"
          f" {diag['portion']:.2f}): ")
  if diag["phase"] == 1:
    how = "LRENT" if diag.get("pseudo_labels") == "lrent" else "voting"
    line += (f"density {pct('density_cbst')} -> {pct('density_voted')} after"
             f" {how}, precision {pct('precision_cbst')} ->"
             f" {pct('precision_voted')}")
  else:
    line += (f"easy/hard {diag['num_easy']}/{diag['num_hard']}, CBST"
             f" density {pct('density_cbst')}, precision easy full labels"
             f" {pct('precision_easy_full')}")
  if "target_miou" in diag:
    line += f"; target mIoU {pct('target_miou')}"
  return line


def _record_round(run, state, r: int, end: int, diag: dict[str, Any],
                  records: list[dict], records_path: str) -> list[dict]:
  """Evaluates the model that ends round ``r``; rewrites rounds.json."""
  result = train_loop.evaluate_target(run, state, end)
  diag = dict(diag, target_miou=result["miou"], step=end)
  records = [d for d in records if d["round"] != r] + [diag]
  if run.is_main:
    with open(records_path + ".tmp", "w") as f:
      json.dump(records, f, indent=2)
    os.replace(records_path + ".tmp", records_path)
  run.log(_format_round(diag))
  return records


def _signal_history(records: list[dict], before: int) -> list[dict]:
  """Rounds < ``before`` with signals, oldest first: round, phase and the
  `SIGNAL_KEYS` they have (runs from before the signals have none)."""
  return [{"round": d["round"], "phase": d["phase"],
           **{k: d[k] for k in SIGNAL_KEYS if k in d}}
          for d in sorted(records, key=lambda d: d["round"])
          if d["round"] < before and "target_entropy" in d]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       method: base.Method) -> dict[str, Any]:
  """Runs the whole self-training pipeline (resumable); returns the summary."""
  config = _copy(config)
  r1, r2, steps_per_round = rounds_and_steps(config, method)
  os.makedirs(workdir, exist_ok=True)
  st = config.self_training
  config.model.init_checkpoint = warm_base.ensure_base(
      config, workdir, lambda m: print(m, flush=True))
  config = recipe.round_schedule(target_statistics.round_config(config),
                                 steps_per_round)
  run = train_loop.setup(config, workdir, method)
  try:
    train_loop.write_config(run)
    run.writer.write_hparams(config.to_dict())
    gt = None
    if st.report_precision:
      # Diagnostics only: never batched, never seen by a step.
      gt = pipeline.load_domain(
          config.target.name, role="target",
          data_dir=config.target.data_dir or None, split="train",
          height=splits.domain_size(config, "target")[0],
          width=splits.domain_size(config, "target")[1],
          num_images=config.data.num_train_images, seed=config.data.seed,
          require_labels=False,
          list_file=config.target.get("list_file", "") or None).labels
    state, start = train_loop.init_or_restore(run)
    records_path = run.path("rounds.json")
    records = []
    if os.path.exists(records_path):
      with open(records_path) as f:
        records = json.load(f)
    base_eval = bn_eval = None
    if start == 0:
      base_eval = train_loop.evaluate_target(run, state, 0)
      run.log(f"base model: target mIoU {100 * base_eval['miou']:.2f}%")
    run.log(f"{config.method}: {r1} phase-1 + {r2} phase-2 rounds x"
            f" {steps_per_round} steps, batch {config.batch_size}")
    compiled = {}
    source_hist = previous = None
    last = start // steps_per_round - 1
    if (start % steps_per_round == 0 and 0 <= last < r1 + r2
        and not any(d["round"] == last for d in records)):
      # A stop (SIGTERM/SIGINT) on a round's last step checkpoints the round
      # end but leaves before its evaluation; the restored state is exactly
      # that round's final model, so record it now.
      last_labels = load_pseudo_labels(run, last)
      if last_labels is not None:
        records = _record_round(run, state, last, start,
                                last_labels["diagnostics"], records,
                                records_path)
    for r in range(start // steps_per_round, r1 + r2):
      phase = 1 if r < r1 else 2
      if target_statistics.enabled(config) and start <= r * steps_per_round:
        # A function of the last round's final state: a resumed round start
        # re-estimates exactly; mid-round the checkpoint holds them.
        state, bn_eval = target_statistics.at_round_start(run, state, r,
                                                          bn_eval)
      data = load_pseudo_labels(run, r)
      lrent = st.target_loss == "lrent" and phase == 1
      if lrent and parallel.sum_over_processes(np.asarray(
          int(recipe.load_soft(run, r) is None))):
        data = None  # a process's soft labels are missing: all relabel
      if data is None:
        if source_hist is None:
          source_hist = source_histogram(run)
        if previous is None and r > 0:
          previous = (load_pseudo_labels(run, r - 1) or {}).get("pl_label")
        data = make_pseudo_labels(run, state, r, phase, gt,
                                  source_hist=source_hist,
                                  previous_labels=previous)
        data["diagnostics"]["warning"] = progress.no_progress(
            _signal_history(records, r) + [data["diagnostics"]])
        save_pseudo_labels(run, r, data)
        if run.is_main and st.num_pictures:
          # Process 0's share starts at image 0.
          k = min(st.num_pictures, len(run.data["target_train"].images))
          visualize.save_pseudo_label_grid(
              run.path("pictures", f"pseudo_labels_round{r}.png"),
              run.data["target_train"].images[:k], data["before"][:k],
              data["after"][:k], None if gt is None else gt[:k],
              visualize.default_palette(run.num_classes), run.class_names,
              title=f"round {r} (phase {phase}): CBST labels | "
              + ("after voting" if phase == 1 else "easy full labels"))
      diag = data["diagnostics"]
      previous = data["pl_label"]
      if "target_entropy" in diag:
        run.log(_format_signals(diag))
      if diag.get("warning"):
        run.log(diag["warning"])
      run.writer.write_scalars(r * steps_per_round, {
          f"pseudo/{k}": v for k, v in diag.items()
          if isinstance(v, (int, float)) and v is not None})
      if phase not in compiled:
        make = (method.make_step if phase == 1
                else method.phase_steps["phase2"])
        compiled[phase] = train_loop.compile_step(
            run, make(run.models, config, run.tx, run.disc_tx))
      # The labels cover the whole split; batches draw from this
      # process's share (run.data), so keep the matching rows.
      mine = parallel.process_shard(len(data["pl_label"]))
      n = mine.stop - mine.start
      extras = {
          "pl_label": data["pl_label"][mine],
          "pl_weight": data["pl_weight"][mine],
          "is_easy": data["is_easy"][mine],
          "thresholds": np.broadcast_to(data["thresholds"],
                                        (n, run.num_classes)).copy(),
      }
      if lrent:
        extras["pl_soft"] = recipe.load_soft(run, r)
      # CRST: a new random share of the source images each round (§6.6).
      round_run, source_info = recipe.round_source(run, r)
      if source_info:
        diag = dict(diag, **source_info)
        run.log(f"round {r}: {source_info['num_source_images']} source"
                f" images ({100 * source_info['source_portion']:.2f}%)")
      begin = max(start, r * steps_per_round)
      end = (r + 1) * steps_per_round
      state = train_loop.run_steps(
          run, state, compiled[phase],
          recipe.round_batches(round_run, begin, extras,
                               diag.get("mine_ids")),
          begin, end, desc=f"round {r} (phase {phase})")
      records = _record_round(run, state, r, end, diag, records,
                              records_path)
    result = train_loop.evaluate_target(run, state, config.num_steps)
    extra = {"rounds": sorted(records, key=lambda d: d["round"]),
             "base_checkpoint": config.model.init_checkpoint}
    extra["adaptation_signals"] = _signal_history(extra["rounds"],
                                                  r1 + r2)
    extra["adaptation_warning"] = progress.no_progress(
        extra["adaptation_signals"])
    if base_eval is not None:
      extra["base_target_miou"] = base_eval["miou"]
    if bn_eval is not None:
      extra["base_target_miou_with_target_bn"] = bn_eval
    if run.is_main and records:
      run.log("\nper-round summary:")
      for d in extra["rounds"]:
        run.log("  " + _format_round(d))
        if "target_entropy" in d:
          run.log("    " + _format_signals(d))
      if extra["adaptation_warning"]:
        run.log(extra["adaptation_warning"])
    return train_loop.finish(run, state, result, extra=extra)
  finally:
    train_loop.close(run)

