"""Shared command-line front end of the ``experiments.<method>`` entry points.

Each entry point is ``main.run(default_config_path)``: absl flags
``--config=PATH[:variant]`` (with ``--config.key=value`` overrides, unknown
keys rejected), ``--workdir=DIR``; user errors end with one line saying what
is wrong and how to fix it, not a traceback.
"""

from __future__ import annotations

import os
import sys
from absl import app
from absl import flags
from ml_collections import config_flags

_WORKDIR_HELP = ("Run directory (checkpoints, logs, pictures, summary);"
                 " default runs/<method>_seed<seed>. Rerunning resumes.")
_WORKDIR = flags.DEFINE_string("workdir", None, _WORKDIR_HELP)


def config_path(name: str) -> str:
  """Absolute path of ``experiments/configs/<name>.py``."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                      f"{name}.py")


def define_config_flag(default_config: str) -> None:
  config_flags.DEFINE_config_file(
      "config", default_config, "Config file, optionally PATH:variant.",
      lock_config=True)


def user_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that mean "the user must change something"."""
  from jaxda import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxda.data import errors as data_errors  # pylint: disable=g-import-not-at-top
  from jaxda.train import exceptions as errors  # pylint: disable=g-import-not-at-top
  from jaxda.weights import torch_import  # pylint: disable=g-import-not-at-top
  return (errors.ConfigError, errors.TrainingDivergedError,
          data_errors.DataError, checkpoint.CheckpointError,
          torch_import.WeightImportError, PermissionError, FileNotFoundError)


def run(default_config: str) -> None:
  """Defines the flags and runs ``config.method`` through the registry
  (``jaxda.methods.train_and_evaluate``: the method's driver or the loop)."""
  # Before JAX runs anything (its worker threads keep the allocator arena
  # they start with): XLA:CPU's per-step buffers are then reused instead of
  # page-faulted in again every step (jaxda.host_memory).
  from jaxda import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.keep_freed_memory()
  define_config_flag(default_config)
  app.run(lambda argv: _main(argv, flags.FLAGS),
          flags_parser=lambda argv: _parse_flags(argv, flags.FLAGS))


def run_cli(argv: list[str], default_config: str | None = None) -> int:
  """The CLI in this process (tests): returns the exit code ``run`` would.

  ``argv[0]`` is the program name. Flags go to a fresh ``FlagValues``, so
  calls do not see each other's flags; parsing, user errors and exit codes
  are ``run``'s (everything between parsing and ``sys.exit``).
  """
  argv = list(argv)
  flag_values = flags.FlagValues()
  # The override flags (--config.key=value) are defined from sys_argv.
  config_flags.DEFINE_config_file(
      "config", default_config, "Config file, optionally PATH:variant.",
      flag_values=flag_values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, _WORKDIR_HELP,
                      flag_values=flag_values)
  try:
    _main(_parse_flags(argv, flag_values), flag_values)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return 0


def _main(argv, flag_values):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from absl import logging  # pylint: disable=g-import-not-at-top
  # Orbax and JAX log a lot at INFO; users see jaxda's own progress and
  # summary on stdout. `--verbosity=0` (or -v 0) brings INFO back.
  if "verbosity" not in flag_values or not flag_values["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config = flag_values.config
  workdir = flag_values.workdir or os.path.join(
      "runs", f"{config.method}_seed{config.seed}")
  from jaxda import methods  # pylint: disable=g-import-not-at-top
  from jaxda import parallel  # pylint: disable=g-import-not-at-top
  from jaxda.train import signals  # pylint: disable=g-import-not-at-top
  try:
    # Before any JAX computation: joins the other processes of a
    # multi-host run (config.distributed / JAX_* variables); else no-op.
    parallel.initialize_distributed(config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    # Every entry point alike: config mistakes (num_steps < 1, bad sizes or
    # scales) fail here in one line, before any driver trains a base model.
    from jaxda.train import loop  # pylint: disable=g-import-not-at-top
    loop.validate_config(config, methods.get_method(config.method))
    methods.train_and_evaluate(config, workdir)
  except signals.StopRequested as e:
    # SIGTERM/SIGINT: a checkpoint was written; exit as the signal would
    # have (143 / 130) so schedulers see the run was stopped, not done.
    print(str(e), file=sys.stderr)
    sys.exit(e.exit_code)
  except user_errors() as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted; rerun the same command to resume from the last"
          " checkpoint", file=sys.stderr)
    sys.exit(130)


def _parse_flags(argv, flag_values):
  """Parses flags; a bad ``--config.*`` override is a one-line error."""
  try:
    return flag_values(argv)
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:  # An exception inside the config file.
      lines = [l for l in message.splitlines() if l.strip()]
      cause = [l.strip() for l in lines if "Error:" in l][-1:]
      message = " ".join([lines[0]] + cause)
    print(f"error: {message}\nPass --helpfull to see the flags.",
          file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections reports an unknown key as AttributeError("'key'\nDid you
    # mean ...") and a wrong type as TypeError/ValueError.
    message = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
    message = message.replace("\\'", "'")
    print(f"error: bad config override: {message}. Valid keys are listed by"
          " the config file (experiments/configs/*.py).", file=sys.stderr)
    sys.exit(2)
