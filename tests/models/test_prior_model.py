"""The DiffusionPrior transformer: shapes, masking, null conditioning, normalisation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models.prior import DiffusionPrior, timestep_embedding

D, W, L = 16, 24, 6


@pytest.fixture(scope='module')
def prior():
  model = DiffusionPrior(embed_dim=D, text_width=W, num_tokens=L, width=32, depth=2, num_heads=4)
  rng = np.random.default_rng(0)
  inputs = dict(
      x_t=jnp.asarray(rng.normal(size=(3, D)), jnp.float32),
      t=jnp.array([0, 500, 999]),
      text_emb=jnp.asarray(rng.normal(size=(3, D)), jnp.float32),
      token_encodings=jnp.asarray(rng.normal(size=(3, L, W)), jnp.float32),
      token_mask=jnp.array([[True] * 3 + [False] * 3] * 3))
  params = nn.unbox(model.init(jax.random.PRNGKey(0), **inputs))['params']
  return model, params, inputs


def _apply(prior, **changes):
  model, params, inputs = prior
  return model.apply({'params': params}, **dict(inputs, **changes))


def test_output_shape_and_dtype(prior):
  out = _apply(prior)
  assert out.shape == (3, D) and out.dtype == jnp.float32


def test_padding_tokens_are_ignored(prior):
  enc = np.array(prior[2]['token_encodings'])
  enc[:, 3:] = 100.0
  np.testing.assert_allclose(_apply(prior, token_encodings=enc), _apply(prior), atol=1e-5)
  enc = np.array(prior[2]['token_encodings'])
  enc[:, 1] += 1.0
  assert np.abs(_apply(prior, token_encodings=enc) - _apply(prior)).max() > 1e-4


def test_conditioning_paths(prior):
  base = _apply(prior)
  assert np.abs(_apply(prior, x_t=prior[2]['x_t'] + 1) - base).max() > 1e-4
  assert np.abs(_apply(prior, t=jnp.array([1, 2, 3])) - base).max() > 1e-4
  assert np.abs(_apply(prior, text_emb=-prior[2]['text_emb']) - base).max() > 1e-4
  # Dropped text: the learned null embedding and tokens replace the caption entirely.
  drop = jnp.array([True, False, True])
  dropped = _apply(prior, drop_text=drop)
  other = _apply(prior, drop_text=drop, text_emb=jnp.zeros((3, D)),
                 token_encodings=jnp.ones((3, L, W)), token_mask=jnp.ones((3, L), bool))
  np.testing.assert_allclose(dropped[0], other[0], atol=1e-5)
  np.testing.assert_allclose(dropped[1], base[1], atol=1e-5)
  assert np.abs(other[1] - dropped[1]).max() > 1e-4


def test_normalisation_round_trip(prior):
  model, params, _ = prior
  params = dict(params, clip_mean=jnp.full((D,), 0.5), clip_std=jnp.full((D,), 2.0))
  emb = jnp.linspace(-1, 1, 2 * D).reshape(2, D)
  x = model.apply({'params': params}, emb, method=DiffusionPrior.normalize)
  np.testing.assert_allclose(x, (emb - 0.5) / 2.0, rtol=1e-6)
  back = model.apply({'params': params}, x, method=DiffusionPrior.denormalize)
  np.testing.assert_allclose(back, emb, atol=1e-6)
  scaled = DiffusionPrior(embed_dim=D, text_width=W, num_tokens=L, width=32, depth=1,
                          num_heads=4, normalization='scale')
  np.testing.assert_allclose(scaled.apply({'params': params}, emb, method='normalize'),
                             emb * np.sqrt(D), rtol=1e-6)


def test_wrong_token_count_is_rejected(prior):
  with pytest.raises(ValueError, match='num_tokens=6'):
    _apply(prior, token_encodings=jnp.zeros((3, 7, W)), token_mask=jnp.ones((3, 7), bool))


def test_timestep_embedding():
  emb = timestep_embedding(jnp.array([0, 10]), 8)
  assert emb.shape == (2, 8)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-6)
