"""kakaobrain's karlo prior (diffusers `PriorTransformer`) → our DiffusionPrior, and diffusers'
`UnCLIPScheduler` settings → our diffusion / sampling config fields.

The two transformers compute the same function (parity to ~1e-6 relative in float32, see
tests/convert/test_convert_prior.py):
  * sequence [caption encodings, text embedding, time, noised x, final query ("prd" token)] plus a
    [L + 4, width] positional embedding; pre-LayerNorm blocks (eps 1e-5) with biased attention
    and an exact-GELU MLP of 4·width; a final LayerNorm; the output read at the last token;
  * the timestep sinusoid [cos, sin] with frequencies exp(-ln(1e4)·i/half)
    (diffusers' flip_sin_to_cos=True, downscale_freq_shift=0), then Linear → SiLU → Linear;
  * a causal mask plus a key mask over padded caption tokens. diffusers adds -10000 to masked
    logits, we exclude them: equal in float32 whenever a query row keeps one visible key, which
    holds for every row of a real caption (its first token, BOS, is never padding). diffusers
    applies NO mask, not even the causal one, when `attention_mask` is None; karlo always
    passes one, and our model is always causal.
Layout differences the converter handles: separate to_q/to_k/to_v become our fused
[width, 3, heads, head_dim] kernel; torch Linear [out, in] becomes Dense [in, out].

karlo has no learned null caption: its unconditional branch is the empty prompt's CLIP
encodings and mask. Converted configs set `model.null_caption = 'empty_prompt'`, and our (then
unused) `null_text_emb` / `null_token_encodings` params are filled with zeros.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax.convert import base_config
from unclip_jax.convert.torch_io import (ConversionError, Reader, as_float32, check_params,
                                         load_state_dict, read_json)
from unclip_jax.models.prior import DiffusionPrior

# PriorTransformer config fields whose value changes the architecture: the values we implement.
_SUPPORTED = {
    'additional_embeddings': (4,),
    'norm_in_type': (None,),
    'embedding_proj_norm_type': (None,),
    'encoder_hid_proj_type': ('linear',),
    'added_emb_type': ('prd',),
    'time_embed_act_fn': ('silu',),
}


def _refuse(path: str, field: str, value: Any, supported: Any):
  raise ConversionError(f'{path}: {field}={value!r} is not supported (supported: {supported})')


def read_prior_config(folder: str) -> dict[str, int]:
  """Sizes of a diffusers PriorTransformer folder's config.json, refusing unsupported layouts.

  Returns:
    {'width', 'num_heads', 'depth', 'embed_dim', 'num_tokens'}: transformer width
    (num_attention_heads × attention_head_dim), heads, layers, CLIP embedding size (also the
    caption encodings' width) and caption length.
  """
  if not os.path.isdir(folder):
    raise ConversionError(f'{folder} is not a folder (expected a diffusers PriorTransformer '
                          'folder with config.json and its weights)')
  return prior_sizes(read_json(folder), os.path.join(folder, 'config.json'))


def prior_sizes(cfg: dict[str, Any], path: str) -> dict[str, int]:
  """`read_prior_config` for a PriorTransformer config dict (`path` names it in errors)."""
  if cfg.get('_class_name', 'PriorTransformer') != 'PriorTransformer':
    raise ConversionError(f"{path}: _class_name={cfg['_class_name']!r}, expected "
                          "'PriorTransformer'")
  defaults = {'additional_embeddings': 4, 'encoder_hid_proj_type': 'linear',
              'added_emb_type': 'prd', 'time_embed_act_fn': 'silu'}
  for field, allowed in _SUPPORTED.items():
    value = cfg.get(field, defaults.get(field))
    if value not in allowed:
      _refuse(path, field, value, allowed)
  heads = int(cfg.get('num_attention_heads', 32))
  width = heads * int(cfg.get('attention_head_dim', 64))
  embed_dim = int(cfg.get('embedding_dim', 768))
  for field, want in (('time_embed_dim', width), ('embedding_proj_dim', embed_dim),
                      ('clip_embed_dim', embed_dim)):
    if cfg.get(field) not in (None, want):
      _refuse(path, field, cfg[field], f'None or {want}')
  return {'width': width, 'num_heads': heads, 'depth': int(cfg.get('num_layers', 20)),
          'embed_dim': embed_dim, 'num_tokens': int(cfg.get('num_embeddings', 77))}


def _check_clip(clip_config: ml_collections.ConfigDict, sizes: dict[str, int]):
  """The CLIP stage config must give the embedding size and caption shape the prior was made for."""
  m = clip_config.model
  for field, got, want in (('model.embed_dim', m.embed_dim, sizes['embed_dim']),
                           ('model.text.width', m.text.width, sizes['embed_dim']),
                           ('model.text.context_length', m.text.context_length,
                            sizes['num_tokens'])):
    if int(got) != want:
      raise ConversionError(f'clip config {field} is {got}, but the prior was made for {want}')


def prior_model(config: ml_collections.ConfigDict, sizes: dict[str, int],
                dtype=jnp.float32) -> DiffusionPrior:
  """Our DiffusionPrior for a prior stage `config` and the CLIP `sizes` of `read_prior_config`."""
  m, p = config.model, config.prior
  return DiffusionPrior(
      embed_dim=sizes['embed_dim'], text_width=sizes['embed_dim'],
      num_tokens=sizes['num_tokens'], width=m.width, depth=m.depth, num_heads=m.num_heads,
      mlp_ratio=m.mlp_ratio, activation=m.activation, normalization=p.normalization,
      embedding_scale=p.embedding_scale, null_caption=m.null_caption, remat=m.remat, scan=m.scan,
      remat_policy=m.get('remat_policy', 'full'), dtype=dtype)


def _linear(r: Reader, name: str, n_in: int, n_out: int) -> dict[str, np.ndarray]:
  """torch Linear `name` [n_out, n_in] → Dense {'kernel' [n_in, n_out], 'bias' [n_out]}."""
  return {'kernel': r.take(name + '.weight', (n_out, n_in)).T,
          'bias': r.take(name + '.bias', (n_out,))}


def _norm(r: Reader, name: str, n: int) -> dict[str, Any]:
  """torch LayerNorm → our LayerNorm {'ln': {'scale', 'bias'}}."""
  return {'ln': {'scale': r.take(name + '.weight', (n,)), 'bias': r.take(name + '.bias', (n,))}}


def _block(r: Reader, i: int, width: int, heads: int) -> dict[str, Any]:
  """transformer_blocks.i (BasicTransformerBlock: norm1, attn1, norm3, ff) → our block_i."""
  p, hd = f'transformer_blocks.{i}.', width // heads
  qkv = [r.take(f'{p}attn1.to_{n}.weight', (width, width)).T for n in 'qkv']
  qkv_bias = [r.take(f'{p}attn1.to_{n}.bias', (width,)) for n in 'qkv']
  attn = {'qkv_kernel': np.stack(qkv, 1).reshape(width, 3, heads, hd),
          'qkv_bias': np.stack(qkv_bias).reshape(3, heads, hd),
          'out_kernel': r.take(p + 'attn1.to_out.0.weight', (width, width)).T.reshape(
              heads, hd, width),
          'out_bias': r.take(p + 'attn1.to_out.0.bias', (width,))}
  mlp = {'fc': _linear(r, p + 'ff.net.0.proj', width, 4 * width),
         'proj': _linear(r, p + 'ff.net.2', 4 * width, width)}
  return {'ln_1': _norm(r, p + 'norm1', width), 'attn': attn,
          'ln_2': _norm(r, p + 'norm3', width), 'mlp': mlp}


def _params(r: Reader, sizes: dict[str, int], scan: bool) -> dict[str, Any]:
  """The state dict in `r` → our DiffusionPrior params (numpy float32)."""
  w, d, length = sizes['width'], sizes['embed_dim'], sizes['num_tokens']
  blocks = [_block(r, i, w, sizes['num_heads']) for i in range(sizes['depth'])]
  if scan:  # nn.scan's layout: one 'block' with parameters stacked on a leading layers axis
    transformer = {'block': jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
  else:
    transformer = {f'block_{i}': b for i, b in enumerate(blocks)}
  return as_float32({
      'clip_mean': r.take('clip_mean', (1, d))[0],
      'clip_std': r.take('clip_std', (1, d))[0],
      'token_proj': _linear(r, 'encoder_hidden_states_proj', d, w),
      'text_emb_proj': _linear(r, 'embedding_proj', d, w),
      'x_proj': _linear(r, 'proj_in', d, w),
      'time_fc1': _linear(r, 'time_embedding.linear_1', w, w),
      'time_fc2': _linear(r, 'time_embedding.linear_2', w, w),
      'null_text_emb': np.zeros((d,), np.float32),           # unused: null_caption='empty_prompt'
      'null_token_encodings': np.zeros((length, d), np.float32),
      'final_query': r.take('prd_embedding', (1, 1, w))[0, 0],
      'positional_embedding': r.take('positional_embedding', (1, length + 4, w))[0],
      'transformer': transformer,
      'ln_out': _norm(r, 'norm_out', w),
      'out_proj': _linear(r, 'proj_to_clip_embeddings', w, d),
  })


def convert_prior(folder: str, clip_config: ml_collections.ConfigDict | None = None
                  ) -> tuple[ml_collections.ConfigDict, dict]:
  """A diffusers PriorTransformer folder → (our prior stage config, params).

  Args:
    folder: holds config.json and diffusion_pytorch_model.safetensors (or .bin), e.g. karlo's
      `prior/` folder.
    clip_config: optional CLIP stage config (configs/clip.py) the prior is used with; its
      embedding size, text width and context length are checked against the prior. The CLIP
      itself is chosen through the returned config's `clip.*` fields (set by the caller).
  Returns:
    (config, params): `configs/prior.py:karlo` with the transformer sizes of `folder` and
    `model.null_caption='empty_prompt'`; params as numpy float32, the tree our model's init
    makes (checked). The CLIP sizes (embedding D, caption length L) are not config fields: the
    stage takes them from the CLIP.
  Raises:
    ConversionError: missing files, unsupported config values (named), tensors with wrong
      shapes (named, with both shapes), or tensors the model has no place for.
  """
  sizes = read_prior_config(folder)
  if clip_config is not None:
    _check_clip(clip_config, sizes)
  config = base_config('prior', 'karlo')
  config.model.update(width=sizes['width'], depth=sizes['depth'], num_heads=sizes['num_heads'],
                      mlp_ratio=4.0, activation='gelu', null_caption='empty_prompt')
  config.prior.normalization = 'stats'
  reader = Reader(load_state_dict(folder), f'diffusers PriorTransformer {folder}')
  params = _params(reader, sizes, scan=config.model.scan)
  reader.check_all_used()
  check_params(params, _expected_params(config, sizes), 'converted prior')
  return config, params


def _expected_params(config: ml_collections.ConfigDict, sizes: dict[str, int]):
  """Shapes of our model's params (no computation: jax.eval_shape of init)."""
  model = prior_model(config, sizes)
  d, length = sizes['embed_dim'], sizes['num_tokens']
  args = (jnp.zeros((1, d)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, d)),
          jnp.zeros((1, length, d)), jnp.ones((1, length), bool))
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)['params']


# --- UnCLIPScheduler ----------------------------------------------------------------------------

_SCHEDULER_DEFAULTS = {'num_train_timesteps': 1000, 'variance_type': 'fixed_small_log',
                       'clip_sample': True, 'clip_sample_range': 1.0,
                       'prediction_type': 'epsilon', 'beta_schedule': 'squaredcos_cap_v2'}
_SCHEDULES = {'squaredcos_cap_v2': 'cosine'}
_MEAN_TYPES = {'sample': 'x0', 'epsilon': 'eps'}
# UnCLIPScheduler's 'fixed_small_log' is the posterior variance beta~ (its standard deviation via
# exp(0.5·log)), which is our 'fixed_small'; its 'learned_range' interpolates log beta~ and
# log beta with the model's v in [-1, 1], as ours.
_VAR_TYPES = {'fixed_small_log': 'fixed_small', 'learned_range': 'learned_range'}


def scheduler_fields(folder: str, num_inference_steps: int | None = None) -> dict[str, Any]:
  """Our config fields that reproduce a diffusers UnCLIPScheduler folder's sampler.

  Args:
    folder: holds scheduler_config.json (e.g. karlo's prior_scheduler/, decoder_scheduler/,
      super_res_scheduler/).
    num_inference_steps: the step count the pipeline passes to `set_timesteps` (karlo: prior 25,
      decoder 25, super-resolution 7); it is not part of the scheduler's config. When given, the
      result holds `sampling.steps`, the respacing that keeps the same timesteps.
  Returns:
    flat {dotted field: value}: diffusion.schedule, diffusion.num_steps, diffusion.mean_type,
    diffusion.var_type, sampling.sampler ('ddpm': UnCLIPScheduler is ancestral DDPM),
    sampling.clip_range (None when clip_sample is off) and maybe sampling.steps. The prior
    config has all of them; the decoder and upsampler configs have no sampling.clip_range (their
    stages always clip to [-1, 1]).
  Raises:
    ConversionError: a missing file, another scheduler class, or a setting we do not implement.
  """
  cfg = read_json(folder, 'scheduler_config.json')
  path = os.path.join(folder, 'scheduler_config.json')
  if cfg.get('_class_name', 'UnCLIPScheduler') != 'UnCLIPScheduler':
    raise ConversionError(f"{path}: _class_name={cfg['_class_name']!r}; only UnCLIPScheduler "
                          'settings are mapped')
  for key, value in cfg.items():  # e.g. thresholding=True from another scheduler's config
    if not key.startswith('_') and key not in _SCHEDULER_DEFAULTS and value not in (None, False):
      _refuse(path, key, value, 'absent')
  s = {k: cfg.get(k, v) for k, v in _SCHEDULER_DEFAULTS.items()}
  for field, table in (('beta_schedule', _SCHEDULES), ('prediction_type', _MEAN_TYPES),
                       ('variance_type', _VAR_TYPES)):
    if s[field] not in table:
      _refuse(path, field, s[field], sorted(table))
  fields = {'diffusion.schedule': _SCHEDULES[s['beta_schedule']],
            'diffusion.num_steps': int(s['num_train_timesteps']),
            'diffusion.mean_type': _MEAN_TYPES[s['prediction_type']],
            'diffusion.var_type': _VAR_TYPES[s['variance_type']],
            'sampling.sampler': 'ddpm',
            'sampling.timesteps': 'unclip',   # a step count picks UnCLIPScheduler's timesteps
            'sampling.clip_range': float(s['clip_sample_range']) if s['clip_sample'] else None}
  if num_inference_steps is not None:
    fields['sampling.steps'] = _respacing(int(s['num_train_timesteps']), num_inference_steps)
  return fields


def _respacing(num_train_timesteps: int, n: int) -> str:
  """`sampling.steps` for UnCLIPScheduler's n timesteps (read with `sampling.timesteps='unclip'`,
  so any other count a user asks for later also gets diffusers' timesteps)."""
  if not 2 <= n <= num_train_timesteps:
    raise ConversionError(f'num_inference_steps={n}: UnCLIPScheduler needs 2 to '
                          f'{num_train_timesteps} steps')
  return str(n)