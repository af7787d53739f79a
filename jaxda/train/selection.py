"""Model selection on the target val labels (``eval.selection``).

``'last'`` (the default) reports the last iterate and uses no target
labels. ``'best_on_target_val'`` is what AdaptSegNet and ADVENT reported
(METHODS.md §3.10: a checkpoint every N steps, the best on the target val
set): it evaluates every ``eval.every`` steps, keeps the best model's
weights in ``workdir/best_checkpoint`` and reports that model, labelled as
chosen with target labels (optimistic: not an unsupervised result).

Why a module of its own: the loop stays one pass of steps; this only cuts
it at the evaluation points and keeps the history. Resume-safe: every
evaluation point is a checkpoint step of the loop, and the history
(``selection.json``) only holds points at or before the resumed step.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from jaxda import checkpoint as checkpoint_lib

LAST = "last"
BEST_ON_TARGET_VAL = "best_on_target_val"
SELECTIONS = (LAST, BEST_ON_TARGET_VAL)
NOTE = ("best checkpoint on the target val labels (the originals'"
        " reporting; optimistic: uses target labels for model selection)")


def eval_points(start: int, num_steps: int, every: int) -> list[int]:
  """Steps after ``start`` at which the model is evaluated: the multiples of
  ``every`` and ``num_steps`` (always the last)."""
  points = [s for s in range(every, num_steps, every) if s > start]
  return points + [num_steps] if num_steps > start else points


def best_entry(history: list[dict[str, Any]]) -> dict[str, Any] | None:
  """The entry with the highest score; the earliest among equals."""
  best = None
  for entry in history:
    if best is None or entry["score"] > best["score"]:
      best = entry
  return best


def _load_history(path: str, start: int) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [e for e in json.load(f) if e["step"] <= start]


def _write_history(path: str, history: list[dict[str, Any]]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(history, f, indent=2)
  os.replace(tmp, path)


def train_select_best(
    run, state, start: int, *,
    train_until: Callable[[Any, int, int], Any],
    evaluate: Callable[[Any, int], dict[str, Any]],
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """Trains to ``config.num_steps``, evaluating at every ``eval.every``.

  Args:
    run: the loop's ``Run``.
    state: the (restored) train state at ``start``.
    start: the step ``state`` is at.
    train_until: ``(state, from, to) -> state``, the loop's steps; it
      checkpoints at ``to``.
    evaluate: ``(state, step) -> result``, the task's target evaluation.

  Returns:
    ``(best_state, best_result, info)``; ``info`` goes to ``summary.json``
    (history, best step, the last iterate's target metrics, the note).
  """
  config = run.config
  every = int(config.eval.get("every", 0)) or int(config.checkpoint_every)
  history_path = run.path("selection.json")
  history = _load_history(history_path, start)
  best_ckpt = checkpoint_lib.Checkpointer(run.path("best_checkpoint"),
                                          max_to_keep=1)
  results: dict[int, dict[str, Any]] = {}
  points = eval_points(start, config.num_steps, every)
  # A kill between the loop's checkpoint at an evaluation point and its
  # history entry resumes at that point: evaluate it again.
  if start and start % every == 0 and start not in {e["step"] for e in history}:
    points = [start] + points
  step = start
  for point in points:
    if point > step:
      state = train_until(state, step, point)
      step = point
    result = evaluate(state, point)
    results[point] = result
    name, score = run.task.headline(run.task.summary_target(result))
    previous = best_entry(history)
    history.append({"step": point, "metric": name, "score": float(score)})
    if previous is None or score > previous["score"]:
      # Weights first, then the history entry naming them.
      best_ckpt.save(point, state, force=True)
      best_ckpt.wait()
    if run.is_main:
      _write_history(history_path, history)
    run.log(f"selection: step {point} target {name} {score:.4f}"
            f" (best {max(e['score'] for e in history):.4f})")
  best = best_entry(history)
  last = results.get(config.num_steps)
  if last is None:  # Resumed after the end: evaluate the last iterate.
    last = evaluate(state, config.num_steps)
  if best["step"] in results:
    best_result = results[best["step"]]
    best_state = state if best["step"] == config.num_steps else \
        best_ckpt.restore(state, best["step"])[0]
  else:  # Chosen before a resume: its weights are on disk.
    best_state, _ = best_ckpt.restore(state, best["step"])
    best_result = evaluate(best_state, config.num_steps)
  best_ckpt.close()
  info = {"model_selection": BEST_ON_TARGET_VAL,
          "selection": {"note": NOTE, "every": every,
                        "best_step": best["step"], "history": history,
                        "last_iterate_target": run.task.summary_target(last),
                        "best_checkpoint": run.path("best_checkpoint")}}
  return best_state, best_result, info
