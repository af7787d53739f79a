"""GAM / DAM on digits (issue 22 item 2): LeNet, fc3/fc4 taps, presets."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import gam as gam_configs
from jaxda import methods
from jaxda import models
from jaxda.methods.gam import driver as gam_driver
from jaxda.methods.gam import taps as activation_taps
from jaxda.models import forward
from jaxda.train.exceptions import ConfigError


def test_lenet_geometry_and_fc3_fc4_taps():
  net = models.create_classifier('lenet', 10, bottleneck_dim=500)
  x = jnp.zeros((2, 28, 28, 3))
  shapes = jax.eval_shape(net.init, jax.random.key(0), x)['params']
  got = {k: {n: v.shape for n, v in d.items()}
         for k, d in shapes['feature_extractor'].items()}
  assert got == {'conv1': {'kernel': (5, 5, 3, 20), 'bias': (20,)},
                 'conv2': {'kernel': (5, 5, 20, 50), 'bias': (50,)}}
  assert shapes['bottleneck']['kernel'].shape == (4 * 4 * 50, 500)  # fc3
  assert shapes['classifier']['kernel'].shape == (500, 10)  # fc4
  taps = activation_taps.ActivationTaps(net, ('bottleneck', 'classifier'),
                                        gaussian_matching=False)
  variables = taps.init(jax.random.key(0), x)
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 3))
  out, t, _ = taps.apply_with_taps(variables, x, match='none')
  # fc3 is tapped after its ReLU (what DAM's fc3 discriminator sees), fc4
  # is the logits.
  assert t['raw']['bottleneck'].shape == (2, 500)
  assert float(jnp.min(t['raw']['bottleneck'])) >= 0.0
  np.testing.assert_array_equal(t['raw']['classifier'], out['logits'])
  # The task's models dataclass: the classifier is the network GAM wraps.
  assert activation_taps.network_field(
      forward.ClassificationModels(net)) == 'classifier'


def test_digits_presets():
  paper = gam_configs.get_config('digits')
  assert paper.method == 'gam_cls'
  assert methods.get_method('gam_cls').task == 'classification'
  g = paper.gam
  assert tuple(g.layers) == ('bottleneck', 'classifier')
  assert tuple(g.layer_weights) == (0.1, 1.0)
  assert tuple(g.disc_features) == (500, 500) and g.disc_negative_slope == 0
  assert (g.gaussian_matching, g.drift_weight, g.drift_reduction) == (
      True, 0.1, 'sum')
  assert (paper.optim.optimizer, paper.optim.learning_rate,
          paper.optim.adam_b1, paper.batch_size) == ('adam', 2e-4, 0.5, 128)
  assert (g.base_optim.optimizer, g.base_learning_rate, g.base_steps) == (
      'adam', 1e-3, 10_000)
  assert paper.model.name == 'lenet' and paper.model.bottleneck_dim == 500
  code = gam_configs.get_config('digits,code').gam
  assert (code.gaussian_matching, code.drift_weight, code.drift_reduction) == (
      False, 1.0, 'mean_per_variable')
  bench = gam_configs.get_config('digits,code,bench')
  assert (bench.gam.base_steps, bench.num_steps) == (1500, 1500)
  assert bench.gam.drift_weight == 1.0 and bench.batch_size == 128
  with pytest.raises(ValueError, match='unknown gam digits variant'):
    gam_configs.get_config('digits,nope')


def test_paper_without_source_model_refuses():
  config = gam_configs.get_config('paper')
  with pytest.raises(ConfigError) as e:
    gam_driver.check_config(config)
  assert '\n' not in str(e.value)
  assert 'init_checkpoint' in str(e.value)
  assert 'experiments.source_only' in str(e.value)
  assert 'source_only.py:paper' in str(e.value)
  config.model.init_checkpoint = '/somewhere'
  gam_driver.check_config(config)


# slow: 22 s, and one CI-like run (05:25, a second pytest sharing the 2
# cores) saw the xdist worker abort inside XLA in its statistics pass;
# run with `-m slow` until that is understood.
def test_digits_tiny_end_to_end(tmp_path):
  config = gam_configs.get_config('digits,tiny')
  summary = methods.train_and_evaluate(config, str(tmp_path))
  on_disk = json.loads((tmp_path / 'summary.json').read_text())
  for s in (summary, on_disk):
    assert 0.0 <= s['target']['accuracy'] <= 1.0
    assert 0.0 <= s['source_model']['target']['accuracy'] <= 1.0
  assert 'target_accuracy_at_start' in on_disk
  assert set(on_disk['activation_report']['after']) == {'bottleneck',
                                                         'classifier'}
