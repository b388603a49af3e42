"""benchmarks/train_step.py runs and reports sane quantities (no timing assertions)."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_benchmark():
  spec = importlib.util.spec_from_file_location(
      'train_step_benchmark', os.path.join(REPO, 'benchmarks', 'train_step.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_train_step_benchmark_reports_flops_and_matches_peer_size(make_tiny_clip_config):
  bench = _load_benchmark()
  config = make_tiny_clip_config()
  ours = bench.measure_jax(config, steps=2, warmup=1)
  assert ours['num_devices'] == 8
  assert ours['flops_per_step'] > 0 and ours['tflops_per_s'] > 0
  assert ours['samples_per_s'] == pytest.approx(config.batch_size / ours['step_time_s'])
  pytest.importorskip('transformers')
  peer = bench.measure_transformers_clip(config, steps=1, warmup=1, compile_model=False)
  # The peer is the same architecture at the same sizes: identical parameter counts.
  assert peer['params'] == ours['params']


def test_compile_preset_reports_a_sharded_step_without_allocating(data_dir):
  """benchmarks/compile_preset.py on the tiny upsampler over a 2x4 (data, fsdp) mesh."""
  spec = importlib.util.spec_from_file_location(
      'compile_preset', os.path.join(REPO, 'benchmarks', 'compile_preset.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from tests import helpers  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_upsampler_config(data_dir)
  config.model.unet.update(channel_mult=(1,), model_channels=16, norm_groups=8)  # compiles fast
  config.mesh.shape = (2, 4, 1)
  result = module.compile_preset(config)
  assert result['mesh_shape'] == [2, 4, 1] and result['num_devices'] == 8
  assert result['params'] > 10_000 and result['flops_per_step'] > 0
  assert result['compile_s'] > 0
