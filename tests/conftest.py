"""Shared fixtures. The whole session runs with 8 simulated CPU devices for sharding tests."""

import os

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
# The in-process tests run tiny models: compile time dominates, so compile with less
# optimisation. (Subprocess end-to-end runs reset XLA_FLAGS and get the default.)
if '--xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_num_cpu_devices', 8)

import sys  # pylint: disable=g-import-not-at-top,wrong-import-position
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))  # for `configs`

from tests import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.helpers import tiny_clip_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: end-to-end training runs (run once in CI)')


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A tfds data dir shared by the session; datasets are generated on first use."""
  path = str(tmp_path_factory.mktemp('datasets'))
  os.environ['UNCLIP_DATA_DIR'] = path
  return path


@pytest.fixture(scope='session')
def make_tiny_clip_config(data_dir):
  return lambda **kw: tiny_clip_config(data_dir, **kw)


@pytest.fixture(scope='session')
def trained_tiny_clip(data_dir, tmp_path_factory):
  """The README's CLIP job at a shorter length (32px, 350 steps): (workdir, eval metrics)."""
  workdir = tmp_path_factory.mktemp('clip_run')
  metrics = helpers.run_main('configs/clip.py:tiny', workdir, data_dir,
                     '--config.num_train_steps=350', '--config.optim.warmup_steps=50',
                     '--config.data.num_train=8000', '--config.checkpoint.every_steps=0')
  return str(workdir), metrics
