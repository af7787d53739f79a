"""Metric logging without TensorFlow: TensorBoard events, JSON lines, progress.

CLU's `metric_writers` and `flax.metrics.tensorboard` import TensorFlow, so
jaxda writes TensorBoard event files through `tensorboardX` and, next to them,
a plain `metrics.jsonl` that scripts and plots read back with `read_history`
(no TensorBoard needed).  Only one process should write: pass
`enabled=jax.process_index() == 0` and every method of the others is a no-op.

Typical use::

  with writers.MetricWriter(workdir, enabled=jax.process_index() == 0,
                            purge_step=restored_step) as writer:
    writer.write_hparams(config.to_dict())
    bar = writers.ProgressBar(total=num_steps, initial=restored_step)
    for step in ...:
      ...
      writer.write_scalars(step, {'loss': loss, 'lr': lr})
      bar.update(1, loss=loss)
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
import json
import os
import sys
from typing import Any

import tqdm


def _import_tensorboardx():
  """``tensorboardX`` without its optional ``import torch`` (~1 s).

  tensorboardX imports torch when it is installed, only to accept torch
  tensors; jaxda passes NumPy values. A process that already has torch (a
  weight import) keeps it; otherwise torch is hidden for this one import.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules['torch'] = None  # `import torch` raises ImportError meanwhile.
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return tensorboardX


tensorboardX = _import_tensorboardx()

METRICS_FILENAME = 'metrics.jsonl'
HPARAMS_FILENAME = 'hparams.json'

# Key of the marker line written when a run restarts from a checkpoint; see
# `MetricWriter(purge_step=...)` and `read_history`.
_PURGE_KEY = 'purge_step'


def _to_float(value: Any) -> float:
  """Converts a Python, NumPy or JAX scalar (or size-1 array) to float."""
  # float() works on Python numbers, NumPy scalars, 0-d / size-1 NumPy arrays
  # and 0-d jax.Arrays (it fetches the value to the host).
  return float(value)


def flatten_dict(tree: Mapping[str, Any], sep: str = '.') -> dict[str, Any]:
  """Flattens nested mappings into one level with `sep`-joined keys.

  Objects with a `to_dict()` method (e.g. `ml_collections.ConfigDict`) are
  flattened like mappings.

  Args:
    tree: nested mapping, e.g. `{'optim': {'lr': 0.1}, 'seed': 0}`.
    sep: separator placed between nested keys.

  Returns:
    A flat dict, e.g. `{'optim.lr': 0.1, 'seed': 0}`, in insertion order.
  """
  flat = {}

  def visit(prefix: str, node: Any) -> None:
    if hasattr(node, 'to_dict') and not isinstance(node, Mapping):
      node = node.to_dict()
    if isinstance(node, Mapping):
      if not node and prefix:
        flat[prefix] = {}  # Keep empty sections visible.
      for key, value in node.items():
        visit(f'{prefix}{sep}{key}' if prefix else str(key), value)
    else:
      flat[prefix] = node

  visit('', tree)
  return flat


class MetricWriter:
  """Writes scalars to TensorBoard event files and to `metrics.jsonl`.

  Every `write_scalars` call appends one JSON line
  `{"step": int, "<name>": float, ...}` to `logdir/metrics.jsonl`; an existing
  file is appended to, so a resumed run continues the same history (see
  `read_history` for how re-logged steps are resolved).

  With `enabled=False` (non-zero processes) nothing is created or written and
  every method returns immediately.
  """

  def __init__(
      self,
      logdir: str | os.PathLike[str],
      *,
      enabled: bool = True,
      purge_step: int | None = None,
  ):
    """Opens the writers.

    Args:
      logdir: directory for the event files, `metrics.jsonl` and
        `hparams.json`; created if missing.
      enabled: False makes the writer a no-op (use on processes other than 0).
      purge_step: step a resumed run restarts from.  TensorBoard then hides
        points with `step >= purge_step` from the interrupted run, and
        `read_history` drops such points from `metrics.jsonl` unless they are
        logged again.  None for a fresh run.
    """
    self.logdir = os.fspath(logdir)
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    os.makedirs(self.logdir, exist_ok=True)
    # tensorboardX writes a SessionLog.START event at `purge_step`, which is
    # how TensorBoard learns to discard the stale tail of the previous run.
    self._tb = tensorboardX.SummaryWriter(
        logdir=self.logdir, purge_step=purge_step
    )
    self._jsonl = open(
        os.path.join(self.logdir, METRICS_FILENAME), 'a', encoding='utf-8'
    )
    if purge_step is not None:
      self._write_line({_PURGE_KEY: int(purge_step)})

  def _write_line(self, record: Mapping[str, Any]) -> None:
    # allow_nan (the default) keeps a diverged loss visible as NaN in the
    # file; Python's json module reads it back.
    self._jsonl.write(json.dumps(record) + '\n')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs scalar metrics at `step`.

    Args:
      step: global training step.
      scalars: name -> value; values may be Python numbers, NumPy scalars or
        0-d / size-1 arrays (NumPy or JAX).  Names use `/` for TensorBoard
        grouping, e.g. `'train/loss'`.
    """
    if not self.enabled:
      return
    step = int(step)
    values = {str(name): _to_float(value) for name, value in scalars.items()}
    if 'step' in values:
      raise ValueError("'step' is reserved in metrics.jsonl; rename it.")
    for name, value in values.items():
      self._tb.add_scalar(name, value, global_step=step)
    self._write_line({'step': step, **values})

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Logs a text (markdown) summary to TensorBoard (not to the JSON lines).

    Args:
      step: global training step.
      tag: TensorBoard tag.
      text: the text; rendered as markdown by TensorBoard.
    """
    if not self.enabled:
      return
    self._tb.add_text(tag, text, global_step=int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records hyperparameters as `hparams.json` and as TensorBoard text.

    Nested mappings (and `ConfigDict`s) are flattened to dotted keys.  Values
    that are not JSON types are stored as their `str()`.  A second call (e.g.
    after a resume) overwrites `hparams.json`.

    Args:
      hparams: possibly nested mapping of hyperparameters.
    """
    if not self.enabled:
      return
    flat = flatten_dict(hparams)
    path = os.path.join(self.logdir, HPARAMS_FILENAME)
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(flat, f, indent=2, sort_keys=True, default=str)
    # A two-column markdown table reads well in TensorBoard's text tab.
    rows = [f'| {key} | {value!r} |' for key, value in sorted(flat.items())]
    table = '\n'.join(['| name | value |', '|---|---|', *rows])
    self._tb.add_text('hparams', table, global_step=0)

  def flush(self) -> None:
    """Pushes buffered events and lines to disk."""
    if not self.enabled or self._jsonl is None:
      return
    self._tb.flush()
    self._jsonl.flush()

  def close(self) -> None:
    """Flushes and closes the files; further calls are no-ops."""
    if not self.enabled or self._jsonl is None:
      return
    self._tb.close()
    self._jsonl.close()
    self._tb = None
    self._jsonl = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_history(
    logdir: str | os.PathLike[str],
) -> dict[str, list[tuple[int, float]]]:
  """Reads `logdir/metrics.jsonl` back into per-metric series.

  A resumed run re-logs steps already in the file; the LAST value written for
  a (name, step) pair wins, so each step appears once.  A `purge_step` marker
  (see `MetricWriter`) drops every earlier point with `step >= purge_step`.
  A truncated last line (process killed mid-write) is skipped.

  Args:
    logdir: directory holding `metrics.jsonl`.

  Returns:
    name -> list of (step, value), sorted by step.  Empty if the file is
    missing.
  """
  path = os.path.join(os.fspath(logdir), METRICS_FILENAME)
  if not os.path.exists(path):
    return {}
  points = collections.defaultdict(dict)  # name -> {step: value}
  with open(path, encoding='utf-8') as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if _PURGE_KEY in record and 'step' not in record:
        purge = record[_PURGE_KEY]
        for series in points.values():
          for step in [s for s in series if s >= purge]:
            del series[step]
        continue
      if 'step' not in record:
        continue
      step = int(record.pop('step'))
      for name, value in record.items():
        points[name][step] = float(value)
  return {
      name: sorted(series.items()) for name, series in points.items() if series
  }


class ProgressBar:
  """A tqdm progress bar on stderr showing steps/s and ETA.

  With `enabled=False` (non-zero processes, or quiet runs) nothing is printed.
  """

  def __init__(
      self,
      total: int,
      initial: int = 0,
      desc: str | None = None,
      enabled: bool = True,
  ):
    """Creates the bar.

    Args:
      total: step count at completion.
      initial: steps already done (a resumed run starts here).
      desc: label printed before the bar.
      enabled: False makes every method a no-op.
    """
    self.enabled = enabled
    self._bar = None
    if enabled:
      self._bar = tqdm.tqdm(
          total=total,
          initial=initial,
          desc=desc,
          unit='step',
          file=sys.stderr,
          dynamic_ncols=True,
      )

  def update(self, n: int = 1, **postfix: Any) -> None:
    """Advances the bar by `n` steps and shows `postfix` values after it.

    Args:
      n: number of steps done since the last update.
      **postfix: values to display, e.g. `loss=0.31`; numbers (including
        NumPy/JAX scalars) are printed with 4 significant digits.
    """
    if self._bar is None:
      return
    if postfix:
      shown = {}
      for key, value in postfix.items():
        try:
          shown[key] = f'{_to_float(value):.4g}'
        except (TypeError, ValueError):
          shown[key] = str(value)
      # refresh=False: update() below redraws once, not twice.
      self._bar.set_postfix(shown, refresh=False)
    self._bar.update(n)

  def close(self) -> None:
    """Closes the bar; further calls are no-ops."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> ProgressBar:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

