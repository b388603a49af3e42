"""Karlo's decoder (text_proj + UNet2DConditionModel) and super-resolution U-Nets (UNet2DModel)
converted from diffusers folders: numerical parity with the PyTorch models on tiny random
configs with karlo's block types, and clear refusals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from tests import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position
from unclip_jax.convert import diffusers_unet  # pylint: disable=g-import-not-at-top
from unclip_jax.convert.torch_io import ConversionError  # pylint: disable=g-import-not-at-top

D, L, N = 24, 6, 4            # CLIP embedding (= karlo's caption width), caption length, tokens
CONTEXT = 32                  # cross_attention_dim
KARLO_BLOCKS = dict(
    down_block_types=('ResnetDownsampleBlock2D', 'SimpleCrossAttnDownBlock2D'),
    mid_block_type='UNetMidBlock2DSimpleCrossAttn',
    up_block_types=('SimpleCrossAttnUpBlock2D', 'ResnetUpsampleBlock2D'))
DECODER = dict(sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 64),
               layers_per_block=2, attention_head_dim=16, cross_attention_dim=CONTEXT,
               class_embed_type='identity', resnet_time_scale_shift='scale_shift',
               norm_num_groups=8, **KARLO_BLOCKS)
SUPER_RES = dict(sample_size=16, in_channels=6, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=('ResnetDownsampleBlock2D',) * 2,
                 up_block_types=('ResnetUpsampleBlock2D',) * 2, add_attention=False,
                 norm_num_groups=8)


def _randomise(model, seed):
  return helpers.perturb_torch(model, seed, 0.05)


def _normal(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _relative_error(ours, ref):
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope='module')
def karlo_decoder(tmp_path_factory):
  """(decoder folder, text_proj folder, torch text_proj, torch U-Net)."""
  # pylint: disable-next=g-import-not-at-top
  from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
  torch.manual_seed(0)
  unet = _randomise(diffusers.UNet2DConditionModel(**DECODER), 1)
  text_proj = _randomise(UnCLIPTextProjModel(
      clip_extra_context_tokens=N, clip_embeddings_dim=D, time_embed_dim=4 * 32,
      cross_attention_dim=CONTEXT), 2)
  root = tmp_path_factory.mktemp('karlo')
  unet.save_pretrained(root / 'decoder')
  text_proj.save_pretrained(root / 'text_proj')
  return str(root / 'decoder'), str(root / 'text_proj'), text_proj, unet


def _karlo_inputs(b=2):
  """Karlo's guided decoder call for b images: the unconditional half first (empty prompt)."""
  mask = np.zeros((2 * b, L), bool)
  mask[:b, :2] = True                      # the empty prompt: start and end tokens
  mask[b:, :5], mask[-1, 3:] = True, False
  return dict(x=_normal((2 * b, 16, 16, 3), 3), t=np.array([3, 700] * b)[:2 * b],
              image_emb=_normal((b, D), 4), text_emb=_normal((2 * b, D), 5),
              hidden=_normal((2 * b, L, D), 6), mask=mask)


def _karlo_reference(text_proj, unet, inp):
  """diffusers' UnCLIPPipeline decoder step (do_classifier_free_guidance=True)."""
  with torch.no_grad():
    states, time_emb = text_proj(
        image_embeddings=torch.from_numpy(inp['image_emb']),
        prompt_embeds=torch.from_numpy(inp['text_emb']),
        text_encoder_hidden_states=torch.from_numpy(inp['hidden']),
        do_classifier_free_guidance=True)
    mask = torch.nn.functional.pad(torch.from_numpy(inp['mask']), (N, 0), value=True)
    out = unet(sample=_nchw(inp['x']), timestep=torch.from_numpy(inp['t']),
               encoder_hidden_states=states, class_labels=time_emb, attention_mask=mask).sample
  return out.permute(0, 2, 3, 1).numpy()


def test_karlo_decoder_matches_diffusers(karlo_decoder):
  decoder_dir, text_proj_dir, text_proj, unet = karlo_decoder
  config, params = diffusers_unet.convert_decoder(decoder_dir, text_proj_dir)
  m = config.model
  assert (m.unet.model_channels, tuple(m.unet.channel_mult), m.unet.num_res_blocks) == (
      32, (1, 2), 2)
  assert tuple(m.unet.attention_resolutions) == (2,) and m.unet.num_head_channels == 16
  assert (m.context_width, m.num_clip_tokens, m.clip_emb_scale) == (CONTEXT, N, 1.0)
  assert m.text_emb_to_time and m.caption_norm and m.unet.norm_groups == 8
  assert config.diffusion.var_type == 'learned_range' and config.data.resolution == 16
  inp = _karlo_inputs()
  config.dtype = 'float32'   # the karlo preset computes in bfloat16
  model = diffusers_unet.decoder_model(config, diffusers_unet.minimal_clip_config(D))
  # Ours: the unconditional half is the null CLIP embedding (drop_clip) with the empty prompt's
  # caption and text embedding (drop_text off), as karlo guides.
  drop_clip = np.array([True, True, False, False])
  clip_emb = np.concatenate([_normal((2, D), 7), inp['image_emb']])
  ours = jax.jit(functools.partial(model.apply, train=False))(
      {'params': params}, inp['x'], inp['t'], clip_emb, inp['hidden'], inp['mask'], drop_clip,
      np.zeros(4, bool), text_emb=inp['text_emb'])
  ref = _karlo_reference(text_proj, unet, inp)
  assert ours.shape == ref.shape == (4, 16, 16, 6)
  assert _relative_error(ours[:2], ref[:2]) <= 1e-4      # null image embedding branch
  assert _relative_error(ours[2:], ref[2:]) <= 1e-4      # conditional branch


@pytest.mark.parametrize('variant', [dict(out_channels=3),   # karlo's super_res_first/last
                                     dict(out_channels=6, resnet_time_scale_shift='scale_shift')])
def test_super_res_matches_diffusers(tmp_path, variant):
  torch.manual_seed(0)
  reference = _randomise(diffusers.UNet2DModel(**SUPER_RES, **variant), 3)
  reference.save_pretrained(tmp_path)
  config, params = diffusers_unet.convert_super_res(str(tmp_path), low_resolution=8)
  assert (config.data.resolution, config.upsampler.scale) == (16, 2)
  assert config.diffusion.var_type == ('fixed_small' if variant['out_channels'] == 3
                                       else 'learned_range')
  assert config.model.unet.use_scale_shift_norm == ('resnet_time_scale_shift' in variant)
  assert config.model.unet.resblock_updown and not config.model.unet.attention_resolutions
  from unclip_jax.stages import upsampler as upsampler_stage  # pylint: disable=g-import-not-at-top
  config.dtype = 'float32'   # the karlo preset computes in bfloat16
  model = upsampler_stage.build_model(config)
  x_t, low = _normal((2, 16, 16, 3), 8), _normal((2, 16, 16, 3), 9)
  t = np.array([5, 900])
  ours = jax.jit(model.apply)({'params': params}, np.concatenate([x_t, low], -1), t)
  with torch.no_grad():   # karlo: torch.cat([super_res_latents, image_upscaled], dim=1)
    ref = reference(torch.cat([_nchw(x_t), _nchw(low)], 1), torch.from_numpy(t)).sample
  ref = ref.permute(0, 2, 3, 1).numpy()
  assert ours.shape == ref.shape == (2, 16, 16, variant['out_channels'])
  assert _relative_error(ours, ref) <= 1e-4


def test_wrong_shape_names_the_tensor_and_both_shapes(karlo_decoder):
  state = {k: v.numpy() for k, v in karlo_decoder[3].state_dict().items()}
  name = 'down_blocks.1.attentions.0.add_k_proj.weight'
  state[name] = state[name][:, :-1]
  with pytest.raises(ConversionError, match=rf"{name}.*\(64, 31\), expected \(64, 32\)"):
    diffusers_unet.convert_unet2d(state, DECODER)
  state = {k: v.numpy() for k, v in karlo_decoder[3].state_dict().items()}
  state['extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError, match=r"extra\.weight"):
    diffusers_unet.convert_unet2d(state, DECODER)


def test_unsupported_configs_are_refused():
  cross = dict(DECODER, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
               up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'))
  with pytest.raises(ConversionError, match="'CrossAttnDownBlock2D', 'CrossAttnUpBlock2D'"):
    diffusers_unet.unet_kwargs(cross)
  with pytest.raises(ConversionError, match="mid block type 'UNetMidBlock2DCrossAttn'"):
    diffusers_unet.unet_kwargs(dict(DECODER, mid_block_type='UNetMidBlock2DCrossAttn'))
  with pytest.raises(ConversionError, match='flip_sin_to_cos=False'):
    diffusers_unet.unet_kwargs(dict(DECODER, flip_sin_to_cos=False))
  with pytest.raises(ConversionError, match="class_embed_type 'timestep'"):
    diffusers_unet.unet_kwargs(dict(DECODER, class_embed_type='timestep'))


def test_clip_config_and_sizes_are_checked(karlo_decoder):
  clip = diffusers_unet.minimal_clip_config(D)
  clip.model.text.width = 16
  with pytest.raises(ConversionError, match='embed_dim 24 and text width 16.*both = 24'):
    diffusers_unet.convert_decoder(*karlo_decoder[:2], clip_config=clip)
  # karlo's super_res_last config has no sample_size: the preset's 256 (64 → 256) stays.
  config = diffusers_unet._upsampler_config(dict(SUPER_RES, sample_size=None), 64)
  assert (config.data.resolution, config.upsampler.scale, config.upsampler.crop_size) == (
      256, 4, 64)
  with pytest.raises(ConversionError, match='16 is not a multiple'):
    diffusers_unet._upsampler_config(SUPER_RES, 64)


def test_text_emb_is_required_by_karlo_decoders(karlo_decoder):
  config, params = diffusers_unet.convert_decoder(*karlo_decoder[:2])
  model = diffusers_unet.decoder_model(config, diffusers_unet.minimal_clip_config(D))
  args = (jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)), jnp.zeros((1, D)), jnp.zeros((1, L, D)),
          jnp.ones((1, L), bool))
  with pytest.raises(ValueError, match=r'needs text_emb \[B, D\] = \(1, 24\)'):
    jax.eval_shape(functools.partial(model.apply, {'params': params}), *args)
  # A dropped caption (drop_text) drops its text embedding too.
  config.dtype = 'float32'
  model = diffusers_unet.decoder_model(config, diffusers_unet.minimal_clip_config(D))
  apply = jax.jit(lambda text_emb: model.apply({'params': params}, *args, None,
                                               jnp.ones((1,), bool), text_emb=text_emb))
  np.testing.assert_array_equal(apply(jnp.asarray(_normal((1, D), 1))), apply(jnp.zeros((1, D))))
