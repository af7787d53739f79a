"""Config presets: every documented variant loads, validates and composes.

The documented variants are the README entry-point table's; entry points
whose config module exposes ``VARIANTS`` must list exactly those in README.
Config-only (no data, no JAX compile): a few seconds.
"""

import itertools
import pathlib
import re

import pytest

from experiments import main as cli
from experiments.configs import common
from jaxda import methods
from jaxda.methods.self_training import rounds
from jaxda.train import exceptions
from jaxda.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_variants() -> dict[str, tuple[str, ...]]:
  """``{entry point: variants}`` from README's entry-point table."""
  table = {}
  previous = ()
  for line in (ROOT / "README.md").read_text().splitlines():
    m = re.match(r"\| `experiments\.(\w+)` \|.*\| (.*) \|$", line)
    if not m or m.group(1) == "compare":
      continue
    cell = m.group(2)
    names = tuple(re.findall(r"`(\w+)`", cell))
    if cell.startswith("as above"):  # "as above, `tllib`"
      names = previous + names
    table[m.group(1)] = previous = names
  return table


README_VARIANTS = _readme_variants()


def _module(name):
  return __import__(f"experiments.configs.{name}", fromlist=["get_config"])


def validate(config):
  """The loop's validation, plus the round checks of self-training drivers."""
  method = methods.get_method(config.method)
  loop.validate_config(config, method)
  if "self_training" in config:
    rounds.rounds_and_steps(config, method)


def test_readme_lists_every_entry_point():
  for name in ("source_only", "oracle", "adaptsegnet", "advent", "cbst",
               "crst", "tpld", "gam", "anchor", "dann", "tada", "daformer"):
    assert name in README_VARIANTS, name
    assert "tiny" in README_VARIANTS[name], name


@pytest.mark.parametrize("name", sorted(
    n for n in README_VARIANTS if hasattr(_module(n), "VARIANTS")))
def test_readme_variants_are_the_modules(name):
  assert README_VARIANTS[name] == tuple(_module(name).VARIANTS)


CASES = sorted({(name, v) for name, variants in README_VARIANTS.items()
                for base in variants
                for v in ((base,) if base == "tiny" else (base,
                                                          f"{base},tiny"))})


@pytest.mark.parametrize("name,variant", CASES)
def test_every_variant_loads_and_validates(name, variant):
  validate(_module(name).get_config(variant))


def _composing(name):
  variants = _module(name).VARIANTS
  for a, b in itertools.combinations(variants, 2):
    if b not in variants[a].conflicts and a not in variants[b].conflicts:
      yield a, b


COMPOSING = [(n, a, b) for n in sorted(README_VARIANTS)
             if hasattr(_module(n), "VARIANTS") for a, b in _composing(n)]


@pytest.mark.parametrize("name,a,b", COMPOSING)
def test_order_does_not_matter(name, a, b):
  get = _module(name).get_config
  assert get(f"{a},{b}").to_dict() == get(f"{b},{a}").to_dict()
  validate(get(f"{a},{b}"))
  validate(get(f"{a},{b},tiny") if "tiny" not in (a, b) else get(f"{a},{b}"))


def _changes(name, variant):
  base = _flat(_module(name).get_config().to_dict())
  after = _flat(_module(name).get_config(variant).to_dict())
  return {k: v for k, v in after.items() if base.get(k) != v}


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[k if not prefix else prefix + k] = v
  return out


@pytest.mark.parametrize("name,a,b", COMPOSING)
def test_same_kind_variants_touch_different_fields(name, a, b):
  """Variants applied at the same stage commute only if they do not set a
  field to different values; else they must declare the conflict."""
  variants = _module(name).VARIANTS
  if variants[a].kind != variants[b].kind:
    return  # A later stage refines an earlier one by design.
  ca, cb = _changes(name, a), _changes(name, b)
  clash = {k for k in set(ca) & set(cb) if ca[k] != cb[k]}
  assert not clash, (name, a, b, clash)


@pytest.mark.parametrize("name,variant,message", [
    ("tpld", "cbst,crst", "conflict"),
    ("tpld", "crst,cbst", "conflict"),
    ("tpld", "cbst,code", "conflict"),
    ("adaptsegnet", "code,faithful", "conflict"),
    ("adaptsegnet", "paper,paper", "given twice"),
    ("cbst", "crst", "unknown config variant"),
    ("source_only", "paper,bogus", "unknown config variant"),
])
def test_bad_combinations_are_one_line_errors(name, variant, message):
  with pytest.raises(ValueError, match=message) as e:
    _module(name).get_config(variant)
  assert "\n" not in str(e.value)


def test_bad_combination_on_the_command_line(capsys):
  code = cli.run_cli(["tpld", "--config=experiments/configs/tpld.py:cbst,crst"])
  err = capsys.readouterr().err
  assert code == 2
  assert err.startswith("error: ") and "conflict" in err.splitlines()[0]
  assert "Traceback" not in err


def test_self_training_paper_presets():
  cbst = _module("cbst").get_config("paper")
  assert cbst.method == "cbst"
  assert cbst.self_training.mrkld_weight == 0  # CBST, not CRST
  assert cbst.self_training.phase2_rounds == 0
  assert not cbst.self_training.voting
  assert cbst.to_dict() == _module("tpld").get_config("cbst,paper").to_dict()
  crst = _module("crst").get_config
  assert crst("paper").self_training.mrkld_weight == 0.1  # paper α
  assert crst("paper,code").self_training.mrkld_weight == 0.01  # code: α²
  assert crst("paper").to_dict() == _module("tpld").get_config(
      "paper,crst").to_dict()
  tpld = _module("tpld").get_config("paper")
  st = tpld.self_training
  assert (st.phase1_rounds, st.phase2_rounds, st.num_iters) == (6, 3, 3)
  # Eq. 8: no source term and no labels on hard images in phase 2.
  assert st.phase2_source_weight == 0 and st.phase2_hard_labels == "none"
  assert _module("tpld").get_config("tiny").self_training.phase2_rounds == 1
  assert _module("cbst").get_config("tiny,paper").method == "cbst"


def test_paper_protocol_fields():
  asn = _module("adaptsegnet").get_config
  assert asn("paper").model.bn_mode == "train"
  assert asn("paper").model.aspp_branches_used == 4
  assert asn("paper,code").model.aspp_branches_used == 2
  assert asn("faithful").to_dict() == asn("code").to_dict()
  adv = _module("advent").get_config("paper")
  assert adv.num_steps == 120_000 and adv.optim.schedule_steps == 250_000
  assert adv.model.bn_mode == "train"
  for name in ("source_only", "adaptsegnet", "advent"):
    c = _module(name).get_config("paper")
    assert (c.source.height, c.source.width) == common.GTA5_SIZE
    assert (c.target.height, c.target.width) == common.CITYSCAPES_SIZE
    s = _module(name).get_config("paper,synthia")
    assert (s.source.height, s.source.width) == common.SYNTHIA_SIZE
    assert s.target.name == "cityscapes16"
    assert c.eval.selection == "last"


def _tiny(name="source_only"):
  return _module(name).get_config("tiny")


@pytest.mark.parametrize("name", sorted(README_VARIANTS))
@pytest.mark.parametrize("steps", [0, -3])
def test_num_steps_below_one_is_a_config_error(name, steps):
  c = _module(name).get_config("tiny")
  c.num_steps = steps
  with pytest.raises(exceptions.ConfigError, match="num_steps"):
    validate(c)


@pytest.mark.parametrize("field,value,message", [
    ("eval.scales", (0.5, 0.0), "positive"),
    ("eval.scales", (-1.0,), "positive"),
    ("eval.selection", "oracle", "must be one of"),
    ("eval.every", -1, "eval.every"),
    ("source.height", -1, "source.height"),
    ("target.width", -5, "target.height/width"),
])
def test_bad_segmentation_values_are_config_errors(field, value, message):
  c = _tiny()
  group, key = field.split(".")
  c[group][key] = value
  with pytest.raises(exceptions.ConfigError, match=message) as e:
    validate(c)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["source_only", "cbst", "gam", "anchor",
                                  "dann"])
def test_num_steps_zero_fails_the_same_way_everywhere(name, tmp_path, capsys):
  workdir = tmp_path / "run"
  code = cli.run_cli([name, f"--config=experiments/configs/{name}.py:tiny",
                      "--config.num_steps=0", f"--workdir={workdir}"])
  err = capsys.readouterr().err
  assert code == 2
  assert err.strip() == "error: config.num_steps must be >= 1, got 0"
  assert not workdir.exists()  # Nothing trained (no base model either).


def test_anchor_target_phase2_and_tpld_probe_variants():
  """The probes' variants change only what their names say."""
  anchor = _module("anchor").get_config
  assert _changes("anchor", "target_phase2") == {
      "anchor.phase2_weights.source_main": 0.0,
      "anchor.phase2_weights.source_anchor": 0.0}
  with pytest.raises(ValueError, match="seed_schedule"):
    anchor("seed_schedule,target_phase2")
  assert _changes("tpld", "steady_portion") == {
      "self_training.portion_step": 0.0}
  assert _changes("tpld", "phase1_only") == {
      "self_training.phase1_rounds": 5, "self_training.phase2_rounds": 0}
  assert _module("tpld").get_config("phase1_only").num_steps == (
      _module("tpld").get_config().num_steps)
