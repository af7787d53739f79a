"""Tests for jaxda.writers: JSON lines, TensorBoard events, progress bar."""

import glob
import json
import os
import struct

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jaxda import writers


def _read_events(logdir):
  """Parses every TFRecord-framed Event proto in the logdir's event files.

  Record framing: uint64 length, uint32 length-crc, payload, uint32 crc.
  Written here independently of tensorboardX's writer.
  """
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      payload = data[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      event = event_pb2.Event()
      event.ParseFromString(payload)
      events.append(event)
  return events


def _scalar_points(events):
  points = {}
  for event in events:
    for value in event.summary.value:
      if value.HasField('simple_value'):
        points.setdefault(value.tag, []).append(
            (event.step, value.simple_value))
  return points


def test_jsonl_round_trip_with_numpy_and_jax_scalars(tmp_path):
  rng = np.random.default_rng(0)
  expected = {'loss': [], 'lr': []}
  with writers.MetricWriter(tmp_path) as writer:
    for step in range(0, 50, 10):
      loss, lr = rng.random(), rng.random() * 1e-3
      # Mixed scalar types: NumPy float32, 0-d jax.Array, Python float.
      writer.write_scalars(
          np.int64(step), {'loss': np.float32(loss), 'lr': jnp.asarray(lr)})
      expected['loss'].append((step, float(np.float32(loss))))
      expected['lr'].append((step, float(jnp.asarray(lr))))
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) == 5
  first = json.loads(lines[0])
  assert first == {'step': 0, 'loss': expected['loss'][0][1],
                   'lr': expected['lr'][0][1]}
  assert isinstance(first['step'], int)
  history = writers.read_history(tmp_path)
  assert set(history) == {'loss', 'lr'}
  for name in expected:
    steps = [s for s, _ in history[name]]
    assert steps == [0, 10, 20, 30, 40]
    np.testing.assert_allclose(
        [v for _, v in history[name]], [v for _, v in expected[name]],
        rtol=1e-6)


def test_resume_appends_and_last_value_per_step_wins(tmp_path):
  with writers.MetricWriter(tmp_path) as writer:
    for step in range(1, 6):
      writer.write_scalars(step, {'loss': 10.0 + step})
    writer.write_scalars(5, {'acc': 0.5})
  # Second run restarts at step 3 and re-logs steps 3 and 4, then goes on.
  with writers.MetricWriter(tmp_path) as writer:
    writer.write_scalars(3, {'loss': 23.0})
    writer.write_scalars(4, {'loss': 24.0})
    writer.write_scalars(6, {'loss': 26.0})
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) == 6 + 3  # Appended, not truncated.
  history = writers.read_history(tmp_path)
  assert history['loss'] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0),
                             (5, 15.0), (6, 26.0)]
  assert history['acc'] == [(5, 0.5)]


def test_purge_step_drops_stale_tail(tmp_path):
  with writers.MetricWriter(tmp_path) as writer:
    for step in range(1, 6):
      writer.write_scalars(step, {'loss': float(step)})
    writer.write_scalars(4, {'eval': 0.4})
  with writers.MetricWriter(tmp_path, purge_step=3) as writer:
    writer.write_scalars(3, {'loss': 30.0})
  history = writers.read_history(tmp_path)
  # Steps 4 and 5 of the first run are gone; 'eval' had only a stale point.
  assert history == {'loss': [(1, 1.0), (2, 2.0), (3, 30.0)]}
  # TensorBoard gets the matching SessionLog.START marker at step 3.
  starts = [e.step for e in _read_events(str(tmp_path))
            if e.HasField('session_log') and e.session_log.status == 1]
  assert starts == [3]


def test_read_history_skips_truncated_line_and_keeps_nan(tmp_path):
  with writers.MetricWriter(tmp_path) as writer:
    writer.write_scalars(1, {'loss': 1.5})
    writer.write_scalars(2, {'loss': float('nan')})
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 3, "loss": 0.')  # Killed mid-write.
  history = writers.read_history(tmp_path)
  assert [s for s, _ in history['loss']] == [1, 2]
  assert history['loss'][0][1] == 1.5
  assert np.isnan(history['loss'][1][1])
  assert writers.read_history(tmp_path / 'missing') == {}


def test_tensorboard_events_hold_scalars_and_text(tmp_path):
  with writers.MetricWriter(tmp_path) as writer:
    writer.write_scalars(
        7, {'train/loss': 0.25, 'train/acc': np.float64(0.75)})
    writer.write_scalars(9, {'train/loss': 0.125})
    writer.write_text(9, 'notes', 'hello **world**')
  files = glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  assert len(files) == 1 and os.path.getsize(files[0]) > 0
  events = _read_events(str(tmp_path))
  points = _scalar_points(events)
  assert points['train/loss'] == [(7, 0.25), (9, 0.125)]
  assert points['train/acc'] == [(7, 0.75)]
  texts = [(e.step, v.tensor.string_val[0].decode())
           for e in events for v in e.summary.value
           if v.tag.startswith('notes')]
  assert texts == [(9, 'hello **world**')]


def test_write_hparams_flattens_nested_dicts_and_configdicts(tmp_path):
  config = ml_collections.ConfigDict(
      {'optim': {'lr': 2.5e-4, 'momentum': 0.9}, 'seed': 3})
  hparams = {'config': config, 'name': 'tpld', 'shape': (2, 3),
             'dtype': np.float32}
  with writers.MetricWriter(tmp_path) as writer:
    writer.write_hparams(hparams)
  stored = json.loads((tmp_path / 'hparams.json').read_text())
  assert stored == {
      'config.optim.lr': 2.5e-4,
      'config.optim.momentum': 0.9,
      'config.seed': 3,
      'name': 'tpld',
      'shape': [2, 3],
      'dtype': str(np.float32),
  }
  texts = [v.tensor.string_val[0].decode()
           for e in _read_events(str(tmp_path)) for v in e.summary.value
           if v.tag.startswith('hparams')]
  assert len(texts) == 1 and '| config.optim.lr | 0.00025 |' in texts[0]


def test_flatten_dict():
  assert writers.flatten_dict({'a': {'b': {'c': 1}, 'd': 2}, 'e': {}}) == {
      'a.b.c': 1, 'a.d': 2, 'e': {}}
  assert writers.flatten_dict({'a': {'b': 1}}, sep='/') == {'a/b': 1}


def test_step_is_a_reserved_metric_name(tmp_path):
  with writers.MetricWriter(tmp_path) as writer:
    with pytest.raises(ValueError, match='reserved'):
      writer.write_scalars(1, {'step': 1.0})


def test_disabled_writer_writes_nothing(tmp_path):
  logdir = tmp_path / 'logs'
  with writers.MetricWriter(logdir, enabled=False, purge_step=2) as writer:
    writer.write_scalars(1, {'loss': 1.0})
    writer.write_text(1, 'tag', 'text')
    writer.write_hparams({'a': {'b': 1}})
    writer.flush()
  writer.close()  # Idempotent.
  assert not logdir.exists()
  assert writers.read_history(logdir) == {}


def test_flush_makes_lines_visible_before_close(tmp_path):
  writer = writers.MetricWriter(tmp_path)
  writer.write_scalars(1, {'loss': 2.0})
  writer.flush()
  assert writers.read_history(tmp_path) == {'loss': [(1, 2.0)]}
  writer.close()
  writer.close()


def test_progress_bar_writes_rate_and_postfix_to_stderr(capsys):
  with writers.ProgressBar(total=10, initial=4, desc='train') as bar:
    bar.update(3, loss=jnp.asarray(0.123456), stage='warmup')
  captured = capsys.readouterr()
  assert captured.out == ''
  assert 'train' in captured.err
  assert '7/10' in captured.err
  assert 'loss=0.1235' in captured.err
  assert 'stage=warmup' in captured.err
  assert 'step/s' in captured.err


def test_disabled_progress_bar_prints_nothing(capsys):
  bar = writers.ProgressBar(total=10, desc='train', enabled=False)
  bar.update(5, loss=1.0)
  bar.close()
  captured = capsys.readouterr()
  assert captured.out == '' and captured.err == ''
