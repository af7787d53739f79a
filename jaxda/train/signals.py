"""SIGTERM / SIGINT as a request to stop at the next step boundary."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any


class StopRequested(RuntimeError):
  """SIGTERM/SIGINT stopped training at a step boundary, after a checkpoint.

  Attributes:
    signal_name: ``'SIGTERM'`` or ``'SIGINT'``.
    step: the step the run stopped at (and was checkpointed at).
    exit_code: the shell convention for death by that signal, 128 + its
      number (143 for SIGTERM, 130 for SIGINT).
  """

  def __init__(self, signal_name: str, step: int):
    super().__init__(
        f"stopped by {signal_name} at step {step}; checkpoint saved; rerun"
        " the same command to resume")
    self.signal_name = signal_name
    self.step = step
    self.exit_code = 128 + int(getattr(signal, signal_name))


class StopSignals(contextlib.AbstractContextManager):
  """Turns SIGTERM/SIGINT into a flag while training runs.

  A scheduler's SIGTERM (pre-emption) or a Ctrl-C then stops the loop at the
  next step boundary, where it can checkpoint, instead of killing it
  mid-step. A second signal while the first is pending is not swallowed: the
  previous handlers are put back and the signal re-raised, so a user who
  insists gets the usual behaviour (KeyboardInterrupt, or death by SIGTERM).
  The previous handlers are also restored on exit. Ignored signals stay
  ignored; outside the main thread (where Python cannot install handlers)
  this is a no-op.

  Attributes:
    requested: name of the first signal received (``'SIGTERM'``), or None.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is not threading.main_thread():
      return self
    for signum in self.SIGNALS:
      # An ignored signal (e.g. SIGINT of a job started with `&` or nohup)
      # stays ignored: whoever started us asked for that.
      if signal.getsignal(signum) is signal.SIG_IGN:
        continue
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    self._restore()

  def _restore(self) -> None:
    for signum, handler in self._previous.items():
      # None: the handler was not installed from Python; SIG_DFL is the
      # closest we can put back.
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.requested is None:
      self.requested = signal.Signals(signum).name
      return
    self._restore()
    signal.raise_signal(signum)
