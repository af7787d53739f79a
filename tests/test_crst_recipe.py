"""CBST / CRST recipe (METHODS.md §6.2-§6.6): source portion, scoring views,
rare-class mining, spatial priors, LRENT, image list files.

Each pure piece against a NumPy reference written here on random inputs,
plus the edge cases; the LRENT step runs one step of a one-conv stand-in
segmenter (no DeepLab compile). No end-to-end run (CI budget).
"""

import dataclasses
import math
import types

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import cbst as cbst_cfg
from experiments.configs import crst as crst_cfg
from experiments.configs import tpld as tpld_cfg
from jaxda import parallel
from jaxda import state as state_lib
from jaxda.data import augment
from jaxda.data import errors as data_errors
from jaxda.data import pipeline
from jaxda.data.readers import common as readers_common
from jaxda import methods
from jaxda.methods import base
from jaxda.methods.self_training import recipe
from jaxda.methods.self_training import recipe_math
from jaxda.methods.self_training import rounds
from jaxda.methods.self_training import steps
from jaxda.methods.self_training import thresholds
from jaxda.tasks import evaluation
from jaxda.train.exceptions import ConfigError
from jaxda.types import IGNORE_LABEL


# --------------------------------------------------------------------------
# Source portion
# --------------------------------------------------------------------------


def test_source_portion_schedule_is_crsts():
  got = [recipe_math.source_portion(r, 0.03, 0.0025, 0.06) for r in range(16)]
  want = [min(0.03 + r * 0.0025, 0.06) for r in range(16)]
  assert got == want and got[-1] == 0.06


@pytest.mark.parametrize("n,portion", [(19984, 0.03), (100, 0.06), (16, 0.03),
                                       (7, 0.5), (5, 1.0), (5, 3.0)])
def test_source_rows_size_and_range(n, portion):
  rows = recipe_math.source_rows(n, portion, seed=0, round_index=2)
  want = n if portion >= 1 else max(1, math.floor(n * portion))
  assert len(rows) == want
  assert rows.dtype == np.int64 and np.all(np.diff(rows) > 0)  # sorted
  assert rows.min() >= 0 and rows.max() < n


def test_source_rows_deterministic_and_redrawn_per_round():
  kw = dict(seed=3, policy="redraw")
  r0 = recipe_math.source_rows(1000, 0.05, round_index=0, **kw)
  np.testing.assert_array_equal(
      r0, recipe_math.source_rows(1000, 0.05, round_index=0, **kw))
  r1 = recipe_math.source_rows(1000, 0.05, round_index=1, **kw)
  assert len(set(r0) & set(r1)) < len(r0) // 2  # a new draw, not a shift
  other_seed = recipe_math.source_rows(1000, 0.05, seed=4, round_index=0)
  assert not np.array_equal(r0, other_seed)


def test_cumulative_source_rows_are_nested():
  rows = [recipe_math.source_rows(500, recipe_math.source_portion(
      r, 0.03, 0.0025, 0.06), seed=0, round_index=r, policy="cumulative")
          for r in range(4)]
  for a, b in zip(rows, rows[1:]):
    assert set(a) <= set(b) and len(b) >= len(a)


def test_source_rows_rejects_bad_input():
  with pytest.raises(ValueError, match="policy"):
    recipe_math.source_rows(10, 0.5, seed=0, round_index=0, policy="bogus")
  with pytest.raises(ValueError, match="> 0"):
    recipe_math.num_source_rows(10, 0.0)


class _CountingSource:
  name, split, root = "fake", "train", "/nowhere"

  def __init__(self, n):
    self.n, self.reads = n, 0

  def __len__(self):
    return self.n

  def read_field(self, i, field):
    del field
    self.reads += 1
    return np.full((4, 6, 3), i, np.uint8)


def test_round_source_subsets_lazily_and_keeps_default_runs():
  src = _CountingSource(40)
  images = readers_common.LazyArray(src, "image", (4, 6))
  labels = np.arange(40, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(
      6, 2)
  config = crst_cfg.get_config("tiny")
  run = types.SimpleNamespace(
      config=config, data={"source_train": pipeline.Domain(
          images, labels, ("a",))})
  same, info = recipe.round_source(run, 1)  # CPU default: every image
  assert same is run and info is None
  config.self_training.source_portion = 0.1
  config.self_training.source_portion_step = 0.05
  run = _Run(config=config, data=run.data)
  sub, info = recipe.round_source(run, 1)
  portion = 0.1 + 1 * 0.05
  want = recipe_math.source_rows(40, portion, seed=config.seed, round_index=1)
  assert info == {"source_portion": portion, "num_source_images": len(want)}
  assert src.reads == 0  # a view: nothing decoded
  got = np.asarray(sub.data["source_train"].images)[:, 0, 0, 0]
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(sub.data["source_train"].labels[:, 0, 0],
                                want)
  assert run.data["source_train"].images is images  # the run is untouched


@dataclasses.dataclass
class _Run:
  """What ``recipe.round_source`` reads of ``train_loop.Run``."""
  config: object
  data: dict


# --------------------------------------------------------------------------
# Rare-class mining
# --------------------------------------------------------------------------


def np_rare_class_ids(pred_cls_num, mine_port=1e-3, rare_cls_num=3):
  """CRST kc_parameters, as METHODS.md's reference writes it."""
  share = pred_cls_num / np.sum(pred_cls_num)
  order = np.argsort(share, kind="stable")
  num_mine = int(np.count_nonzero(share < mine_port))
  return order[:rare_cls_num], order[:num_mine]


@pytest.mark.parametrize("seed", range(5))
def test_rare_class_ids_match_reference(seed):
  rng = np.random.default_rng(seed)
  counts = rng.integers(0, 10_000, 19) * (rng.random(19) < 0.7)
  counts[rng.integers(19)] = 10**7  # a dominant class: others are rare
  counts[:2] = counts[2]  # ties
  got = recipe_math.rare_class_ids(counts, 1e-3, 3)
  want = np_rare_class_ids(counts.astype(np.float64), 1e-3, 3)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_rare_class_ids_edge_cases():
  rare, mine = recipe_math.rare_class_ids(np.zeros(4), 1e-3, 3)
  assert len(rare) == 3 and len(mine) == 4  # nothing predicted: all rare
  rare, mine = recipe_math.rare_class_ids([5, 5, 5], 1e-3, 0)
  assert len(rare) == 0 and len(mine) == 0


def test_mine_pixel_picks_a_present_mined_class():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 4, (9, 11)).astype(np.uint8)
  label[label == 2] = 0  # class 2 absent
  label[0, 0] = 3
  for _ in range(50):
    c, y, x = recipe_math.mine_pixel(label, [2, 3, 1], rng)
    assert c in (3, 1) and label[y, x] == c
  assert recipe_math.mine_pixel(label, [2, IGNORE_LABEL], rng) is None
  label[:] = IGNORE_LABEL
  assert recipe_math.mine_pixel(label, [IGNORE_LABEL], rng) is None


def _crop_rows(size, scale, crop, offsets):
  """Source (row, col) grids of augment.scale_crop_example's crop."""
  h, w = size
  ids = np.arange(h * w, dtype=np.int64).reshape(h, w, 1) + 1  # 0 = pad
  out = augment.scale_crop_example({"id": ids}, scale, crop, offsets,
                                   {"id": 0})["id"][..., 0]
  return out


@pytest.mark.parametrize("seed", range(6))
def test_centred_crop_offset_centres_the_pixel(seed):
  rng = np.random.default_rng(seed)
  h, w = rng.integers(10, 40, 2)
  scale = float(rng.choice([0.5, 0.8, 1.0, 1.3, 1.5]))
  crop = (int(rng.integers(4, 12)), int(rng.integers(4, 12)))
  y, x = int(rng.integers(h)), int(rng.integers(w))
  out = _crop_rows((h, w), scale, crop, recipe_math.centred_crop_offset(
      (y, x), (h, w), scale, crop))
  sh, sw = recipe_math.scaled_size((h, w), scale)
  # Reference: the scaled pixel, the centred corner, clipped to the image.
  q = (min(int((y + 0.5) * sh / h), sh - 1), min(int((x + 0.5) * sw / w),
                                                 sw - 1))
  corner = [min(max(q[i] - crop[i] // 2, 0), max(crop[i], s) - crop[i])
            for i, s in enumerate((sh, sw))]
  centre = (q[0] - corner[0], q[1] - corner[1])
  src = out[centre] - 1
  # Nearest neighbour: that output pixel reads (about) the chosen pixel.
  assert abs(src // w - y) <= math.ceil(h / sh) and abs(src % w - x) <= \
      math.ceil(w / sw)
  if scale == 1.0:
    assert src == y * w + x
  if corner[0] not in (0, max(crop[0], sh) - crop[0]):
    assert centre[0] == crop[0] // 2  # unclipped: the centre row


def test_mined_crops_centre_on_mined_classes():
  rng = np.random.default_rng(0)
  b, h, w = 6, 24, 40
  pl = np.zeros((b, h, w), np.uint8)
  for i in range(b):  # one 2x2 rare blob per image
    y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
    pl[i, y:y + 2, x:x + 2] = 4
  batch = {"image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
           "pl_label": pl, "index": np.arange(b)}
  cfg = tpld_cfg.get_config("tiny").data
  cfg.crop_height, cfg.crop_width = 8, 12
  cfg.scale_min, cfg.scale_max = 1.0, 1.0

  def run(chance, step=0):
    return next(recipe.mined_scale_crop(iter([batch]), seed=1,
                                        start_step=step, data_cfg=cfg,
                                        mine_ids=[4, 7], chance=chance))

  mined = run(1.0)
  assert mined["pl_label"].shape == (b, 8, 12)
  assert mined["image"].shape == (b, 8, 12, 3)
  assert np.all((mined["pl_label"] == 4).any(axis=(1, 2)))  # every crop
  np.testing.assert_array_equal(run(1.0)["image"], mined["image"])
  plain = run(0.0)  # random crops: most miss the 2x2 blob
  assert (plain["pl_label"] == 4).any(axis=(1, 2)).sum() < b
  assert not np.array_equal(run(0.0, step=1)["image"], plain["image"])


# --------------------------------------------------------------------------
# Spatial priors (CBST-SP)
# --------------------------------------------------------------------------


def np_prior_counts(labels, c):
  counts = np.zeros(labels.shape[1:] + (c,), np.int64)
  for lab in labels:
    for yy in range(lab.shape[0]):
      for xx in range(lab.shape[1]):
        if lab[yy, xx] < c:
          counts[yy, xx, lab[yy, xx]] += 1
  return counts


def test_spatial_prior_matches_reference():
  rng = np.random.default_rng(0)
  c = 5
  labels = rng.integers(0, c, (7, 6, 9)).astype(np.uint8)
  labels[rng.random(labels.shape) < 0.2] = IGNORE_LABEL
  labels[:, 0, 0] = IGNORE_LABEL  # a location without labels
  counts = recipe_math.spatial_prior_counts(labels, c)
  np.testing.assert_array_equal(counts, np_prior_counts(labels, c))
  for s in (0.0, 1.0, 0.5):
    prior = recipe_math.spatial_prior(counts, s)
    total = counts.sum(-1, keepdims=True)
    want = (counts + s) / (total + c * s) if s else np.where(
        total > 0, counts / np.maximum(total, 1), 1 / c)
    np.testing.assert_allclose(prior, want, rtol=1e-6)
    np.testing.assert_allclose(prior.sum(-1), 1.0, rtol=1e-5)
  assert np.allclose(recipe_math.spatial_prior(counts, 0.0)[0, 0], 1 / c)


def test_apply_spatial_prior_and_its_thresholds():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 8, 10, 6)) * 3
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  prior = rng.dirichlet(np.ones(6) * 0.3, (8, 10))
  q = np.asarray(recipe_math.apply_spatial_prior(p, prior))
  np.testing.assert_allclose(q, p * prior[None], rtol=1e-5)  # not renormalised
  qn = np.asarray(recipe_math.apply_spatial_prior(p, prior, renormalize=True))
  np.testing.assert_allclose(qn, q / q.sum(-1, keepdims=True), rtol=1e-5)
  np.testing.assert_allclose(recipe_math.resize_prior(prior, (8, 10)), prior,
                             rtol=1e-6)
  assert recipe_math.resize_prior(prior, (16, 20)).shape == (16, 20, 6)
  # Scores go below 1/C: the histogram with a floor keeps their resolution.
  assert (q.max(-1) < 1 / 6).mean() > 0.1
  exact = thresholds.class_thresholds(q, 0.3, subsample=1)
  hist = thresholds.update_threshold_histogram(
      thresholds.init_threshold_histogram(6, 2048), jnp.asarray(q, jnp.float32),
      subsample=1, floor=recipe.PRIOR_FLOOR)
  approx = thresholds.thresholds_from_histogram(hist, 0.3,
                                                floor=recipe.PRIOR_FLOOR)
  edges = thresholds.threshold_histogram_edges(6, 2048, recipe.PRIOR_FLOOR)
  width = np.max(np.diff(edges)[np.searchsorted(edges, exact) - 1])
  assert np.all(approx <= exact + 1e-7) and np.all(exact - approx <= width)


# --------------------------------------------------------------------------
# Scoring views (score_scales, score_flip)
# --------------------------------------------------------------------------


class _TinySegmenter(nn.Module):
  """One conv, 4x4 average pooling, a position-dependent term."""

  @nn.compact
  def __call__(self, x, *, train_bn=False):
    del train_bn
    y = nn.Conv(4, (3, 3))(x) + jnp.linspace(0, 1, x.shape[2])[None, None,
                                                                :, None]
    return {"main": nn.avg_pool(y, (4, 4), (4, 4))}


def _tiny_run(config):
  seg = _TinySegmenter()
  x = jax.random.normal(jax.random.key(1), (2, 24, 40, 3))
  variables = seg.init(jax.random.key(0), x)
  state = state_lib.TrainState.create(params=variables["params"],
                                      batch_stats={}, tx=optax.sgd(0.1))
  run = types.SimpleNamespace(config=config, models=base.Models(seg, None),
                              mesh=parallel.make_mesh(1))
  return run, state, x


def test_scoring_views_average_flipped_softmax():
  config = crst_cfg.get_config("tiny")
  config.model.bn_mode = "frozen"
  assert recipe.single_view(config)  # CPU default: the plain pass
  config.self_training.score_flip = True
  run, state, x = _tiny_run(config)
  views = recipe.make_view_logits(run)(state, x)
  probs = recipe.make_view_probs(run, (24, 40))(views)
  logits_fn = evaluation.make_logits_fn(run.models, bn_mode="frozen")
  up = lambda l: evaluation.probs_from_logits(l, (24, 40), align_corners=True)
  want = (up(logits_fn(state, x))
          + up(logits_fn(state, x[:, :, ::-1]))[:, :, ::-1]) / 2
  np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
  config.self_training.score_scales = (0.9,)
  views = recipe.make_view_logits(run)(state, x)
  assert [v.shape for v in views] == [(2, 5, 9, 4)] * 2  # 22x36 input
  probs = recipe.make_view_probs(run, (24, 40))(views)
  assert probs.shape == (2, 24, 40, 4)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------
# LRENT and the presets
# --------------------------------------------------------------------------


def test_lrent_target_term_matches_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7, 4)).astype(np.float32)
  probs = rng.dirichlet(np.ones(4), (2, 5, 7)).astype(np.float32)
  lam = np.array([0.5, 0.9, 0.3, 1.0], np.float32)
  soft, keep = thresholds.lrent_soft_labels(probs, lam, 0.25)
  soft, keep = np.asarray(soft), np.asarray(keep)
  labels = np.where(keep, soft.argmax(-1), IGNORE_LABEL)
  got = steps._target_term(  # pylint: disable=protected-access
      jnp.asarray(logits), jnp.asarray(labels), lam, None, kind="lrent",
      beta=0.95, stop_gradient_prediction=True,
      soft=jnp.asarray(soft, jnp.float16))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  per_pixel = -(soft.astype(np.float16).astype(np.float32) * logp).sum(-1)
  np.testing.assert_allclose(float(got), per_pixel[keep].mean(), rtol=1e-5)


def test_lrent_variant_loads_and_its_step_runs():
  c = crst_cfg.get_config("tiny,lrent")
  st = c.self_training
  assert (c.method, st.target_loss, st.lrent_alpha, st.mrkld_weight,
          st.voting) == ("crst", "lrent", 0.25, 0.0, False)
  rounds.rounds_and_steps(c, base.Method(name="crst", make_step=None))
  paper = crst_cfg.get_config("paper,lrent").self_training
  assert paper.target_loss == "lrent" and paper.score_scales == (0.9,)
  with pytest.raises(ValueError, match="conflict"):
    crst_cfg.get_config("code,lrent")
  c.model.bn_mode = "frozen"
  c.model.multi_level = False
  run, state, x = _tiny_run(c)
  step = steps.make_phase1_step(run.models, c, optax.sgd(0.1))
  rng = np.random.default_rng(0)
  soft = rng.dirichlet(np.ones(4), (2, 24, 40)).astype(np.float16)
  pl = soft.argmax(-1).astype(np.uint8)
  pl[:, :4] = IGNORE_LABEL
  soft[:, :4] = 0
  batch = {
      "source": {"image": np.asarray(x), "label": rng.integers(
          0, 4, (2, 24, 40)).astype(np.int32)},
      "target": {"image": np.asarray(x[:, :, ::-1]), "pl_label": pl,
                 "pl_weight": (pl != IGNORE_LABEL).astype(np.float32),
                 "thresholds": np.full((2, 4), 0.5, np.float32),
                 "pl_soft": soft}}
  new, metrics = jax.jit(step)(state, batch, jax.random.key(0))
  assert np.isfinite(float(metrics["target_main"]))
  assert float(metrics["target_main"]) > 0 and int(new.step) == 1
  assert "mrkld_main" not in metrics


def test_paper_presets_set_crsts_recipe_and_defaults_change_nothing():
  for get in (crst_cfg.get_config, cbst_cfg.get_config):
    st = get("paper").self_training
    assert (st.source_portion, st.source_portion_step,
            st.source_portion_max, st.source_sampling) == (
                0.03, 0.0025, 0.06, "redraw")
    assert (st.score_scales, st.score_flip, st.mine_chance) == ((0.9,), True,
                                                                0.8)
    assert st.spatial_prior == ""  # CBST-SP: an option
    st = get("").self_training
    assert (st.source_portion, st.source_portion_max, st.mine_chance,
            st.spatial_prior, st.target_loss != "lrent") == (1.0, 1.0, 0.0,
                                                             "", True)
    assert recipe.single_view(get(""))
  assert tpld_cfg.get_config("paper,synthia").self_training.source_portion \
      == 0.02


@pytest.mark.parametrize("field,value,message", [
    ("source_portion", 0.0, "source_portion"),
    ("source_portion_max", 1.5, "source_portion"),
    ("source_sampling", "random", "source_sampling"),
    ("score_scales", (0.9, -1.0), "score_scales"),
    ("mine_chance", 1.5, "mine_chance"),
    ("spatial_prior", "/no/such/prior.npy", "spatial_prior"),
    ("target_loss", "bogus", "target_loss"),
    ("round_lr_decay", 0.0, "round_lr_decay"),
    ("bootstrap_apply_to", "some", "bootstrap_apply_to"),
    ("confidence_count", "mean", "confidence_count"),
    ("round_lr_decay", 1.5, "round_lr_decay"),
])
def test_bad_recipe_values_are_one_line_errors(field, value, message):
  c = crst_cfg.get_config("tiny")
  c.self_training[field] = value
  with pytest.raises(ConfigError, match=message) as e:
    recipe.check(c)
  assert "\n" not in str(e.value)


def test_lrent_with_voting_is_refused():
  c = tpld_cfg.get_config("tiny")
  c.self_training.target_loss = "lrent"
  with pytest.raises(ConfigError, match="voting"):
    recipe.check(c)


# --------------------------------------------------------------------------
# Image list files (config.<role>.list_file)
# --------------------------------------------------------------------------


def _fake_cityscapes(root, stems, size=(8, 16)):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for sub in ("leftImg8bit", "gtFine"):
      (root / sub / split / "aachen").mkdir(parents=True)
    for stem in stems:
      Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(
          root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png")
      Image.fromarray(rng.integers(0, 34, size).astype(np.uint8), "L").save(
          root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png")


def _fake_gta5(root, n=3, size=(8, 16)):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  for sub in ("images", "labels"):
    (root / sub).mkdir(parents=True)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(
        root / "images" / f"{i + 1:05d}.png")
    Image.fromarray(rng.integers(0, 34, size).astype(np.uint8), "L").save(
        root / "labels" / f"{i + 1:05d}.png")


def _ids(domain):
  return list(domain.images.source.ids)


def test_list_file_restricts_and_orders_the_split(tmp_path):
  stems = [f"aachen_{j:06d}_000019" for j in range(3)]
  _fake_cityscapes(tmp_path / "cs", stems)
  lst = tmp_path / "cs.lst"
  # The originals' form (a path with the suffix, a label column) and stems.
  lst.write_text(f"leftImg8bit/train/aachen/{stems[2]}_leftImg8bit.png\t"
                 f"gtFine/x.png\n\n# comment\n{stems[0]}\n")
  d = pipeline.load_domain("cityscapes", data_dir=str(tmp_path / "cs"),
                           split="train", list_file=str(lst))
  assert _ids(d) == [stems[2], stems[0]] and len(d.images) == 2
  _fake_gta5(tmp_path / "gta5")
  (tmp_path / "g.lst").write_text("00003.png\n00001\n")
  d = pipeline.load_domain("gta5", data_dir=str(tmp_path / "gta5"),
                           list_file=str(tmp_path / "g.lst"))
  assert _ids(d) == ["00003", "00001"] and d.images.shape == (2, 8, 16, 3)


def test_list_file_errors_are_one_line(tmp_path):
  _fake_gta5(tmp_path / "gta5")
  lst = tmp_path / "g.lst"
  lst.write_text("00001\n00009\n")
  load = lambda name="gta5", **kw: pipeline.load_domain(
      name, data_dir=str(tmp_path / "gta5"), list_file=str(lst), **kw)
  with pytest.raises(data_errors.DataError) as e:
    load()
  msg = str(e.value)
  assert "\n" not in msg and str(lst) in msg and "'00009'" in msg
  assert "line 2" in msg
  lst.write_text("00001\n00001\n")
  with pytest.raises(data_errors.DataError, match="twice"):
    load()
  lst.write_text("# nothing\n")
  with pytest.raises(data_errors.DataError, match="names no image"):
    load()
  with pytest.raises(data_errors.DataError, match="does not exist"):
    pipeline.load_domain("gta5", data_dir=str(tmp_path / "gta5"),
                         list_file=str(tmp_path / "missing.lst"))
  with pytest.raises(data_errors.DataError, match="not read from image"):
    pipeline.load_domain("synthetic", role="target", data_dir=str(tmp_path),
                         height=8, width=16, num_images=2,
                         list_file=str(lst))


def test_list_file_reaches_the_train_split_only(tmp_path):
  from jaxda import methods  # pylint: disable=g-import-not-at-top
  from jaxda.tasks import splits  # pylint: disable=g-import-not-at-top
  stems = [f"aachen_{j:06d}_000019" for j in range(3)]
  _fake_cityscapes(tmp_path / "cs", stems)
  _fake_gta5(tmp_path / "gta5")
  (tmp_path / "t.lst").write_text(stems[1] + "\n")
  (tmp_path / "s.lst").write_text("00002\n00003\n")
  c = crst_cfg.get_config("tiny")
  c.source.name, c.source.data_dir = "gta5", str(tmp_path / "gta5")
  c.target.name, c.target.data_dir = "cityscapes", str(tmp_path / "cs")
  c.source.list_file, c.target.list_file = (str(tmp_path / "s.lst"),
                                            str(tmp_path / "t.lst"))
  data = splits.load_data(c, methods.get_method("crst"))
  assert _ids(data["source_train"]) == ["00002", "00003"]
  assert _ids(data["target_train"]) == [stems[1]]
  assert len(data["target_val"].images) == 3  # val: every image


def test_bootstrap_apply_to_reaches_the_loss():
  """The §7.1 open choice is passed through the step's target term."""
  from jaxda import losses  # pylint: disable=g-import-not-at-top
  from jaxda.methods.self_training import steps  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 4, 5, 3)), jnp.float32)
  labels = rng.integers(0, 3, (2, 4, 5)).astype(np.int32)
  labels[:, :2] = 255  # unlabelled pixels: where the two choices differ
  lam = jnp.asarray([0.5, 0.6, 0.7], jnp.float32)
  got = {}
  for apply_to in ("labeled", "all"):
    got[apply_to] = float(steps._target_term(  # pylint: disable=protected-access
        logits, jnp.asarray(labels), lam, None, kind="bootstrap", beta=0.9,
        stop_gradient_prediction=True, apply_to=apply_to))
    want = float(losses.tpld_bootstrap_loss(
        logits=logits, labels=jnp.asarray(labels), thresholds=lam, beta=0.9,
        apply_to=apply_to, stop_gradient_prediction=True))
    assert got[apply_to] == pytest.approx(want, rel=1e-6)
  assert got["labeled"] != pytest.approx(got["all"], rel=1e-3)


@pytest.mark.parametrize("get_config,decay", [
    (lambda: tpld_cfg.get_config("tiny"), 0.7071),
    (lambda: tpld_cfg.get_config("tiny,constant_lr"), 1.0),
    (lambda: cbst_cfg.get_config("tiny"), 1.0),
    (lambda: tpld_cfg.get_config("tiny,paper"), 1.0)])
def test_round_lr_decay_reaches_the_optimiser_per_round(get_config, decay):
  # The segmenter's optimiser, built by the task from the rounds' config,
  # steps at lr * decay**r in round r (momentum off: the update is -lr * g).
  from jaxda.tasks import segmentation  # pylint: disable=g-import-not-at-top
  config = get_config()
  assert config.self_training.round_lr_decay == decay
  config.optim.momentum = 0.0
  config.optim.weight_decay = 0.0
  config.num_steps = 6
  spr = 2
  config = recipe.round_schedule(config, spr)
  data = {"target_val": types.SimpleNamespace(class_names=["a", "b", "c"])}
  tx = segmentation.build(config, methods.get_method("tpld"), data)["tx"]
  params = {"layer1": {"conv": {"kernel": jnp.zeros((2,))}}}
  opt_state = tx.init(params)
  lr = config.optim.learning_rate
  for count in range(6):
    grads = {"layer1": {"conv": {"kernel": jnp.ones((2,))}}}
    updates, opt_state = tx.update(grads, opt_state, params)
    np.testing.assert_allclose(
        updates["layer1"]["conv"]["kernel"],
        -lr * decay ** (count // spr) * np.ones(2), rtol=1e-6)
