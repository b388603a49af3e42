"""The ADM U-Net: shapes, zero initialisation, conditioning paths, sizes, sharding metadata, dtypes,
remat, and numerical parity with diffusers' UNet2DModel at equivalent configs."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.convert.diffusers_unet import convert_unet2d, unet_kwargs
from unclip_jax.models import unet as unet_lib
from unclip_jax.models.unet import AttentionBlock, ResBlock, UNet

from tests import helpers

CONTEXT_DIM = 8
# Decoder-like: three levels (sizes must be multiples of 4), attention at the factor-2 level and
# in the middle, encoder states.
DECODER = dict(model_channels=32, out_channels=6, num_res_blocks=1, channel_mult=(1, 1, 2),
               attention_resolutions=(2,), num_head_channels=32, context_dim=CONTEXT_DIM)
# One level, attention everywhere: small enough to differentiate quickly.
TINY = dict(model_channels=32, out_channels=3, num_res_blocks=1, channel_mult=(1,),
            attention_resolutions=(1,), num_head_channels=32, context_dim=CONTEXT_DIM)
EMB = 4 * 32


# Tiny models: XLA's backend optimisations would cost more compile time than they save.
_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


_key = helpers.rbg_key


def _normal(shape, seed, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape, np.float32))


def _perturb(params, scale=0.05, seed=0):
  """params + scale·N(0, 1): moves every zero-initialised layer away from zero."""
  return helpers.perturbed(params, seed, scale)


def _random_params(model, *args, **kwargs):
  """Random parameters of the right shapes without compiling an init (GroupNorm scales ≈ 1)."""
  return helpers.random_params(model.init, *args, **kwargs)


@pytest.fixture(scope='module')
def decoder():
  """(model, boxed initial variables, perturbed params)."""
  model = UNet(**DECODER)
  init = _jit(functools.partial(model.init, encoder_states=_normal((1, 5, CONTEXT_DIM), 0)))
  boxed = init(_key(), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)))
  return model, boxed, _perturb(nn.unbox(boxed)['params'])


@functools.partial(_jit, static_argnums=0)
def _apply(model, params, x, t, emb_extra=None, encoder_states=None, encoder_mask=None):
  return model.apply({'params': params}, x, t, emb_extra=emb_extra,
                     encoder_states=encoder_states, encoder_mask=encoder_mask)


def _variants():
  """Six pairs of decoder inputs, each pair changing one thing from the first (batch 12).

  Pairs: base; other (real-valued) timesteps; an emb_extra; a visible encoder token changed;
  masked-out encoder tokens changed (first sample only); the whole caption masked out.
  Samples do not interact in the U-Net, so one call (one compilation) serves all the pairs.
  """
  x = jnp.tile(_normal((2, 16, 16, 3), 1), (6, 1, 1, 1))
  base_t = jnp.array([3.0, 700.0])
  t = jnp.concatenate([base_t, base_t + jnp.array([200.5, -250.0])] + [base_t] * 4)
  extra = jnp.zeros((12, EMB)).at[4:6].set(_normal((2, EMB), 2))
  enc = jnp.tile(_normal((2, 5, CONTEXT_DIM), 3), (6, 1, 1))
  enc = enc.at[6:8, 1].set(_normal((2, CONTEXT_DIM), 4, scale=3.0))
  enc = enc.at[8, 3:].set(_normal((2, CONTEXT_DIM), 5, scale=10.0))
  mask = jnp.tile(jnp.array([[True, True, True, False, False], [True] * 5]), (6, 1))
  mask = mask.at[10:].set(False)
  return x, t, extra, enc, mask


def _differs(a, b, rel=1e-3):
  """Whether a and b differ by more than `rel` of a's typical size (float32 noise is ~1e-6)."""
  return float(jnp.mean(jnp.abs(a - b))) > rel * float(jnp.mean(jnp.abs(a)))


def test_output_is_float32_and_exactly_zero_at_init(decoder):
  model, boxed, _ = decoder
  out = _apply(model, nn.unbox(boxed)['params'], *_variants())
  assert out.shape == (12, 16, 16, 6) and out.dtype == jnp.float32
  assert not np.any(np.asarray(out))
  for out_channels in (3, 6):
    model = UNet(**{**DECODER, 'context_dim': None, 'attention_resolutions': (),
                    'out_channels': out_channels})
    shape = jax.eval_shape(lambda: model.init_with_output(_key(), jnp.zeros((2, 16, 16, 6)),
                                                          jnp.zeros((2,)))[0])
    assert shape.shape == (2, 16, 16, out_channels) and shape.dtype == jnp.float32


def test_blocks_are_the_identity_at_init(decoder):
  params = nn.unbox(decoder[1])['params']
  x, emb = _normal((2, 4, 4, 64), 6), _normal((2, EMB), 7)
  apply = lambda block, name, *args: _jit(block.apply)({'params': params[name]}, *args)
  np.testing.assert_array_equal(apply(ResBlock(64), 'mid_res_0', x, emb), x)
  enc = _normal((2, 5, CONTEXT_DIM), 8)
  np.testing.assert_array_equal(apply(AttentionBlock(32), 'mid_attn', x, enc), x)
  # With new channels (128 → 64 here) a block starts as its 1×1 skip convolution.
  x = _normal((2, 4, 4, 128), 9)
  skip = params['up_2_res_0']['skip']
  expected = jnp.einsum('bhwc,cd->bhwd', x, skip['kernel'][0, 0]) + skip['bias']
  np.testing.assert_allclose(apply(ResBlock(64), 'up_2_res_0', x, emb), expected, atol=1e-5)


def test_fully_convolutional(decoder):
  model, _, params = decoder
  for size in (32, 24):
    x = _normal((1, size, size, 3), size)
    out = _apply(model, params, x, jnp.array([5]), encoder_states=_normal((1, 5, 8), 0))
    assert out.shape == (1, size, size, 6) and np.all(np.isfinite(out))
  with pytest.raises(ValueError, match=r'18x18 is not divisible by 4'):
    model.apply({'params': params}, jnp.zeros((1, 18, 18, 3)), jnp.array([5]),
                encoder_states=_normal((1, 5, 8), 0))


def test_patched_model_folds_pixels_into_channels():
  """patch_size 2: a 2x2 patch's pixels are channels of one position of the finest level, the
  output is unfolded to full size, and attention factors count from the pixel grid."""
  x = _normal((1, 8, 8, 3), 7)
  folded = unet_lib.space_to_depth(x, 2)
  assert folded.shape == (1, 4, 4, 12)
  np.testing.assert_array_equal(folded[0, 1, 2], x[0, 2:4, 4:6].reshape(-1))
  np.testing.assert_array_equal(unet_lib.depth_to_space(folded, 2), x)
  model = UNet(**dict(TINY, attention_resolutions=(2,), patch_size=2))
  params = _random_params(model, x, jnp.zeros((1,)), encoder_states=_normal((1, 5, 8), 0))
  assert params['conv_in']['kernel'].shape == (3, 3, 12, 32)
  assert params['conv_out']['kernel'].shape == (3, 3, 32, 12)
  assert 'down_0_attn_0' in params           # level 0 works at factor 2
  out = _apply(model, params, x, jnp.array([5]), encoder_states=_normal((1, 5, 8), 0))
  assert out.shape == (1, 8, 8, 3) and np.all(np.isfinite(out))
  with pytest.raises(ValueError, match=r'7x7 is not divisible by 2'):
    model.apply({'params': params}, jnp.zeros((1, 7, 7, 3)), jnp.array([5]),
                encoder_states=_normal((1, 5, 8), 0))
  with pytest.raises(ValueError, match=r'\[1\] is not one of \[2\]'):
    UNet(**dict(TINY, patch_size=2)).apply({'params': params}, x, jnp.array([5]),
                                           encoder_states=_normal((1, 5, 8), 0))


def test_coordinate_channels_let_a_constant_input_give_a_placed_output():
  coords = np.asarray(unet_lib.coordinate_channels(2, 4, 8))
  assert coords.shape == (2, 4, 8, 2)
  np.testing.assert_allclose(coords[0, 0, 0], [-7 / 8, -3 / 4])    # x, y of the top-left centre
  np.testing.assert_allclose(coords[1, 3, 7], [7 / 8, 3 / 4])
  np.testing.assert_allclose(coords[0, 2, :, 0], (np.arange(8) + 0.5) / 4 - 1)
  # A constant image: a purely convolutional U-Net's output is the same at every pixel away
  # from the borders (here 24 pixels, beyond its receptive field); with coordinates it is not,
  # and conv_in reads two more channels.
  x = jnp.full((1, 64, 64, 3), 0.3)
  kw = dict(TINY, attention_resolutions=(), context_dim=None)
  for with_coords in (False, True):
    model = UNet(**dict(kw, coord_channels=with_coords))
    params = _perturb(_random_params(model, x, jnp.zeros((1,))), scale=0.2)
    assert params['conv_in']['kernel'].shape == (3, 3, 5 if with_coords else 3, 32)
    out = np.asarray(_apply(model, params, x, jnp.array([5])))[0, 24:40, 24:40]
    spread = np.abs(out - out[0, 0]).max()
    assert (spread > 1e-2) if with_coords else (spread < 1e-5), (with_coords, spread)


def test_conditioning_paths(decoder):
  model, _, params = decoder
  out = _apply(model, params, *_variants())
  base, timestep, extra, visible, masked, no_caption = (out[i:i + 2] for i in range(0, 12, 2))
  assert all(_differs(base[i], timestep[i]) for i in range(2))
  assert all(_differs(base[i], extra[i]) for i in range(2))
  assert all(_differs(base[i], visible[i]) for i in range(2))
  np.testing.assert_allclose(masked, base, atol=1e-6)   # masked-out tokens are ignored
  assert np.all(np.isfinite(no_caption)) and all(_differs(base[i], no_caption[i]) for i in range(2))


def test_encoder_states_need_attention_blocks():
  x, t, enc = jnp.zeros((1, 16, 16, 6)), jnp.zeros((1,)), jnp.zeros((1, 5, CONTEXT_DIM))
  convolutional = dict(DECODER, attention_resolutions=())
  with pytest.raises(ValueError, match='attention_resolutions is empty'):
    jax.eval_shape(functools.partial(UNet(**convolutional).init, encoder_states=enc), _key(), x, t)
  with pytest.raises(ValueError, match='context_dim=None'):
    jax.eval_shape(functools.partial(UNet(**{**convolutional, 'context_dim': None}).init,
                                     encoder_states=enc), _key(), x, t)


def _assert_fully_annotated(boxed):
  """Every parameter has a logical PartitionSpec of its own rank."""
  is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)
  flat_specs = jax.tree_util.tree_leaves_with_path(nn.get_partition_spec(boxed), is_leaf=is_spec)
  flat_params = jax.tree_util.tree_leaves_with_path(nn.unbox(boxed))
  assert [p for p, _ in flat_specs] == [p for p, _ in flat_params]
  for (path, spec), (_, param) in zip(flat_specs, flat_params):
    assert is_spec(spec) and len(spec) == param.ndim, (jax.tree_util.keystr(path), spec,
                                                       param.shape)


def test_every_parameter_has_logical_axes(decoder):
  boxed = decoder[1]
  _assert_fully_annotated(boxed)
  specs = nn.get_partition_spec(boxed)['params']
  assert tuple(specs['conv_in']['kernel']) == (None, None, 'channels', 'conv_out')
  assert tuple(specs['conv_out']['kernel']) == (None, None, 'conv_in', 'channels')
  assert tuple(specs['mid_res_0']['conv_in']['kernel']) == (None, None, 'conv_in', 'conv_out')
  assert tuple(specs['down_1_attn_0']['qkv']['kernel']) == ('embed', None, 'heads', 'kv')
  assert tuple(specs['down_1_attn_0']['encoder_kv']['kernel']) == (
      'embed_in', None, 'heads', 'kv')
  assert tuple(specs['mid_res_0']['emb_proj']['kernel']) == ('embed', None, 'conv_out')
  # The convolutional variant (no scale-shift, conv resampling) is fully annotated as well.
  model = UNet(**{**DECODER, 'context_dim': None, 'attention_resolutions': (),
                  'use_scale_shift_norm': False, 'resblock_updown': False})
  _assert_fully_annotated(jax.eval_shape(model.init, _key(), jnp.zeros((1, 16, 16, 6)),
                                         jnp.zeros((1,))))


def test_sharded_init_and_apply_match_unsharded():
  """Every logical spec is usable: params born sharded over (data, fsdp) give the same output."""
  if jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  rules = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('conv_out', 'fsdp'),
           ('heads', 'tensor'), ('mlp', 'tensor'))
  mesh = jax.make_mesh((2, 4, 1), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  model = UNet(**TINY, remat=True)
  x, t, enc = _normal((8, 8, 8, 3), 1), jnp.arange(8) * 100, _normal((8, 5, CONTEXT_DIM), 3)
  init = functools.partial(model.init, encoder_states=enc)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    specs = nn.get_partition_spec(jax.eval_shape(init, _key(), x, t))
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    params = _jit(lambda k: nn.unbox(init(k, x, t)), out_shardings=shardings)(_key())
    assert params['params']['down_0_res_0']['conv_in']['kernel'].sharding.spec[-1] == 'fsdp'
    params = _perturb(jax.device_get(params))
    sharded = _jit(lambda p: model.apply(p, x, t, encoder_states=enc))(
        jax.device_put(params, shardings))
  np.testing.assert_allclose(sharded, _apply(model, params['params'], x, t, encoder_states=enc),
                             atol=1e-5)


def test_bfloat16_compute_with_float32_params():
  x, t, enc = _normal((2, 8, 8, 3), 1), jnp.array([3, 700]), _normal((2, 5, CONTEXT_DIM), 3)
  params = _random_params(UNet(**TINY), x, t, encoder_states=enc)
  out = _apply(UNet(**TINY, dtype=jnp.bfloat16), params, x, t, encoder_states=enc)
  ref = _apply(UNet(**TINY), params, x, t, encoder_states=enc)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 5e-2
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('policy', ['full', 'save_projections'])
def test_remat_and_dropout_match_the_plain_model(policy):
  x, t, enc = _normal((2, 8, 8, 3), 1), jnp.array([3, 700]), _normal((2, 5, CONTEXT_DIM), 3)
  params = _random_params(UNet(**TINY), x, t, encoder_states=enc)

  def loss(remat, p):
    kw = dict(encoder_states=enc, rngs={'dropout': jax.random.PRNGKey(7)})
    model = UNet(**TINY, dropout=0.3, remat=remat, remat_policy=policy)
    out = model.apply({'params': p}, x, t, train=True, **kw)
    evaluation = model.apply({'params': p}, x, t, **kw)
    return jnp.mean(out ** 2), (out, evaluation)

  grad = lambda remat: _jit(jax.value_and_grad(functools.partial(loss, remat), has_aux=True))
  (_, (plain, evaluation)), g_plain = grad(False)(params)
  (_, (remat, _)), g_remat = grad(True)(params)
  np.testing.assert_allclose(remat, plain, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  assert _differs(plain, evaluation)   # dropout is active in training only


def _residual_bytes(model, params, x, t, enc):
  """Bytes the jitted forward pass keeps for the backward one (parameters aside)."""
  return helpers.backward_residual_bytes(
      lambda p: jnp.sum(model.apply({'params': p}, x, t, encoder_states=enc) ** 2), params)


def test_remat_policies_keep_less_for_the_backward_pass():
  """'full' keeps least, 'save_projections' (conv and dense outputs) more, no remat the most."""
  x, t, enc = _normal((2, 16, 16, 3), 1), jnp.array([3, 700]), _normal((2, 5, CONTEXT_DIM), 3)
  params = _random_params(UNet(**TINY), x, t, encoder_states=enc)
  kept = {name: _residual_bytes(UNet(**TINY, **kw), params, x, t, enc) for name, kw in [
      ('none', {}), ('full', dict(remat=True)),
      ('save_projections', dict(remat=True, remat_policy='save_projections'))]}
  assert kept['full'] < kept['save_projections'] < 0.8 * kept['none'], kept   # measured 0.67
  with pytest.raises(ValueError, match="remat_policy must be one of .*'nothing'"):
    jax.eval_shape(functools.partial(UNet(**TINY, remat_policy='nothing').init,
                                     encoder_states=enc), _key(), x, t)


@pytest.mark.parametrize('silu,modulated', [(False, False), (True, False), (True, True)])
def test_fused_group_norm_matches_autodiff_of_the_formula(silu, modulated):
  """unet.group_norm's hand-written backward pass (which keeps only x and the statistics) gives
  the gradients autodiff gives for the plain formula, for the input, the affine parameters and a
  per-sample modulation (scale-shift conditioning)."""
  from unclip_jax.models.unet import group_norm   # pylint: disable=g-import-not-at-top
  groups, c = 4, 16
  x = _normal((3, 5, 6, c), 1) * 2 + 0.5
  a = 1 + 0.3 * _normal((3 if modulated else 1, 1, 1, c), 2)
  b = 0.2 * _normal((3 if modulated else 1, 1, 1, c), 3)
  w = _normal((3, 5, 6, c), 4)

  def reference(x, a, b):
    xg = x.reshape(3, 5, 6, groups, c // groups)
    mean = xg.mean((1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean((1, 2, 4), keepdims=True)
    z = ((xg - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape) * a + b
    return jax.nn.silu(z) if silu else z

  fused = lambda x, a, b: group_norm(x, a, b, groups, 1e-5, silu)
  np.testing.assert_allclose(fused(x, a, b), reference(x, a, b), atol=2e-5)
  loss = lambda f: lambda x, a, b: jnp.sum(f(x, a, b) * w)
  got = jax.grad(loss(fused), argnums=(0, 1, 2))(x, a, b)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(x, a, b)
  for g, r in zip(got, want):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, atol=5e-5, rtol=1e-4)
  # bfloat16 input: the gradient comes back in bfloat16, close to float32's.
  gx = jax.grad(lambda x: jnp.sum(fused(x, a, b) * w))(x.astype(jnp.bfloat16))
  assert gx.dtype == jnp.bfloat16
  assert float(jnp.linalg.norm(gx.astype(jnp.float32) - want[0]) / jnp.linalg.norm(want[0])) < 0.02


def test_misuse_raises_clear_errors():
  x, t, enc = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,)), jnp.zeros((2, 5, CONTEXT_DIM))
  shape_of = lambda model, **kw: jax.eval_shape(functools.partial(model.init, **kw), _key(), x, t)
  with pytest.raises(ValueError, match=r'emb_extra must have shape \[B, E\] = \(2, 128\)'):
    shape_of(UNet(**DECODER), encoder_states=enc, emb_extra=jnp.zeros((2, 64)))
  with pytest.raises(ValueError, match='not divisible by num_head_channels 48'):
    shape_of(UNet(**{**DECODER, 'num_head_channels': 48}), encoder_states=enc)
  with pytest.raises(ValueError, match='downsampling factors; .16. is not one of'):
    shape_of(UNet(**{**DECODER, 'attention_resolutions': (16,)}), encoder_states=enc)
  with pytest.raises(ValueError, match='encoder_states .* are required'):
    shape_of(UNet(**DECODER))


# ---------------------------------------------------------------------------------------------
# Parity with diffusers' UNet2DModel, whose blocks match ADM's at these configs (the mapping is
# unclip_jax.convert.diffusers_unet's; tests/convert covers karlo's decoder and upsamplers).


def _diffusers_model(resblock_updown, scale_shift, attention, groups=32):
  diffusers = pytest.importorskip('diffusers')
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  resample = 'resnet' if resblock_updown else 'conv'
  down = ('ResnetDownsampleBlock2D' if resblock_updown else 'DownBlock2D',
          'AttnDownBlock2D' if attention else 'DownBlock2D')
  up = ('AttnUpBlock2D' if attention else 'UpBlock2D',
        'ResnetUpsampleBlock2D' if resblock_updown else 'UpBlock2D')
  return diffusers.UNet2DModel(
      in_channels=3, out_channels=6, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=down, up_block_types=up, downsample_type=resample,
      upsample_type=resample, attention_head_dim=32, add_attention=attention, norm_eps=1e-5,
      norm_num_groups=groups,
      attn_norm_num_groups=groups,  # (its default drops the middle attention's norm with scale-shift)
      resnet_time_scale_shift='scale_shift' if scale_shift else 'default').eval()


@pytest.mark.parametrize('resblock_updown,scale_shift,attention,groups',
                         [(True, True, True, 32), (False, False, False, 8)])
def test_matches_diffusers_unet2d(resblock_updown, scale_shift, attention, groups):
  torch = pytest.importorskip('torch')
  reference = _diffusers_model(resblock_updown, scale_shift, attention, groups)
  model = UNet(model_channels=32, out_channels=6, num_res_blocks=1, channel_mult=(1, 2),
               attention_resolutions=(2,) if attention else (), num_head_channels=32,
               resblock_updown=resblock_updown, use_scale_shift_norm=scale_shift,
               norm_groups=groups)
  x, t = _normal((2, 16, 16, 3), 1), jnp.array([3, 700])
  params = jax.tree.map(jnp.asarray, convert_unet2d(reference.state_dict(), reference.config))
  assert unet_kwargs(reference.config) == dict(
      model_channels=32, out_channels=6, num_res_blocks=1, channel_mult=(1, 2),
      attention_resolutions=(2,) if attention else (), num_head_channels=32 if attention else 64,
      resblock_updown=resblock_updown, use_scale_shift_norm=scale_shift, norm_groups=groups,
      context_dim=None)
  expected_tree = jax.eval_shape(model.init, _key(), x, t)['params']
  assert jax.tree.map(jnp.shape, nn.unbox(expected_tree)) == jax.tree.map(jnp.shape, params)
  num_params = sum(p.numel() for p in reference.parameters())
  assert sum(p.size for p in jax.tree.leaves(params)) == num_params
  with torch.no_grad():
    want = reference(torch.tensor(np.array(x)).permute(0, 3, 1, 2),
                     torch.tensor(np.array(t))).sample.permute(0, 2, 3, 1).numpy()
  got = _apply(model, params, x, t)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)
