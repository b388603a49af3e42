"""The upsampler stage: conditioning on the (degraded, in training only) low-resolution image,
training on crops (sharded too) and sampling at full size, presets, bad configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import stages
from unclip_jax.data import degradations
from unclip_jax.stages import upsampler as upsampler_stage

from tests import helpers


@pytest.fixture(scope='module')
def stage(data_dir):
  return upsampler_stage.Stage(helpers.tiny_upsampler_config(data_dir))


@pytest.fixture(scope='module')
def params(stage):
  params = stages.init_params(stage, jax.random.PRNGKey(0), batch_size=2)
  return helpers.perturbed(params, 1)   # away from the zero-initialised output


def test_degradation_is_applied_in_training_only(stage, params, monkeypatch):
  calls = []
  real = degradations.degrade
  monkeypatch.setattr(degradations, 'degrade',
                      lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
  (batch,) = helpers.take_batches(stage, stage.config, 1)
  arrays = {k: batch[k] for k in stage.batch_spec(len(batch['image']))}
  loss, metrics = jax.jit(stage.loss)(params, arrays, jax.random.PRNGKey(0), {})  # traced once
  assert np.isfinite(loss) and set(metrics) == {'mse', 'vb'}
  assert calls == ['blur']
  low = upsampler_stage.downsample(jnp.asarray(batch['image']), stage.low_res)
  stage.sample_fn(params, low, jax.random.PRNGKey(0))
  assert calls == ['blur']                      # sampling did not degrade
  # The training conditioning is the blurred low-resolution image, upsampled.
  cond = stage.conditioning(batch['image'], jax.random.PRNGKey(3))
  want = upsampler_stage.upsample(degradations.gaussian_blur(low, 0.6, 3), stage.high_res)
  np.testing.assert_allclose(cond, want, atol=1e-5)
  clean = stage.conditioning(batch['image'])
  assert float(jnp.abs(clean - cond).max()) > 1e-3


def test_trained_on_crops_and_sampled_at_full_size_and_any_size(stage):
  """(The U-Net's sharded training is tested on the decoder, which shares it.)"""
  config = stage.config.copy_and_resolve_references()
  assert config.upsampler.crop_size < config.data.resolution
  batches = helpers.take_batches(stage, config, 2)
  state, losses = helpers.run_train_steps(stage, config, helpers.mesh((1, 1, 1), 1), batches)
  assert all(np.isfinite(losses))
  # The first conv sees 6 channels (noisy image + upsampled conditioning) and nothing in the
  # parameters depends on the crop size.
  assert state.params['conv_in']['kernel'].shape[2] == 6
  low = upsampler_stage.downsample(jnp.asarray(batches[0]['image']), stage.low_res)
  noise = jax.random.normal(jax.random.PRNGKey(5), (8, 16, 16, 3))
  a = stage.upsample_images(state.params, low, jax.random.PRNGKey(0), noise)
  b = stage.upsample_images(state.params, low, jax.random.PRNGKey(1), noise)
  assert a.shape == (8, 16, 16, 3) and float(jnp.abs(a).max()) <= 1.0
  np.testing.assert_array_equal(a, b)            # DDIM (eta 0) with the noise given
  big = stage.upsample_images(state.params, jnp.zeros((1, 12, 20, 3)), jax.random.PRNGKey(0))
  assert big.shape == (1, 24, 40, 3)


def test_evaluation_and_grid(stage, params):
  metrics = stage.evaluate(params)
  assert metrics['psnr_bicubic'] > 10 and np.isfinite(metrics['psnr'])
  assert metrics['bicubic_background_accuracy'] > 0.8   # the checker reads upsampled images
  grid = stage.sample(params, None, 0)['upsampled']
  assert grid.shape == (1, 3 * 16, 4 * 16, 3) and grid.dtype == np.uint8


def test_psnr():
  x = np.zeros((2, 4, 4, 3))
  assert upsampler_stage.psnr(x + 0.2, x) == pytest.approx(10 * np.log10(4 / 0.04))


@pytest.mark.parametrize('override,match', [
    ({'upsampler.crop_size': 32}, 'crop_size'),
    ({'upsampler.crop_size': 7}, 'not divisible'),
    ({'upsampler.scale': 3}, 'not a multiple'),
    ({'upsampler.degradation': 'jpeg'}, 'degradation'),
])
def test_bad_configs_name_the_field(data_dir, override, match):
  with pytest.raises(ValueError, match=match):
    upsampler_stage.Stage(helpers.tiny_upsampler_config(data_dir, **override))


@pytest.mark.parametrize('preset,low,high,size', [
    ('karlo_64_256', 0.6e9, 0.8e9, 256), ('paper_256_1024', 0.2e9, 0.8e9, 1024)])
def test_large_presets_build(preset, low, high, size):
  """The paper's upsamplers: parameter counts and full-size output shapes from shapes alone."""
  from configs import upsampler as configs  # pylint: disable=g-import-not-at-top
  stage = upsampler_stage.Stage(configs.get_config(preset))
  shapes = jax.eval_shape(lambda: stages.init_params(stage, jax.random.PRNGKey(0)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert low < count < high, count
  low_res = jax.ShapeDtypeStruct((1, size // 4, size // 4, 3), jnp.float32)
  out = jax.eval_shape(lambda p, x: stage.sample_fn(p, x, jax.random.PRNGKey(0)), shapes, low_res)
  assert out.shape == (1, size, size, 3)
