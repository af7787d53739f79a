"""The CLI (``python -m experiments.<module>``) run inside the test process.

For tests of what a run does, not of the process around it (signals,
SIGKILL, multi-process runs and one "exit 2, no traceback" test keep real
subprocesses).
"""

import contextlib
import dataclasses
import io
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class CliResult:
  returncode: int
  stdout: str
  stderr: str


def run(module, *args):
  """``python -m experiments.<module> *args`` in this process.

  Same flag parsing, error handling and exit codes as the subprocess
  (``experiments.main.run_cli``), but the compiled programs stay in this
  process's XLA cache and nothing is imported again. One device (what a
  CPU user gets, as the subprocess tests drop the 8-device XLA flag) unless
  ``args`` set ``--config.num_devices``.
  """
  from experiments import main  # pylint: disable=g-import-not-at-top
  config = [a for a in args if a.startswith("--config=")]
  rest = [a for a in args if not a.startswith("--config=")]
  if not any(a.startswith("--config.num_devices=") for a in rest):
    rest.insert(0, "--config.num_devices=1")
  argv = [f"experiments.{module}", *config, *rest]
  out, err = io.StringIO(), io.StringIO()
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code = main.run_cli(argv, main.config_path(module))
  finally:
    os.chdir(cwd)
  return CliResult(code, out.getvalue(), err.getvalue())
