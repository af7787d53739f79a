"""Input-pipeline throughput at paper size on real-layout files (issue 20).

Writes GTA5 (1914x1052 RGB PNG + palette label PNGs of Cityscapes label ids)
and Cityscapes (2048x1024 leftImg8bit + gtFine labelIds) files in their
distributed layouts to a temporary directory, reads them through the run
path (`pipeline.load_domain` -> lazy readers -> `pipeline.train_batches`,
`augment.scale_crop_batches` for the CRST-style preset) and measures:

* decoded + resized + normalised images/s per domain, at batch 1 (the paper
  presets' batch per domain), with 1..k threads (`train_batches(workers=)`);
* the same with CRST's scale 0.5-1.5 / 512x1024 crop / flip;
* the paired source+target stream feeding a simulated device step (a sleep,
  which like an async device releases the GIL): the time the step waits for
  input, serial (the loop today) vs `prefetch(train_batches(workers=k))`;

and prints images/s, images/s per core and the cores a host needs to feed
the step rate the step's FLOPs imply. Why: whether the hand-written loader
keeps an accelerator busy was unmeasured. Images are smooth fields plus
noise, so they compress roughly like camera frames (PNG ~0.6 of raw here;
GTA5 / Cityscapes frames are ~0.4-0.5), i.e. decode is if anything slower.

  python -m benchmarks.input_pipeline --out DIR [--images N]
      [--threads 1,2] [--repeats 3] [--smoke]
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from jaxda.data import augment
from jaxda.data import pipeline
from jaxda.data.readers import common

# The step rate the FLOPs imply (issue 20): one paper-size AdaptSegNet step
# (DeepLab-v2 R101, 512x1024, batch 1 per domain, forward + backward of both
# domains and the discriminators) ~4.9 TFLOP (NOTES.md: 1,276 GFLOP at
# 256x512, x4 pixels); a H100/H200-class bf16 dense peak ~989 TFLOP/s.
STEP_TFLOP = 4.9
PEAK_TFLOPS = 989.0
MFU = 0.40
IMAGES_PER_STEP = 2  # one source + one target image
ISSUE_IMAGES_PER_S = 60.0  # the issue's round figure (~30 steps/s)
HOST_CORES = 16
GTA5_NATIVE = (1052, 1914)  # (H, W)
CITYSCAPES_NATIVE = (1024, 2048)
GTA5_TRAIN = (720, 1280)  # AdaptSegNet's GTA5 input size
CITYSCAPES_TRAIN = (512, 1024)
CRST_CROP = (512, 1024)


def _photo(rng, size):
  """uint8 (H, W, 3): smooth colour field + noise (compresses like a frame)."""
  h, w = size
  ys = np.arange(h, dtype=np.float32)[:, None]
  xs = np.arange(w, dtype=np.float32)[None, :]
  base = np.stack([128 + 60 * np.sin(xs / (37 + 9 * c) + ys / (53 + 7 * c)
                                     + c) for c in range(3)], -1)
  noise = rng.normal(0, 6, (h, w, 3)).astype(np.float32)
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def _label_ids(rng, size, block=32):
  """uint8 (H, W) Cityscapes label ids in [0, 34), blocky like a label map."""
  h, w = size
  small = rng.integers(0, 34, (h // block + 1, w // block + 1)).astype(
      np.uint8)
  return np.kron(small, np.ones((block, block), np.uint8))[:h, :w]


def _palette_png(path, ids):
  """GTA5 label: palette PNG whose indices are the label ids."""
  img = Image.fromarray(ids, mode='P')
  img.putpalette([(i * 37) % 256 for i in range(768)])
  img.save(path)


def write_gta5(root, n, size, rng):
  """ROOT/images/%05d.png and ROOT/labels/%05d.png (the GTA5 layout)."""
  os.makedirs(os.path.join(root, 'images'))
  os.makedirs(os.path.join(root, 'labels'))
  for i in range(n):
    Image.fromarray(_photo(rng, size)).save(
        os.path.join(root, 'images', f'{i + 1:05d}.png'))
    _palette_png(os.path.join(root, 'labels', f'{i + 1:05d}.png'),
                 _label_ids(rng, size))


def write_cityscapes(root, n, size, rng, cities=('aachen', 'bochum')):
  """leftImg8bit/train/<city>/*_leftImg8bit.png + gtFine *_labelIds.png."""
  for j in range(n):
    city = cities[j % len(cities)]
    image_dir = os.path.join(root, 'leftImg8bit', 'train', city)
    label_dir = os.path.join(root, 'gtFine', 'train', city)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    stem = f'{city}_{j:06d}_000019'
    Image.fromarray(_photo(rng, size)).save(
        os.path.join(image_dir, stem + '_leftImg8bit.png'))
    Image.fromarray(_label_ids(rng, size), mode='L').save(
        os.path.join(label_dir, stem + '_gtFine_labelIds.png'))


def _set_decode_threads(n):
  """Size of the readers' row-decode pool (used when a batch has > 1 row)."""
  if common._POOL is not None:  # pylint: disable=protected-access
    common._POOL.shutdown()  # pylint: disable=protected-access
  common._POOL = None  # pylint: disable=protected-access
  common._DECODE_THREADS = n  # pylint: disable=protected-access


def _stream(domain, workers, augmented, start, crop):
  batches = pipeline.train_batches(
      domain.images, domain.labels, batch_size=1, seed=0, start_step=start,
      flip=augmented, mode='caffe_bgr', workers=workers)
  if augmented:
    batches = augment.scale_crop_batches(
        batches, seed=0, start_step=start, scale_min=0.5, scale_max=1.5,
        scale_step=0.1, crop_size=crop)
  return batches


def images_per_s(domain, workers, augmented, repeats, crop):
  """Median images/s of one epoch of batch-1 batches, and the repeats."""
  n = len(domain.images)
  rates = []
  for r in range(repeats):
    batches = _stream(domain, workers, augmented, r * n, crop)
    t0 = time.perf_counter()
    for _ in range(n):
      next(batches)
    rates.append(n / (time.perf_counter() - t0))
    batches.close()
  return statistics.median(rates), rates


def paired_wait(domains, workers, step_s, steps, prefetch):
  """Mean input wait per simulated step (s) of the paired loop.

  Each step takes next() of {source, target} batches (what
  `train.loop.paired_batches` yields) and then 'runs' for `step_s`, a sleep
  standing in for an asynchronously dispatched device step.
  """
  def paired():
    its = {role: _stream(d, workers, False, 0, None)
           for role, d in domains.items()}
    while True:
      yield {role: next(it) for role, it in its.items()}

  batches = paired()
  if prefetch:
    batches = pipeline.prefetch(batches, size=2)
  next(batches)  # Warm-up: thread pools, first permutation.
  waits = []
  t_all = time.perf_counter()
  for _ in range(steps):
    t0 = time.perf_counter()
    next(batches)
    waits.append(time.perf_counter() - t0)
    time.sleep(step_s)
  total = time.perf_counter() - t_all
  batches.close()
  return {'mean_wait_s': statistics.mean(waits),
          'median_wait_s': statistics.median(waits),
          'wait_fraction': sum(waits) / total,
          'steps_per_s': steps / total}


def _cpu_model():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def target_rate():
  """Images/s the FLOPs imply, with the arithmetic as a sentence."""
  step_s = STEP_TFLOP / (MFU * PEAK_TFLOPS)
  steps = 1.0 / step_s
  images = steps * IMAGES_PER_STEP
  text = (f'{STEP_TFLOP} TFLOP/step / ({MFU:.0%} x {PEAK_TFLOPS:.0f} TFLOP/s '
          f'bf16 dense) = {step_s * 1e3:.1f} ms/step = {steps:.1f} steps/s '
          f'x {IMAGES_PER_STEP} images = {images:.0f} images/s (the issue '
          f'rounds this to ~30 steps/s, {ISSUE_IMAGES_PER_S:.0f} images/s, '
          f'which is what ~15% MFU gives)')
  return images, steps, text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--images', type=int, default=8,
                      help='files written per domain')
  parser.add_argument('--threads', default=None,
                      help='comma-separated worker counts (default 1..cores)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--steps', type=int, default=16,
                      help='simulated steps of the paired-loop wait check')
  parser.add_argument('--smoke', action='store_true',
                      help='4 images per domain at 1/8 size, 1 repeat')
  args = parser.parse_args(argv)
  cores = os.cpu_count() or 1
  threads = ([int(t) for t in args.threads.split(',')] if args.threads
             else list(range(1, cores + 1)))
  scale = 8 if args.smoke else 1
  n = 4 if args.smoke else args.images
  repeats = 1 if args.smoke else args.repeats
  steps = 4 if args.smoke else args.steps

  def sized(size):
    return (size[0] // scale, size[1] // scale)

  sizes = {'gta5': (sized(GTA5_NATIVE), sized(GTA5_TRAIN)),
           'cityscapes': (sized(CITYSCAPES_NATIVE), sized(CITYSCAPES_TRAIN))}
  crop = sized(CRST_CROP)
  os.makedirs(args.out, exist_ok=True)
  _set_decode_threads(1)  # Batch 1: parallelism comes from `workers`.
  try:
    with tempfile.TemporaryDirectory(prefix='jaxda_input_') as tmp:
      rng = np.random.default_rng(0)
      t0 = time.perf_counter()
      write_gta5(os.path.join(tmp, 'GTA5'), n, sizes['gta5'][0], rng)
      write_cityscapes(os.path.join(tmp, 'Cityscapes'), n,
                       sizes['cityscapes'][0], rng)
      write_s = time.perf_counter() - t0
      file_mb = {name: sum(os.path.getsize(os.path.join(d, f))
                           for d, _, fs in os.walk(os.path.join(tmp, root))
                           for f in fs) / 1e6 / n
                 for name, root in (('gta5', 'GTA5'),
                                    ('cityscapes', 'Cityscapes'))}
      domains = {
          name: pipeline.load_domain(
              name, data_dir=os.path.join(tmp, root), split='train',
              height=sizes[name][1][0], width=sizes[name][1][1])
          for name, root in (('gta5', 'GTA5'), ('cityscapes', 'Cityscapes'))}
      rows = []
      for name, domain in domains.items():
        for augmented in (False, True):
          for t in threads:
            rate, all_rates = images_per_s(domain, t, augmented, repeats,
                                           crop)
            rows.append({'domain': name, 'augmented': augmented,
                         'threads': t, 'images_per_s': rate,
                         'repeats': all_rates})
      # Paired loop: a step 1.25x the time k workers take to build one
      # source + one target batch, so with k workers input can always be
      # ready; serially it takes about twice as long as that.
      k = max(threads)
      step_s = 1.25 * sum(1.0 / r['images_per_s'] for r in rows
                          if r['threads'] == k and not r['augmented'])
      wait = {'step_s': step_s,
              'serial': paired_wait(
                  {'source': domains['gta5'], 'target': domains['cityscapes']},
                  1, step_s, steps, prefetch=False),
              f'prefetch_workers{k}': paired_wait(
                  {'source': domains['gta5'], 'target': domains['cityscapes']},
                  k, step_s, steps, prefetch=True)}
  finally:
    _set_decode_threads(min(8, cores))

  need, need_steps, arithmetic = target_rate()
  base = {(r['domain'], r['augmented']): r['images_per_s']
          for r in rows if r['threads'] == 1}
  summary = {}
  for (name, augmented), per_core in base.items():
    best = max(rows, key=lambda r: (r['domain'] == name
                                    and r['augmented'] == augmented,
                                    r['threads']))
    speedup = best['images_per_s'] / per_core
    efficiency = speedup / best['threads']
    linear = per_core * HOST_CORES
    host = linear * min(1.0, efficiency)
    summary[f'{name}{"+aug" if augmented else ""}'] = {
        'per_core': per_core,
        'scaling_efficiency': efficiency,
        'cores_for_target': need / per_core,
        'cores_for_issue_rate': ISSUE_IMAGES_PER_S / per_core,
        f'host{HOST_CORES}_linear_images_per_s': linear,
        f'host{HOST_CORES}_vs_target': linear / need,
        f'host{HOST_CORES}_vs_issue_rate': linear / ISSUE_IMAGES_PER_S,
        f'host{HOST_CORES}_at_measured_efficiency_vs_target': host / need}
  result = {
      'machine': {'cpu': _cpu_model(), 'cores': cores,
                  'loadavg': os.getloadavg()},
      'smoke': args.smoke, 'images_per_domain': n, 'repeats': repeats,
      'sizes': {k: {'file': v[0], 'train': v[1]} for k, v in sizes.items()},
      'file_mb_per_example': file_mb, 'write_s': write_s,
      'target': {'images_per_s': need, 'steps_per_s': need_steps,
                 'issue_images_per_s': ISSUE_IMAGES_PER_S,
                 'arithmetic': arithmetic},
      'rows': rows, 'summary': summary, 'paired_wait': wait,
      'extrapolation': (
          f'cores@ and {HOST_CORES}c/ columns = images/s at 1 thread x '
          f'cores (linear); threads measured only up to {max(threads)} on '
          'this machine (eff = speed-up / threads, low when other work '
          'shares the cores: see loadavg)')}
  with open(os.path.join(args.out, 'input_pipeline.json'), 'w') as f:
    json.dump(result, f, indent=2)
  _print(result, threads)
  return result


def _print(result, threads):
  print(f"machine: {result['machine']['cpu']}, {result['machine']['cores']} "
        f"cores, load {result['machine']['loadavg'][0]:.2f}"
        f"{'  (SMOKE: reduced sizes)' if result['smoke'] else ''}")
  print('target: ' + result['target']['arithmetic'])
  print(f"{'domain':<16}" + ''.join(f'{f"{t} thr img/s":>13}'
                                    for t in threads)
        + f"{'img/s/core':>12}{'eff':>6}{'cores@tgt':>10}"
        f"{'cores@60':>9}{'16c/tgt':>8}{'16c/60':>7}")
  for key, s in result['summary'].items():
    name, aug = (key[:-4], True) if key.endswith('+aug') else (key, False)
    rates = {r['threads']: r['images_per_s'] for r in result['rows']
             if r['domain'] == name and r['augmented'] == aug}
    print(f'{key:<16}' + ''.join(f'{rates[t]:>13.1f}' for t in threads)
          + f"{s['per_core']:>12.1f}{s['scaling_efficiency']:>6.2f}"
          f"{s['cores_for_target']:>10.1f}{s['cores_for_issue_rate']:>9.1f}"
          f"{s['host16_vs_target']:>7.1f}x{s['host16_vs_issue_rate']:>6.1f}x")
  print(result['extrapolation'])
  w = result['paired_wait']
  print(f"paired loop, simulated step {w['step_s'] * 1e3:.0f} ms: input wait "
        + ', '.join(f"{k} {v['mean_wait_s'] * 1e3:.1f} ms/step "
                    f"({v['wait_fraction']:.0%} of the time)"
                    for k, v in w.items() if k != 'step_s'))


if __name__ == '__main__':
  main()
