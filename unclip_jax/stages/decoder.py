"""The decoder stage: CLIP image embedding (+ caption) → image, with a GLIDE/ADM U-Net.

Training: the frozen CLIP (a constant of the step) embeds each batch image and encodes its
caption on device; the U-Net learns eps and the variance interpolation (learned-range variance,
hybrid loss) on the cosine schedule, with the CLIP embedding replaced by a learned null
embedding `clip_drop_prob` of the time and the caption dropped `text_drop_prob` of the time.

Sampling: one compiled call runs the respaced sampler with classifier-free guidance (the
conditional and unconditional halves in one batched forward pass). Image variations decode an
image's own CLIP embedding with different seeds.
"""

import functools
import os
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax.data import sources
from unclip_jax.diffusion import gaussian_diffusion
from unclip_jax.diffusion import samplers
from unclip_jax.diffusion import schedules
from unclip_jax.images import image_grid
from unclip_jax.models.decoder import UnclipDecoder
from unclip_jax.stages import clip as clip_stage
from unclip_jax.stages import export
from unclip_jax.stages import prior as prior_stage


def build_model(config, clip_config) -> UnclipDecoder:
  m = config.model
  caption_transformer = None
  if m.caption_encoder == 'transformer':
    caption_transformer = flax.core.FrozenDict(m.caption_transformer,
                               vocab_size=clip_config.model.text.vocab_size,
                               context_length=clip_config.model.text.context_length)
  out_channels = 6 if config.diffusion.var_type == 'learned_range' else 3
  unet = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in m.unet.items()}
  return UnclipDecoder(unet=flax.core.FrozenDict(unet, out_channels=out_channels),
                       clip_dim=clip_config.model.embed_dim, context_width=m.context_width,
                       num_clip_tokens=m.num_clip_tokens, caption_encoder=m.caption_encoder,
                       caption_transformer=caption_transformer,
                       clip_emb_scale=m.get('clip_emb_scale'),
                       text_emb_to_time=m.get('text_emb_to_time', False),
                       caption_norm=m.get('caption_norm', False),
                       clip_map_size=m.get('clip_map_size', 0),
                       clip_map_channels=m.get('clip_map_channels', 64),
                       dtype=clip_stage.DTYPES[config.dtype])


def build_diffusion(config) -> gaussian_diffusion.GaussianDiffusion:
  d = config.diffusion
  return gaussian_diffusion.diffusion_from_config(d.schedule, d.num_steps, mean_type=d.mean_type,
                                                  var_type=d.var_type)


class Stage:
  """See `unclip_jax.stages` for the interface."""

  def __init__(self, config: ml_collections.ConfigDict,
               clip: Optional[clip_stage.FrozenClip] = None):
    self.config = config
    self.clip = prior_stage.load_clip(config) if clip is None else clip
    if sources.source_name(config.data) == 'clip_embeddings':
      raise ValueError("config.data.source: the decoder learns to draw images, so it needs them; "
                       "'clip_embeddings' holds embeddings only (use it for the prior)")
    prior_stage.check_tokenizer_fits_data(self.clip, config)
    self.model = build_model(config, self.clip.config)
    self.diffusion = build_diffusion(config)
    self.sampling_diffusion = self.diffusion.respace(
        schedules.stage_spacing(config.sampling))
    self.learned_variance = config.diffusion.var_type == 'learned_range'
    self.normalize = config.clip.get('normalize', True)
    self.text_emb_to_time = config.model.get('text_emb_to_time', False)
    self.null_caption = config.model.get('null_caption', 'learned')
    if self.null_caption not in ('learned', 'empty_prompt'):
      raise ValueError(f"config.model.null_caption: {self.null_caption!r} is not 'learned' or "
                       "'empty_prompt'")
    self.precomputed = bool(config.data.get('embeddings_dir'))
    if self.precomputed:
      if not self.normalize:
        raise ValueError('config.data.embeddings_dir: precomputed embeddings are unit-norm, but '
                         'config.clip.normalize is False')
      from unclip_jax.data import embeddings  # pylint: disable=g-import-not-at-top
      embeddings.check(config.data.embeddings_dir, config.data, self.clip)
    self._jitted = {}
    self._null_features = None

  @property
  def tokenizer(self):
    return self.clip.tokenizer

  # --- conditioning -----------------------------------------------------------------------------

  def clip_features(self, clip_params, batch):
    """{'clip_emb' [B, D], 'caption', 'caption_mask' [B, L]}.

    'clip_emb' is the batch's precomputed 'clip_image_emb' if it has one, else the embedding of
    batch['image'] (absent if neither is).
    """
    features = {'caption_mask': self.clip.token_mask(batch['tokens'])}
    if self.config.model.caption_encoder == 'clip' or self.text_emb_to_time:
      text_emb, states = self.clip.encode_text(batch['tokens'], clip_params,
                                               normalize=self.normalize)
      if self.text_emb_to_time:
        features['text_emb'] = text_emb
    features['caption'] = (states if self.config.model.caption_encoder == 'clip'
                           else batch['tokens'])
    if 'clip_image_emb' in batch:
      features['clip_emb'] = batch['clip_image_emb']
    elif 'image' in batch:
      features['clip_emb'] = self.clip.encode_image(batch['image'], clip_params,
                                                     normalize=self.normalize)
    return jax.tree.map(jax.lax.stop_gradient, features)

  def null_features(self, clip_params):
    """The empty prompt's caption features, batch 1: the unconditional caption of a decoder
    with `model.null_caption = 'empty_prompt'` (karlo's), in place of a masked-out caption."""
    f = self.clip_features(clip_params, {'tokens': jnp.asarray(self.tokenizer(['']))})
    f.pop('clip_emb', None)
    return f

  def _null(self):
    return prior_stage.cached_null_features(self)

  def _apply(self, params, x_t, t, clip_emb, caption, drop_clip=None, drop_text=None,
             **kwargs):
    """The model on a caption dict {'caption', 'caption_mask'[, 'text_emb']}."""
    extra = {'text_emb': caption['text_emb']} if self.text_emb_to_time else {}
    return self.model.apply({'params': params}, x_t, t, clip_emb, caption['caption'],
                            caption['caption_mask'], drop_clip, drop_text, **extra, **kwargs)

  # --- training ---------------------------------------------------------------------------------

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    r = self.config.data.resolution
    length = self.clip.config.model.text.context_length
    spec = {'image': jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.float32),
            'tokens': jax.ShapeDtypeStruct((batch_size, length), jnp.int32)}
    if self.precomputed:
      spec['clip_image_emb'] = jax.ShapeDtypeStruct(
          (batch_size, self.clip.config.model.embed_dim), jnp.float32)
    return spec

  def constants(self):
    return {'clip': self.clip.params}

  def init(self, rng, batch):
    b = batch['image'].shape[0]
    f = jax.eval_shape(self.clip_features, self.clip.params, batch)
    zeros = lambda s: jnp.zeros(s.shape, s.dtype)
    caption = {k: zeros(v) for k, v in f.items() if k != 'clip_emb'}
    caption['caption_mask'] = jnp.ones((b, batch['tokens'].shape[1]), bool)
    return self.model.init(rng, batch['image'], jnp.zeros((b,), jnp.int32), zeros(f['clip_emb']),
                           caption['caption'], caption['caption_mask'],
                           **({'text_emb': caption['text_emb']} if self.text_emb_to_time else {}))

  def loss(self, params, batch, rng, constants):
    f = self.clip_features(constants['clip'], batch)
    x0 = batch['image']
    b = x0.shape[0]
    rng_t, rng_noise, rng_clip, rng_text, rng_dropout = jax.random.split(rng, 5)
    t = self.diffusion.sample_timesteps(rng_t, b)
    noise = jax.random.normal(rng_noise, x0.shape)
    x_t = self.diffusion.q_sample(x0, t, noise)
    d = self.config.decoder
    drop_clip = jax.random.bernoulli(rng_clip, d.clip_drop_prob, (b,))
    drop_text = jax.random.bernoulli(rng_text, d.text_drop_prob, (b,))
    caption = {k: v for k, v in f.items() if k != 'clip_emb'}
    if self.null_caption == 'empty_prompt':   # dropped captions become the empty prompt
      null = self.null_features(constants['clip'])
      caption = {k: prior_stage.where_rows(drop_text, null[k], v) for k, v in caption.items()}
      drop_text = None
    out = self._apply(params, x_t, self.diffusion.model_timesteps(t), f['clip_emb'], caption,
                      drop_clip, drop_text, train=True, rngs={'dropout': rng_dropout})
    gamma = self.config.diffusion.get('min_snr_gamma')
    mse_weights = None if gamma is None else self.diffusion.min_snr_weights(t, gamma)
    losses = self.diffusion.training_losses(out, x0, t, noise, mse_weights=mse_weights)
    return losses['loss'].mean(), {'mse': losses['mse'].mean(), 'vb': losses['vb'].mean()}

  def make_iterator(self, split, batch_size, *, seed, shuffle, process_index, process_count):
    from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    return input_pipeline.make_iterator(
        self.config.data, split=split, batch_size=batch_size, tokenizer=self.tokenizer,
        seed=seed, shuffle=shuffle, process_index=process_index, process_count=process_count)

  # --- sampling ---------------------------------------------------------------------------------

  def sample_fn(self, params, clip_emb, caption, caption_mask, rng, noise=None, text_emb=None,
                null=None):
    """Images [B, H, W, 3] in [-1, 1] for CLIP embeddings and captions: pure, jit-able.

    With guidance_scale != 1 the conditional and the unconditional (null CLIP embedding, no
    caption — or the empty prompt's caption for `model.null_caption = 'empty_prompt'`, which
    then needs `null=null_features(clip_params)`) halves run as one batch of 2B per step.
    `text_emb` [B, D] (the caption's CLIP text embedding) is required by decoders with
    `model.text_emb_to_time` (karlo's).
    """
    s = self.config.sampling
    b = clip_emb.shape[0]
    r = self.config.data.resolution
    cond = {'caption': caption, 'caption_mask': caption_mask}
    if self.text_emb_to_time:
      if text_emb is None:
        raise ValueError('this decoder adds the CLIP text embedding to its timestep embedding '
                         '(model.text_emb_to_time): pass text_emb')
      cond['text_emb'] = text_emb
    apply = functools.partial(self._apply, params)
    twice = lambda a: jnp.concatenate([a, a])
    drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
    if s.guidance_scale == 1.0:
      model_fn = lambda x, t: apply(x, t, clip_emb, cond)
    elif self.null_caption == 'empty_prompt':
      if null is None:
        raise ValueError('this decoder is guided by the empty prompt: pass '
                         'null=stage.null_features(clip_params)')
      both = {k: jnp.concatenate([v, jnp.broadcast_to(null[k], v.shape)]) for k, v in cond.items()}
      model_fn = samplers.classifier_free_guidance(
          lambda x2, t2: apply(x2, t2, twice(clip_emb), both, drop),
          s.guidance_scale, learned_variance=self.learned_variance)
    else:
      model_fn = samplers.classifier_free_guidance(
          lambda x2, t2: apply(x2, t2, twice(clip_emb), jax.tree.map(twice, cond), drop, drop),
          s.guidance_scale, learned_variance=self.learned_variance)
    images = samplers.sample(self.sampling_diffusion, model_fn, (b, r, r, 3), rng, s,
                             noise=noise, clip_range=s.get('clip_range', 1.0))
    return jnp.clip(images, -1.0, 1.0)

  def _compiled(self, name, fn):
    if name not in self._jitted:
      self._jitted[name] = jax.jit(fn)
    return self._jitted[name]

  def generate(self, params, clip_emb, tokens, rng, noise=None) -> jax.Array:
    """Images for CLIP image embeddings [B, D] and caption tokens [B, L] (one compiled call)."""
    f = self._compiled('features', self.clip_features)(self.clip.params, {'tokens': tokens})
    return self._compiled('sample', self.sample_fn)(params, clip_emb, f['caption'],
                                                    f['caption_mask'], rng, noise,
                                                    f.get('text_emb'), self._null())

  def variations(self, params, image: np.ndarray, num: int, rng,
                 caption: str = '') -> jax.Array:
    """`num` images decoded from one image's own CLIP embedding, with different noise.

    Args:
      image: [H, W, 3] in [-1, 1] at the decoder's resolution.
      caption: optional caption; '' conditions on the CLIP embedding alone.
    """
    batch = {'image': jnp.asarray(image)[None], 'tokens': self.tokenizer([caption])}
    f = self._compiled('features', self.clip_features)(self.clip.params, batch)
    repeat = lambda a: jnp.repeat(a, num, axis=0)
    mask = f['caption_mask']
    if not caption and self.null_caption == 'learned':
      mask = jnp.zeros_like(mask)   # no caption; an 'empty_prompt' decoder reads '' as one
    text_emb = repeat(f['text_emb']) if self.text_emb_to_time else None
    return self._compiled('sample', self.sample_fn)(
        params, repeat(f['clip_emb']), repeat(f['caption']), repeat(mask), rng, None, text_emb,
        self._null())

  # --- evaluation and sample grids --------------------------------------------------------------

  def _held_out(self, n):
    from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    return input_pipeline.load_split(self.config.data, 'test', tokenizer=self.tokenizer,
                                     max_examples=n)

  def _reconstruct(self, params, data, seed):
    """Decodes each held-out image's CLIP embedding (with its caption), in fixed-size batches:
    (images [N, R, R, 3], the embeddings decoded [N, D])."""
    e = self.config.eval
    features = self._compiled('features', self.clip_features)
    out, embeddings = [], []
    n = len(data['image'])
    keys = [k for k in ('image', 'tokens', 'clip_image_emb') if k in data]
    for i in range(0, n, e.batch_size):
      chunk = {k: prior_stage.pad_to(data[k][i:i + e.batch_size], e.batch_size) for k in keys}
      f = features(self.clip.params, chunk)
      images = self._compiled('sample', self.sample_fn)(
          params, f['clip_emb'], f['caption'], f['caption_mask'],
          jax.random.fold_in(jax.random.PRNGKey(seed), i), None, f.get('text_emb'), self._null())
      keep = min(e.batch_size, n - i)
      out.append(np.asarray(clip_stage.to_host(images))[:keep])
      embeddings.append(np.asarray(clip_stage.to_host(f['clip_emb']))[:keep])
    return np.concatenate(out), np.concatenate(embeddings)

  def evaluate(self, params, workdir: Optional[str] = None) -> dict[str, float]:
    """Held-out images' CLIP embeddings decoded, the decodings embedded again by the frozen
    CLIP: their cosine to the embedding they were decoded from, against the cosine between
    different held-out images' embeddings, and how often a decoding's nearest source embedding
    is its own (any data). On the built-in data also the samples' background colour, shape
    colour, shape, size and position read from pixels (`shape_checker`) against the source
    images', and the same read of the real images as the ceiling."""
    del workdir
    data = self._held_out(self.config.eval.num_examples)
    samples, source_emb = self._reconstruct(params, data, self.config.seed + 1)
    metrics = reconstruction_metrics(self.clip.embed_images(samples, self.config.eval.batch_size),
                                     source_emb)
    if sources.source_name(self.config.data) == 'shapes':
      from unclip_jax.data import shape_checker  # pylint: disable=g-import-not-at-top
      labels = {k: data[k] for k in ('color', 'background', 'shape', 'size', 'position')}
      metrics.update({f'samples_{k}': v for k, v in shape_checker.score(samples,
                                                                        labels).items()})
      metrics.update({f'real_{k}': v for k, v in shape_checker.score(data['image'],
                                                                     labels).items()})
    return metrics

  def sample(self, params, workdir, step):
    """{'reconstructions': one grid, held-out images in the top row, their decodings below}."""
    del workdir, step
    n = self.config.sampling.num_images
    data = self._held_out(n)
    samples, _ = self._reconstruct(params, data, self.config.seed + 2)
    pairs = np.concatenate([data['image'][:n], samples[:n]])
    return {'reconstructions': image_grid(pairs, columns=n)[None]}

  def export(self, params, workdir: str):
    export.save_export(os.path.join(workdir, 'export'), params,
                       clip_stage.with_clip_fingerprint(self.config, self.clip))


def reconstruction_metrics(decoded_emb: np.ndarray, source_emb: np.ndarray) -> dict[str, float]:
  """Decoded images' CLIP embeddings [N, D] against those they were decoded from [N, D]:
  mean cosine to their own source, mean cosine between different sources (the level a decoder
  that ignored its input would reach), and top-1 retrieval of the own source among all N."""
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  decoded, source = unit(np.asarray(decoded_emb, np.float64)), unit(np.asarray(source_emb,
                                                                               np.float64))
  similarity = decoded @ source.T
  n = len(similarity)
  off = (source @ source.T)[~np.eye(n, dtype=bool)]
  return {'reconstruction_cosine': float(np.mean(np.diag(similarity))),
          'reconstruction_cosine_other_images': float(off.mean()) if off.size else 0.0,
          'reconstruction_retrieval@1': float(np.mean(np.argmax(similarity, 1) == np.arange(n)))}


def load_decoder(path: str, clip: Optional[clip_stage.FrozenClip] = None):
  """(Stage, params) of a trained decoder (a decoder run's workdir or its export/)."""
  config, params = export.load_export(path, what='decoder')
  return Stage(config, clip=clip), params
