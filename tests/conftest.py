"""Shared fixtures. The whole session runs with 8 simulated CPU devices for sharding tests."""

import os

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_num_cpu_devices', 8)

import sys  # pylint: disable=g-import-not-at-top,wrong-import-position
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))  # for `configs`

from unclip_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: end-to-end training runs (run once in CI)')


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A tfds data dir shared by the session; datasets are generated on first use."""
  path = str(tmp_path_factory.mktemp('datasets'))
  os.environ['UNCLIP_DATA_DIR'] = path
  return path


def tiny_clip_config(data_dir: str, **overrides):
  """configs/clip.py:tiny shrunk further for unit tests (16px, 1-2 layers, 64 examples)."""
  from configs import clip  # pylint: disable=g-import-not-at-top
  c = clip.get_config('tiny')
  c.data.data_dir = data_dir
  c.data.resolution = 16
  c.data.num_train = 256
  c.data.num_test = 64
  c.model.embed_dim = 32
  c.model.text.update(width=32, depth=1, num_heads=2)
  c.model.vision.update(width=32, depth=2, num_heads=2)
  c.batch_size = 16
  c.num_train_steps = 8
  c.optim.warmup_steps = 2
  c.log_every_steps = 4
  c.checkpoint.every_steps = 4
  c.checkpoint.async_save = False
  c.eval.num_examples = 64
  c.eval.batch_size = 64
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope='session')
def make_tiny_clip_config(data_dir):
  return lambda **kw: tiny_clip_config(data_dir, **kw)
