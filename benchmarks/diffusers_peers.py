"""PyTorch peers of our diffusion stages, built at exactly our configs' architectures.

Each stage config maps to the diffusers modules karlo is made of (`PriorTransformer`,
`UnCLIPTextProjModel` + `UNet2DConditionModel`, `UNet2DModel`) and that mapping is checked by
mapping back through unclip_jax.convert's own config reading (`check_round_trip`): the converters'
weight mapping, tested for parity in tests/convert, then guarantees that both compute the same
function. A config with an option diffusers has no counterpart for (patchified U-Nets, the
CLIP map, a learned null caption, ...) is refused by `NoPeer`, naming the field.

The CLIP-conditioned stages run their frozen CLIP inside the train step (text tower for the
caption, image tower for the image embedding); the peers do the same with transformers'
`CLIPModel` at the CLIP config's sizes, without gradients.
"""

from __future__ import annotations

from typing import Any

import ml_collections


class NoPeer(ValueError):
  """The config uses something the diffusers modules do not compute."""


# Our decoder's options that karlo's diffusers decoder has built in (what the karlo converter
# sets on a converted decoder): a peer exists only with these values.
KARLO_DECODER_OPTIONS = {
    'model.caption_encoder': 'clip', 'model.text_emb_to_time': True,
    'model.caption_norm': True, 'model.clip_emb_scale': 1.0,
    'model.null_caption': 'empty_prompt', 'model.clip_map_size': 0,
    'model.unet.patch_size': 1, 'model.unet.coord_channels': False, 'model.unet.dropout': 0.0,
    'model.unet.resblock_updown': True,
}
KARLO_PRIOR_OPTIONS = {'model.mlp_ratio': 4.0, 'model.activation': 'gelu',
                       'model.null_caption': 'empty_prompt', 'prior.normalization': 'stats'}
UPSAMPLER_OPTIONS = {'model.unet.patch_size': 1, 'model.unet.coord_channels': False,
                     'model.unet.dropout': 0.0}


def _get(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    node = node.get(part) if hasattr(node, 'get') else None
  return node


def _matches(got, value) -> bool:
  """A field a config lacks (None) has its off value: False, 0."""
  return got == value or (got is None and value in (False, 0))


def align(config: ml_collections.ConfigDict, options: dict[str, Any]) -> dict[str, Any]:
  """Sets `options` on `config` (our side of a peer comparison); returns the fields changed,
  {field: (before, after)}, for the benchmark's report."""
  changed = {}
  for dotted, value in options.items():
    before = _get(config, dotted)
    if not _matches(before, value):
      *path, name = dotted.split('.')
      node = config
      for part in path:
        node = node[part]
      with node.unlocked() if hasattr(node, 'unlocked') else _nothing():
        node[name] = value
      changed[dotted] = (before, value)
  return changed


class _nothing:  # pylint: disable=invalid-name
  def __enter__(self):
    return self

  def __exit__(self, *args):
    return False


def _require(config, options: dict[str, Any], what: str):
  for dotted, value in options.items():
    got = _get(config, dotted)
    if not _matches(got, value):
      raise NoPeer(f'{what}: config.{dotted} is {got!r}; diffusers\' modules compute '
                   f'{value!r} (pass --align_to_peer to set it)')


# --- U-Nets -------------------------------------------------------------------------------------

def unet_config(unet: ml_collections.ConfigDict, *, resolution: int, in_channels: int,
                out_channels: int, context_dim: int | None) -> dict[str, Any]:
  """A diffusers UNet2DConditionModel (`context_dim` set) or UNet2DModel config for our UNet."""
  levels = len(unet.channel_mult)
  attends = [2 ** l in tuple(unet.attention_resolutions) for l in range(levels)]
  updown = bool(unet.resblock_updown)
  if context_dim is not None and any(attends) and not updown:
    raise NoPeer('model.unet.resblock_updown: diffusers\' cross-attention blocks resample with '
                 'ResBlocks; set it True')
  down, up = [], []
  for attend in attends:
    if attend:
      down.append('SimpleCrossAttnDownBlock2D' if context_dim else 'AttnDownBlock2D')
      up.append('SimpleCrossAttnUpBlock2D' if context_dim else 'AttnUpBlock2D')
    else:
      down.append('ResnetDownsampleBlock2D' if updown else 'DownBlock2D')
      up.append('ResnetUpsampleBlock2D' if updown else 'UpBlock2D')
  cfg = dict(sample_size=resolution, in_channels=in_channels, out_channels=out_channels,
             block_out_channels=tuple(unet.model_channels * m for m in unet.channel_mult),
             layers_per_block=unet.num_res_blocks, down_block_types=tuple(down),
             up_block_types=tuple(reversed(up)), norm_num_groups=unet.norm_groups,
             resnet_time_scale_shift='scale_shift' if unet.use_scale_shift_norm else 'default',
             attention_head_dim=unet.num_head_channels)
  if context_dim is not None:
    cfg.update(mid_block_type='UNetMidBlock2DSimpleCrossAttn' if any(attends) else None,
               cross_attention_dim=context_dim, class_embed_type='identity')
  else:
    cfg.update(add_attention=any(attends), attn_norm_num_groups=unet.norm_groups,
               downsample_type='resnet' if updown else 'conv',
               upsample_type='resnet' if updown else 'conv')
  return cfg


def decoder_configs(config: ml_collections.ConfigDict, clip_config: ml_collections.ConfigDict
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(UNet2DConditionModel config, UnCLIPTextProjModel kwargs) for our decoder config."""
  _require(config, KARLO_DECODER_OPTIONS, 'decoder')
  d = clip_config.model.embed_dim
  if clip_config.model.text.width != d:
    raise NoPeer(f'clip: karlo\'s text_proj reads caption states of the embedding width ({d}); '
                 f'the CLIP\'s text width is {clip_config.model.text.width}')
  unet = config.model.unet
  out = 6 if config.diffusion.var_type == 'learned_range' else 3
  cfg = unet_config(unet, resolution=config.data.resolution, in_channels=3, out_channels=out,
                    context_dim=config.model.context_width)
  text_proj = dict(clip_extra_context_tokens=config.model.num_clip_tokens,
                   clip_embeddings_dim=d, time_embed_dim=4 * unet.model_channels,
                   cross_attention_dim=config.model.context_width)
  return cfg, text_proj


def upsampler_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """UNet2DModel config for our upsampler config (karlo's super-resolution U-Net)."""
  _require(config, UPSAMPLER_OPTIONS, 'upsampler')
  out = 6 if config.diffusion.var_type == 'learned_range' else 3
  return unet_config(config.model.unet, resolution=config.data.resolution, in_channels=6,
                     out_channels=out, context_dim=None)


def prior_config(config: ml_collections.ConfigDict, clip_config: ml_collections.ConfigDict
                 ) -> dict[str, Any]:
  """PriorTransformer kwargs for our prior config on `clip_config`'s CLIP."""
  _require(config, KARLO_PRIOR_OPTIONS, 'prior')
  m, c = config.model, clip_config.model
  if c.text.width != c.embed_dim:
    raise NoPeer(f'clip: PriorTransformer reads caption states of the embedding width '
                 f'({c.embed_dim}); the CLIP\'s text width is {c.text.width}')
  if m.width % m.num_heads:
    raise NoPeer(f'model.width {m.width} is not a multiple of model.num_heads {m.num_heads}')
  return dict(num_attention_heads=m.num_heads, attention_head_dim=m.width // m.num_heads,
              num_layers=m.depth, embedding_dim=c.embed_dim,
              num_embeddings=c.text.context_length, additional_embeddings=4)


def check_round_trip(stage: str, config, peer: Any, clip_config=None):
  """Maps the peer's diffusers config back through unclip_jax.convert and requires our config's
  architecture fields again (else AssertionError naming the field)."""
  from unclip_jax.convert import diffusers_prior  # pylint: disable=g-import-not-at-top
  from unclip_jax.convert import diffusers_unet  # pylint: disable=g-import-not-at-top
  if stage == 'prior':
    sizes = diffusers_prior.prior_sizes(peer, 'peer')
    ours = {'width': config.model.width, 'num_heads': config.model.num_heads,
            'depth': config.model.depth, 'embed_dim': clip_config.model.embed_dim,
            'num_tokens': clip_config.model.text.context_length}
    _same(ours, sizes, 'prior')
    return
  unet_cfg = peer[0] if stage == 'decoder' else peer
  back = diffusers_unet.unet_kwargs(unet_cfg)
  unet = config.model.unet
  ours = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in unet.items()
          if k in back and k not in ('out_channels', 'context_dim')}
  if not unet.attention_resolutions:
    ours.pop('num_head_channels', None)
  back = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in back.items()
          if k in ours}
  _same(ours, back, stage)
  if stage == 'decoder':
    _same({'context_dim': config.model.context_width},
          {'context_dim': diffusers_unet.unet_kwargs(unet_cfg)['context_dim']}, stage)


def _same(ours: dict, theirs: dict, what: str):
  differ = {k: (ours[k], theirs.get(k)) for k in ours if ours[k] != theirs.get(k)}
  assert not differ, f'{what}: the peer does not map back to our config: {differ}'


# --- modules ------------------------------------------------------------------------------------

def build(stage: str, config, clip_config=None):
  """{name: torch module} of the stage's trainable peer (random init)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  if stage == 'prior':
    return {'prior': diffusers.PriorTransformer(**prior_config(config, clip_config))}
  if stage == 'decoder':
    from diffusers.pipelines.deprecated.unclip import UnCLIPTextProjModel  # pylint: disable=g-import-not-at-top
    unet_cfg, text_proj = decoder_configs(config, clip_config)
    return {'text_proj': UnCLIPTextProjModel(**text_proj),
            'unet': diffusers.UNet2DConditionModel(**unet_cfg)}
  if stage == 'upsampler':
    return {'unet': diffusers.UNet2DModel(**upsampler_config(config))}
  raise NoPeer(f'stage {stage!r} has no diffusers peer (the CLIP\'s is transformers\')')


def peer_configs(stage: str, config, clip_config=None):
  if stage == 'prior':
    return prior_config(config, clip_config)
  if stage == 'decoder':
    return decoder_configs(config, clip_config)
  return upsampler_config(config)


def count(modules: dict) -> int:
  return sum(p.numel() for m in modules.values() for p in m.parameters())


# --- a karlo-shaped UnCLIPPipeline --------------------------------------------------------------

# Sizes of the karlo-shaped pipelines: 'karlo' is kakaobrain's karlo-v1-alpha (the configs of
# diffusers' conversion script: a 1.0B prior, an 885M decoder at 64px, two 730M 64→256
# super-resolution U-Nets, CLIP ViT-L/14's text tower); 'reduced' keeps every block type and
# option at widths a 2-core CPU samples in seconds; 'smoke' is the smallest that runs.
KARLO_SIZES = {
    'karlo': dict(clip_dim=768, text_layers=12, text_heads=12, context=77, prior_heads=32,
                  prior_head_dim=64, prior_layers=20, decoder_res=64,
                  decoder_channels=(320, 640, 960, 1280), decoder_layers=3, head_dim=64,
                  cross_dim=1536, super_res=256, super_res_channels=(320, 640, 960, 1280),
                  super_res_layers=3, groups=32),
    'reduced': dict(clip_dim=64, text_layers=2, text_heads=4, context=77, prior_heads=4,
                    prior_head_dim=32, prior_layers=4, decoder_res=32,
                    decoder_channels=(32, 64, 96, 128), decoder_layers=2, head_dim=32,
                    cross_dim=128, super_res=128, super_res_channels=(32, 64, 96, 128),
                    super_res_layers=2, groups=16),
    'smoke': dict(clip_dim=32, text_layers=1, text_heads=2, context=16, prior_heads=2,
                  prior_head_dim=16, prior_layers=1, decoder_res=16, decoder_channels=(16, 32),
                  decoder_layers=1, head_dim=16, cross_dim=32, super_res=32,
                  super_res_channels=(16, 32), super_res_layers=1, groups=8),
}


def _tokenizer():
  """(vocab, merges) of a small CLIP BPE vocabulary: byte tokens, a few merges, the start and
  end tokens. The pipelines only need token ids, and nothing is downloaded."""
  from unclip_jax.data.tokenizers import bytes_to_unicode  # pylint: disable=g-import-not-at-top
  merges = [('t', 'h'), ('th', 'e</w>'), ('c', 'a'), ('ca', 't</w>'), ('o', 'f</w>')]
  chars = list(bytes_to_unicode().values())
  tokens = chars + [c + '</w>' for c in chars] + [a + b for a, b in merges]
  tokens += ['<|startoftext|>', '<|endoftext|>']
  return {t: i for i, t in enumerate(tokens)}, merges


def karlo_pipeline(size: str):
  """A diffusers UnCLIPPipeline of karlo's architecture at `size` (KARLO_SIZES), random weights
  (perturbed so that no layer is zero; at karlo's size as initialised, in float16), schedulers
  as karlo's."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from diffusers.pipelines.deprecated.unclip import UnCLIPTextProjModel  # pylint: disable=g-import-not-at-top
  s = KARLO_SIZES[size]
  vocab, merges = _tokenizer()
  torch.manual_seed(0)
  d = s['clip_dim']
  text_encoder = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=49408 if size == 'karlo' else len(vocab), hidden_size=d,
      intermediate_size=4 * d, num_hidden_layers=s['text_layers'],
      num_attention_heads=s['text_heads'], max_position_embeddings=s['context'],
      projection_dim=d, bos_token_id=vocab['<|startoftext|>'],
      eos_token_id=vocab['<|endoftext|>'], pad_token_id=vocab['<|endoftext|>']))
  tokenizer = transformers.CLIPTokenizer(vocab=dict(vocab), merges=list(merges),
                                         model_max_length=s['context'])
  prior = diffusers.PriorTransformer(
      num_attention_heads=s['prior_heads'], attention_head_dim=s['prior_head_dim'],
      num_layers=s['prior_layers'], embedding_dim=d, num_embeddings=s['context'],
      additional_embeddings=4)
  levels = len(s['decoder_channels'])
  text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=d,
                                  time_embed_dim=4 * s['decoder_channels'][0],
                                  cross_attention_dim=s['cross_dim'])
  decoder = diffusers.UNet2DConditionModel(
      sample_size=s['decoder_res'], in_channels=3, out_channels=6,
      block_out_channels=s['decoder_channels'], layers_per_block=s['decoder_layers'],
      norm_num_groups=s['groups'],
      down_block_types=('ResnetDownsampleBlock2D',) + ('SimpleCrossAttnDownBlock2D',) * (
          levels - 1),
      mid_block_type='UNetMidBlock2DSimpleCrossAttn',
      up_block_types=('SimpleCrossAttnUpBlock2D',) * (levels - 1) + ('ResnetUpsampleBlock2D',),
      attention_head_dim=s['head_dim'], cross_attention_dim=s['cross_dim'],
      class_embed_type='identity', resnet_time_scale_shift='scale_shift')
  super_res = [diffusers.UNet2DModel(
      sample_size=s['super_res'], in_channels=6, out_channels=3,
      block_out_channels=s['super_res_channels'], layers_per_block=s['super_res_layers'],
      norm_num_groups=s['groups'],
      down_block_types=('ResnetDownsampleBlock2D',) * len(s['super_res_channels']),
      up_block_types=('ResnetUpsampleBlock2D',) * len(s['super_res_channels']),
      add_attention=False) for _ in range(2)]
  modules = [text_encoder, prior, text_proj, decoder, *super_res]
  if size == 'karlo':
    # ~3.5B parameters: saved in float16 (half the bytes to write and convert), not perturbed
    # (timing needs no parity).
    for module in modules:
      module.half()
  else:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
      for module in modules:
        for p in module.parameters():
          p.add_(0.02 * torch.randn(p.shape, generator=gen))
  return diffusers.UnCLIPPipeline(
      prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tokenizer,
      text_proj=text_proj, super_res_first=super_res[0], super_res_last=super_res[1],
      prior_scheduler=diffusers.UnCLIPScheduler(variance_type='fixed_small_log',
                                                prediction_type='sample', clip_sample_range=5.0),
      decoder_scheduler=diffusers.UnCLIPScheduler(variance_type='learned_range',
                                                  prediction_type='epsilon'),
      super_res_scheduler=diffusers.UnCLIPScheduler(variance_type='fixed_small_log',
                                                    prediction_type='epsilon'))
