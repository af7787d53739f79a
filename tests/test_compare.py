"""experiments.compare writes result files a repository can commit."""

import json
import os
import subprocess

import pytest
from absl import flags

from experiments import compare
from experiments import results_files


def test_config_diff_lists_changed_and_one_sided_keys():
  default = {"seed": 0, "optim": {"lr": 0.1, "power": 0.9}, "a": (1, 2)}
  config = {"seed": 3, "optim": {"lr": 0.2, "power": 0.9}, "a": (1, 2),
            "b": True}
  assert results_files.config_diff(config, default) == {"optim.lr": 0.2,
                                                         "b": True}
  assert results_files.config_diff(default, default) == {}


def test_aggregate_mean_std_and_gain_over_source_only():
  rows = [{"label": l, "shift": "s", "seed": seed, "metric": "miou",
           "value": v, "wall_time_s": 1.0}
          for l, seed, v in [("source_only", 0, 0.20), ("source_only", 1, 0.30),
                             ("tpld", 0, 0.25), ("tpld", 1, 0.40)]]
  agg = results_files.aggregate(rows, "source_only")
  tpld = agg["tpld|s"]
  assert tpld["mean"] == pytest.approx(32.5)
  assert tpld["std"] == pytest.approx(abs(40 - 25) / 2 ** 0.5)  # n - 1
  assert tpld["gain"] == pytest.approx(7.5)  # mean of +5 and +10
  assert agg["source_only|s"]["gain"] is None


def test_extra_columns_mean_std_in_display_units():
  rows = [{"label": l, "shift": "s", "seed": seed, "metric": "within_22_5",
           "value": v, "wall_time_s": 2.0, "extra": {"mean angle (deg)": a}}
          for l, seed, v, a in [("mtl_src", 0, 0.5, 30.0),
                                ("mtl_src", 1, 0.6, 20.0),
                                ("mtl_a", 0, 0.8, 10.0)]]
  table = {"provenance": {"commit": "abc", "dirty": False, "date": "d",
                          "machine": {"cpu": "c", "cores": 2,
                                      "device": "cpu"}},
           "rows": rows, "baseline": "mtl_src",
           "aggregate": results_files.aggregate(rows, "mtl_src")}
  agg = table["aggregate"]
  assert agg["mtl_src|s"]["extra"]["mean angle (deg)"] == pytest.approx(
      [25.0, 50 ** 0.5])
  md = results_files.markdown(table).splitlines()
  assert md[2].endswith("| mean angle (deg) | seeds | wall s (mean) |")
  assert "| 25.00 ± 7.07 |" in md[4] and "| 10.00 ± 0.00 |" in md[5]
  assert md[3].count("---") == 8
  # Rows without extras (segmentation, classification) keep 7 columns.
  for r in rows:
    del r["extra"]
  table["aggregate"] = results_files.aggregate(rows, "mtl_src")
  assert results_files.markdown(table).splitlines()[3].count("---") == 7


def test_gitignore_keeps_only_result_files(tmp_path):
  out = tmp_path / "results" / "bench"
  run = out / "source_only_seed0"
  (run / "checkpoints" / "4").mkdir(parents=True)
  (run / "pictures").mkdir()
  for name in ("summary.json", "rounds.json", "provenance.json",
               "config.json", "metrics.jsonl", "checkpoints/4/state",
               "pictures/a.png"):
    (run / name).write_text("x")
  results_files.write_gitignore(str(out))
  subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
  listed = subprocess.run(
      ["git", "ls-files", "--others", "--exclude-standard"], cwd=tmp_path,
      capture_output=True, text=True, check=True).stdout.split()
  assert sorted(listed) == sorted(
      f"results/bench/{p}" for p in (
          ".gitignore", "source_only_seed0/summary.json",
          "source_only_seed0/rounds.json",
          "source_only_seed0/provenance.json"))


def _fake_train(config, workdir):
  """A run's summary without training (the CLI tests train for real)."""
  os.makedirs(workdir)
  summary = {"method": config.method, "wall_time_s": 1.5,
             "target": {"miou": 0.25 + 0.01 * config.seed},
             "config": config.to_dict()}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f)
  return summary


def test_compare_run_writes_table_and_provenance(tmp_path, shared_data_cache,
                                                 monkeypatch):
  from jaxda import methods  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(methods, "train_and_evaluate", _fake_train)
  out = str(tmp_path / "bench")
  argv = ["compare", "--methods=source_only:tiny", "--seeds=0",
          "--shifts=weather", f"--out={out}",
          f"--override=source.data_dir={shared_data_cache}",
          f"--override=target.data_dir={shared_data_cache}"]
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  try:
    compare._main(argv)
    with open(os.path.join(out, "table.json")) as f:
      table = json.load(f)
    (row,) = table["rows"]
    assert row["shift"] == "weather" and row["seed"] == 0
    assert row["config_diff"]["target.shift"] == "weather"
    assert row["commit"] == table["provenance"]["commit"]
    assert row["workdir"] == "source_only-tiny_weather_seed0"
    assert row["value"] == 0.25 and row["wall_time_s"] >= 0
    with open(os.path.join(out, row["workdir"], "summary.json")) as f:
      assert json.load(f)["target"]["miou"] == row["value"]
    md = open(os.path.join(out, "table.md")).read()
    assert "| source_only-tiny | weather | miou |" in md
    # A second call reuses the finished run (same row, no training).
    compare._main(argv)
    with open(os.path.join(out, "table.json")) as f:
      assert json.load(f)["rows"] == table["rows"]
  finally:
    flags.FLAGS.unparse_flags()


def test_only_finished_trains_nothing_and_adapted_base_starts_from_adaptsegnet(
    tmp_path, shared_data_cache, monkeypatch):
  from jaxda import methods  # pylint: disable=g-import-not-at-top
  trained = []

  def fake(config, workdir):
    trained.append((config.method, config.model.init_checkpoint))
    return _fake_train(config, workdir)

  monkeypatch.setattr(methods, "train_and_evaluate", fake)
  out = str(tmp_path / "bench")
  common = [f"--out={out}", f"--override=source.data_dir={shared_data_cache}",
            f"--override=target.data_dir={shared_data_cache}"]
  argv = ["compare", "--methods=adaptsegnet:tiny,tpld:tiny+adapted_base",
          "--seeds=0", *common]
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  try:
    compare._main(argv)
    # The base is the method spec's config name, so only "adaptsegnet"
    # (not "adaptsegnet:tiny") in --methods makes the link; here it is absent.
    assert trained == [("adaptsegnet", ""), ("tpld", "")]
    trained.clear()
    argv = ["compare", "--methods=adaptsegnet,tpld:adapted_base",
            "--seeds=0", "--override=num_steps=2", *common]
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    compare._main(argv)
    assert trained == [("adaptsegnet", ""),
                       ("tpld", os.path.join(out, "adaptsegnet_seed0"))]
    # --only_finished: seed 1 was never run, so nothing trains and the
    # table keeps the finished seed only.
    trained.clear()
    argv += ["--seeds=0,1", "--only_finished"]
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    compare._main(argv)
    assert not trained
    with open(os.path.join(out, "table.json")) as f:
      rows = json.load(f)["rows"]
    assert sorted((r["label"], r["seed"]) for r in rows) == [
        ("adaptsegnet", 0), ("tpld-adapted_base", 0)]
  finally:
    flags.FLAGS.unparse_flags()


def test_user_errors_are_one_line_and_keep_finished_runs(
    tmp_path, shared_data_cache, monkeypatch, capsys):
  """A base run kept as a summary without a checkpoint (a committed results
  directory), a bad override and an unknown method end in one line naming
  the run and the fix, exit code 2, and the finished run stays."""
  from jaxda import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxda import methods  # pylint: disable=g-import-not-at-top

  def fake(config, workdir):
    if config.model.init_checkpoint:
      raise checkpoint.CheckpointError(
          f"no readable checkpoint in {config.model.init_checkpoint}")
    return _fake_train(config, workdir)

  monkeypatch.setattr(methods, "train_and_evaluate", fake)
  out = str(tmp_path / "bench")
  common = [f"--out={out}", "--seeds=0", "--override=num_steps=2",
            f"--override=source.data_dir={shared_data_cache}",
            f"--override=target.data_dir={shared_data_cache}"]
  cases = [
      (["--methods=source_only,tpld"], "tpld seed 0: no readable checkpoint",
       "--override model.init_checkpoint=PATH"),
      (["--methods=source_only", "--override=num_stepz=3"],
       "bad --override 'num_stepz=3'", 'did you mean "num_steps"'),
      (["--methods=source_only,tpldx"], "unknown method 'tpldx'", ", tpld"),
      (["--methods=oracle", "--override=num_steps=0"],
       "oracle seed 0: config.num_steps must be >= 1", ""),
  ]
  try:
    for extra, what, fix in cases:
      argv = ["compare", *common, *extra]
      flags.FLAGS.unparse_flags()
      flags.FLAGS(argv)
      with pytest.raises(SystemExit) as exit_info:
        compare._main(argv)
      assert exit_info.value.code == 2
      err = capsys.readouterr().err.strip().splitlines()
      assert len(err) == 1 and err[0].startswith("error: "), err
      assert what in err[0] and fix in err[0], err[0]
      # The source-only run of the first case finished and is kept.
      assert os.path.exists(os.path.join(out, "source_only_seed0",
                                         "summary.json"))
  finally:
    flags.FLAGS.unparse_flags()
