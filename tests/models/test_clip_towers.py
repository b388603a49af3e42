"""The CLIP towers: shapes, causal pooling at the end token, logit-scale clamp, attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from unclip_jax.models import attention
from unclip_jax.models.clip import CLIP

EOT = 2


def _model(**kw):
  return CLIP(text=dict(vocab_size=50, context_length=12, width=32, depth=2, num_heads=4,
                        eot_id=EOT),
              vision=dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=4),
              embed_dim=24, **kw)


def _tokens():
  t = np.zeros((3, 12), np.int32)
  t[:, 0] = 1
  t[0, 1:4], t[0, 4] = [5, 6, 7], EOT
  t[1, 1:3], t[1, 3] = [8, 9], EOT
  t[2, 1] = EOT
  return t


@pytest.fixture(scope='module')
def model_and_params():
  model = _model()
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 16, 3), minval=-1, maxval=1)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), images, _tokens()))['params']
  return model, params, images


def test_shapes_and_normalisation(model_and_params):
  model, params, images = model_and_params
  image_emb, text_emb, scale = model.apply({'params': params}, images, _tokens())
  assert image_emb.shape == text_emb.shape == (3, 24)
  np.testing.assert_allclose(np.linalg.norm(image_emb, axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(text_emb, axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)
  _, hidden = model.apply({'params': params}, _tokens(), method=CLIP.encode_text)
  assert hidden.shape == (3, 12, 32)
  assert model.apply({'params': params}, images, method=CLIP.encode_image).shape == (3, 24)


def test_text_pooled_at_end_token_and_causal(model_and_params):
  model, params, _ = model_and_params
  encode = lambda t: model.apply({'params': params}, t, method=CLIP.encode_text)
  base, hidden = encode(_tokens())
  after = _tokens()
  after[0, 6:] = 11          # tokens after the end token change nothing that is pooled
  emb, hidden_after = encode(after)
  np.testing.assert_allclose(emb[0], base[0], atol=1e-6)
  np.testing.assert_allclose(hidden_after[0, :5], hidden[0, :5], atol=1e-6)  # causal
  before = _tokens()
  before[0, 2] = 13          # a token before it does
  assert np.abs(encode(before)[0][0] - base[0]).max() > 1e-3


def test_logit_scale_is_the_exponential_of_its_parameter(model_and_params):
  """exp(t), unclamped in the model (a clamp there would zero t's gradient): training keeps t
  within [0, log 100] after each update (tests/stages/test_clip_stage.py)."""
  model, params, images = model_and_params
  params = dict(params, logit_scale=jnp.log(50.0))
  _, _, scale = model.apply({'params': params}, images, _tokens())
  np.testing.assert_allclose(float(scale), 50.0, rtol=1e-6)


def test_bad_image_size_is_rejected(model_and_params):
  model, params, _ = model_and_params
  with pytest.raises(ValueError, match='not divisible by patch_size'):
    model.apply({'params': params}, jnp.zeros((1, 18, 18, 3)), method=CLIP.encode_image)
  with pytest.raises(ValueError, match='built for image_size=16'):
    model.apply({'params': params}, jnp.zeros((1, 20, 20, 3)), method=CLIP.encode_image)


def test_bfloat16_compute_keeps_float32_params():
  model = _model(dtype=jnp.bfloat16)
  images = jnp.zeros((2, 16, 16, 3))
  variables = nn.unbox(model.init(jax.random.PRNGKey(0), images, _tokens()[:2]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  image_emb, text_emb, _ = model.apply(variables, images, _tokens()[:2])
  assert image_emb.dtype == jnp.float32 and np.all(np.isfinite(image_emb))
  assert np.all(np.isfinite(text_emb))


def test_attention_helper_matches_reference():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 5, 3, 4)).astype(np.float32) for _ in range(3))
  out = attention.dot_product_attention(q, k, v, is_causal=True)
  logits = np.einsum('bthd,bshd->bhts', q, k) / 2.0
  logits = np.where(np.tril(np.ones((5, 5), bool)), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum('bhts,bshd->bthd', weights, v), atol=1e-5)


def test_sincos2d_position_features_are_fixed_and_tell_every_patch_apart():
  from unclip_jax.models.clip import posemb_sincos_2d
  pos = np.asarray(posemb_sincos_2d(4, 32))
  assert pos.shape == (16, 32)
  q = 8                                   # frequencies per quarter
  omega = 1 / 10_000 ** (np.arange(q) / (q - 1))
  row, col = divmod(6, 4)                 # patch 6: row 1, column 2
  np.testing.assert_allclose(pos[6], np.concatenate([
      np.sin(row * omega), np.cos(row * omega), np.sin(col * omega), np.cos(col * omega)]),
      rtol=1e-6, atol=1e-6)
  distances = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + np.eye(16)
  assert distances.min() > 0.5
  # The tower with them has no position parameter, and the images' places change its output.
  model = CLIP(text=None, vision=dict(image_size=16, patch_size=4, width=32, depth=2,
                                      num_heads=4, posemb='sincos2d'), embed_dim=24)
  images = np.zeros((2, 16, 16, 3), np.float32)
  images[0, :4, :4], images[1, -4:, -4:] = 1, 1     # the same patch in two corners
  params = nn.unbox(model.init(jax.random.PRNGKey(0), images, method=CLIP.encode_image))
  assert 'positional_embedding' not in params['params']['vision_tower']
  emb = np.asarray(model.apply(params, images, method=CLIP.encode_image))
  assert np.linalg.norm(emb[0] - emb[1]) > 0.05
  with pytest.raises(ValueError, match="posemb: 'nope' is not 'learn' or 'sincos2d'"):
    CLIP(text=None, vision=dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=4,
                                posemb='nope'), embed_dim=24).init(
        jax.random.PRNGKey(0), images, method=CLIP.encode_image)
