"""The unCLIP decoder's conditioning: CLIP embedding into time embedding and context tokens,
caption tokens in attention, null embedding and caption dropping for guidance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models.decoder import UnclipDecoder

from tests import helpers

D, W, L = 8, 12, 5
UNET = dict(model_channels=32, out_channels=6, num_res_blocks=1, channel_mult=(1, 2),
            attention_resolutions=(2,), num_head_channels=16)


def _inputs(rng):
  return dict(x_t=jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32),
              t=jnp.array([3, 700]),
              clip_emb=jnp.asarray(rng.normal(size=(2, D)), jnp.float32),
              caption=jnp.asarray(rng.normal(size=(2, L, W)), jnp.float32),
              caption_mask=jnp.array([[True] * 3 + [False] * 2] * 2))


_key = helpers.rbg_key


@pytest.fixture(scope='module')
def decoder():
  model = UnclipDecoder(unet=UNET, clip_dim=D, context_width=16)
  inputs = _inputs(np.random.default_rng(0))
  # Random values (no init to compile): zero-initialised output layers would make the output
  # exactly 0 and hide every conditioning path.
  params = helpers.random_params(lambda k: model.init(k, **inputs), scale=0.05, seed=1)
  return model, params, inputs


def _apply(decoder, **changes):
  model, params, inputs = decoder
  inputs = dict(inputs, **changes)
  drop = jnp.zeros((2,), bool)
  inputs.setdefault('drop_clip', drop)
  inputs.setdefault('drop_text', drop)
  return np.asarray(_jitted_apply(model)({'params': params}, **inputs))


_CACHE = {}


def _jitted_apply(model):
  if id(model) not in _CACHE:
    _CACHE[id(model)] = jax.jit(model.apply)
  return _CACHE[id(model)]


def test_shape_and_zero_output_at_init():
  model = UnclipDecoder(unet=UNET, clip_dim=D, context_width=16)
  inputs = _inputs(np.random.default_rng(0))
  out = jax.jit(lambda k: model.apply(model.init(k, **inputs), **inputs))(_key())
  assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)


def test_clip_embedding_and_caption_condition_the_output(decoder):
  base = _apply(decoder)
  assert np.abs(_apply(decoder, clip_emb=decoder[2]['clip_emb'] * -1) - base).max() > 1e-3
  caption = np.array(decoder[2]['caption'])
  caption[:, 0] += 1.0
  assert np.abs(_apply(decoder, caption=caption) - base).max() > 1e-4
  caption = np.array(decoder[2]['caption'])
  caption[:, 3:] = 50.0                       # padding positions are not attended to
  np.testing.assert_allclose(_apply(decoder, caption=caption), base, atol=1e-4)


def test_dropped_conditions_use_the_null_embedding_and_no_caption(decoder):
  drop = jnp.array([True, False])
  dropped = _apply(decoder, drop_clip=drop, drop_text=drop)
  other = _apply(decoder, drop_clip=drop, drop_text=drop, clip_emb=jnp.zeros((2, D)),
                 caption=jnp.ones((2, L, W)))
  np.testing.assert_allclose(dropped[0], other[0], atol=1e-5)   # row 0: both dropped
  assert np.abs(dropped[1] - other[1]).max() > 1e-3             # row 1: conditioned
  np.testing.assert_allclose(dropped[1], _apply(decoder)[1], atol=1e-5)


def test_own_caption_transformer():
  model = UnclipDecoder(unet=UNET, clip_dim=D, context_width=16, caption_encoder='transformer',
                        caption_transformer=dict(vocab_size=20, context_length=L, width=16,
                                                 depth=1, num_heads=2))
  inputs = dict(_inputs(np.random.default_rng(0)), caption=jnp.array([[1, 5, 2, 0, 0]] * 2))
  variables = jax.jit(lambda k: model.init(k, **inputs))(_key())
  assert 'caption_transformer' in variables['params']
  assert jax.jit(model.apply)(variables, **inputs).shape == (2, 8, 8, 6)


def test_the_clip_map_is_a_spatial_condition():
  """clip_map_size: the embedding's s x s map reaches the U-Net's middle block, and its cells
  are places, not one pooled vector: the same change made to the top-left cell or to the
  bottom-right one changes the output differently (a global condition could not tell them
  apart)."""
  model = UnclipDecoder(unet=UNET, clip_dim=D, context_width=16, clip_map_size=2,
                        clip_map_channels=8)
  inputs = _inputs(np.random.default_rng(0))
  params = helpers.random_params(lambda k: model.init(k, **inputs), scale=0.05, seed=1)
  assert params['clip_to_map']['kernel'].shape == (D, 2 * 2 * 8)
  assert params['unet']['cond_map_in']['kernel'].shape == (1, 1, 8, 64)   # mid block: 64 wide
  base = _apply((model, params, inputs))

  def with_cell_shifted(cell):
    # The map's outputs are ordered (row, column, channel): cell k is columns 8k..8k+7.
    kernel = np.asarray(params['clip_to_map']['kernel']).copy()
    kernel[:, 8 * cell:8 * cell + 8] += 0.5
    changed = {**params, 'clip_to_map': {**params['clip_to_map'], 'kernel': jnp.asarray(kernel)}}
    return _apply((model, changed, inputs))

  top_left, bottom_right = with_cell_shifted(0), with_cell_shifted(3)
  assert np.abs(top_left - base).mean() > 1e-2
  assert np.abs(top_left - bottom_right).mean() > 0.5 * np.abs(top_left - base).mean()
  # Without the map the decoder has neither parameter (karlo's and the paper's).
  plain = UnclipDecoder(unet=UNET, clip_dim=D, context_width=16)
  shapes = jax.eval_shape(lambda k: plain.init(k, **inputs), _key())['params']
  assert 'clip_to_map' not in shapes and 'cond_map_in' not in shapes['unet']
