"""What a task is: the hooks where prediction problems differ.

The run loop (``jaxda.train.loop``) is the same for every task; it calls a
``Task``'s hooks to validate the config, load the splits, build models and
optimisers, initialise parameters, evaluate, draw pictures and summarise.
A method names its task (``Method.task``); the loop never compares a task or
method name itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Task:
  """Registry entry of a prediction task (``jaxda.tasks.TASKS``).

  Every hook receives the ``jaxda.train.loop.Run`` (``run``) or the config
  and the ``jaxda.methods.base.Method`` (``method``); none imports the loop.

  Attributes:
    name: registry name (``'segmentation'``, ``'classification'``,
      ``'depth'``).
    config_problems: ``(config, method) -> [message]``: invalid values, one
      line each (empty if fine).
    load_data: ``(config, method) -> {split_name: Domain}`` with
      ``'target_val'`` always, ``'source_train'`` / ``'target_train'`` as
      the method reads them (this process's share).
    build: ``(config, method, data) -> {'models', 'tx', 'labels_fn',
      'disc_tx'}``.
    init_variables: ``(run, key) -> (params, batch_stats, disc_params)``,
      traceable (runs under ``parallel.init_replicated``).
    evaluate: ``(run, state, step, prefix) -> result`` on the target val
      split (last iterate); writes its scalars under ``prefix/``.
    save_pictures: ``(run, state, result, tag) -> {name: path}``.
    summary_target: ``result -> dict``, the ``target`` entry of
      ``summary.json``.
    report: ``result -> (table, headline)`` for the closing printout.
    headline: ``target -> (metric_name, value)``, what runs are compared by
      (a fraction in [0, 1], higher is better: tables print it as %).
    table_metrics: ``target -> {column: value}``, further columns of the
      comparison tables in display units (degrees, %); None: none.
  """
  name: str
  config_problems: Callable[..., list[str]]
  load_data: Callable[..., dict[str, Any]]
  build: Callable[..., dict[str, Any]]
  init_variables: Callable[..., tuple[Any, Any, Any]]
  evaluate: Callable[..., dict[str, Any]]
  save_pictures: Callable[..., dict[str, str]]
  summary_target: Callable[[dict[str, Any]], dict[str, Any]]
  report: Callable[[dict[str, Any]], tuple[str, str]]
  headline: Callable[[dict[str, Any]], tuple[str, float]]
  table_metrics: Callable[[dict[str, Any]], dict[str, float]] | None = None
