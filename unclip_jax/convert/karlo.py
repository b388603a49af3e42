"""kakaobrain's karlo, saved as a diffusers `UnCLIPPipeline` folder → an unclip_jax run folder.

The folder's parts become one run directory per stage, each an export (`config.json` + orbax
`params`) that `UnclipPipeline.from_run` and `unclip-sample --run` load:

  text_encoder/ + tokenizer/ (+ image_encoder/)  → clip/      (CLIP; the image tower is optional)
  prior/ + prior_scheduler/                      → prior/
  text_proj/ + decoder/ + decoder_scheduler/     → decoder/
  super_res_first/ + super_res_last/ + super_res_scheduler/ → upsampler/

The converted configs reproduce karlo's inference exactly: raw (not unit-norm) CLIP embeddings
(`clip.normalize = False`), the empty prompt as the unconditional caption
(`model.null_caption = 'empty_prompt'`), the CLIP text embedding added to the decoder's
timestep embedding, UnCLIPScheduler's timesteps, clip ranges and variances, unclipped bicubic
conditioning for super-resolution and `super_res_last` taking its last step. Sampling defaults
are karlo's: prior 25 steps at guidance 4, decoder 25 steps at guidance 8, super-resolution 7
steps; one prior sample per prompt.
"""

from __future__ import annotations

import json
import os

import ml_collections

from unclip_jax.convert import clip as clip_convert
from unclip_jax.convert import diffusers_prior
from unclip_jax.convert import diffusers_unet
from unclip_jax.convert.torch_io import ConversionError
from unclip_jax.stages import export

REQUIRED_PARTS = ('text_encoder', 'tokenizer', 'prior', 'prior_scheduler', 'text_proj',
                  'decoder', 'decoder_scheduler', 'super_res_first', 'super_res_last',
                  'super_res_scheduler')

# karlo's default sampling settings (UnCLIPPipeline.__call__).
# diffusers_guidance: no guidance when the scales are at most 1, as diffusers' pipelines.
PRIOR_SAMPLING = dict(steps='25', sampler='ddpm', guidance_scale=4.0, num_candidates=1,
                      diffusers_guidance=True)
DECODER_SAMPLING = dict(steps='25', sampler='ddpm', guidance_scale=8.0, diffusers_guidance=True)
SUPER_RES_SAMPLING = dict(steps='7', sampler='ddpm')


def check_folder(src: str):
  """Raises ConversionError unless `src` holds every part of an UnCLIPPipeline."""
  if not os.path.isdir(src):
    raise ConversionError(f'{src} is not a folder (expected a diffusers UnCLIPPipeline saved '
                          'with save_pretrained)')
  missing = [p for p in REQUIRED_PARTS if not os.path.isdir(os.path.join(src, p))]
  if missing:
    raise ConversionError(f'{src} is not a diffusers UnCLIPPipeline folder: missing '
                          f'{", ".join(missing)}')


def apply_fields(config: ml_collections.ConfigDict, fields: dict):
  """Sets dotted config fields, e.g. {'diffusion.mean_type': 'x0'}."""
  for dotted, value in fields.items():
    *path, name = dotted.split('.')
    node = config
    for part in path:
      node = node[part]
    node[name] = value


def _karlo_conditioning(config: ml_collections.ConfigDict, clip_dir: str):
  config.clip.workdir = os.path.abspath(clip_dir)
  config.clip.normalize = False
  config.model.null_caption = 'empty_prompt'
  config.dtype = 'float32'


def convert_karlo(src: str, dst: str, vision: str | None = None,
                  final_dst: str | None = None) -> dict[str, str]:
  """Writes dst/{clip,prior,decoder,upsampler}; returns {stage: its folder}.

  Args:
    src: a diffusers UnCLIPPipeline folder (karlo).
    dst: the run folder to write (its stage folders are created).
    vision: an optional CLIPVisionModelWithProjection folder for the CLIP's image tower
      (image variations and interpolations); default: src/image_encoder when present.
    final_dst: where dst will be moved once complete (the prior and decoder configs record
      the CLIP's folder); default dst.
  """
  check_folder(src)
  part = lambda name: os.path.join(src, name)
  if vision is None and os.path.isdir(part('image_encoder')):
    vision = part('image_encoder')
  out = {name: os.path.join(dst, name) for name in ('clip', 'prior', 'decoder', 'upsampler')}
  clip_dir = os.path.join(final_dst or dst, 'clip')

  clip_config, clip_params = clip_convert.convert_hf_clip(text=part('text_encoder'),
                                                          vision=vision)
  clip_convert.save_converted_clip(out['clip'], clip_config, clip_params, part('tokenizer'))

  prior_config, prior_params = diffusers_prior.convert_prior(part('prior'), clip_config)
  apply_fields(prior_config, diffusers_prior.scheduler_fields(part('prior_scheduler')))
  prior_config.sampling.update(PRIOR_SAMPLING)
  _karlo_conditioning(prior_config, clip_dir)
  if clip_config.model.get('vision'):
    prior_config.data.resolution = clip_config.model.vision.image_size
  export.save_export(os.path.join(out['prior'], 'export'), prior_params, prior_config)

  decoder_config, decoder_params = diffusers_unet.convert_decoder(
      part('decoder'), part('text_proj'), clip_config)
  apply_fields(decoder_config, diffusers_prior.scheduler_fields(part('decoder_scheduler')))
  decoder_config.sampling.update(DECODER_SAMPLING)
  _karlo_conditioning(decoder_config, clip_dir)
  export.save_export(os.path.join(out['decoder'], 'export'), decoder_params, decoder_config)

  low = decoder_config.data.resolution
  first_config, first = diffusers_unet.convert_super_res(part('super_res_first'), low)
  last_config, last = diffusers_unet.convert_super_res(part('super_res_last'), low)
  if first_config.model.to_dict() != last_config.model.to_dict():
    raise ConversionError('super_res_first and super_res_last have different architectures')
  apply_fields(first_config, diffusers_prior.scheduler_fields(part('super_res_scheduler')))
  first_config.sampling.update(SUPER_RES_SAMPLING)
  first_config.upsampler.last_step_model = True
  first_config.upsampler.clip_conditioning = False
  first_config.dtype = 'float32'
  export.save_export(os.path.join(out['upsampler'], 'export'),
                     {'all_but_last': first, 'last': last}, first_config)

  with open(os.path.join(dst, 'converted_from.json'), 'w', encoding='utf-8') as f:
    json.dump({'kind': 'karlo', 'source': os.path.abspath(src),
               'vision': os.path.abspath(vision) if vision else None}, f, indent=2)
  return out
