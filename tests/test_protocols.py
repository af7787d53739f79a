"""Paper protocols: README's table is the presets', per-domain sizes work.

``experiments.protocols.table()`` resolves every ``paper`` preset; README
"Paper protocols" must hold exactly that table. One tiny AdaptSegNet run
trains with a source and a target of different sizes through one step.
"""

import json
import pathlib
import re
import subprocess
import sys

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import protocols
from experiments.configs import adaptsegnet
from experiments.configs import source_only
from jaxda import checkpoint
from jaxda import methods
from jaxda import models
from jaxda.data import tables
from jaxda.tasks import splits
from jaxda.train import exceptions
from jaxda.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_protocol_table_is_generated_from_the_presets():
  readme = (ROOT / "README.md").read_text()
  m = re.search(r"<!-- protocols:begin -->\n(.*?)\n<!-- protocols:end -->",
                readme, re.S)
  assert m, "README lacks the Paper protocols table markers"
  assert m.group(1).strip() == protocols.table(), (
      "README 'Paper protocols' differs from the presets: paste the output"
      " of `python -m experiments.protocols`")


def test_table_names_the_protocol_fields():
  rows = {r[0]: r for r in (protocols.row(*p) for p in protocols.presets())}
  asn = rows["`adaptsegnet:paper`"]
  assert asn[1:5] == ["720×1280", "512×1024", "1", "150,000"]
  assert asn[7:9] == ["train", "4"]
  assert rows["`adaptsegnet:paper,code`"][8] == "2"
  assert rows["`advent:paper`"][4] == "120,000"
  assert "MRKLD 0.01" in rows["`crst:paper,code`"][9]
  assert "MRKLD 0.1" in rows["`crst:paper`"][9]
  assert "MRKLD 0," in rows["`cbst:paper`"][9] + ","
  assert rows["`oracle:paper`"][1] == "—"  # reads no source images
  assert all(r[10] == "last" for r in rows.values())


def test_each_domain_loads_at_its_own_size():
  c = source_only.get_config("tiny")
  assert splits.domain_size(c, "source") == (32, 64)
  c.source.height, c.source.width = 24, 40
  method = methods.get_method("adaptsegnet")
  data = splits.load_data(c, method)
  assert data["source_train"].images.shape[1:3] == (24, 40)
  assert data["target_train"].images.shape[1:3] == (32, 64)
  assert data["target_val"].images.shape[1:3] == (32, 64)


def test_two_sizes_train_through_one_step(tmp_path):
  c = adaptsegnet.get_config("tiny")
  c.num_steps = 2
  # The FC discriminator needs >= 32 pixels a side; target: data's 32x64.
  c.source.height, c.source.width = 40, 80
  c.num_devices = 1  # One compile of each function, not one per mesh size.
  # Lean: one level (one discriminator), batch 2, few images, one picture.
  c.model.multi_level = False
  c.batch_size = c.eval.batch_size = 2
  c.data.num_train_images, c.data.num_val_images = 4, 2
  c.eval.num_pictures = 1
  c.log_every = c.checkpoint_every = 2
  c.model.conv_impl = "lax"  # Compiles fastest on XLA:CPU.
  summary = methods.train_and_evaluate(c, str(tmp_path))
  assert summary["sizes"] == {"source": [40, 80], "target": [32, 64]}
  assert summary["model_selection"] == "last"
  assert np.isfinite(summary["target"]["miou"])
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["sizes"] == summary["sizes"]


# AdaptSegNet's DeeplabVGG state dict: torchvision VGG-16 convs without pool4
# (conv5 at features 23-27), fc6/fc7 at features 29/31, the ASPP classifier.
_VGG_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128),
              (10, 128, 256), (12, 256, 256), (14, 256, 256), (17, 256, 512),
              (19, 512, 512), (21, 512, 512), (23, 512, 512), (25, 512, 512),
              (27, 512, 512), (29, 512, 1024), (31, 1024, 1024))


def _deeplab_vgg_state_dict(num_classes, rng):
  sd = {}
  for i, cin, cout in _VGG_CONVS:
    sd[f"features.{i}.weight"] = rng.standard_normal(
        (cout, cin, 3, 3), np.float32) * 0.01
    sd[f"features.{i}.bias"] = rng.standard_normal(cout, np.float32)
  for b in range(4):
    sd[f"classifier.conv2d_list.{b}.weight"] = rng.standard_normal(
        (num_classes, 1024, 3, 3), np.float32) * 0.01
    sd[f"classifier.conv2d_list.{b}.bias"] = rng.standard_normal(
        num_classes, np.float32)
  return sd


def test_import_weights_deeplabv2_vgg16_fits_the_registry_model(tmp_path):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  sd = _deeplab_vgg_state_dict(19, rng)
  path = tmp_path / "deeplab_vgg.pth"
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  out = tmp_path / "converted"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.import_weights", f"--torch={path}",
       "--arch=deeplabv2_vgg16", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  info = json.loads((out / "import_info.json").read_text())
  assert info["arch"] == "deeplabv2_vgg16"
  loaded = checkpoint.load_weights(str(out))["params"]
  model = models.create_segmenter("deeplabv2_vgg16", 19,
                                  aspp_branches_used=2)
  want = jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))
  shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
  assert shapes(loaded) == shapes(want["params"])
  np.testing.assert_array_equal(  # OIHW -> HWIO
      np.asarray(loaded["backbone"]["fc6"]["kernel"]),
      sd["features.29.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      np.asarray(loaded["aspp_main"]["branch_3"]["bias"]),
      sd["classifier.conv2d_list.3.bias"])


def test_vgg_segmenter_refuses_what_it_lacks(tmp_path):
  with pytest.raises(ValueError, match="single output"):
    models.create_segmenter("deeplabv2_vgg16", 19, multi_level=True)
  c = adaptsegnet.get_config("tiny,vgg")
  c.model.multi_level = True
  with pytest.raises(exceptions.ConfigError, match="single output"):
    loop.setup(c, str(tmp_path), methods.get_method(c.method))


class _TinySegmenter(nn.Module):
  """One conv then 4x4 average pooling: a position-dependent stand-in for
  DeepLab (fast op by op), with its ``train_bn`` signature."""

  @nn.compact
  def __call__(self, x, *, train_bn=False):
    del train_bn
    y = nn.Conv(3, (3, 3))(x) + jnp.linspace(0, 1, x.shape[2])[None, None,
                                                                :, None]
    return {"main": nn.avg_pool(y, (4, 4), (4, 4))}


def test_multi_scale_flip_logits_average_the_views():
  from jaxda.models import forward  # pylint: disable=g-import-not-at-top
  from jaxda.tasks import evaluation  # pylint: disable=g-import-not-at-top
  seg = _TinySegmenter()
  x = jax.random.normal(jax.random.key(1), (1, 24, 40, 3))
  variables = seg.init(jax.random.key(0), x)

  class State:
    params, batch_stats = variables["params"], {}

  ms = forward.Models(seg, None)
  kw = dict(bn_mode="frozen", align_corners=True)
  one = evaluation.make_scaled_logits_fn(ms, scales=(1.0,), flip=False, **kw)
  single = one(State, x, (24, 40))
  same = evaluation.make_scaled_logits_fn(ms, scales=(1.0, 1.0), flip=False,
                                          **kw)(State, x, (24, 40))
  np.testing.assert_allclose(same, single, rtol=1e-5, atol=1e-5)
  flipped = evaluation.make_scaled_logits_fn(ms, scales=(1.0,), flip=True,
                                             **kw)(State, x, (24, 40))
  mirror = one(State, x[:, :, ::-1], (24, 40))[:, :, ::-1]
  assert not np.allclose(mirror, single)  # The flip view differs...
  np.testing.assert_allclose(flipped, (single + mirror) / 2, rtol=1e-5,
                             atol=1e-5)  # ...and is averaged in.
  multi = evaluation.make_scaled_logits_fn(ms, scales=(0.5, 1.5), flip=False,
                                           **kw)(State, x, (24, 40))
  assert multi.shape == (1, 24, 40, 3) and np.all(np.isfinite(multi))
  assert not np.allclose(multi, single)
  probs = evaluation.make_predict_fn(ms, scales=(1.0,), **kw)(State, x)
  np.testing.assert_allclose(probs, jax.nn.softmax(single), rtol=1e-5,
                             atol=1e-6)


def _fake_gta5(root, rng, n=2, size=(90, 160)):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for sub in ("images", "labels"):
    (root / sub).mkdir(parents=True)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(
        root / "images" / f"{i:05d}.png")
    label = Image.fromarray(rng.integers(0, 34, size).astype(np.uint8), "P")
    label.putpalette(list(rng.integers(0, 256, 768, dtype=np.uint8)))
    label.save(root / "labels" / f"{i:05d}.png")


def _fake_cityscapes(root, rng, size=(128, 256)):
  """Two images per split; returns the val label ids (2, H, W)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  val = []
  for split in ("train", "val"):
    for sub in ("leftImg8bit", "gtFine"):
      (root / sub / split / "aachen").mkdir(parents=True)
    for j in range(2):
      stem = f"aachen_{j:06d}_000019"
      Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(
          root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png")
      ids = rng.integers(0, 34, size).astype(np.uint8)
      Image.fromarray(ids, "L").save(
          root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png")
      if split == "val":
        val.append(ids)
  return np.stack(val)


@pytest.mark.slow
def test_adaptsegnet_paper_preset_smoke_on_fake_gta5_cityscapes(tmp_path):
  """R101 ``paper`` for one step with both sizes at 1/8 of the preset's."""
  rng = np.random.default_rng(0)
  _fake_gta5(tmp_path / "gta5", rng)
  val_ids = _fake_cityscapes(tmp_path / "cityscapes", rng)
  c = adaptsegnet.get_config("paper")
  src, tgt = (c.source.height, c.source.width), (c.target.height,
                                                   c.target.width)
  c.source.name, c.source.data_dir = "gta5", str(tmp_path / "gta5")
  c.target.name, c.target.data_dir = "cityscapes", str(tmp_path /
                                                        "cityscapes")
  c.source.height, c.source.width = src[0] // 8, src[1] // 8
  c.target.height, c.target.width = tgt[0] // 8, tgt[1] // 8
  c.data.height, c.data.width = c.target.height, c.target.width
  c.num_steps, c.num_devices, c.eval.batch_size = 1, 1, 1
  c.log_every = c.checkpoint_every = 1
  c.eval.num_pictures = 1
  summary = methods.train_and_evaluate(c, str(tmp_path / "run"))
  assert summary["sizes"] == {"source": [90, 160], "target": [64, 128]}
  # Scored at the labels' 128x256, not the 64x128 input: every valid pixel.
  valid = tables.LABEL_ID_TO_TRAIN_ID[val_ids] != 255
  assert summary["target"]["num_pixels"] == int(valid.sum())
  assert summary["model_selection"] == "last"
