"""diffusers U-Nets → our UNet / UnclipDecoder params: kakaobrain karlo's decoder and upsamplers.

Karlo (`UnCLIPPipeline`) keeps its decoder in two folders: `text_proj` (`UnCLIPTextProjModel`: the
CLIP embeddings → time embedding and context tokens) and `decoder` (`UNet2DConditionModel` with
ResnetDownsampleBlock2D / SimpleCrossAttn*Block2D blocks, `class_embed_type='identity'`), and its
64→256 upsampler in `super_res_first` and `super_res_last` (`UNet2DModel`, no attention; the
pipeline uses `super_res_last` for the final step only). Each maps one to one onto ours:

* diffusers' blocks are ADM's: ResnetBlock2D is our ResBlock (norm1/conv1/time_emb_proj/norm2/
  conv2/conv_shortcut; a scale-shift projection's output is [scale | shift]), resnet down/up
  samplers are BigGAN ResBlocks, conv resamplers our Downsample/Upsample; `down_blocks[l]` is our
  level l, `up_blocks[k]` our level L - 1 - k.
* AttnAddedKVProcessor attention (keys/values = [projected context, image]; the -10000 mask bias
  covers the context, the image keys are padded with 0) is our GLIDE AttentionBlock with
  `encoder_kv` (heads of `attention_head_dim` channels, head-major columns).
* The time embedding is the same sinusoid (flip_sin_to_cos=True, freq_shift=0) and MLP; karlo's
  `class_labels` (identity class embedding) are our `emb_extra`, added after the MLP.
* text_proj's context tokens come from `reshape(B, W, N).permute(0, 2, 1)` (token n, channel w at
  column w·N + n): the converter reorders the columns to our `reshape(B, N, W)`.

Tests: tests/convert/test_convert_unets.py (parity with diffusers on tiny random models).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax.convert import base_config
from unclip_jax.convert.torch_io import (ConversionError, Reader, check_params, load_state_dict,
                                         read_json)

# Block type → (attention kind, resampling). Resampling None: given by downsample_type /
# upsample_type ('conv' unless 'resnet').
_DOWN_BLOCKS = {'ResnetDownsampleBlock2D': (None, 'resnet'), 'DownBlock2D': (None, 'conv'),
                'AttnDownBlock2D': ('self', None),
                'SimpleCrossAttnDownBlock2D': ('cross', 'resnet')}
_UP_BLOCKS = {'ResnetUpsampleBlock2D': (None, 'resnet'), 'UpBlock2D': (None, 'conv'),
              'AttnUpBlock2D': ('self', None), 'SimpleCrossAttnUpBlock2D': ('cross', 'resnet')}
_MID_BLOCKS = {'UNetMidBlock2D': 'self', 'UNetMidBlock2DSimpleCrossAttn': 'cross'}

# Config fields whose other values change the computation in ways our UNet does not have:
# field → the values we accept (the first is diffusers' default).
_FIXED = {'center_input_sample': (False,), 'flip_sin_to_cos': (True,), 'freq_shift': (0,),
          'act_fn': ('silu', 'swish'), 'norm_eps': (1e-5,), 'time_embedding_type': ('positional',),
          'mid_block_scale_factor': (1,), 'downsample_padding': (1,),
          'only_cross_attention': (False,), 'mid_block_only_cross_attention': (None, False),
          'dual_cross_attention': (False,), 'encoder_hid_dim': (None,),
          'encoder_hid_dim_type': (None,), 'addition_embed_type': (None,),
          'time_embedding_act_fn': (None,), 'timestep_post_act': (None,),
          'time_cond_proj_dim': (None,), 'conv_in_kernel': (3,), 'conv_out_kernel': (3,),
          'class_embeddings_concat': (False,), 'resnet_skip_time_act': (False,),
          'resnet_out_scale_factor': (1.0,), 'cross_attention_norm': (None,),
          'num_attention_heads': (None,), 'num_class_embeds': (None,),
          'attention_type': ('default',)}
_CLASS_EMBEDS = (None, 'identity')

KARLO_LOW_RESOLUTION = 64   # karlo's decoder output, the super-resolution input


def _levels(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Per level l: {'channels', 'attention' (None/'self'/'cross'), 'down', 'up'} (resamplers)."""
  down, up = list(cfg['down_block_types']), list(cfg['up_block_types'])
  bad = [b for b in down if b not in _DOWN_BLOCKS] + [b for b in up if b not in _UP_BLOCKS]
  if bad:
    raise ConversionError(f'unsupported diffusers block types {bad}: supported down blocks '
                          f'{sorted(_DOWN_BLOCKS)}, up blocks {sorted(_UP_BLOCKS)}')
  channels = list(cfg['block_out_channels'])
  if not len(down) == len(up) == len(channels):
    raise ConversionError(f'{len(down)} down blocks, {len(up)} up blocks and '
                          f'{len(channels)} block_out_channels do not match')
  levels = []
  for l, (d, u) in enumerate(zip(down, reversed(up))):
    (attn_down, res_down), (attn_up, res_up) = _DOWN_BLOCKS[d], _UP_BLOCKS[u]
    if attn_down != attn_up:
      raise ConversionError(f'level {l}: {d} and {u} differ in attention; our UNet attends '
                            'on both paths of a level or on neither')
    levels.append({'channels': channels[l], 'attention': attn_down,
                   'down': res_down or cfg.get('downsample_type') or 'conv',
                   'up': res_up or cfg.get('upsample_type') or 'conv'})
  return levels


def _check_fixed(cfg: Mapping[str, Any]):
  for key, allowed in _FIXED.items():
    value = cfg.get(key, allowed[0])
    values = value if isinstance(value, (list, tuple)) else [value]   # per-block lists
    if not all(v in allowed for v in values):
      raise ConversionError(f'diffusers config {key}={cfg[key]!r} is not supported (our U-Net '
                            f'computes as with {allowed[0]!r})')
  if cfg.get('class_embed_type') not in _CLASS_EMBEDS:
    raise ConversionError(f"class_embed_type {cfg['class_embed_type']!r} is not supported "
                          f'(only {_CLASS_EMBEDS}: the class labels are our emb_extra)')
  b0 = cfg['block_out_channels'][0]
  if cfg.get('time_embedding_dim') not in (None, 4 * b0):
    raise ConversionError(f"time_embedding_dim {cfg['time_embedding_dim']} is not "
                          f'4 · block_out_channels[0] = {4 * b0}')


def unet_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Our `UNet` attributes for a diffusers UNet2DModel / UNet2DConditionModel config.

  Refuses (ConversionError) block types and options our UNet does not compute. The result has
  model_channels, out_channels, num_res_blocks, attention_resolutions, channel_mult,
  num_head_channels, use_scale_shift_norm, resblock_updown, norm_groups and context_dim.
  """
  _check_fixed(cfg)
  levels = _levels(cfg)
  b0 = levels[0]['channels']
  mult = [lv['channels'] // b0 for lv in levels]
  if any(lv['channels'] != m * b0 for lv, m in zip(levels, mult)):
    raise ConversionError(f"block_out_channels {tuple(cfg['block_out_channels'])} are not "
                          'multiples of the first')
  layers = cfg.get('layers_per_block', 2)
  if not isinstance(layers, int):
    raise ConversionError(f'layers_per_block {layers} must be one number for every level')
  resample = {lv['down'] for lv in levels[:-1]} | {lv['up'] for lv in levels[1:]}
  if len(resample) > 1:
    raise ConversionError(f'resamplers {sorted(resample)} are mixed; our UNet uses one kind')
  kinds = {lv['attention'] for lv in levels} - {None}
  mid = _mid_attention(cfg, kinds)
  if len(kinds | {mid} - {None}) > 1:
    raise ConversionError(f'attention kinds {sorted(kinds | {mid} - {None})} are mixed: our '
                          'UNet attends to encoder states everywhere or nowhere')
  if not isinstance(cfg.get('norm_num_groups', 32), int):
    raise ConversionError(f"norm_num_groups {cfg['norm_num_groups']!r} is not supported")
  scale_shift = cfg.get('resnet_time_scale_shift', 'default')
  if scale_shift not in ('default', 'scale_shift'):
    raise ConversionError(f'resnet_time_scale_shift {scale_shift!r} is not supported')
  head_dim = cfg.get('attention_head_dim')
  if isinstance(head_dim, (list, tuple)) and len(set(head_dim)) == 1:
    head_dim = head_dim[0]
  if mid and not isinstance(head_dim, int):
    raise ConversionError(f'attention_head_dim {head_dim!r} must be one number')
  return dict(model_channels=b0, out_channels=cfg.get('out_channels', 3), num_res_blocks=layers,
              attention_resolutions=tuple(2 ** l for l, lv in enumerate(levels)
                                          if lv['attention']),
              channel_mult=tuple(mult), num_head_channels=head_dim if mid else 64,
              use_scale_shift_norm=scale_shift == 'scale_shift',
              resblock_updown=resample == {'resnet'}, norm_groups=cfg.get('norm_num_groups', 32),
              context_dim=cfg.get('cross_attention_dim') if mid == 'cross' else None)


def _mid_attention(cfg, kinds) -> Optional[str]:
  """The middle block's attention kind, which must exist iff the levels attend."""
  mid_type = cfg.get('mid_block_type', 'UNetMidBlock2D')
  if mid_type not in _MID_BLOCKS:
    raise ConversionError(f'unsupported diffusers mid block type {mid_type!r}: supported '
                          f'{sorted(_MID_BLOCKS)}')
  kind = _MID_BLOCKS[mid_type]
  if kind == 'self' and not cfg.get('add_attention', True):
    kind = None
  if bool(kind) != bool(kinds):
    raise ConversionError(f'the middle block ({mid_type}) attends iff the levels do in our '
                          f'UNet; here the levels attend: {bool(kinds)}, the middle: {bool(kind)}')
  if kind == 'self':   # UNet2DModel's middle attention has its own group count
    groups = cfg.get('attn_norm_num_groups')
    if groups is None and cfg.get('resnet_time_scale_shift') == 'scale_shift':
      raise ConversionError('the middle attention has no group norm (UNet2DModel with '
                            'scale_shift and attn_norm_num_groups None): not supported')
    if groups not in (None, cfg.get('norm_num_groups', 32)):
      raise ConversionError(f'attn_norm_num_groups {groups} differs from norm_num_groups '
                            f"{cfg.get('norm_num_groups', 32)}: not supported")
  return kind


class _UNetReader:
  """Reads diffusers U-Net tensors with the shapes a config implies, in our layouts."""

  def __init__(self, reader: Reader, kw: dict[str, Any]):
    self.r, self.kw = reader, kw
    self.emb = 4 * kw['model_channels']

  def conv(self, name, cin, cout, k=3):
    return {'kernel': self.r.take(name + '.weight', (cout, cin, k, k)).transpose(2, 3, 1, 0),
            'bias': self.r.take(name + '.bias', (cout,))}

  def linear(self, name, fin, fout):
    return {'kernel': self.r.take(name + '.weight', (fout, fin)).T,
            'bias': self.r.take(name + '.bias', (fout,))}

  def norm(self, name, c):
    return {'scale': self.r.take(name + '.weight', (c,)), 'bias': self.r.take(name + '.bias', (c,))}

  def res(self, name, cin, cout):
    """ResnetBlock2D → ResBlock."""
    out = {'norm_in': self.norm(name + '.norm1', cin),
           'conv_in': self.conv(name + '.conv1', cin, cout),
           'norm_out': self.norm(name + '.norm2', cout),
           'conv_out': self.conv(name + '.conv2', cout, cout)}
    if self.kw['use_scale_shift_norm']:
      proj = self.linear(name + '.time_emb_proj', self.emb, 2 * cout)
      proj = {'kernel': proj['kernel'].reshape(self.emb, 2, cout),
              'bias': proj['bias'].reshape(2, cout)}
    else:
      proj = self.linear(name + '.time_emb_proj', self.emb, cout)
    out['emb_proj'] = proj
    if cin != cout:
      out['skip'] = self.conv(name + '.conv_shortcut', cin, cout, 1)
    return out

  def resample(self, name, c):
    """A down/upsampler: a BigGAN ResBlock or a conv."""
    return self.res(name, c, c) if self.kw['resblock_updown'] else {'conv': self.conv(
        name + '.conv', c, c)}

  def attn(self, name, c):
    """Attention (AttnProcessor or AttnAddedKVProcessor) → AttentionBlock."""
    d = self.kw['num_head_channels']
    if c % d:
      raise ConversionError(f'{name}: {c} channels are not divisible by attention_head_dim {d}')
    heads = c // d

    def fused(names, fin):   # Linears fin → c: kernel [fin, n, heads, d], bias [n, heads, d]
      parts = [self.linear(f'{name}.{n}', fin, c) for n in names]
      return {'kernel': np.stack([p['kernel'] for p in parts], 1).reshape(fin, -1, heads, d),
              'bias': np.stack([p['bias'] for p in parts]).reshape(-1, heads, d)}

    out = self.linear(name + '.to_out.0', c, c)
    out = {'norm': self.norm(name + '.group_norm', c), 'qkv': fused(('to_q', 'to_k', 'to_v'), c),
           'out': {'kernel': out['kernel'].reshape(heads, d, c), 'bias': out['bias']}}
    if self.kw['context_dim'] is not None:
      out['encoder_kv'] = fused(('add_k_proj', 'add_v_proj'), self.kw['context_dim'])
    return out


def _unet_params(u: _UNetReader, in_channels: int) -> dict[str, Any]:
  """Walks our UNet's layout (as UNet.__call__ builds it) reading the diffusers tensors."""
  kw = u.kw
  mult, n = kw['channel_mult'], kw['num_res_blocks']
  attends = set(kw['attention_resolutions'])
  last = len(mult) - 1
  h = kw['model_channels'] * mult[0]
  p = {'conv_in': u.conv('conv_in', in_channels, h),
       'time_fc1': u.linear('time_embedding.linear_1', kw['model_channels'], u.emb),
       'time_fc2': u.linear('time_embedding.linear_2', u.emb, u.emb)}
  skips = [h]
  for l, m in enumerate(mult):
    c = m * kw['model_channels']
    for i in range(n):
      p[f'down_{l}_res_{i}'], h = u.res(f'down_blocks.{l}.resnets.{i}', h, c), c
      if 2 ** l in attends:
        p[f'down_{l}_attn_{i}'] = u.attn(f'down_blocks.{l}.attentions.{i}', c)
      skips.append(h)
    if l < last:
      p[f'down_{l}_downsample'] = u.resample(f'down_blocks.{l}.downsamplers.0', h)
      skips.append(h)
  p['mid_res_0'] = u.res('mid_block.resnets.0', h, h)
  if attends:
    p['mid_attn'] = u.attn('mid_block.attentions.0', h)
  p['mid_res_1'] = u.res('mid_block.resnets.1', h, h)
  for l in reversed(range(len(mult))):
    c, k = mult[l] * kw['model_channels'], last - l
    for i in range(n + 1):
      p[f'up_{l}_res_{i}'], h = u.res(f'up_blocks.{k}.resnets.{i}', h + skips.pop(), c), c
      if 2 ** l in attends:
        p[f'up_{l}_attn_{i}'] = u.attn(f'up_blocks.{k}.attentions.{i}', c)
    if l > 0:
      p[f'up_{l}_upsample'] = u.resample(f'up_blocks.{k}.upsamplers.0', c)
  p['norm_out'] = u.norm('conv_norm_out', h)
  p['conv_out'] = u.conv('conv_out', h, kw['out_channels'])
  return p


def _as_reader(state_or_reader, what: str) -> tuple[Reader, bool]:
  """(Reader, whether we made it) for a Reader or a {name: array or torch tensor} mapping."""
  if isinstance(state_or_reader, Reader):
    return state_or_reader, False
  to_numpy = lambda v: np.asarray(v.detach().cpu().float() if hasattr(v, 'detach') else v,
                                  np.float32)
  return Reader({k: to_numpy(v) for k, v in state_or_reader.items()}, what), True


def convert_unet2d(state_or_reader, diffusers_config: Mapping[str, Any]) -> dict[str, Any]:
  """Our UNet params (numpy float32) from a diffusers UNet2DModel / UNet2DConditionModel.

  Args:
    state_or_reader: the U-Net's state dict ({name: numpy array or torch tensor}; every tensor
      must be used) or a `Reader` over it (the caller checks what is left).
    diffusers_config: the model's config (config.json or `model.config`).

  Returns:
    params for `UNet(**unet_kwargs(diffusers_config))`, input channels `in_channels`.
  """
  reader, own = _as_reader(state_or_reader, 'diffusers U-Net')
  kw = unet_kwargs(diffusers_config)
  params = _unet_params(_UNetReader(reader, kw), diffusers_config.get('in_channels', 3))
  if own:
    reader.check_all_used()
  return params


def _text_proj_params(r: Reader, tp: Mapping[str, Any], caption_width: int) -> dict[str, Any]:
  """UnCLIPTextProjModel tensors → the UnclipDecoder params outside `unet`."""
  d, w = tp.get('clip_embeddings_dim', 768), tp['cross_attention_dim']
  n, e = tp.get('clip_extra_context_tokens', 4), tp['time_embed_dim']
  linear = lambda name, fin, fout: {'kernel': r.take(name + '.weight', (fout, fin)).T,
                                    'bias': r.take(name + '.bias', (fout,))}
  tokens = linear('clip_extra_context_tokens_proj', d, n * w)
  # Their column w·N + n holds token n, channel w; ours n·W + w.
  tokens = {'kernel': tokens['kernel'].reshape(d, w, n).transpose(0, 2, 1).reshape(d, n * w),
            'bias': tokens['bias'].reshape(w, n).T.reshape(n * w)}
  return {'null_clip_emb': r.take('learned_classifier_free_guidance_embeddings', (d,)),
          'clip_to_time': linear('clip_image_embeddings_project_to_time_embeddings', d, e),
          'text_to_time': linear('embedding_proj', d, e),
          'clip_to_tokens': tokens,
          'caption_proj': linear('encoder_hidden_states_proj', caption_width, w),
          'caption_norm': {'ln': {'scale': r.take('text_encoder_hidden_states_norm.weight', (w,)),
                                  'bias': r.take('text_encoder_hidden_states_norm.bias', (w,))}}}


def _set_unet_config(unet_config, kw: dict[str, Any]):
  """Copies our UNet attributes into a stage config's model.unet (except out_channels and
  context_dim, which the stage sets, and the head width of a U-Net without attention)."""
  skip = {'out_channels', 'context_dim'} | (set() if kw['attention_resolutions'] else
                                            {'num_head_channels'})
  for key, value in kw.items():
    if key not in skip:
      unet_config[key] = value


def _var_type(out_channels: int, what: str) -> str:
  if out_channels not in (3, 6):
    raise ConversionError(f'{what}: out_channels {out_channels} is not 3 (eps) or 6 (eps and '
                          'the learned variance interpolation)')
  return 'learned_range' if out_channels == 6 else 'fixed_small'


def _decoder_config(unet_cfg, tp_cfg, clip_config) -> ml_collections.ConfigDict:
  """Our decoder stage config for karlo's decoder and text_proj configs."""
  kw = unet_kwargs(unet_cfg)
  if kw['context_dim'] is None:
    raise ConversionError('the decoder U-Net has no cross-attention blocks '
                          '(SimpleCrossAttnDownBlock2D ...): not a karlo decoder')
  if unet_cfg.get('class_embed_type') != 'identity':
    raise ConversionError(f"the decoder U-Net's class_embed_type is "
                          f"{unet_cfg.get('class_embed_type')!r}, karlo's is 'identity'")
  if unet_cfg.get('in_channels', 4) != 3:
    raise ConversionError(f"the decoder U-Net has {unet_cfg.get('in_channels')} input channels, "
                          'expected 3 (an image)')
  expect = {'time_embed_dim': 4 * kw['model_channels'], 'cross_attention_dim': kw['context_dim']}
  for key, value in expect.items():
    if tp_cfg.get(key) != value:
      raise ConversionError(f'text_proj {key} is {tp_cfg.get(key)}, the decoder U-Net needs '
                            f'{value}')
  d = tp_cfg.get('clip_embeddings_dim', 768)
  if clip_config is not None:
    m = clip_config.model
    if m.embed_dim != d or m.text.width != d:
      raise ConversionError(f'the CLIP config has embed_dim {m.embed_dim} and text width '
                            f'{m.text.width}; karlo\'s text_proj needs both = {d}')
  c = base_config('decoder', 'karlo')
  _set_unet_config(c.model.unet, kw)
  c.model.context_width = kw['context_dim']
  c.model.num_clip_tokens = tp_cfg.get('clip_extra_context_tokens', 4)
  c.model.clip_emb_scale = 1.0
  c.model.caption_encoder = 'clip'
  c.model.text_emb_to_time = True
  c.model.caption_norm = True
  c.model.null_caption = 'empty_prompt'   # karlo's unconditional caption
  c.diffusion.var_type = _var_type(kw['out_channels'], 'the decoder U-Net')
  if unet_cfg.get('sample_size'):
    c.data.resolution = int(np.ravel(unet_cfg['sample_size'])[0])
  return c


def minimal_clip_config(d: int) -> ml_collections.ConfigDict:
  """What building the decoder needs from a CLIP config whose sizes the caller did not give."""
  return ml_collections.ConfigDict({'model': {'embed_dim': d, 'text': {'width': d}}})


def decoder_model(config, clip_config):
  """The decoder stage's model for a converted config."""
  from unclip_jax.stages import decoder as decoder_stage  # pylint: disable=g-import-not-at-top
  return decoder_stage.build_model(config, clip_config)


def _decoder_shapes(model, config, d: int):
  """The parameter shapes `model.init` gives (abstract: nothing is computed)."""
  factor = 2 ** (len(config.model.unet.channel_mult) - 1)
  x = jnp.zeros((1, factor, factor, 3))
  args = (x, jnp.zeros((1,)), jnp.zeros((1, d)), jnp.zeros((1, 1, d)), jnp.ones((1, 1), bool))
  init = functools.partial(model.init, text_emb=jnp.zeros((1, d)))
  return jax.eval_shape(init, jax.random.PRNGKey(0), *args)['params']


def convert_decoder(decoder_folder: str, text_proj_folder: str,
                    clip_config=None) -> tuple[ml_collections.ConfigDict, dict]:
  """Karlo's decoder (`decoder/` UNet2DConditionModel + `text_proj/` UnCLIPTextProjModel).

  Args:
    decoder_folder, text_proj_folder: diffusers model folders (config.json and weights).
    clip_config: the CLIP stage config the decoder will run with (checked: its embed_dim and text
      width must equal text_proj's clip_embeddings_dim); None skips the check.

  Returns:
    (our decoder stage config: configs/decoder.py:karlo with the checkpoint's sizes and karlo's
    options — model.text_emb_to_time, model.caption_norm, clip_emb_scale 1.0,
    model.null_caption 'empty_prompt' — and its params, numpy float32).
  """
  unet_cfg, tp_cfg = read_json(decoder_folder), read_json(text_proj_folder)
  config = _decoder_config(unet_cfg, tp_cfg, clip_config)
  d = tp_cfg.get('clip_embeddings_dim', 768)
  unet_reader = Reader(load_state_dict(decoder_folder), f'decoder ({decoder_folder})')
  tp_reader = Reader(load_state_dict(text_proj_folder), f'text_proj ({text_proj_folder})')
  params = _text_proj_params(tp_reader, tp_cfg, d)
  params['unet'] = convert_unet2d(unet_reader, unet_cfg)
  unet_reader.check_all_used()
  tp_reader.check_all_used()
  model = decoder_model(config, clip_config or minimal_clip_config(d))
  check_params(params, _decoder_shapes(model, config, d), 'converted karlo decoder')
  return config, params


def _upsampler_config(cfg, low_resolution: int) -> ml_collections.ConfigDict:
  """Our upsampler stage config for a karlo super-resolution UNet2DModel config."""
  kw = unet_kwargs(cfg)
  if kw['context_dim'] is not None or kw['attention_resolutions']:
    raise ConversionError('the super-resolution U-Net attends; our upsamplers do not')
  if cfg.get('in_channels', 3) != 6:
    raise ConversionError(f"the super-resolution U-Net has {cfg.get('in_channels')} input "
                          'channels, expected 6 (x_t and the upsampled low-resolution image)')
  c = base_config('upsampler', 'karlo_64_256')
  _set_unet_config(c.model.unet, kw)
  c.diffusion.var_type = _var_type(kw['out_channels'], 'the super-resolution U-Net')
  if cfg.get('sample_size'):   # karlo's super_res_last has none: keep the preset's 256
    c.data.resolution = int(np.ravel(cfg['sample_size'])[0])
  r = c.data.resolution
  if r % low_resolution or r <= low_resolution:
    raise ConversionError(f'the super-resolution size {r} is not a multiple (> 1) of the '
                          f'low resolution {low_resolution}')
  c.upsampler.scale = r // low_resolution
  c.upsampler.crop_size = min(c.upsampler.crop_size, r)
  return c


def convert_super_res(folder: str, low_resolution: int = KARLO_LOW_RESOLUTION
                      ) -> tuple[ml_collections.ConfigDict, dict]:
  """One karlo super-resolution U-Net (`super_res_first/` or `super_res_last/`, UNet2DModel).

  The U-Net's input is concat([x_t, upsampled low-res image], channels), as in our upsampler
  stage. Args: folder, a diffusers model folder; low_resolution, the size of the images it
  upsamples (64: karlo's decoder). Returns (our upsampler stage config — configs/upsampler.py:
  karlo_64_256 with the checkpoint's sizes, data.resolution = sample_size (256 when the config
  has none) and upsampler.scale = resolution / low_resolution —, params numpy float32).
  """
  from unclip_jax.stages import upsampler as upsampler_stage  # pylint: disable=g-import-not-at-top
  cfg = read_json(folder)
  config = _upsampler_config(cfg, low_resolution)
  upsampler_stage.check_config(config)
  reader = Reader(load_state_dict(folder), f'super-resolution U-Net ({folder})')
  params = convert_unet2d(reader, cfg)
  reader.check_all_used()
  model = upsampler_stage.build_model(config)
  factor = 2 ** (len(config.model.unet.channel_mult) - 1)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, factor, factor, 6)),
                          jnp.zeros((1,)))['params']
  check_params(params, shapes, 'converted super-resolution U-Net')
  return config, params
