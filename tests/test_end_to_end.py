"""Every entry point end to end on the tiny config; resume; user errors.

These run the real CLI (``experiments.<name>``: same flags, errors and exit
codes) on the embedded benchmark at tiny size, in this process
(``inprocess_cli``) so compiled programs are shared between runs; one
user-error test runs ``python -m`` in a subprocess, exactly as a user would,
to check the exit code and that no traceback reaches stderr.
"""

import json
import os
import shutil
import subprocess
import sys

import inprocess_cli
import child_env
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, cache_dir, check=True):
  """The CLI in this process; one device unless ``--config.num_devices``."""
  # --config must come before its overrides.
  config = [a for a in args if a.startswith("--config=")]
  rest = [a for a in args if not a.startswith("--config=")]
  proc = inprocess_cli.run(module, *config,
                           f"--config.source.data_dir={cache_dir}",
                           f"--config.target.data_dir={cache_dir}", *rest)
  if check and proc.returncode != 0:
    raise AssertionError(f"{module} {args} failed:\n{proc.stdout}\n"
                         f"{proc.stderr}")
  return proc


def _run_subprocess(module, *args, cache_dir, check=True, xla_flags=None):
  env = child_env.child_env()  # One device: what a CPU user gets.
  if xla_flags:
    env["XLA_FLAGS"] = f"{xla_flags} {child_env.COMPILE_FLAGS}"
  # --config must come before its overrides.
  config = [a for a in args if a.startswith("--config=")]
  rest = [a for a in args if not a.startswith("--config=")]
  cmd = [sys.executable, "-m", f"experiments.{module}", *config,
         f"--config.source.data_dir={cache_dir}",
         f"--config.target.data_dir={cache_dir}", *rest]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}")
  return proc


@pytest.fixture(scope="module")
def cache_dir(shared_data_cache):
  return shared_data_cache


@pytest.fixture(scope="module")
def source_only_run(tmp_path_factory, cache_dir):
  """One finished tiny source-only run (4 steps, checkpoints at 2 and 4).

  Shared by the tests that start from such a run (resume, a NaN after it,
  a donor of weights); a test that changes the run works on a copy
  (`_copy_of`).
  """
  workdir = tmp_path_factory.mktemp("source_only_run") / "run"
  proc = _run("source_only", _TINY, f"--workdir={workdir}",
              cache_dir=cache_dir)
  return workdir, proc


def _copy_of(run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  return workdir


def _check_summary(workdir, method, steps):
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["method"] == method
  assert summary["steps"] == steps
  assert isinstance(summary["seed"], int)
  assert summary["wall_time_s"] > 0
  target = summary["target"]
  assert 0.0 <= target["miou"] <= 1.0
  assert 0.0 <= target["pixel_accuracy"] <= 1.0
  assert len(target["per_class_iou"]) >= 8
  assert summary["config"]["method"] == method
  for path in summary["files"]["pictures"].values():
    assert os.path.getsize(path) > 1000
  return summary


# Resume is checked on AdaptSegNet (segmenter, discriminators, their
# optimisers); source-only's resume is test_best_on_target_val_selection_
# and_resume's second run (CI time: one fewer 6-step run). ADVENT's entry
# point (the same three-line `main.run` wrapper) left CI for time: its step
# runs in test_methods (and lowers in the slow test_lowering sweep).
@pytest.mark.parametrize("module,method,resume", [
    ("source_only", "source_only", False), ("oracle", "oracle", False),
    ("adaptsegnet", "adaptsegnet", True)])
def test_entry_point_runs_and_resumes(request, tmp_path, cache_dir, module,
                                      method, resume):
  config = f"--config=experiments/configs/{module}.py:tiny"
  if module == "source_only":  # The module's shared run is this first run.
    run, proc = request.getfixturevalue("source_only_run")
    workdir = str(_copy_of(run, tmp_path))
  else:
    workdir = str(tmp_path / "run")
    proc = _run(module, config, f"--workdir={workdir}", cache_dir=cache_dir)
  assert "target mIoU" in proc.stdout
  _check_summary(workdir, method, 4)
  if not resume:
    return
  steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert "4" in steps
  # Rerun with more steps: resumes from step 4 instead of starting over.
  proc = _run(module, config, f"--workdir={workdir}", "--config.num_steps=6",
              cache_dir=cache_dir)
  assert "Resuming from checkpoint step 4" in proc.stdout
  _check_summary(workdir, method, 6)
  lines = [json.loads(l) for l in open(os.path.join(workdir,
                                                    "metrics.jsonl"))]
  logged = sorted({l["step"] for l in lines if "train/loss" in l})
  assert logged == [2, 4, 6]


def test_tpld_pipeline_tiny(tmp_path, cache_dir):
  workdir = str(tmp_path / "tpld")
  proc = _run("tpld", "--config=experiments/configs/tpld.py:tiny",
              f"--workdir={workdir}", cache_dir=cache_dir)
  out = proc.stdout
  assert "round 0 (phase 1" in out and "round 1 (phase 2" in out
  assert "density" in out and "precision" in out and "target mIoU" in out
  summary = _check_summary(workdir, "tpld", 4)
  rounds = summary["rounds"]
  assert [r["phase"] for r in rounds] == [1, 2]
  assert rounds[1]["num_easy"] + rounds[1]["num_hard"] == 16
  # Label-free adaptation signals, one entry per round (issue 23 item 4).
  signals = summary["adaptation_signals"]
  assert [s["round"] for s in signals] == [0, 1]
  assert all(0 <= s["target_entropy"] <= 1 and 0 <= s["class_drift"] <= 1
             for s in signals)
  assert "agreement" not in signals[0] and 0 <= signals[1]["agreement"] <= 1
  assert "adaptation_warning" in summary
  assert "round 1 signals (no target labels): target entropy" in out
  assert os.path.exists(os.path.join(workdir, "base_source_only",
                                     "summary.json"))
  for r in (0, 1):
    assert os.path.exists(os.path.join(workdir, "pseudo_labels",
                                       f"round_{r}.npz"))
    assert os.path.exists(os.path.join(workdir, "pictures",
                                       f"pseudo_labels_round{r}.png"))


def test_unknown_config_key_is_one_line_error(tmp_path, cache_dir):
  proc = _run("source_only", "--config=experiments/configs/source_only.py:tiny",
              f"--workdir={tmp_path}", "--config.optim.learnin_rate=0.1",
              cache_dir=cache_dir, check=False)
  assert proc.returncode != 0
  assert "learnin_rate" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_missing_data_dir_is_one_line_error(tmp_path, cache_dir):
  # The one user error run as a real process: exit status 2 and no
  # traceback on the process's stderr.
  proc = _run_subprocess("source_only", "--config=experiments/configs/source_only.py:tiny",
              f"--workdir={tmp_path / 'w'}", "--config.source.name=folder",
              f"--config.source.data_dir={tmp_path / 'nope'}",
              cache_dir=cache_dir, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error:")
  assert "nope" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_nan_loss_stops_and_keeps_good_checkpoint(tmp_path, cache_dir,
                                                  source_only_run):
  workdir = _copy_of(source_only_run[0], tmp_path)
  config = "--config=experiments/configs/source_only.py:tiny"
  before = sorted(os.listdir(workdir / "checkpoints"))
  proc = _run("source_only", config, f"--workdir={workdir}",
              "--config.num_steps=8", "--config.optim.learning_rate=1e30",
              cache_dir=cache_dir, check=False)
  assert proc.returncode == 2
  assert "NaN/Inf" in proc.stderr and "Traceback" not in proc.stderr
  after = sorted(os.listdir(workdir / "checkpoints"))
  assert after == before  # nothing bad was written, nothing good was lost


def test_folder_layout_for_both_domains(tmp_path, cache_dir):
  """The documented folder layout works for source and target, no code
  change; the target train split has no labels at all."""
  from jaxda.data.readers import folder
  from jaxda.data.embedded import synthetic
  root = tmp_path / "data"
  for domain in ("source", "target"):
    for split, n in (("train", 8), ("val", 4)):
      images, labels = synthetic.generate(domain, n, height=40, width=72,
                                          seed=1 if split == "train" else 2)
      keep_labels = not (domain == "target" and split == "train")
      folder.export_folder(str(root / domain), split, images,
                           labels if keep_labels else None,
                           synthetic.CLASS_NAMES)
  assert not (root / "target" / "train" / "labels").exists()
  workdir = tmp_path / "run"
  _run("adaptsegnet", "--config=experiments/configs/adaptsegnet.py:tiny",
       f"--workdir={workdir}", "--config.source.name=folder",
       f"--config.source.data_dir={root / 'source'}",
       "--config.target.name=folder",
       f"--config.target.data_dir={root / 'target'}", cache_dir=cache_dir)
  summary = _check_summary(str(workdir), "adaptsegnet", 4)
  assert summary["target"]["num_images"] == 4


_TINY = "--config=experiments/configs/source_only.py:tiny"


def _assert_one_line_error(proc, *needles):
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines()
           if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


def test_wrong_config_value_type_is_one_line_error(tmp_path, cache_dir):
  proc = _run("source_only", _TINY, f"--workdir={tmp_path}",
              "--config.batch_size=eight", cache_dir=cache_dir, check=False)
  _assert_one_line_error(proc, "batch_size", "eight")


def test_batch_not_divisible_by_devices_is_one_line_error(tmp_path,
                                                          cache_dir):
  proc = _run("source_only", _TINY, f"--workdir={tmp_path}",
              "--config.batch_size=3", "--config.num_devices=2",
              cache_dir=cache_dir, check=False)
  _assert_one_line_error(proc, "batch size 3", "multiple of 2")


def test_missing_init_checkpoint_is_one_line_error(tmp_path, cache_dir):
  proc = _run("source_only", _TINY, f"--workdir={tmp_path / 'w'}",
              f"--config.model.init_checkpoint={tmp_path / 'no_such_run'}",
              cache_dir=cache_dir, check=False)
  _assert_one_line_error(proc, "no_such_run", "does not exist")


def test_weights_of_another_architecture_are_one_line_error(
    tmp_path, cache_dir, source_only_run):
  donor = source_only_run[0]
  before = sorted(os.listdir(donor / "checkpoints"))
  proc = _run("source_only", _TINY, f"--workdir={tmp_path / 'w2'}",
              f"--config.model.init_checkpoint={donor}",
              "--config.model.name=deeplabv2_resnet50",
              cache_dir=cache_dir, check=False)
  _assert_one_line_error(proc, str(donor), "has shape", "the model expects")
  assert sorted(os.listdir(donor / "checkpoints")) == before


def test_best_on_target_val_selection_and_resume(tmp_path, cache_dir):
  workdir = str(tmp_path / "select")
  args = ("--config=experiments/configs/source_only.py:tiny",
          f"--workdir={workdir}", "--config.eval.selection=best_on_target_val",
          "--config.eval.every=2")
  proc = _run("source_only", *args, cache_dir=cache_dir)
  assert "model selection: step" in proc.stdout
  summary = _check_summary(workdir, "source_only", 4)
  sel = summary["selection"]
  assert summary["model_selection"] == "best_on_target_val"
  assert [e["step"] for e in sel["history"]] == [2, 4]
  best = max(sel["history"], key=lambda e: e["score"])
  assert sel["best_step"] == best["step"]
  # The reported model is the best one, scored as its history entry says
  # (the task's headline metric).
  assert best["metric"] == "miou"
  assert summary["target"]["miou"] == pytest.approx(best["score"])
  assert os.listdir(os.path.join(workdir, "best_checkpoint")) == [
      str(best["step"])]
  last = next(e for e in sel["history"] if e["step"] == 4)
  assert sel["last_iterate_target"]["miou"] == pytest.approx(
      last["score"])
  # Resumed with more steps: the history keeps its points and goes on.
  _run("source_only", *args, "--config.num_steps=6", cache_dir=cache_dir)
  with open(os.path.join(workdir, "summary.json")) as f:
    resumed = json.load(f)["selection"]
  assert [e["step"] for e in resumed["history"]] == [2, 4, 6]
  assert resumed["history"][:2] == sel["history"]


def test_selection_is_refused_by_multi_stage_drivers(tmp_path, cache_dir):
  proc = _run("tpld", "--config=experiments/configs/tpld.py:tiny",
              f"--workdir={tmp_path}",
              "--config.eval.selection=best_on_target_val",
              cache_dir=cache_dir, check=False)
  assert proc.returncode == 2
  assert "multi-stage driver" in proc.stderr and "Traceback" not in proc.stderr
