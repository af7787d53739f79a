"""HRDA in DAFormer / MIC (jaxda.models.hrda, methods.daformer.hrda_*).

* Sliding-window detail averaging and the whole HRDA inference / training
  views of the wrapper (on a stub network whose logits NumPy can compute)
  against independent NumPy references.
* The training-view geometry over random keys: the 0.5x context is the 2x2
  mean, the detail box lies inside the crop on the os / scale grid, labels
  and weights are cropped like the image.
* The steps of ``daformer:hrda,tiny`` and ``:hrda,mic,tiny`` train with
  finite losses weighted 0.9 fused + 0.1 detail; ``hrda,mic,tiny`` runs end
  to end through ``jaxda.methods.train_and_evaluate`` and writes a summary
  with the target mIoU (both on a two-layer network in HRDA's wrapper, to
  compile in seconds; the DeepLab-v2 wrapper runs forward on its own);
  bad HRDA sizes are one-line config errors.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import daformer as daformer_config
from jaxda import methods
from jaxda import models as models_lib
from jaxda.methods import base
from jaxda.methods.daformer import ema_driver
from jaxda.methods.daformer import ema_step
from jaxda import hrda_fusion
from jaxda.methods.daformer import hrda_step
from jaxda.models import hrda
from jaxda.train import exceptions

RNG = np.random.default_rng(0)
C = 3  # classes


# ------------------------------------------------------- NumPy references
def _np_slide_boxes(h, w, ch, cw, sh, sw):
  """mmseg slide_inference's windows, written out independently."""
  ch, cw = min(ch, h), min(cw, w)
  ys = list(range(0, max(h - ch, 0) + 1, sh))
  xs = list(range(0, max(w - cw, 0) + 1, sw))
  if ys[-1] + ch < h:
    ys.append(h - ch)
  if xs[-1] + cw < w:
    xs.append(w - cw)
  return [(y, y + ch, x, x + cw) for y in ys for x in xs]


def _np_average(windows, boxes, out_hw, os_):
  total = np.zeros((windows.shape[1],) + out_hw + (windows.shape[-1],))
  count = np.zeros(out_hw)
  for win, (y1, y2, x1, x2) in zip(windows, boxes):
    total[:, y1 // os_:y2 // os_, x1 // os_:x2 // os_] += win
    count[y1 // os_:y2 // os_, x1 // os_:x2 // os_] += 1
  return total / count[None, :, :, None]


def _np_up2(x):
  """PyTorch bilinear x2, align_corners=False, (B, h, w, C)."""
  def axis(n):
    src = np.maximum((np.arange(2 * n) + 0.5) / 2 - 0.5, 0)
    i0 = np.floor(src).astype(int)
    return i0, np.minimum(i0 + 1, n - 1), src - i0
  r0, r1, rw = axis(x.shape[1])
  c0, c1, cw = axis(x.shape[2])
  rows = (x[:, r0] * (1 - rw)[None, :, None, None]
          + x[:, r1] * rw[None, :, None, None])
  return (rows[:, :, c0] * (1 - cw)[None, None, :, None]
          + rows[:, :, c1] * cw[None, None, :, None])


def _np_pool(x, k):
  b, h, w, c = x.shape
  return x.reshape(b, h // k, k, w // k, k, c).mean((2, 4))


def _np_fuse(ctx, att_logits, det, box=None, os_=4):
  """HRDA's fusion: fused = up(a) * detail_inserted + up((1 - a) * ctx)."""
  att = 1 / (1 + np.exp(-att_logits))
  if box is not None:
    y1, y2, x1, x2 = box
    mask = np.zeros(ctx.shape[1:3])
    mask[y1 // (2 * os_):y2 // (2 * os_), x1 // (2 * os_):x2 // (2 * os_)] = 1
    att = att * mask[None, :, :, None]
    inserted = np.zeros(ctx.shape[:1] + (2 * ctx.shape[1], 2 * ctx.shape[2])
                        + ctx.shape[3:])
    inserted[:, y1 // os_:y2 // os_, x1 // os_:x2 // os_] = det
    det = inserted
  return _np_up2(att) * det + _np_up2((1 - att) * ctx)


class _StubNet(nn.Module):
  """Logits = (average-pool by os of the input) @ W; NumPy can follow it."""
  num_classes: int = C
  os: int = 4

  @nn.compact
  def __call__(self, x, *, train_bn=False, attention=True):
    del train_bn
    b, h, w, c = x.shape
    pooled = x.reshape(b, h // self.os, self.os, w // self.os, self.os,
                       c).mean((2, 4))
    out = {"main": nn.Dense(self.num_classes, use_bias=False,
                            name="cls")(pooled)}
    if attention:
      out["attention"] = nn.Dense(self.num_classes, use_bias=False,
                                  name="head_att")(pooled)
    return out


# -------------------------------------------------------------- (a) math
@pytest.mark.parametrize("h,w,crop,stride", [
    (1024, 1024, 512, 256),  # HRDA's training crop: 9 windows
    (1024, 2048, 512, 256),  # Cityscapes val: 21 windows
    (48, 80, 16, 8), (40, 40, 24, 16), (16, 32, 32, 16)])
def test_slide_boxes_and_window_average_match_numpy(h, w, crop, stride):
  boxes = hrda_fusion.slide_boxes(h, w, crop, crop, stride, stride)
  assert boxes == _np_slide_boxes(h, w, crop, crop, stride, stride)
  if h == 1024:
    assert len(boxes) == (9 if w == 1024 else 21)
  if h > 100:
    return
  os_ = 8
  ch, cw = min(crop, h), min(crop, w)
  windows = RNG.normal(size=(len(boxes), 2, ch // os_, cw // os_, C))
  got = hrda_fusion.average_windows(jnp.asarray(windows, jnp.float32), boxes,
                                    (h // os_, w // os_), os_)
  np.testing.assert_allclose(
      got, _np_average(windows, boxes, (h // os_, w // os_), os_), atol=1e-5)


@pytest.fixture(scope="module")
def stub():
  seg = hrda.HRDA(_StubNet(), output_stride=4, detail_size=(16, 16),
                  slide_stride=(8, 8))
  x = RNG.normal(size=(2, 32, 48, 3)).astype(np.float32)
  params = jax.jit(seg.init)(jax.random.key(0), x)["params"]
  assert set(params) == {"cls", "head_att"}  # the net's names, unprefixed
  w, wa = (np.asarray(params[k]["kernel"], np.float64)
           for k in ("cls", "head_att"))
  return seg, params, x.astype(np.float64), w, wa


def test_hrda_inference_matches_numpy(stub):
  """Context of the whole image + detail windows averaged, fused."""
  seg, params, x, w, wa = stub
  got = seg.apply({"params": params}, x.astype(np.float32))
  context = _np_pool(_np_pool(x, 2), 4)  # 0.5x (2x2 mean), then the net
  boxes = _np_slide_boxes(32, 48, 16, 16, 8, 8)
  assert len(boxes) == 15
  windows = np.stack([_np_pool(x[:, y1:y2, x1:x2], 4) @ w
                      for y1, y2, x1, x2 in boxes])
  detail = _np_average(windows, boxes, (8, 12), 4)
  want = _np_fuse(context @ w, context @ wa, detail)
  assert got["main"].shape == (2, 8, 12, C)
  np.testing.assert_allclose(got["main"], want, rtol=1e-4, atol=1e-4)


def test_hrda_train_views_match_numpy(stub):
  seg, params, x, w, wa = stub
  box = (16, 32, 8, 24)
  got = jax.jit(lambda p, x, b: seg.apply(
      {"params": p}, x, b, method=hrda.HRDA.train_views))(
          params, x.astype(np.float32), jnp.asarray(box, jnp.int32))
  context = _np_pool(_np_pool(x, 2), 4)
  detail = _np_pool(x[:, 16:32, 8:24], 4) @ w
  np.testing.assert_allclose(got["context"], context @ w, atol=1e-4)
  np.testing.assert_allclose(got["detail"], detail, atol=1e-4)
  np.testing.assert_allclose(
      got["main"], _np_fuse(context @ w, context @ wa, detail, box),
      rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------- (b) geometry
@pytest.mark.parametrize("max_offset", ["full", "code"])
def test_training_view_geometry_over_random_keys(max_offset):
  hw, det, div = (64, 96), (32, 48), 16
  b = 2
  yy, xx = np.meshgrid(np.arange(hw[0]), np.arange(hw[1]), indexing="ij")
  labels = np.broadcast_to(yy * 1000 + xx, (b,) + hw).astype(np.int32)
  images = RNG.normal(size=(b,) + hw + (3,)).astype(np.float32)

  @jax.jit
  @jax.vmap
  def views(key):
    box = hrda_fusion.detail_box(key, hw, det, div, max_offset)
    return (box, hrda_fusion.crop(labels, box, det),
            hrda_fusion.crop(images, box, det))

  boxes, crops, image_crops = jax.device_get(
      views(jax.random.split(jax.random.key(1), 200)))
  for box, lab, img in zip(boxes, crops, image_crops):
    y1, y2, x1, x2 = (int(v) for v in box)
    assert (y2 - y1, x2 - x1) == det
    assert 0 <= y1 and y2 <= hw[0] and 0 <= x1 and x2 <= hw[1]
    assert y1 % div == 0 and x1 % div == 0
    np.testing.assert_array_equal(lab, labels[:, y1:y2, x1:x2])
    np.testing.assert_array_equal(img, images[:, y1:y2, x1:x2])
  far = {"full": ({0, 16, 32}, {0, 16, 32, 48}),  # up to the far border
         "code": ({0, 16}, {0, 16, 32})}[max_offset]  # randint(0, (m+1)//k)
  assert set(boxes[:, 0].tolist()) == far[0]
  assert set(boxes[:, 2].tolist()) == far[1]
  context = hrda_fusion.downscale(jnp.asarray(images), 0.5)
  np.testing.assert_allclose(context, _np_pool(images, 2), atol=1e-5)
  assert hrda_fusion.resolve_size((0.5, 0.5), (1024, 1024)) == (512, 512)
  assert hrda_fusion.resolve_size((512, 256), (1024, 1024)) == (512, 256)


# ------------------------------------------------------------ (c) steps
def _config(variant, **daformer):
  c = daformer_config.get_config(variant)
  c.daformer.color_jitter_strength = 0.0  # 2-3 s less to compile
  c.daformer.blur = False
  c.daformer.pseudo_threshold = 0.3  # some confident pixels at init
  c.daformer.debug_every = -1
  for k, v in daformer.items():
    c.daformer[k] = v
  return c


def _batch(seed, b=2, h=32, w=64):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, C, (b, h, w)).astype(np.int32)
  label[:, :2] = 255
  return {"source": {"image": rng.normal(size=(b, h, w, 3)).astype(
      np.float32), "label": label},
          "target": {"image": rng.normal(size=(b, h, w, 3)).astype(
              np.float32)}}


class _TinyNet(nn.Module):
  """conv-BN-ReLU, pooled to stride 8, 1x1 heads (the registry segmenters'
  interface, plus the attention head): compiles in seconds."""
  num_classes: int = C

  @nn.compact
  def __call__(self, x, *, train_bn=False, attention=True):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train_bn, momentum=0.9)(x)
    x = nn.avg_pool(nn.relu(x), (8, 8), (8, 8))
    out = {"main": nn.Conv(self.num_classes, (1, 1), name="aspp_main")(x)}
    if attention:
      out["attention"] = nn.Conv(self.num_classes, (1, 1), name="head_att")(x)
    return out


@pytest.mark.parametrize("variant", ["hrda,tiny", "hrda,mic,tiny"])
def test_hrda_tiny_steps_train_with_weighted_fused_and_detail_losses(
    variant):
  """The step of ``daformer:hrda,tiny`` / ``:hrda,mic,tiny`` on a two-layer
  network in HRDA's wrapper (the DeepLab-v2 one runs end to end below)."""
  config = _config(variant)
  assert config.daformer.hrda
  full = hrda_step.wrap(config, models_lib.create_segmenter(
      config.model.name, C, multi_level=False))
  assert isinstance(full.net, hrda.DeepLabV2Attention)
  models = base.Models(full.clone(net=_TinyNet()))
  assert models.segmenter.detail_size == (16, 32)
  variables = jax.jit(models.segmenter.init)(jax.random.key(0),
                                             jnp.zeros((1, 32, 64, 3)))
  tx, labels_fn = ema_driver.make_tx(config)
  groups = labels_fn(variables["params"])
  assert set(jax.tree.leaves(groups["head_att"])) == {"head"}  # LR x10
  state = ema_driver.TeacherTrainState.create(
      params=variables["params"], batch_stats=variables["batch_stats"], tx=tx)
  state = state.replace(teacher=jax.tree.map(jnp.copy, state.params))
  step = jax.jit(ema_step.make_step(models, config, tx))
  metrics = []
  for i in range(3):
    state, m = step(state, _batch(i), jax.random.key(i))
    metrics.append(jax.device_get(m))
  lam = config.daformer.hrda_hr_loss_weight
  terms = ("", "mix_") + (("mask_",) if config.daformer.mask_lambda else ())
  for m in metrics:
    for k in ("loss", "pseudo_weight", "grad_norm") + tuple(
        f"{t}ce_{v}" for t in terms for v in ("main", "detail")):
      assert np.isfinite(m[k]), k
    np.testing.assert_allclose(
        m["loss"], sum((1 - lam) * m[f"{t}ce_main"] + lam * m[f"{t}ce_detail"]
                       for t in terms), rtol=1e-5)
  assert any(m["pseudo_weight"] > 0 for m in metrics)
  assert int(state.step) == 3


def test_deeplab_hrda_views_and_inference():
  """DeepLab-v2 in HRDA's wrapper: the parameters keep DeepLab's names (plus
  `head_att`); its ceil-mode logits (3 x 5 for 16 x 32) land on the exact
  stride-8 grid."""
  config = _config("hrda,tiny")
  seg = hrda_step.wrap(config, models_lib.create_segmenter(
      config.model.name, C, multi_level=False, conv_impl="lax"))
  x = jnp.asarray(RNG.normal(size=(2, 32, 64, 3)), jnp.float32)

  @jax.jit
  def run(x, box):
    variables = seg.init(jax.random.key(0), x)
    views, _ = seg.apply(variables, x, box, train_bn=True,
                         mutable=["batch_stats"],
                         method=hrda.HRDA.train_views)
    return variables["params"], views, seg.apply(variables, x)

  params, views, inferred = run(x, jnp.asarray([16, 32, 0, 32]))
  assert set(params) == {"backbone", "aspp_main", "head_att"}
  shapes = {k: v.shape for k, v in views.items()}
  assert shapes == {"main": (2, 4, 8, C), "context": (2, 2, 4, C),
                    "attention": (2, 2, 4, C), "detail": (2, 2, 4, C)}
  assert inferred["main"].shape == (2, 4, 8, C)
  for v in list(views.values()) + [inferred["main"]]:
    assert np.isfinite(np.asarray(v)).all()


# Slow (~8 s on the CI machine): the DAFormer driver runs end to end in CI
# (tests/test_daformer_method.py); the HRDA steps are tested above.
@pytest.mark.slow
def test_hrda_mic_tiny_runs_end_to_end(tmp_path, shared_data_cache,
                                       monkeypatch):
  """``daformer:hrda,mic,tiny`` through ``jaxda.methods.train_and_evaluate``
  (driver, teacher state, sliding-window evaluation, summary) with the
  two-layer network in the wrapper (CI time)."""
  monkeypatch.setattr(hrda, "with_attention",
                      lambda net, **kw: _TinyNet(num_classes=net.num_classes))
  config = _config("hrda,mic,tiny")
  config.num_steps = 2
  config.num_devices = 1
  for role in ("source", "target"):
    config[role].data_dir = shared_data_cache
  workdir = str(tmp_path / "run")
  summary = methods.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["target"]["miou"] == summary["target"]["miou"]
  assert summary["method"] == "mic" and summary["steps"] == 2
  assert 0.0 <= summary["target"]["miou"] <= 1.0
  logged = [json.loads(l) for l in open(os.path.join(workdir,
                                                    "metrics.jsonl"))]
  train = [l for l in logged if "train/loss" in l]
  assert train
  for key in ("loss", "ce_main", "ce_detail", "mix_ce_main",
              "mix_ce_detail", "mask_ce_main", "mask_ce_detail"):
    assert all(np.isfinite(l[f"train/{key}"]) for l in train), key


# ----------------------------------------------------- (5) config errors
@pytest.mark.parametrize("field,value,message", [
    ("hrda_detail_crop", (48, 32), "hrda_detail_crop gives a 48x32 detail"
     " crop, larger than the 32x64"),
    ("hrda_detail_crop", (8, 32), "multiples of 16"),
    ("hrda_context_scale", 0.25, "hrda_context_scale must be 0.5"),
    ("hrda_sliding_stride", (4, 16), "hrda_sliding_stride"),
])
def test_bad_hrda_sizes_are_one_line_config_errors(field, value, message):
  c = _config("hrda,tiny", **{field: value})
  with pytest.raises(exceptions.ConfigError, match=message) as e:
    ema_driver.train_and_evaluate(c, "/nonexistent",
                                  methods.METHODS["daformer"])
  assert "\n" not in str(e.value) and "config.daformer." in str(e.value)
  c = _config("hrda,tiny")
  c.data.height = 40  # not a multiple of 8 / 0.5
  problems = ema_driver.config_problems(c)
  assert any("config.data.height/width" in p and "multiples of 16" in p
             for p in problems)


def test_paper_hrda_presets():
  c = daformer_config.get_config("paper,hrda,mic")
  d = c.daformer
  assert c.method == "mic" and d.hrda and d.network == "mit_b5"
  assert (c.source.height, c.source.width) == (1440, 2560)
  assert (c.target.height, c.target.width) == (1024, 2048)
  assert (c.data.crop_height, c.data.crop_width) == (1024, 1024)
  assert hrda_step.detail_size(c) == (512, 512)
  assert hrda_step.slide_stride(c) == (256, 256)
  assert hrda_step.divisor(c) == 8
  assert d.pseudo_margins == (30, 240, 30, 30)
  assert d.rcs_min_crop_ratio == 2.0 and d.mask_block == 64
  assert (c.batch_size, c.num_steps) == (2, 40_000)
  assert daformer_config.PUBLISHED["paper,hrda"] == "73.8"
  assert daformer_config.PUBLISHED["paper,hrda,mic"] == "75.9"
  assert ema_driver.config_problems(c) == []
