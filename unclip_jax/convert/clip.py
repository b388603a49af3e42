"""Pretrained CLIPs → our CLIP stage: Hugging Face folders, open_clip and OpenAI state dicts.

  convert_hf_clip(text=DIR, vision=DIR)     CLIPModel, CLIPTextModelWithProjection and/or
                                            CLIPVisionModelWithProjection folders
  convert_open_clip(PATH, model_config)     open_clip / OpenAI ViT state dicts (.pt, .bin,
                                            .safetensors, OpenAI's TorchScript archives)
  save_converted_clip(DST, config, params, tokenizer_src)
                                            an export that `stages.clip.load_frozen` reads

Each converter returns our CLIP stage config (every size set from the checkpoint) and a float32
numpy params tree checked against the model's own parameter shapes. The converted model computes
what the reference computes: the text tower pools where Hugging Face / open_clip pool, and the
image tower takes our [-1, 1] images and applies the checkpoint's pixel normalisation itself
(`model.vision.pixel_mean` / `pixel_std`). A CLIP with one tower has `model.text` or
`model.vision` set to None. Converted configs compute in float32 (`config.dtype`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Optional

import ml_collections
import numpy as np

from unclip_jax.convert import base_config
from unclip_jax.convert.torch_io import (ConversionError, Reader, as_float32, check_params,
                                         load_state_dict, read_json)

# OpenAI CLIP's input normalisation of [0, 1] pixels (also open_clip's default).
OPENAI_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
TOKENIZER_FILES = ('vocab.json', 'merges.txt', 'tokenizer.json', 'special_tokens_map.json',
                   'tokenizer_config.json', 'bpe_simple_vocab_16e6.txt.gz')
# Hugging Face's CLIPTextConfig / CLIPVisionConfig defaults, for config.json files that omit them.
HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                        projection_dim=512, num_hidden_layers=12, num_attention_heads=8,
                        max_position_embeddings=77, hidden_act='quick_gelu', layer_norm_eps=1e-5,
                        eos_token_id=49407)
HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512,
                          num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                          image_size=224, patch_size=32, hidden_act='quick_gelu',
                          layer_norm_eps=1e-5)
HF_ACTIVATIONS = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_new': 'gelu_tanh',
                  'gelu_pytorch_tanh': 'gelu_tanh'}
_HF_KINDS = {'clip': 'clip', 'clip_text_model': 'text', 'clip_vision_model': 'vision'}


# --- layers: PyTorch layouts → ours --------------------------------------------------------------

def _linear(r: Reader, name: str, d_in: int, d_out: int) -> dict[str, np.ndarray]:
  """nn.Linear `name` [d_out, d_in] (+ bias) → Dense {'kernel': [d_in, d_out], 'bias'}."""
  return {'kernel': r.take(name + '.weight', (d_out, d_in)).T,
          'bias': r.take(name + '.bias', (d_out,))}


def _norm(r: Reader, name: str, width: int) -> dict[str, Any]:
  """LayerNorm `name` → our LayerNorm wrapper's {'ln': {'scale', 'bias'}}."""
  return {'ln': {'scale': r.take(name + '.weight', (width,)),
                 'bias': r.take(name + '.bias', (width,))}}


def _attention(w_qkv: np.ndarray, b_qkv: np.ndarray, w_out: np.ndarray, b_out: np.ndarray,
               heads: int) -> dict[str, np.ndarray]:
  """PyTorch attention weights → our MultiHeadAttention params.

  Args:
    w_qkv: [3, width, width], the q, k, v projections as nn.Linear weights [out, in].
    b_qkv: [3, width].
    w_out, b_out: the output projection, [width, width] and [width].
    heads: the number of heads; head h owns output rows h*head_dim:(h+1)*head_dim.
  Returns:
    qkv_kernel [width, 3, heads, head_dim], qkv_bias [3, heads, head_dim],
    out_kernel [heads, head_dim, width], out_bias [width].
  """
  width = w_out.shape[0]
  head_dim = width // heads
  return {'qkv_kernel': w_qkv.reshape(3, heads, head_dim, width).transpose(3, 0, 1, 2),
          'qkv_bias': b_qkv.reshape(3, heads, head_dim),
          'out_kernel': w_out.T.reshape(heads, head_dim, width),
          'out_bias': b_out}


def _hf_block(r: Reader, p: str, width: int, heads: int, mlp: int) -> dict[str, Any]:
  """One Hugging Face CLIPEncoderLayer at prefix `p` → our ResidualBlock params."""
  w = {n: r.take(f'{p}self_attn.{n}_proj.weight', (width, width)) for n in 'qkv'}
  b = {n: r.take(f'{p}self_attn.{n}_proj.bias', (width,)) for n in 'qkv'}
  return {'ln_1': _norm(r, p + 'layer_norm1', width),
          'attn': _attention(np.stack([w['q'], w['k'], w['v']]),
                             np.stack([b['q'], b['k'], b['v']]),
                             r.take(p + 'self_attn.out_proj.weight', (width, width)),
                             r.take(p + 'self_attn.out_proj.bias', (width,)), heads),
          'ln_2': _norm(r, p + 'layer_norm2', width),
          'mlp': {'fc': _linear(r, p + 'mlp.fc1', width, mlp),
                  'proj': _linear(r, p + 'mlp.fc2', mlp, width)}}


def _open_clip_block(r: Reader, p: str, width: int, heads: int, mlp: int) -> dict[str, Any]:
  """One OpenAI / open_clip ResidualAttentionBlock at prefix `p` → our ResidualBlock params."""
  return {'ln_1': _norm(r, p + 'ln_1', width),
          'attn': _attention(r.take(p + 'attn.in_proj_weight', (3 * width, width)).reshape(
                                 3, width, width),
                             r.take(p + 'attn.in_proj_bias', (3 * width,)).reshape(3, width),
                             r.take(p + 'attn.out_proj.weight', (width, width)),
                             r.take(p + 'attn.out_proj.bias', (width,)), heads),
          'ln_2': _norm(r, p + 'ln_2', width),
          'mlp': {'fc': _linear(r, p + 'mlp.c_fc', width, mlp),
                  'proj': _linear(r, p + 'mlp.c_proj', mlp, width)}}


def _blocks(block_fn, r: Reader, prefix: str, tower: ml_collections.ConfigDict):
  mlp = int(tower.width * tower.mlp_ratio)
  return {f'block_{i}': block_fn(r, f'{prefix}{i}.', tower.width, tower.num_heads, mlp)
          for i in range(tower.depth)}


# --- sizes ---------------------------------------------------------------------------------------

def mlp_ratio(hidden: int, width: int) -> float:
  """The float ratio whose `int(width * ratio)` (our MLP's hidden size) is exactly `hidden`."""
  ratio = hidden / width
  while int(width * ratio) < hidden:  # e.g. 8192 / 1664 may round down
    ratio = float(np.nextafter(ratio, np.inf))
  if int(width * ratio) != hidden:
    raise ConversionError(f'cannot express an MLP of {hidden} for width {width} as a ratio')
  return ratio


def _heads(width: int, heads: int, what: str) -> int:
  if heads <= 0 or width % heads:
    raise ConversionError(f'{what}: width {width} is not divisible by {heads} heads')
  return heads


def _clip_config(text: Optional[dict], vision: Optional[dict],
                 embed_dim: int) -> ml_collections.ConfigDict:
  """Our CLIP stage config (vit_l14 preset, float32) with the given tower fields; a tower that
  is None is removed."""
  c = base_config('clip', 'vit_l14')
  c.dtype = 'float32'
  c.model.embed_dim = embed_dim
  for name, fields in (('text', text), ('vision', vision)):
    if fields is None:
      c.model[name] = None
    else:
      c.model[name].update(fields)
  return c


def _square(value, what: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ConversionError(f'{what} {value} is not square; only square sizes are supported')
    value = value[0]
  return int(value)


# --- Hugging Face ------------------------------------------------------------------------------

class _HFSource:
  """One Hugging Face folder: its config, its kind ('clip', 'text', 'vision') and its tensors."""

  def __init__(self, folder: str):
    if not os.path.isdir(folder):
      raise ConversionError(f'{folder} is not a folder (expected a Hugging Face CLIP folder '
                            'saved with save_pretrained)')
    self.folder = folder
    self.config = read_json(folder)
    model_type = self.config.get('model_type')
    if model_type not in _HF_KINDS:
      raise ConversionError(f'{folder}/config.json: model_type {model_type!r} is not a CLIP '
                            f'({", ".join(_HF_KINDS)})')
    self.kind = _HF_KINDS[model_type]
    self.reader = Reader(load_state_dict(folder), what=folder)

  def tower_config(self, tower: str) -> dict[str, Any]:
    """The HF config of one tower with HF's defaults filled in, plus 'projection_dim'."""
    if self.kind not in ('clip', tower):
      raise ConversionError(f'{self.folder} holds a CLIP {self.kind} model, not a {tower} tower')
    defaults = HF_TEXT_DEFAULTS if tower == 'text' else HF_VISION_DEFAULTS
    if self.kind == 'clip':
      sub = self.config.get(f'{tower}_config') or self.config.get(f'{tower}_config_dict') or {}
      return {**defaults, **sub, 'projection_dim': self.config.get('projection_dim', 512)}
    return {**defaults, **self.config}

  def pixel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean / image_std of the folder's preprocessor_config.json, else OpenAI's."""
    path = os.path.join(self.folder, 'preprocessor_config.json')
    if not os.path.isfile(path):
      return OPENAI_PIXEL_MEAN, OPENAI_PIXEL_STD
    with open(path, encoding='utf-8') as f:
      pre = json.load(f)
    mean = tuple(float(v) for v in pre.get('image_mean', OPENAI_PIXEL_MEAN))
    std = tuple(float(v) for v in pre.get('image_std', OPENAI_PIXEL_STD))
    if len(mean) != 3 or len(std) != 3:
      raise ConversionError(f'{path}: image_mean / image_std must have 3 values each')
    return mean, std


def _hf_activation(cfg: dict, what: str) -> str:
  act = cfg['hidden_act']
  if act not in HF_ACTIVATIONS:
    raise ConversionError(f'{what}: hidden_act {act!r} is not supported '
                          f'({", ".join(HF_ACTIVATIONS)})')
  return HF_ACTIVATIONS[act]


def _hf_text_fields(cfg: dict, what: str) -> dict[str, Any]:
  """Our model.text fields from a HF CLIPTextConfig (dict)."""
  vocab, width = cfg['vocab_size'], cfg['hidden_size']
  eos = cfg.get('eos_token_id')
  if not isinstance(eos, int):
    raise ConversionError(f'{what}: eos_token_id {eos!r} is not a single token id')
  # HF pools at the first eos_token_id, except for configs written before it was set right
  # (eos_token_id == 2): those pool at the largest id, which is OpenAI's end token (the last id).
  legacy = eos == 2
  return dict(vocab_size=vocab, context_length=cfg['max_position_embeddings'], width=width,
              depth=cfg['num_hidden_layers'],
              num_heads=_heads(width, cfg['num_attention_heads'], what),
              eot_id=vocab - 1 if legacy else eos, pool='argmax' if legacy else 'eot',
              mlp_ratio=mlp_ratio(cfg['intermediate_size'], width),
              activation=_hf_activation(cfg, what), layer_norm_eps=float(cfg['layer_norm_eps']),
              remat=False)


def _hf_vision_fields(cfg: dict, pixel_stats, what: str) -> dict[str, Any]:
  """Our model.vision fields from a HF CLIPVisionConfig (dict)."""
  width = cfg['hidden_size']
  if cfg.get('num_channels', 3) != 3:
    raise ConversionError(f'{what}: num_channels {cfg["num_channels"]} is not 3')
  mean, std = pixel_stats
  return dict(image_size=_square(cfg['image_size'], f'{what}: image_size'),
              patch_size=_square(cfg['patch_size'], f'{what}: patch_size'), width=width,
              depth=cfg['num_hidden_layers'],
              num_heads=_heads(width, cfg['num_attention_heads'], what),
              mlp_ratio=mlp_ratio(cfg['intermediate_size'], width),
              activation=_hf_activation(cfg, what), layer_norm_eps=float(cfg['layer_norm_eps']),
              pixel_mean=mean, pixel_std=std, remat=False)


def _hf_text_params(r: Reader, text: ml_collections.ConfigDict, embed_dim: int):
  p = 'text_model.'
  return {
      'token_embedding': {'embedding': r.take(p + 'embeddings.token_embedding.weight',
                                              (text.vocab_size, text.width))},
      'positional_embedding': r.take(p + 'embeddings.position_embedding.weight',
                                     (text.context_length, text.width)),
      'transformer': _blocks(_hf_block, r, p + 'encoder.layers.', text),
      'ln_final': _norm(r, p + 'final_layer_norm', text.width),
      'projection': {'kernel': r.take('text_projection.weight', (embed_dim, text.width)).T},
  }


def _hf_vision_params(r: Reader, vision: ml_collections.ConfigDict, embed_dim: int):
  p, w, patch = 'vision_model.', vision.width, vision.patch_size
  num_tokens = (vision.image_size // patch) ** 2 + 1
  return {
      'patch_embedding': {'kernel': r.take(p + 'embeddings.patch_embedding.weight',
                                           (w, 3, patch, patch)).transpose(2, 3, 1, 0)},
      'class_embedding': r.take(p + 'embeddings.class_embedding', (w,)),
      'positional_embedding': r.take(p + 'embeddings.position_embedding.weight',
                                     (num_tokens, w)),
      'ln_pre': _norm(r, p + 'pre_layrnorm', w),
      'transformer': _blocks(_hf_block, r, p + 'encoder.layers.', vision),
      'ln_post': _norm(r, p + 'post_layernorm', w),
      'projection': {'kernel': r.take('visual_projection.weight', (embed_dim, w)).T},
  }


def _hf_ignored(tower: Optional[str]):
  """Tensors a converter may leave: position_ids buffers, and the other tower of a CLIPModel
  that gives only one."""
  other = {'text': ('vision_model.', 'visual_projection.'),
           'vision': ('text_model.', 'text_projection.')}.get(tower, ())
  return lambda name: name.endswith('position_ids') or name.startswith(other)


def convert_hf_clip(text: str | None = None, vision: str | None = None
                    ) -> tuple[ml_collections.ConfigDict, dict]:
  """A Hugging Face CLIP → (our CLIP stage config, float32 numpy params).

  Args:
    text: a folder (config.json + model.safetensors or pytorch_model.bin) of a `CLIPModel`
      (both towers, unless `vision` is given too) or a `CLIPTextModelWithProjection`.
    vision: a `CLIPVisionModelWithProjection` (or `CLIPModel`) folder for the image tower.
      Its preprocessor_config.json's image_mean / image_std are used when present (else
      OpenAI's).
  Returns:
    The config (sizes, activation, pooling rule, LayerNorm epsilon, pixel normalisation from the
    checkpoint; `model.text` / `model.vision` None for a missing tower; dtype float32) and
    params {'text_tower', 'vision_tower', 'logit_scale'} (towers only where present). The
    logit scale is the checkpoint's, or log(1/0.07) without a CLIPModel.
  Raises:
    ConversionError: a missing folder or weights, a non-CLIP config, a tensor of the wrong
      shape (named, with both shapes), a missing or unexpected tensor.
  """
  if text is None and vision is None:
    raise ConversionError('convert_hf_clip: give a text folder, a vision folder or both')
  text_src = _HFSource(text) if text is not None else None
  vision_src = _HFSource(vision) if vision is not None else None
  if text_src is not None and text_src.kind == 'vision' and vision_src is None:
    text_src, vision_src = None, text_src  # a lone vision folder passed first
  if vision_src is None and text_src is not None and text_src.kind == 'clip':
    vision_src = text_src
  if text_src is not None and text_src.kind == 'vision':
    raise ConversionError(f'{text}: a vision model folder was given as the text tower')

  text_cfg = text_src.tower_config('text') if text_src else None
  vision_cfg = vision_src.tower_config('vision') if vision_src else None
  dims = {c['projection_dim'] for c in (text_cfg, vision_cfg) if c is not None}
  if len(dims) != 1:
    raise ConversionError(f'the text and image towers project to different sizes {sorted(dims)}')
  config = _clip_config(
      _hf_text_fields(text_cfg, text) if text_cfg else None,
      _hf_vision_fields(vision_cfg, vision_src.pixel_stats(), vision) if vision_cfg else None,
      dims.pop())

  m = config.model
  params = {}
  if text_src is not None:
    params['text_tower'] = _hf_text_params(text_src.reader, m.text, m.embed_dim)
  if vision_src is not None:
    params['vision_tower'] = _hf_vision_params(vision_src.reader, m.vision, m.embed_dim)
  params['logit_scale'] = _hf_logit_scale(text_src, vision_src)
  for src in {id(s): s for s in (text_src, vision_src) if s is not None}.values():
    both = src is text_src and src is vision_src
    src.reader.check_all_used(_hf_ignored(None if both else
                                          ('text' if src is text_src else 'vision')))
  return config, _checked(config, params)


def _hf_logit_scale(*sources) -> np.ndarray:
  for src in sources:
    if src is not None and src.kind == 'clip':
      return src.reader.take('logit_scale', ())
  return np.asarray(np.log(1 / 0.07), np.float32)


def _checked(config: ml_collections.ConfigDict, params: dict) -> dict:
  """`params` as float32 numpy, after checking names and shapes against the model's init."""
  import jax  # pylint: disable=g-import-not-at-top
  from unclip_jax import stages  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import clip as clip_stage  # pylint: disable=g-import-not-at-top
  stage = clip_stage.Stage(config)
  expected = jax.eval_shape(lambda: stages.init_params(stage, jax.random.PRNGKey(0)))
  params = as_float32(params)
  check_params(params, expected, what='converted CLIP')
  return params


# --- open_clip / OpenAI ------------------------------------------------------------------------

# open_clip model-config fields whose non-default values change the architecture beyond ours.
_OPEN_CLIP_UNSUPPORTED = {
    'vision_cfg': dict(ls_init_value=None, attentional_pool=False, no_ln_pre=False,
                       final_ln_after_pool=False, pool_type='tok', pos_embed_type='learnable',
                       timm_model_name=None, qk_norm=False, scaled_cosine_attn=False,
                       scale_heads=False, scale_attn_inner=False, scale_attn=False,
                       scale_fc=False, patch_dropout=0.0),
    'text_cfg': dict(ls_init_value=None, embed_cls=False, no_causal_mask=False,
                     final_ln_after_pool=False, proj_bias=False, proj_type='linear',
                     hf_model_name=None, qk_norm=False, scaled_cosine_attn=False,
                     scale_heads=False, scale_attn_inner=False, scale_attn=False,
                     scale_fc=False),
}


def _read_model_config(path: str, model_config) -> dict:
  """open_clip's model config as a dict: given, read from a JSON file, or the
  open_clip_config.json beside the weights; {} when there is none (sizes are inferred)."""
  if isinstance(model_config, str):
    if not os.path.isfile(model_config):
      raise ConversionError(f'model config {model_config} does not exist')
    with open(model_config, encoding='utf-8') as f:
      model_config = json.load(f)
  if model_config is None:
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    beside = os.path.join(folder, 'open_clip_config.json')
    if not os.path.isfile(beside):
      return {}
    with open(beside, encoding='utf-8') as f:
      model_config = json.load(f)
  return dict(model_config)


def _check_supported(cfg: dict):
  for part, fields in _OPEN_CLIP_UNSUPPORTED.items():
    for key, default in fields.items():
      value = (cfg.get(part) or {}).get(key, default)
      if value != default and not (key == 'patch_dropout' and not value):
        raise ConversionError(f'open_clip model config {part}.{key}={value!r} is not supported '
                              '(only the standard OpenAI CLIP ViT architecture is)')
  if isinstance((cfg.get('vision_cfg') or {}).get('layers'), (list, tuple)):
    raise ConversionError('open_clip model config vision_cfg.layers is a list: a ResNet image '
                          'tower, which is not supported (only ViTs are)')


def _count_blocks(state: dict, prefix: str) -> int:
  return len({k[len(prefix):].split('.')[0] for k in state if k.startswith(prefix)})


def _open_clip_fields(state: dict, cfg: dict, t: str):
  """(text fields, vision fields, embed_dim, pixel stats) from the model config, falling back
  to what the tensor shapes say (OpenAI's build_model: heads = width // 64, QuickGELU). The MLP
  size always comes from the tensors (open_clip's int(width * mlp_ratio))."""
  _check_supported(cfg)
  inferred = not cfg
  vc, tc = dict(cfg.get('vision_cfg') or {}), dict(cfg.get('text_cfg') or {})
  conv = _need(state, 'visual.conv1.weight')
  v_width, patch = conv.shape[0], conv.shape[-1]
  grid = round((_need(state, 'visual.positional_embedding').shape[0] - 1) ** 0.5)
  t_width = _need(state, t + 'ln_final.weight').shape[0]
  vocab = _need(state, t + 'token_embedding.weight').shape[0]
  ctx = _need(state, t + 'positional_embedding').shape[0]
  act = 'quick_gelu' if inferred or cfg.get('quick_gelu', False) else 'gelu'
  norm_eps = lambda c: float((c.get('norm_kwargs') or {}).get('eps', 1e-5))
  pool = tc.get('pool_type', 'argmax')
  if pool not in ('argmax', 'eos'):
    raise ConversionError(f'open_clip model config text_cfg.pool_type={pool!r} is not supported '
                          "('argmax' or 'eos')")
  text = dict(vocab_size=tc.get('vocab_size', vocab), context_length=tc.get('context_length', ctx),
              width=tc.get('width', t_width), depth=tc.get('layers', _count_blocks(
                  state, t + 'transformer.resblocks.')),
              num_heads=_heads(t_width, t_width // 64 if inferred else tc.get('heads', 8),
                               'text tower'),
              mlp_ratio=_mlp_from_state(state, t + 'transformer.resblocks.0.mlp.c_fc.weight',
                                        t_width),
              eot_id=tc.get('eos_id', 2) if pool == 'eos' else tc.get('vocab_size', vocab) - 1,
              pool='eot' if pool == 'eos' else 'argmax', activation=act,
              layer_norm_eps=norm_eps(tc), remat=False)
  vision = dict(image_size=_square(vc.get('image_size', grid * patch), 'image_size'),
                patch_size=_square(vc.get('patch_size', patch), 'patch_size'),
                width=vc.get('width', v_width),
                depth=vc.get('layers', _count_blocks(state, 'visual.transformer.resblocks.')),
                num_heads=_heads(v_width, v_width // vc.get('head_width', 64), 'image tower'),
                mlp_ratio=_mlp_from_state(
                    state, 'visual.transformer.resblocks.0.mlp.c_fc.weight', v_width),
                activation=act, layer_norm_eps=norm_eps(vc), remat=False)
  embed_dim = cfg.get('embed_dim', _need(state, t + 'text_projection').shape[-1])
  return text, vision, embed_dim, _open_clip_pixel_stats(cfg)


def _open_clip_pixel_stats(cfg: dict):
  pre = cfg.get('preprocess_cfg') or {}
  vc = cfg.get('vision_cfg') or {}
  mean = pre.get('mean', vc.get('image_mean', OPENAI_PIXEL_MEAN))
  std = pre.get('std', vc.get('image_std', OPENAI_PIXEL_STD))
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _need(state: dict, name: str) -> np.ndarray:
  if name not in state:
    raise ConversionError(f'tensor {name!r} is missing: not an open_clip / OpenAI CLIP ViT state '
                          'dict (ResNet towers and custom text towers are not supported)')
  return state[name]


def _mlp_from_state(state: dict, name: str, width: int) -> float:
  return mlp_ratio(_need(state, name).shape[0], width)


def _open_clip_text_params(r: Reader, t: str, text: ml_collections.ConfigDict, embed_dim: int):
  return {
      'token_embedding': {'embedding': r.take(t + 'token_embedding.weight',
                                              (text.vocab_size, text.width))},
      'positional_embedding': r.take(t + 'positional_embedding',
                                     (text.context_length, text.width)),
      'transformer': _blocks(_open_clip_block, r, t + 'transformer.resblocks.', text),
      'ln_final': _norm(r, t + 'ln_final', text.width),
      'projection': {'kernel': r.take(t + 'text_projection', (text.width, embed_dim))},
  }


def _open_clip_vision_params(r: Reader, vision: ml_collections.ConfigDict, embed_dim: int):
  w, patch = vision.width, vision.patch_size
  return {
      'patch_embedding': {'kernel': r.take('visual.conv1.weight', (w, 3, patch, patch)
                                           ).transpose(2, 3, 1, 0)},
      'class_embedding': r.take('visual.class_embedding', (w,)),
      'positional_embedding': r.take('visual.positional_embedding',
                                     ((vision.image_size // patch) ** 2 + 1, w)),
      'ln_pre': _norm(r, 'visual.ln_pre', w),
      'transformer': _blocks(_open_clip_block, r, 'visual.transformer.resblocks.', vision),
      'ln_post': _norm(r, 'visual.ln_post', w),
      'projection': {'kernel': r.take('visual.proj', (w, embed_dim))},
  }


def convert_open_clip(path: str, model_config: dict | str | None = None
                      ) -> tuple[ml_collections.ConfigDict, dict]:
  """An open_clip or OpenAI CLIP ViT state dict → (our CLIP stage config, float32 params).

  Args:
    path: a weights file (.pt/.pth/.bin pickles, OpenAI's TorchScript archives, .safetensors)
      or a folder holding open_clip_model.safetensors / open_clip_pytorch_model.bin.
    model_config: open_clip's model config (a dict, e.g. `open_clip.get_model_config(name)`, or
      a JSON path; an open_clip_config.json holding {'model_cfg', 'preprocess_cfg'} works too).
      None: open_clip_config.json beside the weights if there is one, else the sizes are
      inferred from the tensor shapes as OpenAI's `build_model` does (heads = width // 64,
      QuickGELU, text pooled at the largest token id).
  Returns:
    (config, params) as `convert_hf_clip`; pixel statistics from the config's preprocess_cfg or
    OpenAI's.
  Raises:
    ConversionError: missing weights, an unsupported architecture (ResNet tower, layer scale,
      attentional pooling...), wrong shapes (named), unexpected tensors.
  """
  state = load_state_dict(path)
  cfg = _read_model_config(path, model_config)
  cfg = dict(cfg.get('model_cfg', cfg), preprocess_cfg=cfg.get('preprocess_cfg'))
  cfg = {k: v for k, v in cfg.items() if v is not None}
  t = 'text.' if 'text.token_embedding.weight' in state else ''  # open_clip's custom_text
  text, vision, embed_dim, (mean, std) = _open_clip_fields(state, cfg, t)
  config = _clip_config(text, dict(vision, pixel_mean=mean, pixel_std=std), embed_dim)
  m = config.model
  r = Reader(state, what=path)
  params = {'text_tower': _open_clip_text_params(r, t, m.text, embed_dim),
            'vision_tower': _open_clip_vision_params(r, m.vision, embed_dim),
            'logit_scale': r.take('logit_scale', ()) if 'logit_scale' in r else
                           np.asarray(np.log(1 / 0.07), np.float32)}
  # OpenAI's archives carry these sizes as tensors; open_clip may keep a causal-mask buffer.
  r.check_all_used(lambda k: k in ('input_resolution', 'context_length', 'vocab_size')
                   or k.endswith('attn_mask'))
  return config, _checked(config, params)


# --- export --------------------------------------------------------------------------------------

def _tokenizer_files(src: str) -> list[str]:
  """The tokenizer files of `src`: a tokenizer file itself (with its known siblings), or the
  known files of a folder or of its tokenizer/ subfolder."""
  if os.path.isfile(src):
    folder = os.path.dirname(src)
    siblings = [os.path.join(folder, n) for n in TOKENIZER_FILES
                if os.path.isfile(os.path.join(folder, n))]
    return siblings if os.path.basename(src) in TOKENIZER_FILES else []
  for folder in (src, os.path.join(src, 'tokenizer')):
    found = [os.path.join(folder, n) for n in TOKENIZER_FILES
             if os.path.isfile(os.path.join(folder, n))]
    if found:
      return found
  return []


def save_converted_clip(dst: str, config: ml_collections.ConfigDict, params,
                        tokenizer_src: str | None):
  """Writes a converted CLIP export to `dst` that `stages.clip.load_frozen(dst)` loads.

  The tokenizer files of `tokenizer_src` (a tokenizer file, a folder, or a folder with a
  tokenizer/ subfolder: vocab.json, merges.txt, tokenizer.json, special_tokens_map.json,
  tokenizer_config.json, bpe_simple_vocab_16e6.txt.gz, whichever exist) are copied to
  `dst/tokenizer/` and the saved config names them by the relative path 'tokenizer', so the
  export can be moved. The tokenizer is checked against the text tower (end token, vocabulary
  size) first. Without tokenizer files (e.g. a bare .pt) the config keeps no tokenizer path and
  a warning says so. `config` itself is not changed.
  """
  from unclip_jax.stages import clip as clip_stage  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  files = []
  if tokenizer_src is not None:
    if not os.path.exists(tokenizer_src):
      raise ConversionError(f'tokenizer source {tokenizer_src} does not exist')
    files = _tokenizer_files(tokenizer_src)
    if not files:
      logging.warning('no tokenizer files (%s) in %s: the export has no tokenizer; set '
                      'config.tokenizer.path before encoding text', ', '.join(TOKENIZER_FILES),
                      tokenizer_src)
  config.tokenizer.kind = 'clip_bpe'
  if config.model.text is not None:
    config.tokenizer.context_length = config.model.text.context_length
  tokenizer_dir = os.path.join(dst, 'tokenizer')
  if files:
    _check_tokenizer(files, config)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    os.makedirs(tokenizer_dir)
    for f in files:
      shutil.copy2(f, tokenizer_dir)
    config.tokenizer.path = 'tokenizer'
  clip_stage.save_frozen(dst, params, config)


def _check_tokenizer(files: list[str], config: ml_collections.ConfigDict):
  from unclip_jax.data.tokenizers import ClipTokenizer  # pylint: disable=g-import-not-at-top
  try:
    tok = ClipTokenizer.from_file(os.path.dirname(files[0]),
                                  context_length=config.tokenizer.context_length)
  except (ValueError, FileNotFoundError) as e:
    raise ConversionError(f'the tokenizer files {files} are not usable: {e}') from e
  text = config.model.text
  if text is None:
    return
  if tok.eot_id != text.eot_id:
    raise ConversionError(f'the tokenizer ends text with id {tok.eot_id}; the text tower pools '
                          f'at {text.eot_id} (model.text.eot_id)')
  if tok.vocab_size > text.vocab_size:
    raise ConversionError(f'the tokenizer has {tok.vocab_size} tokens; the text tower embeds '
                          f'only {text.vocab_size}')
