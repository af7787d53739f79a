"""self_training.base_method: which model the self-training rounds start from."""

import os

import pytest

from experiments.configs import cbst as cbst_cfg
from experiments.configs import tpld as tpld_cfg
from jaxda.methods.self_training import warm_base
from jaxda.train import exceptions
from jaxda.train import loop


def _fake_training(calls):
  def train_and_evaluate(config, workdir, method):
    calls.append((config, workdir, method))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      f.write("{}")
  return train_and_evaluate


@pytest.mark.parametrize("variant,method,folder", [
    ("tiny", "source_only", "base_source_only"),
    ("tiny,adapted_base", "adaptsegnet", "base_adaptsegnet")])
def test_base_run_is_trained_by_the_chosen_method(tmp_path, monkeypatch,
                                                  variant, method, folder):
  calls = []
  monkeypatch.setattr(loop, "train_and_evaluate", _fake_training(calls))
  config = tpld_cfg.get_config(variant)
  logs = []
  path = warm_base.ensure_base(config, str(tmp_path), logs.append)
  assert path == str(tmp_path / folder)
  (base, workdir, trained), = calls
  assert trained.name == method and base.method == method
  assert workdir == path
  # The same base recipe whichever method trains it.
  assert base.num_steps == config.self_training.base_steps
  assert base.optim.learning_rate == config.self_training.base_learning_rate
  assert method in logs[0]
  # A finished base run is reused, not trained again.
  assert warm_base.ensure_base(config, str(tmp_path), logs.append) == path
  assert len(calls) == 1 and "reusing" in logs[-1]


def test_given_init_checkpoint_wins_and_cbst_has_the_variant(tmp_path,
                                                             monkeypatch):
  monkeypatch.setattr(loop, "train_and_evaluate", _fake_training([]))
  config = cbst_cfg.get_config("tiny,adapted_base")
  assert config.self_training.base_method == "adaptsegnet"
  config.model.init_checkpoint = "/some/run"
  assert warm_base.ensure_base(config, str(tmp_path), print) == "/some/run"


def test_unknown_base_method_is_a_config_error():
  config = tpld_cfg.get_config("tiny")
  config.self_training.base_method = "dann"
  with pytest.raises(exceptions.ConfigError, match="base_method='dann'.*"
                     "adaptsegnet"):
    warm_base.base_method(config)
