"""DAFormer / HRDA / MIC pure parts (jaxda.methods.daformer), METHODS.md §17.

Every function is checked against a NumPy reference written here (from the
formulas of §17.3, not from the JAX code) on random inputs and edge cases.
"""

from __future__ import annotations

import colorsys
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.methods.daformer import feature_distance as fd
from jaxda import hrda_fusion
from jaxda.methods.daformer import masking
from jaxda.methods.daformer import mixing
from jaxda.methods.daformer import photometric
from jaxda.methods.daformer import rare_class
from jaxda.methods.daformer import schedule
from jaxda.methods.daformer import teacher

RNG = np.random.default_rng(0)


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------ teacher
def test_ema_update_matches_numpy_and_warms_up_as_a_plain_mean():
  student = {'a': RNG.normal(size=(3, 4)).astype(np.float32),
             'b': [RNG.normal(size=(5,)).astype(np.float32)]}
  t0 = jax.tree.map(lambda x: x + 1.0, student)
  update = jax.jit(teacher.ema_update, static_argnames='alpha')
  for step in (0, 1, 5, 998, 999, 1000, 123456):
    a = min(1.0 - 1.0 / (step + 1), 0.999)
    got = update(t0, student, step, alpha=0.999)
    for g, t, s in zip(jax.tree.leaves(got), jax.tree.leaves(t0),
                       jax.tree.leaves(student)):
      np.testing.assert_allclose(g, a * t + (1 - a) * s, rtol=1e-6, atol=1e-6)
  # Step 0 is a copy; then the plain mean of the iterates while a < alpha.
  iterates = [RNG.normal(size=(6,)).astype(np.float32) for _ in range(20)]
  t = jnp.zeros(6)
  for i, s in enumerate(iterates):
    t = teacher.ema_update(t, s, i, alpha=0.999)
    np.testing.assert_allclose(t, np.mean(iterates[:i + 1], 0), atol=1e-5)
  assert float(teacher.ema_alpha(0)) == 0.0
  assert float(teacher.ema_alpha(10 ** 6)) == pytest.approx(0.999)


def _ref_pseudo(logits, tau, margins, scope='batch'):
  p = _np_softmax(logits.astype(np.float64))
  conf, label = p.max(-1), p.argmax(-1)
  ok = conf >= tau
  q = (np.full(conf.shape, ok.mean()) if scope == 'batch'
       else np.broadcast_to(ok.mean((1, 2))[:, None, None], conf.shape).copy())
  top, bottom, left, right = margins
  h, w = conf.shape[1:]
  q[:, :top] = 0
  q[:, h - bottom:] = 0
  q[:, :, :left] = 0
  q[:, :, w - right:] = 0
  return label, q


@pytest.mark.parametrize('margins,scope', [((0, 0, 0, 0), 'batch'),
                                           ((2, 3, 1, 4), 'batch'),
                                           ((1, 0, 0, 2), 'image')])
def test_pseudo_label_and_weight_matches_numpy(margins, scope):
  logits = (RNG.normal(size=(3, 10, 12, 5)) * 4).astype(np.float32)
  tau = float(np.median(_np_softmax(logits.astype(np.float64)).max(-1))) + 1e-4
  lab, w = teacher.pseudo_label_and_weight(jnp.asarray(logits), tau, margins,
                                           scope=scope)
  ref_lab, ref_w = _ref_pseudo(logits, tau, margins, scope)
  np.testing.assert_array_equal(lab, ref_lab)
  np.testing.assert_allclose(w, ref_w, atol=1e-6)


def test_pseudo_weight_counts_margin_pixels_and_valid_mask():
  # Confident only in the top rows, which the margin then zeroes: q > 0
  # (margin pixels count), but every remaining weight is q, margins 0.
  logits = np.zeros((2, 8, 8, 3), np.float32)
  logits[:, :2, :, 0] = 20.0
  lab, w = teacher.pseudo_label_and_weight(jnp.asarray(logits), 0.968,
                                           (2, 0, 0, 0))
  q = 2 * 8 * 2 / (2 * 8 * 8)
  np.testing.assert_allclose(np.asarray(w)[:, 2:], q)
  np.testing.assert_array_equal(np.asarray(w)[:, :2], 0.0)
  valid = RNG.uniform(size=(2, 8, 8)) > 0.5
  _, w2 = teacher.pseudo_label_and_weight(jnp.asarray(logits), 0.968,
                                          valid_mask=jnp.asarray(valid))
  np.testing.assert_allclose(w2, q * valid)
  # tau 0 keeps everything (>=), tau above 1 nothing.
  assert float(teacher.pseudo_label_and_weight(logits, 0.0)[1].mean()) == 1.0
  assert float(teacher.pseudo_label_and_weight(logits, 1.01)[1].max()) == 0.0


# ------------------------------------------------------------------ ClassMix
def _labels(b, h, w, classes, p_ignore=0.1):
  lab = RNG.choice(classes, size=(b, h, w))
  lab[RNG.uniform(size=lab.shape) < p_ignore] = 255
  return lab.astype(np.int32)


def test_class_mix_matches_numpy_one_mix():
  b, h, w, c = 3, 9, 11, 6
  src_lab = _labels(b, h, w, [0, 2, 3, 5])
  tgt_lab = RNG.integers(0, c, (b, h, w)).astype(np.int32)
  src_img = RNG.normal(size=(b, h, w, 3)).astype(np.float32)
  tgt_img = RNG.normal(size=(b, h, w, 3)).astype(np.float32)
  tgt_w = RNG.uniform(size=(b, h, w)).astype(np.float32)
  for pool, ignore in (('image', False), ('batch', True), ('image', True)):
    out = jax.jit(mixing.class_mix, static_argnums=(6, 7, 8))(
        jax.random.key(3), src_img, src_lab, tgt_img, tgt_lab, tgt_w, c,
        pool, ignore)
    for j in range(b):
      pool_labels = src_lab[j] if pool == 'image' else src_lab
      cands = np.unique(pool_labels)
      if not ignore:
        cands = cands[cands != 255]
      slots = np.where(cands == 255, c, cands)
      chosen_slots = np.nonzero(np.asarray(out['chosen'][j]))[0]
      assert set(chosen_slots) <= set(slots)
      assert len(chosen_slots) == (len(cands) + len(cands) % 2) // 2
      chosen = np.where(chosen_slots == c, 255, chosen_slots)
      m = np.isin(src_lab[j], chosen).astype(np.float32)
      np.testing.assert_array_equal(out['mask'][j], m)
      np.testing.assert_allclose(
          out['image'][j], m[..., None] * src_img[j] + (1 - m[..., None])
          * tgt_img[j], atol=1e-6)
      np.testing.assert_array_equal(out['label'][j],
                                    np.where(m > 0, src_lab[j], tgt_lab[j]))
      np.testing.assert_allclose(out['weight'][j], m + (1 - m) * tgt_w[j])


def test_class_choice_is_uniform_and_batch_pool_reaches_absent_classes():
  present = jnp.asarray([True, False, True, True, True, False, True])
  keys = jax.random.split(jax.random.key(0), 4000)
  chosen = np.asarray(jax.jit(jax.vmap(mixing.choose_classes, (0, None)))(
      keys, present))
  assert (chosen.sum(1) == 3).all() and not chosen[:, [1, 5]].any()
  freq = chosen[:, np.asarray(present)].mean(0)  # each 3/5 in expectation
  assert np.all(np.abs(freq - 0.6) < 4 * math.sqrt(0.24 / 4000))
  # 'batch' pool: image 0 holds {0, 1}, image 1 holds {2, 3}.
  lab = np.zeros((2, 4, 4), np.int32)
  lab[0, :2], lab[1] = 1, 2
  lab[1, :2] = 3
  mix = jax.jit(jax.vmap(
      lambda k: mixing.class_mix(k, jnp.zeros((2, 4, 4, 3)), lab,
                                 jnp.zeros((2, 4, 4, 3)), lab,
                                 jnp.ones((2, 4, 4)), 4)['chosen']))
  chosen = np.asarray(mix(jax.random.split(jax.random.key(1), 20)))
  assert chosen[:, 0, 2:4].any()  # classes absent from image 0 get chosen
  # Single present class: ceil(1/2) = 1, so it is always pasted.
  one = mixing.choose_classes(jax.random.key(0), jnp.asarray([False, True]))
  np.testing.assert_array_equal(one, [False, True])


# ------------------------------------------------------------------ photometric
def _np_hsv(rgb):
  flat = rgb.reshape(-1, 3)
  return np.array([colorsys.rgb_to_hsv(*p) for p in flat]).reshape(rgb.shape)


def _np_rgb(hsv):
  flat = hsv.reshape(-1, 3)
  return np.array([colorsys.hsv_to_rgb(*p) for p in flat]).reshape(hsv.shape)


def _np_jitter(x, p):
  """kornia 0.5.8 ColorJitter ops (METHODS.md §17.3.4) via colorsys."""
  for op in p['order']:
    if op == 0:
      x = np.clip(x + p['brightness'], 0, 1)
    elif op == 1:
      x = np.clip(x * p['contrast'], 0, 1)
    elif op == 2:
      hsv = _np_hsv(x)
      hsv[..., 1] = np.clip(hsv[..., 1] * p['saturation'], 0, 1)
      x = _np_rgb(hsv)
    else:
      hsv = _np_hsv(x)
      hsv[..., 0] = (hsv[..., 0] + p['hue'] / (2 * np.pi)) % 1.0
      x = _np_rgb(hsv)
  return x


def _np_blur(img, sigma):
  out = img.astype(np.float64)
  for axis in (0, 1):
    side = img.shape[axis]
    c = math.ceil(0.1 * side)
    size = int(math.floor(c - 0.5 + c % 2))
    x = np.arange(size) - size // 2
    k = np.exp(-x ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    pad = [(0, 0)] * 3
    pad[axis] = (size // 2, size // 2)
    padded = np.pad(out, pad, mode='reflect')
    out = sum(k[i] * np.take(padded, np.arange(side) + i, axis=axis)
              for i in range(size))
  return out


def test_hsv_round_trip_matches_colorsys():
  rgb = RNG.uniform(size=(50, 3))
  rgb[0] = 0.5  # grey: hue 0, saturation 0
  rgb[1] = [1.0, 1.0, 0.2]  # tie between R and G maxima
  hsv = np.asarray(photometric.rgb_to_hsv(jnp.asarray(rgb, jnp.float32)))
  ref = _np_hsv(rgb)
  ref[:, 0] *= 2 * np.pi
  np.testing.assert_allclose(hsv, ref, atol=1e-5)
  back = photometric.hsv_to_rgb(jnp.asarray(hsv))
  np.testing.assert_allclose(back, rgb, atol=1e-5)


def test_blur_kernel_size_and_blur_match_numpy():
  assert [photometric.blur_kernel_size(s) for s in (512, 1024, 64, 40)] == [
      51, 103, 7, 3]
  img = RNG.normal(size=(40, 64, 3)).astype(np.float32)
  got = photometric.gaussian_blur(jnp.asarray(img), jnp.float32(0.9))
  np.testing.assert_allclose(got, _np_blur(img, 0.9), atol=1e-5)


def test_strong_transform_matches_numpy_per_image():
  b = 2
  imgs01 = RNG.uniform(size=(b, 6, 7, 3)).astype(np.float32)
  mean, std = np.array(photometric.IMAGENET_MEAN), np.array(
      photometric.IMAGENET_STD)
  imgs = ((imgs01 - mean) / std).astype(np.float32)
  key = jax.random.key(7)
  run = jax.jit(photometric.strong_transform, static_argnames='blur')
  # Both switches off (u <= p): the identity.
  off = run(key, imgs, switches=(jnp.float32(0.2), jnp.float32(0.5)))
  np.testing.assert_array_equal(off, imgs)
  # Jitter only: per-image factors and order, re-derived from the key split
  # documented in strong_transform.
  on = np.asarray(run(key, imgs, switches=(jnp.float32(0.9),
                                           jnp.float32(0.1))))
  _, k_img = jax.random.split(key)
  k_jit, k_blur = jax.random.split(k_img)
  for i, k in enumerate(jax.random.split(k_jit, b)):
    p = {n: np.asarray(v) for n, v in photometric.jitter_params(k).items()}
    assert abs(p['brightness']) <= 0.2 and abs(p['hue']) <= 0.2 * 2 * np.pi
    assert 0.8 <= p['contrast'] <= 1.2 and sorted(p['order']) == [0, 1, 2, 3]
    ref = (_np_jitter(imgs01[i].astype(np.float64), p) - mean) / std
    np.testing.assert_allclose(on[i], ref, atol=2e-5)
  # Blur only: sigma ~ U(0.15, 1.15) per image.
  blurred = np.asarray(run(key, imgs, switches=(jnp.float32(0.0),
                                                jnp.float32(0.9))))
  for i, k in enumerate(jax.random.split(k_blur, b)):
    sigma = float(jax.random.uniform(k, (), jnp.float32, 0.15, 1.15))
    np.testing.assert_allclose(blurred[i], _np_blur(imgs[i], sigma), atol=1e-5)


# ------------------------------------------------------------------ RCS
def test_rare_class_statistics_match_numpy():
  labels = [RNG.choice([0, 1, 2, 4, 255], size=(60, 80),
                       p=[0.5, 0.3, 0.15, 0.04, 0.01]) for _ in range(12)]
  counts = rare_class.image_class_counts(labels, num_classes=6)
  for lab, row in zip(labels, counts):
    for c in range(6):
      assert row[c] == np.sum(lab == c)
  classes, probs = rare_class.class_probabilities(counts, temperature=0.05)
  n = counts.sum(0)
  present = np.nonzero(n)[0]
  f = n[present] / n[present].sum()
  ref = np.exp((1 - f) / 0.05) / np.exp((1 - f) / 0.05).sum()
  assert list(classes) == sorted(present, key=lambda c: n[c])
  np.testing.assert_allclose(probs, ref[np.argsort(n[present], kind='stable')])
  assert probs[0] == probs.max()  # rarest class first, most likely
  # Strictly more than min_pixels: an image with exactly min_pixels is out.
  min_px = int(counts[0, 4])
  stats = rare_class.rare_class_stats(counts, 0.05, min_pixels=min_px)
  k = list(stats.classes).index(4)
  np.testing.assert_array_equal(stats.images[k],
                                np.nonzero(counts[:, 4] > min_px)[0])
  assert 0 not in stats.images[k]
  again = rare_class.RareClassStats.from_json(stats.to_json())
  np.testing.assert_array_equal(again.probs, stats.probs)


def test_rare_class_sampler_frequencies_match_probabilities():
  counts = np.array([[5000, 4000, 0, 100],
                     [6000, 3500, 3100, 3001],
                     [7000, 0, 5000, 0],
                     [9000, 3200, 0, 4000]])
  stats = rare_class.rare_class_stats(counts, temperature=0.5,
                                      min_pixels=3000)
  draws = 20000
  cls, img = rare_class.RareClassSampler(stats, rng=0).sample_many(draws)
  for c, p, cand in zip(stats.classes, stats.probs, stats.images):
    freq = np.mean(cls == c)
    assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / draws) + 1e-9
    picked = img[cls == c]
    assert set(picked) <= set(cand)
    share = np.mean(picked == cand[0])
    assert abs(share - 1 / len(cand)) < 0.05
  # Class 3: images 1 (3001 > 3000) and 3; not image 0 (100 px).
  k = list(stats.classes).index(3)
  assert list(stats.images[k]) == [1, 3]


def test_accepted_crop():
  assert rare_class.accepted_crop([10, 2000, 0] + [0] * 8) == 1
  assert rare_class.accepted_crop([1500] * 11) == 10  # 1500 is not > 1500
  assert rare_class.accepted_crop([0] * 11, min_crop_ratio=0) == 0
  assert rare_class.accepted_crop([7000] + [0] * 10, min_crop_ratio=2.0) == 0


# ------------------------------------------------------------------ FD
def _np_downscale(lab, s, min_ratio=0.75, nc=19):
  b, h, w = lab.shape
  out = np.full((b, h // s, w // s), 255)
  for i in range(b):
    for y in range(h // s):
      for x in range(w // s):
        cell = lab[i, y * s:(y + 1) * s, x * s:(x + 1) * s].ravel()
        cell = np.where(cell == 255, nc, cell)
        cnt = np.bincount(cell, minlength=nc + 1)
        c = int(np.argmax(cnt))
        if c != nc and cnt[c] / cell.size >= min_ratio:
          out[i, y, x] = c
  return out


def test_thing_class_mask_matches_numpy():
  lab = RNG.choice([0, 6, 11, 13, 255], size=(2, 64, 96)).astype(np.int32)
  lab[0, :32, :32] = 13  # a pure thing cell
  lab[0, 32:, :32] = 255  # a pure void cell
  lab[1, :32, :32] = 13
  lab[1, :7, :32] = 2  # 25 / 32 rows of 13 = 0.78 share: kept
  lab[1, 32:, :32] = 13
  lab[1, 32:41, :32] = 2  # 23 / 32 = 0.72 < 0.75: ignored
  down = np.asarray(fd.downscale_label_ratio(jnp.asarray(lab), 32))
  ref = _np_downscale(lab, 32)
  np.testing.assert_array_equal(down, ref)
  assert down[0, 0, 0] == 13 and down[0, 1, 0] == 255
  assert down[1, 0, 0] == 13 and down[1, 1, 0] == 255
  mask = fd.thing_class_mask(jnp.asarray(lab), (2, 3))
  np.testing.assert_array_equal(mask, np.isin(ref, fd.CITYSCAPES_THING_CLASSES))
  # HRDA: context features at half resolution -> scale 64.
  np.testing.assert_array_equal(
      fd.thing_class_mask(jnp.asarray(lab[:, :, :64]), (1, 1)),
      np.isin(_np_downscale(lab[:, :, :64], 64), fd.CITYSCAPES_THING_CLASSES))


def test_feature_distance_matches_numpy_and_handles_empty_masks():
  fs = RNG.normal(size=(2, 3, 4, 8)).astype(np.float32)
  fi = RNG.normal(size=(2, 3, 4, 8)).astype(np.float32)
  mask = RNG.uniform(size=(2, 3, 4)) > 0.5
  ref = 0.005 * np.sqrt(((fs - fi) ** 2).sum(-1))[mask].mean()
  np.testing.assert_allclose(fd.feature_distance(fs, fi, mask), ref, rtol=1e-6)
  np.testing.assert_allclose(
      fd.feature_distance(fs, fi), 0.005 * np.sqrt(((fs - fi) ** 2).sum(-1))
      .mean(), rtol=1e-6)
  empty = np.zeros((2, 3, 4), bool)
  assert float(fd.feature_distance(fs, fi, empty)) == 0.0
  assert np.isnan(float(fd.feature_distance(fs, fi, empty, empty='nan')))
  for e in ('zero', 'nan'):
    g = jax.grad(lambda f: fd.feature_distance(f, fi, empty, empty=e))(fs)
    np.testing.assert_array_equal(g, 0.0)
  # Identical features: distance 0 with a finite (zero) gradient.
  g = jax.grad(lambda f: fd.feature_distance(f, fs, mask))(jnp.asarray(fs))
  assert np.isfinite(np.asarray(g)).all() and not np.asarray(g).any()


# ------------------------------------------------------------------ MIC mask
def test_block_mask_matches_numpy_nearest():
  assert masking.grid_shape(1024, 1024, 64) == (16, 16)
  assert masking.grid_shape(96, 160, 64) == (2, 2)  # round(1.5)=2, round(2.5)=2
  u = RNG.uniform(size=(3, 2, 2)).astype(np.float32)
  got = np.asarray(masking.mask_from_uniform(jnp.asarray(u), (96, 160), 0.7))
  rows = np.minimum(np.floor(np.arange(96) * (2 / 96)).astype(int), 1)
  cols = np.minimum(np.floor(np.arange(160) * (2 / 160)).astype(int), 1)
  ref = (u > 0.7).astype(np.float32)[:, rows][:, :, cols]
  np.testing.assert_array_equal(got, ref)
  m = np.asarray(jax.jit(masking.block_mask, static_argnums=(1, 2, 3, 4, 5))(
      jax.random.key(0), 32, 64, 64, 8, 0.7))
  assert m.shape == (32, 64, 64)
  assert abs(1 - m.mean() - 0.7) < 0.04  # 4 sigma over 2048 cells
  assert not np.array_equal(m[0], m[1])  # independent per sample
  cells = m[:, ::8, ::8]
  np.testing.assert_array_equal(np.repeat(np.repeat(cells, 8, 1), 8, 2), m)
  imgs = RNG.normal(size=(2, 16, 16, 3)).astype(np.float32)
  masked, mk = jax.jit(masking.mask_images, static_argnums=2)(
      jax.random.key(1), jnp.asarray(imgs), 4)
  np.testing.assert_allclose(masked, imgs * np.asarray(mk)[..., None])


# ------------------------------------------------------------------ schedule
def _np_lr(i, base, max_iters, warm, ratio=1e-6, power=1.0):
  regular = base * (1 - i / max_iters) ** power
  if i < warm:
    return regular * (1 - (1 - i / warm) * (1 - ratio))
  return regular


def test_poly_warmup_schedule_matches_numpy():
  sched = schedule.poly_warmup_schedule(6e-5, 40000, 1500)
  for i in (0, 1, 750, 1499, 1500, 1501, 20000, 39999, 40000, 50000):
    want = _np_lr(min(i, 40000), 6e-5, 40000, 1500)
    np.testing.assert_allclose(float(sched(i)), want, rtol=1e-5, atol=1e-16)
  assert float(sched(0)) == pytest.approx(6e-5 * 1e-6)
  sched2 = schedule.poly_warmup_schedule(1.0, 100, 0, power=0.9)
  np.testing.assert_allclose(float(sched2(50)), 0.5 ** 0.9, rtol=1e-6)


def test_optimizer_groups_and_adamw_steps_match_numpy():
  params = {'encoder': {'block1_0': {'norm1': {'scale': np.ones(3)},
                                     'attn': {'q': {'kernel': np.ones((3, 3)),
                                                    'bias': np.ones(3)}}},
                        'patch_embed1_norm': {'bias': np.ones(3)}},
            'head': {'fuse': {'bn': {'scale': np.ones(3)}},
                     'cls': {'kernel': np.ones((3, 2))}},
            'head_att': {'cls': {'bias': np.ones(2)}}}
  params = jax.tree.map(
      lambda x: jnp.asarray(x * RNG.uniform(0.5, 1.5, x.shape), jnp.float32),
      params)
  labels = schedule.param_group_labels(params)
  assert labels['encoder']['block1_0']['norm1']['scale'] == 'no_decay'
  assert labels['encoder']['patch_embed1_norm']['bias'] == 'no_decay'
  assert labels['encoder']['block1_0']['attn']['q']['bias'] == 'default'
  assert labels['head']['fuse']['bn']['scale'] == 'head'  # head wins
  assert labels['head_att']['cls']['bias'] == 'head'
  tx = schedule.make_optimizer(params, base_lr=1e-2, max_steps=10,
                               warmup_steps=2)
  state = tx.init(params)
  p_np = jax.tree.map(np.asarray, params)
  m = jax.tree.map(np.zeros_like, p_np)
  v = jax.tree.map(np.zeros_like, p_np)
  lab_leaves = jax.tree.leaves(labels)
  for t in range(3):
    grads = jax.tree.map(lambda x: RNG.normal(size=x.shape).astype(np.float32),
                         p_np)
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    lr = _np_lr(t, 1e-2, 10, 2)
    new = []
    for lab, p, g, mm, vv in zip(lab_leaves, jax.tree.leaves(p_np),
                                 jax.tree.leaves(grads), jax.tree.leaves(m),
                                 jax.tree.leaves(v)):
      mm[...] = 0.9 * mm + 0.1 * g
      vv[...] = 0.999 * vv + 0.001 * g * g
      mh, vh = mm / (1 - 0.9 ** (t + 1)), vv / (1 - 0.999 ** (t + 1))
      glr = lr * (10 if lab == 'head' else 1)
      wd = 0.0 if lab == 'no_decay' else 0.01
      new.append(p - glr * (mh / (np.sqrt(vh) + 1e-8) + wd * p))
    p_np = jax.tree.unflatten(jax.tree.structure(p_np), new)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p_np)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ HRDA
def _np_up2(x):
  """PyTorch bilinear x2, align_corners=False, (B, h, w, C)."""
  def axis_weights(n):
    src = np.maximum((np.arange(2 * n) + 0.5) / 2 - 0.5, 0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, src - i0
  b, h, w, c = x.shape
  r0, r1, rw = axis_weights(h)
  c0, c1, cw = axis_weights(w)
  rows = x[:, r0] * (1 - rw)[None, :, None, None] + x[:, r1] * rw[
      None, :, None, None]
  return rows[:, :, c0] * (1 - cw)[None, None, :, None] + rows[:, :, c1] * cw[
      None, None, :, None]


def _np_fuse(ctx, att_logits, det, box):
  att = 1 / (1 + np.exp(-att_logits))
  y1, y2, x1, x2 = box
  mask = np.zeros(ctx.shape[1:3])
  mask[y1 // 8:y2 // 8, x1 // 8:x2 // 8] = 1
  att = att * mask[None, :, :, None]
  ctx = (1 - att) * ctx
  up_ctx, up_att = _np_up2(ctx), _np_up2(att)
  ins = np.zeros_like(up_ctx)
  ins[:, y1 // 4:y2 // 4, x1 // 4:x2 // 4] = det
  return up_att * ins + up_ctx


@pytest.mark.parametrize('box', [(0, 64, 0, 64), (32, 96, 56, 120),
                                 (64, 128, 64, 128)])
def test_hrda_fusion_matches_numpy(box):
  # Full-resolution input 128x128: context 16x16 (stride 8), detail crop
  # 64x64 -> 16x16 logits (stride 4).
  ctx = RNG.normal(size=(2, 16, 16, 4)).astype(np.float32)
  att = RNG.normal(size=(2, 16, 16, 4)).astype(np.float32)
  det = RNG.normal(size=(2, 16, 16, 4)).astype(np.float32)
  fused, up_att = jax.jit(hrda_fusion.fuse)(ctx, att, det, jnp.asarray(box))
  np.testing.assert_allclose(fused, _np_fuse(ctx, att, det, box), atol=1e-5)
  # The attention is zero far outside the box (one-pixel band aside).
  y1, y2, x1, x2 = box
  outside = np.ones((32, 32), bool)
  outside[max(y1 // 4 - 1, 0):y2 // 4 + 1,
          max(x1 // 4 - 1, 0):x2 // 4 + 1] = False
  assert not np.asarray(up_att)[:, outside].any()


def test_hrda_fusion_without_crop():
  ctx = RNG.normal(size=(1, 4, 5, 3)).astype(np.float32)
  att = RNG.normal(size=(1, 4, 5, 1)).astype(np.float32)
  det = RNG.normal(size=(1, 8, 10, 3)).astype(np.float32)
  fused, _ = hrda_fusion.fuse(ctx, att, det, None)
  a = 1 / (1 + np.exp(-att))
  np.testing.assert_allclose(fused, _np_up2(a) * det + _np_up2((1 - a) * ctx),
                             atol=1e-5)
