"""The diffusion prior stage: a frozen CLIP's text side → a CLIP image embedding.

Training: the frozen CLIP (passed to the step as a constant) embeds the batch's captions and
images on device; the image embedding is normalised, noised with the cosine schedule, and the
prior predicts it back (x0 prediction, MSE), with the caption dropped `text_drop_prob` of the time
for classifier-free guidance.

Sampling (`sample_embeddings`): one compiled call runs the respaced, guided sampler for
`num_candidates` draws per caption and keeps the draw with the larger dot product with the text
embedding (the paper's trick, §2.2).
"""

import functools
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax.data import sources
from unclip_jax.diffusion import gaussian_diffusion
from unclip_jax.diffusion import samplers
from unclip_jax.diffusion import schedules
from unclip_jax.models.prior import DiffusionPrior
from unclip_jax.stages import clip as clip_stage
from unclip_jax.stages import export

DTYPES = clip_stage.DTYPES


def load_clip(config: ml_collections.ConfigDict) -> clip_stage.FrozenClip:
  """The frozen CLIP named by `config.clip` (a trained run, or an untrained preset)."""
  if config.clip.workdir:
    return clip_stage.load_frozen(config.clip.workdir)
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  logging.warning('config.clip.workdir is not set: using an UNTRAINED CLIP (%s); fine for '
                  'compiling and benchmarking, meaningless for training', config.clip.preset)
  clip_config = config_lib.preset('clip', config.clip.preset)
  clip_config.dtype = config.dtype
  return clip_stage.random_clip(clip_config)


def build_model(config, clip_config) -> DiffusionPrior:
  m, p = config.model, config.prior
  if p.normalization not in ('stats', 'scale'):
    raise ValueError(f"config.prior.normalization: {p.normalization!r} is not 'stats' or "
                     "'scale'")
  return DiffusionPrior(embed_dim=clip_config.model.embed_dim,
                        text_width=clip_config.model.text.width,
                        num_tokens=clip_config.model.text.context_length,
                        width=m.width, depth=m.depth, num_heads=m.num_heads,
                        mlp_ratio=m.mlp_ratio, activation=m.activation, remat=m.remat,
                        remat_policy=m.get('remat_policy', 'full'), scan=m.scan,
                        normalization=p.normalization, embedding_scale=p.embedding_scale,
                        null_caption=m.get('null_caption', 'learned'),
                        dtype=DTYPES[config.dtype])


def build_diffusion(config) -> gaussian_diffusion.GaussianDiffusion:
  d = config.diffusion
  return gaussian_diffusion.diffusion_from_config(d.schedule, d.num_steps, mean_type=d.mean_type,
                                                  var_type=d.var_type, loss_type='mse')


class Stage:
  """See `unclip_jax.stages` for the interface."""

  def __init__(self, config: ml_collections.ConfigDict,
               clip: Optional[clip_stage.FrozenClip] = None):
    self.config = config
    self.clip = load_clip(config) if clip is None else clip
    clip_config = self.clip.config
    vision = clip_config.model.get('vision')
    self.from_embeddings = sources.source_name(config.data) == 'clip_embeddings'
    check_tokenizer_fits_data(self.clip, config)
    if vision and vision.image_size != config.data.resolution and not self.from_embeddings:
      raise ValueError(f'config.data.resolution: {config.data.resolution} differs from the '
                       f'CLIP image size {clip_config.model.vision.image_size}')
    self.model = build_model(config, clip_config)
    self.diffusion = build_diffusion(config)
    self.sampling_diffusion = self.diffusion.respace(
        schedules.stage_spacing(config.sampling))
    self._stats = None
    self._null_features = None
    self._sample_fn = None
    self.normalize = config.clip.get('normalize', True)
    self.null_caption = config.model.get('null_caption', 'learned')
    if self.null_caption not in ('learned', 'empty_prompt'):
      raise ValueError(f"config.model.null_caption: {self.null_caption!r} is not 'learned' or "
                       "'empty_prompt'")
    self.precomputed = bool(config.data.get('embeddings_dir')) or self.from_embeddings
    if self.precomputed and not self.normalize:
      raise ValueError('config.data: precomputed embeddings are unit-norm, but '
                       'config.clip.normalize is False')
    if config.data.get('embeddings_dir'):
      from unclip_jax.data import embeddings  # pylint: disable=g-import-not-at-top
      embeddings.check(config.data.embeddings_dir, config.data, self.clip)

  @property
  def tokenizer(self):
    return self.clip.tokenizer

  def null_features(self, clip_params):
    """The empty prompt's CLIP features, batch 1: the unconditional caption of a prior with
    `model.null_caption = 'empty_prompt'` (karlo's), in place of learned null values."""
    tokens = jnp.asarray(self.tokenizer(['']))
    f = self.clip_features(clip_params, {'tokens': tokens})
    return {k: f[k] for k in ('text_emb', 'token_encodings', 'token_mask')}

  # --- training ---------------------------------------------------------------------------------

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Images and tokens; with precomputed embeddings, tokens and `clip_image_emb` [B, D]."""
    spec = dict(self.clip.stage.batch_spec(batch_size))
    if self.precomputed:
      del spec['image']
      spec['clip_image_emb'] = jax.ShapeDtypeStruct(
          (batch_size, self.clip.config.model.embed_dim), jnp.float32)
    return spec

  def constants(self):
    return {'clip': self.clip.params}

  def clip_features(self, clip_params, batch):
    """CLIP text embedding [B, D], token encodings [B, L, W], token mask [B, L], image embedding
    (the batch's precomputed 'clip_image_emb', else computed from its 'image', if any)."""
    text_emb, tokens = self.clip.encode_text(batch['tokens'], clip_params,
                                             normalize=self.normalize)
    features = {'text_emb': text_emb, 'token_encodings': tokens,
                'token_mask': self.clip.token_mask(batch['tokens'])}
    if 'clip_image_emb' in batch:
      features['image_emb'] = batch['clip_image_emb']
    elif 'image' in batch:
      features['image_emb'] = self.clip.encode_image(batch['image'], clip_params,
                                                      normalize=self.normalize)
    return jax.tree.map(jax.lax.stop_gradient, features)

  def embedding_source(self, split: str):
    """The `clip_embeddings` source of `split`, checked against the CLIP's width."""
    source = sources.get(self.config.data, split)
    width = self.clip.config.model.embed_dim
    if source.embed_dim != width:
      raise ValueError(f'config.data.paths: {source.describe()} holds {source.embed_dim}-d '
                       f'embeddings; the CLIP (config.clip) embeds in {width} dimensions')
    return source

  def embedding_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the frozen CLIP's training image embeddings."""
    if self._stats is None and self.from_embeddings:
      emb = self.embedding_source('train').image_embeddings(self.config.prior.stats_examples)
      self._stats = emb.mean(0), emb.std(0) + 1e-6
    if self._stats is None and self.precomputed:
      from unclip_jax.data import embeddings  # pylint: disable=g-import-not-at-top
      table = embeddings.EmbeddingTable(self.config.data.embeddings_dir, 'train')
      mean, std = table.mean_std(self.config.prior.stats_examples)
      self._stats = mean, std + 1e-6
    if self._stats is None:
      from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
      p = self.config.prior
      data = input_pipeline.load_split(self.config.data, 'train', max_examples=p.stats_examples)
      emb = self.clip.stage.embed_images(self.clip.params, data['image'])
      self._stats = emb.mean(0), emb.std(0) + 1e-6
    return self._stats

  def init(self, rng, batch):
    b = batch['tokens'].shape[0]
    c = self.clip.config.model
    variables = self.model.init(
        rng, jnp.zeros((b, c.embed_dim)), jnp.zeros((b,), jnp.int32), jnp.zeros((b, c.embed_dim)),
        jnp.zeros((b, c.text.context_length, c.text.width)),
        jnp.ones((b, c.text.context_length), bool),
        jnp.zeros((b,), bool) if self.null_caption == 'learned' else None)
    if self.config.prior.normalization == 'stats' and self.config.clip.workdir:
      with jax.ensure_compile_time_eval():  # init is traced; the statistics are host values
        mean, std = self.embedding_stats()
      params = variables['params']
      params['clip_mean'] = params['clip_mean'].replace_boxed(jnp.asarray(mean))
      params['clip_std'] = params['clip_std'].replace_boxed(jnp.asarray(std))
    return variables

  def loss(self, params, batch, rng, constants):
    f = self.clip_features(constants['clip'], batch)
    apply = functools.partial(self.model.apply, {'params': params})
    x0 = apply(f['image_emb'], method=DiffusionPrior.normalize)
    rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
    b = x0.shape[0]
    t = self.diffusion.sample_timesteps(rng_t, b)
    noise = jax.random.normal(rng_noise, x0.shape)
    x_t = self.diffusion.q_sample(x0, t, noise)
    drop = jax.random.bernoulli(rng_drop, self.config.prior.text_drop_prob, (b,))
    caption = (f['text_emb'], f['token_encodings'], f['token_mask'])
    if self.null_caption == 'empty_prompt':   # dropped captions become the empty prompt
      null = self.null_features(constants['clip'])
      caption = tuple(where_rows(drop, null[k], a) for k, a in
                      zip(('text_emb', 'token_encodings', 'token_mask'), caption))
      drop = None
    out = apply(x_t, self.diffusion.model_timesteps(t), *caption, drop)
    losses = self.diffusion.training_losses(out, x0, t, noise)
    pred = _unit(apply(out, method=DiffusionPrior.denormalize))
    metrics = {'mse': losses['mse'].mean(),
               'cosine_to_image': jnp.mean(jnp.sum(pred * f['image_emb'], -1))}
    return losses['loss'].mean(), metrics

  def make_iterator(self, split, batch_size, *, seed, shuffle, process_index, process_count):
    from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    return input_pipeline.make_iterator(
        self.config.data, split=split, batch_size=batch_size, tokenizer=self.tokenizer,
        seed=seed, shuffle=shuffle, process_index=process_index, process_count=process_count,
        data_source=self.embedding_source(split) if self.from_embeddings else None)

  # --- sampling ---------------------------------------------------------------------------------

  def sample_fn(self, params, text_emb, token_encodings, token_mask, rng, noise=None,
                null=None):
    """Image embeddings for captions: pure, jit-able (see `sample_embeddings`).

    Args:
      params: the prior's params.
      text_emb [B, D], token_encodings [B, L, W], token_mask [B, L]: the frozen CLIP's features.
      rng: PRNG key.
      noise: optional initial noise [B * num_candidates, D] for exact reproducibility.
      null: `null_features(clip_params)`, required for guidance when the unconditional caption
        is the empty prompt (`model.null_caption = 'empty_prompt'`).
    Returns:
      (best embedding [B, D], all candidates [B, K, D], their dots with text [B, K]); unit
      vectors unless `config.clip.normalize` is False.
    """
    s = self.config.sampling
    k = s.num_candidates
    b, d = text_emb.shape
    rep = lambda a: jnp.repeat(a, k, axis=0)
    cond = (rep(text_emb), rep(token_encodings), rep(token_mask))
    apply = functools.partial(self.model.apply, {'params': params})

    if s.guidance_scale == 1.0:
      model_fn = lambda x, t: apply(x, t, *cond)
    elif self.null_caption == 'empty_prompt':
      if null is None:
        raise ValueError('this prior is guided by the empty prompt: pass '
                         'null=stage.null_features(clip_params)')
      uncond = tuple(jnp.broadcast_to(null[n], a.shape) for n, a in
                     zip(('text_emb', 'token_encodings', 'token_mask'), cond))
      both = tuple(jnp.concatenate([a, u]) for a, u in zip(cond, uncond))
      model_fn = samplers.classifier_free_guidance(
          lambda x2, t2: apply(x2, t2, *both), s.guidance_scale, learned_variance=False)
    else:
      both = tuple(jnp.concatenate([a, a]) for a in cond)
      drop = jnp.concatenate([jnp.zeros((b * k,), bool), jnp.ones((b * k,), bool)])
      model_fn = samplers.classifier_free_guidance(
          lambda x2, t2: apply(x2, t2, *both, drop), s.guidance_scale, learned_variance=False)
    x = samplers.sample(self.sampling_diffusion, model_fn, (b * k, d), rng, s, noise=noise,
                        clip_range=s.clip_range)
    candidates = apply(x, method=DiffusionPrior.denormalize)
    if self.normalize:
      candidates = _unit(candidates)
    candidates = candidates.reshape(b, k, d)
    scores = jnp.einsum('bkd,bd->bk', candidates, text_emb)
    best = jnp.take_along_axis(candidates, jnp.argmax(scores, 1)[:, None, None], 1)[:, 0]
    return best, candidates, scores

  def sample_embeddings(self, params, tokens: np.ndarray, rng, noise=None):
    """Captions' tokens [B, L] → (image embeddings [B, D], candidates, scores); one compiled call
    for the CLIP features and one for the whole sampling loop."""
    if self._sample_fn is None:
      self._sample_fn = jax.jit(self.sample_fn)
      self._features_fn = jax.jit(self.clip_features)
    f = self._features_fn(self.clip.params, {'tokens': tokens})
    return self._sample_fn(params, f['text_emb'], f['token_encodings'], f['token_mask'], rng,
                           noise, self._null())

  def _null(self):
    return cached_null_features(self)

  # --- evaluation -------------------------------------------------------------------------------

  def evaluate(self, params, workdir: Optional[str] = None) -> dict[str, float]:
    """Held-out split: cosine of sampled image embeddings to the true image and text embeddings,
    against the text-embedding baseline (any data); CLIP zero-shot accuracy of the sampled
    embeddings, against the true image embeddings' and the text embeddings', for the class of
    `config.data.label_key` (data with labels) and the built-in data's attributes."""
    del workdir
    from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    e = self.config.eval
    data = input_pipeline.load_split(
        self.config.data, 'test', tokenizer=self.tokenizer, max_examples=e.num_examples,
        data_source=self.embedding_source('test') if self.from_embeddings else None)
    features = jax.jit(self.clip_features)
    preds, texts, images = [], [], []
    rng = jax.random.PRNGKey(self.config.seed + 1)
    n = len(data['tokens'])
    for i in range(0, n, e.batch_size):
      chunk = {k: pad_to(data[k][i:i + e.batch_size], e.batch_size)
               for k in ('tokens', 'image', 'clip_image_emb') if k in data}
      f = features(self.clip.params, chunk)
      if self._sample_fn is None:
        self._sample_fn = jax.jit(self.sample_fn)
      best, _, _ = self._sample_fn(params, f['text_emb'], f['token_encodings'], f['token_mask'],
                                   jax.random.fold_in(rng, i), None, self._null())
      keep = min(e.batch_size, n - i)
      preds.append(np.asarray(clip_stage.to_host(best))[:keep])
      texts.append(np.asarray(clip_stage.to_host(f['text_emb']))[:keep])
      images.append(np.asarray(clip_stage.to_host(f['image_emb']))[:keep])
    pred, text, image = (np.concatenate(x) for x in (preds, texts, images))
    cos = lambda a, b: float(np.mean(np.sum(a * b, -1)))
    metrics = {'cosine_pred_image': cos(pred, image), 'cosine_pred_text': cos(pred, text),
               'cosine_text_image_baseline': cos(text, image)}
    classifiers = {}
    if 'label' in data:
      classifiers['label'] = (self.clip.stage.label_classifier(self.clip.params), data['label'])
    if sources.source_name(self.config.data) == 'shapes':
      for attribute in clip_stage.ZERO_SHOT_ATTRIBUTES:
        classifiers[attribute] = (self.clip.stage.zero_shot_classifier(self.clip.params,
                                                                       attribute), data[attribute])
    for attribute, (classes, labels) in classifiers.items():
      keep = labels >= 0
      prefix = 'zero_shot_accuracy' if attribute == 'label' else f'zero_shot_{attribute}_accuracy'
      for name, emb in (('pred', pred), ('image', image), ('text', text)):
        accuracy = np.mean(np.argmax(emb[keep] @ classes.T, 1) == labels[keep])
        metrics[f'{prefix}_{name}'] = float(accuracy)
    if sources.source_name(self.config.data) == 'shapes':
      # Size and position with the other attributes given: of the true image embeddings, and of
      # the sampled ones where the caption names them (elsewhere the prior has to guess).
      from unclip_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
      for attribute in clip_stage.GIVEN_REST_ATTRIBUTES:
        classes = self.clip.stage.given_rest_classifier(self.clip.params, attribute, data)
        labels = data[attribute][:n]
        metrics[f'zero_shot_{attribute}_given_rest_accuracy_image'] = (
            clip_stage.given_rest_accuracy(image, classes[:n], labels))
        asked = np.array([captioned_shapes.mentions(str(c), attribute, int(v))
                          for c, v in zip(data['caption'][:n], labels)], bool)
        if asked.any():
          metrics[f'zero_shot_{attribute}_given_rest_accuracy_pred_asked'] = (
              clip_stage.given_rest_accuracy(pred[asked], classes[:n][asked], labels[asked]))
    return metrics

  def sample(self, params, workdir, step):
    del params, workdir, step  # The prior draws no images; see `evaluate`.

  def export(self, params, workdir: str):
    """Saves the (EMA) params and config to `workdir/export`, loadable by `load_prior`."""
    export.save_export(os.path.join(workdir, 'export'), params,
                       clip_stage.with_clip_fingerprint(self.config, self.clip))


def load_prior(path: str, clip: Optional[clip_stage.FrozenClip] = None):
  """(Stage, params) of a trained prior (a prior run's workdir or its export/)."""
  config, params = export.load_export(path, what='prior')
  return Stage(config, clip=clip), params


def check_tokenizer_fits_data(clip: clip_stage.FrozenClip, config):
  """A CLIP with the built-in data's word tokenizer cannot read another source's captions."""
  kind = clip.config.get('tokenizer', {}).get('kind')
  if kind == 'auto':
    kind = clip_stage.tokenizer_kind(clip.config)
  source = sources.source_name(config.data)
  if kind == 'words' and source != 'shapes':
    raise ValueError(f"config.clip: this CLIP reads captions with the built-in data's word "
                     f"tokenizer, which cannot represent source {source!r}'s captions; train "
                     "(or convert) a CLIP with the BPE tokenizer for this data")


def cached_null_features(stage):
  """`stage.null_features` of its loaded CLIP (computed once) when its unconditional caption is
  the empty prompt (`model.null_caption = 'empty_prompt'`), else None. For prior and decoder."""
  if stage.null_caption != 'empty_prompt':
    return None
  if stage._null_features is None:  # pylint: disable=protected-access
    stage._null_features = jax.jit(stage.null_features)(stage.clip.params)  # pylint: disable=protected-access
  return stage._null_features  # pylint: disable=protected-access


def where_rows(rows: jax.Array, replacement: jax.Array, x: jax.Array) -> jax.Array:
  """x with the rows where `rows` [B] is True replaced by `replacement` [1, ...]."""
  return jnp.where(rows.reshape((-1,) + (1,) * (x.ndim - 1)), replacement, x)


def _unit(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def pad_to(x: np.ndarray, n: int) -> np.ndarray:
  pad = n - len(x)
  return np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
