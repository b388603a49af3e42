"""Inference across the stages: text → CLIP → prior → decoder → upsamplers → images.

    pipe = UnclipPipeline.from_run('runs/unclip')        # or from_workdirs(prior=..., ...)
    out = pipe.text_to_image(['a red circle on a blue background'], seed=0)
    out.images                                           # [B, H, W, 3] float in [-1, 1]

Each stage runs as one compiled call (CLIP features and the whole sampling loop fused), compiled
once per batch size and sampling setting. Per-stage sampling settings (`StageOptions`: respaced
steps, sampler, guidance scale, seed) are arguments; initial noise may be supplied for every
stage for exact reproducibility. The same parts give image variations, interpolations (slerp
between two images' CLIP embeddings) and text diffs (§3 of the paper).
"""

import dataclasses
import logging
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from unclip_jax import workdir as workdir_lib
from unclip_jax.models import attention
from unclip_jax.stages import clip as clip_stage
from unclip_jax.stages import decoder as decoder_stage
from unclip_jax.stages import export
from unclip_jax.stages import prior as prior_stage
from unclip_jax.stages import upsampler as upsampler_stage


class PromptError(ValueError):
  """A prompt that cannot be encoded (empty, too long, not text)."""


@dataclasses.dataclass(frozen=True)
class StageOptions:
  """Sampling settings of one stage for one call; None keeps the stage config's value.

  steps: respacing of the training schedule ('25', 'ddim27', '10,10,5'); sampler: 'ddpm' or
  'ddim'; eta: DDIM's eta; guidance_scale: classifier-free guidance (prior and decoder);
  seed: this stage's PRNG seed (default: derived from the call's seed).
  """
  steps: Optional[str] = None
  sampler: Optional[str] = None
  eta: Optional[float] = None
  guidance_scale: Optional[float] = None
  seed: Optional[int] = None

  def overrides(self) -> dict:
    fields = ('steps', 'sampler', 'eta', 'guidance_scale')
    return {k: getattr(self, k) for k in fields if getattr(self, k) is not None}


@dataclasses.dataclass
class Generation:
  """What one call produced. Images are float in [-1, 1], NHWC.

  images: the final images [B, H, W, 3] (after the last upsampler).
  stage_images: the decoder's images, then each upsampler's.
  image_embeddings: the CLIP image embeddings decoded [B, D].
  text_embeddings: the prompts' CLIP text embeddings [B, D] (None without prompts).
  prior_scores: the prior candidates' dot products with the text embedding [B, K] (or None).
  seconds: wall-clock seconds per stage (including compilation on first use).
  """
  images: np.ndarray
  stage_images: list
  image_embeddings: np.ndarray
  text_embeddings: Optional[np.ndarray] = None
  prior_scores: Optional[np.ndarray] = None
  seconds: dict = dataclasses.field(default_factory=dict)


def slerp(a: jax.Array, b: jax.Array, t) -> jax.Array:
  """Spherical interpolation between unit vectors a and b [..., D] at fractions t ([N] or
  scalar); returns [N, ..., D] (or [..., D]) unit vectors. Falls back to lerp when a ≈ b."""
  t = jnp.asarray(t, jnp.float32)
  a, b = _unit(a), _unit(b)
  omega = jnp.arccos(jnp.clip(jnp.sum(a * b, -1, keepdims=True), -1.0, 1.0))
  tt = t.reshape(t.shape + (1,) * a.ndim)
  so = jnp.sin(omega)
  safe = so > 1e-6
  wa = jnp.where(safe, jnp.sin((1 - tt) * omega) / jnp.where(safe, so, 1.0), 1 - tt)
  wb = jnp.where(safe, jnp.sin(tt * omega) / jnp.where(safe, so, 1.0), tt)
  return _unit(wa * a + wb * b)


def load_image(path: str, size: int) -> np.ndarray:
  """An image file → [size, size, 3] float32 in [-1, 1] (centre-cropped to a square, resized).

  Raises FileNotFoundError for a missing file and ValueError for one that is not an image.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f'image file not found: {path}')
  try:
    with Image.open(path) as image:
      image = image.convert('RGB')
  except Exception as e:  # PIL raises several types for unreadable files
    raise ValueError(f'cannot read image {path}: {e}') from e
  w, h = image.size
  side = min(w, h)
  left, top = (w - side) // 2, (h - side) // 2
  image = image.crop((left, top, left + side, top + side)).resize((size, size),
                                                                  Image.Resampling.BICUBIC)
  return np.asarray(image, np.float32) / 127.5 - 1.0


class UnclipPipeline:
  """A frozen CLIP, a prior, a decoder and upsamplers, each as (stage object, params).

  Any of prior/decoder may be None for the parts that do not need it (variations need no prior).
  Upsamplers must chain: each one's input size is the previous stage's output size.
  """

  def __init__(self, clip: clip_stage.FrozenClip, prior=None, decoder=None,
               upsamplers: Sequence = ()):
    self.clip = clip
    self._stages = {'prior': prior, 'decoder': decoder}
    self.upsamplers = list(upsamplers)
    self._variants = {}
    self._compiled = {}
    self._batch_sharding = None     # set by shard_over
    dim = clip.config.model.embed_dim
    for name, part in self._stages.items():
      if part is not None and part[0].clip.config.model.embed_dim != dim:
        raise ValueError(f'the {name} was trained on a CLIP with '
                         f'{part[0].clip.config.model.embed_dim}-d embeddings, not {dim}')
    if prior is not None and decoder is not None and prior[0].normalize != decoder[0].normalize:
      raise ValueError('the prior and the decoder disagree on config.clip.normalize (unit-norm '
                       'or raw CLIP embeddings): they were not trained together')
    size = decoder[0].config.data.resolution if decoder is not None else None
    for i, (stage, _) in enumerate(self.upsamplers):
      if size is not None and stage.low_res != size:
        raise ValueError(f'upsampler {i} takes {stage.low_res}px images, but the stage before '
                         f'it produces {size}px')
      size = stage.high_res

  # --- loading ----------------------------------------------------------------------------------

  @classmethod
  def from_workdirs(cls, *, clip: Optional[str] = None, prior: Optional[str] = None,
                    decoder: Optional[str] = None, upsamplers: Sequence[str] = (),
                    dtype: Optional[str] = None):
    """Loads each stage's export from its run directory (or export/ folder).

    `clip` defaults to the CLIP the prior (else the decoder) was trained on, as recorded in its
    config. The stages must share that CLIP. `dtype` ('bfloat16', 'float32', ...) sets every
    stage's compute dtype, the CLIP's too (default: each export's own); parameters stay as
    saved (float32).
    """
    configs = {name: export.load_export(path, what=name) if path else None
               for name, path in (('prior', prior), ('decoder', decoder))}
    if clip is None:
      recorded = [c[0].clip.workdir for c in configs.values() if c is not None]
      if not recorded or not recorded[0]:
        raise ValueError('no CLIP given, and none is recorded in the prior or decoder config')
      clip = recorded[0]
    frozen = clip_stage.load_frozen(clip)
    if dtype is not None:
      frozen = clip_stage.FrozenClip(clip_stage.Stage(_with_dtype(frozen.config, dtype)),
                                     frozen.params)
    fingerprint = None
    parts = {}
    for name, loaded in configs.items():
      if loaded is None:
        parts[name] = None
        continue
      config, params = loaded
      path = prior if name == 'prior' else decoder
      _check_kind(config, name, path)
      recorded = config.clip.get('fingerprint')
      if recorded:    # exports of ours record their CLIP (converted ones do not)
        from unclip_jax.data import embeddings  # pylint: disable=g-import-not-at-top
        fingerprint = fingerprint or embeddings.clip_fingerprint(frozen.params)
        if recorded != fingerprint:
          raise ValueError(f'the {name} at {path} was trained on another CLIP (fingerprint '
                           f'{recorded}) than the one at {clip} ({fingerprint})')
      config = _with_dtype(_for_inference(config), dtype)
      stage_cls = prior_stage.Stage if name == 'prior' else decoder_stage.Stage
      parts[name] = (stage_cls(config, clip=frozen), params)
    ups = []
    for path in upsamplers:
      config, params = export.load_export(path, what='upsampler')
      _check_kind(config, 'upsampler', path)
      ups.append((upsampler_stage.Stage(_with_dtype(_for_inference(config), dtype)), params))
    return cls(frozen, parts['prior'], parts['decoder'], ups)

  @classmethod
  def from_run(cls, root: str, dtype: Optional[str] = None):
    """Loads a run of the whole system (`unclip_jax.train_all`): root/{clip,prior,decoder,
    upsampler*}; `dtype` as in `from_workdirs`."""
    folder = workdir_lib.path(root)
    if not folder.is_dir():
      raise FileNotFoundError(f'no run directory at {root}')
    sub = lambda name: os.fspath(folder / name)
    ups = sorted(d.name for d in folder.iterdir() if d.name.startswith('upsampler'))
    return cls.from_workdirs(clip=sub('clip'), prior=sub('prior'), decoder=sub('decoder'),
                             upsamplers=[sub(d) for d in ups], dtype=dtype)

  def shard_over(self, devices: Optional[Sequence[jax.Device]] = None) -> 'UnclipPipeline':
    """Generates data-parallel from now on: every stage's parameters replicated on `devices`
    (default: this process's), each call's prompts split over them (its batch must divide
    evenly). The images are those of one device, up to float rounding: the noise is drawn for
    the whole batch. Returns the pipeline."""
    devices = list(devices or jax.local_devices())
    mesh = Mesh(np.asarray(devices), ('data',))
    replicated = NamedSharding(mesh, PartitionSpec())
    self.clip.params = jax.device_put(self.clip.params, replicated)
    for name, part in self._stages.items():
      if part is not None:
        self._stages[name] = (part[0], jax.device_put(part[1], replicated))
    self.upsamplers = [(stage, jax.device_put(params, replicated))
                       for stage, params in self.upsamplers]
    self._batch_sharding = NamedSharding(mesh, PartitionSpec('data'))
    return self

  def _place(self, batch: np.ndarray):
    """A batch's array split over the devices of `shard_over` (as it is without it)."""
    sharding = self._batch_sharding
    if sharding is None:
      return batch
    n = sharding.mesh.size
    if len(batch) % n:
      raise ValueError(f'a batch of {len(batch)} does not split over the pipeline\'s {n} '
                       f'devices: use a multiple of {n}')
    return jax.device_put(batch, sharding)

  @property
  def resolution(self) -> int:
    """The final images' size."""
    if self.upsamplers:
      return self.upsamplers[-1][0].high_res
    return self._require('decoder')[0].config.data.resolution

  # --- prompts ----------------------------------------------------------------------------------

  def encode_prompts(self, prompts: Sequence[str], truncate: bool = False) -> np.ndarray:
    """Prompts → token ids [B, L].

    Raises PromptError for a non-string, an empty (or whitespace-only) prompt, and, unless
    `truncate`, a prompt longer than the CLIP's context (L - 2 tokens): with `truncate` it is cut
    to fit (with a warning), as CLIP's own tokenizer does.
    """
    if isinstance(prompts, str) or not prompts:
      raise PromptError('prompts must be a non-empty list of strings')
    tokenizer = self.clip.tokenizer
    limit = tokenizer.context_length - 2
    for i, prompt in enumerate(prompts):
      if not isinstance(prompt, str):
        raise PromptError(f'prompt {i} is a {type(prompt).__name__}, not a str')
      if not prompt.strip():
        raise PromptError(f'prompt {i} is empty')
      try:
        n = len(tokenizer.encode(prompt))
      except ValueError as e:   # a word the CLIP's word tokenizer does not know
        raise PromptError(f'prompt {i}: {e}') from e
      if n > limit:
        if not truncate:
          raise PromptError(f'prompt {i} has {n} tokens; the CLIP reads at most {limit}: '
                            f'shorten it or allow truncation: {prompt!r}')
        logging.warning('prompt %d truncated from %d to %d tokens: %r', i, n, limit, prompt)
    return np.asarray(tokenizer(list(prompts)))

  # --- compiled stages --------------------------------------------------------------------------

  def _require(self, name):
    part = self._stages[name]
    if part is None:
      raise ValueError(f'this pipeline has no {name}; load one to use this method')
    return part

  def _variant(self, name: str, stage, options: StageOptions):
    """The stage object with the call's sampling settings (cached: compiled functions stay)."""
    overrides = options.overrides()
    key = (name, id(stage), tuple(sorted(overrides.items())))
    if key not in self._variants:
      if not overrides:
        self._variants[key] = stage
      else:
        config = ml_collections.ConfigDict(stage.config.to_dict())
        for field, value in overrides.items():
          config.sampling[field] = value
        kwargs = {} if name.startswith('upsampler') else {'clip': self.clip}
        self._variants[key] = type(stage)(config, **kwargs)
    return self._variants[key]

  def _diffusers_guidance(self, **options: StageOptions) -> list[StageOptions]:
    """The stages' options, with diffusers' rule where every stage follows it.

    diffusers' unCLIP pipelines guide only when a scale is above 1 (text→image: the prior's or
    the decoder's; variations: the decoder's); otherwise they draw from the conditional model
    alone. Stages converted from diffusers (`sampling.diffusers_guidance`) keep that rule, so
    scales at most 1 there mean scale 1 for all; our own stages guide at any scale."""
    stages = {name: self._require(name)[0] for name in options}
    if not all(stage.config.sampling.get('diffusers_guidance', False)
               for stage in stages.values()):
      return list(options.values())
    scales = [o.guidance_scale if o.guidance_scale is not None
              else stages[name].config.sampling.guidance_scale for name, o in options.items()]
    if max(scales) > 1.0:
      return list(options.values())
    return [dataclasses.replace(o, guidance_scale=1.0) for o in options.values()]

  def _jit(self, key, fn):
    if key not in self._compiled:   # jitted; XLA's attention where a fused one fails to compile
      self._compiled[key] = attention.jit_falling_back(fn)
    return self._compiled[key]

  def _prior_call(self, stage):
    def run(params, clip_params, tokens, rng, noise):
      f = stage.clip_features(clip_params, {'tokens': tokens})
      null = stage.null_features(clip_params) if stage.null_caption == 'empty_prompt' else None
      best, _, scores = stage.sample_fn(params, f['text_emb'], f['token_encodings'],
                                        f['token_mask'], rng, noise, null)
      return best, scores, f['text_emb']
    return self._jit(('prior', id(stage)), run)

  def _decoder_call(self, stage):
    empty_prompt = stage.null_caption == 'empty_prompt'

    def run(params, clip_params, clip_emb, tokens, use_caption, rng, noise):
      f = stage.clip_features(clip_params, {'tokens': tokens})
      # Without a caption the tokens are the empty prompt's, which an 'empty_prompt' decoder
      # (karlo's) reads as its unconditional caption; ours mask the caption out.
      mask = f['caption_mask'] if empty_prompt else f['caption_mask'] & use_caption[:, None]
      null = stage.null_features(clip_params) if empty_prompt else None
      return stage.sample_fn(params, clip_emb, f['caption'], mask, rng, noise, f.get('text_emb'),
                             null)
    return self._jit(('decoder', id(stage)), run)

  def _upsampler_call(self, stage):
    return self._jit(('upsampler', id(stage)), stage.sample_fn)

  @property
  def _normalize(self) -> bool:
    """Whether the stages use unit-norm CLIP embeddings (ours) or raw ones (karlo's)."""
    for part in self._stages.values():
      if part is not None:
        return part[0].normalize
    return True

  def _image_embedder(self):
    normalize = self._normalize
    return self._jit(('clip_image',), lambda images, p: self.clip.encode_image(
        images, p, normalize=normalize))

  # --- generation -------------------------------------------------------------------------------

  def image_embeddings(self, images: np.ndarray) -> np.ndarray:
    """Images [B, H, W, 3] in [-1, 1] → CLIP image embeddings [B, D] (unit vectors unless
    the stages use raw embeddings, `config.clip.normalize = False`)."""
    return np.asarray(self._image_embedder()(jnp.asarray(images, jnp.float32), self.clip.params))

  def text_embeddings(self, prompts: Sequence[str], truncate: bool = False) -> np.ndarray:
    """Prompts → CLIP text embeddings [B, D] (unit vectors unless the stages use raw ones)."""
    tokens = self.encode_prompts(prompts, truncate)
    normalize = self._normalize
    fn = self._jit(('clip_text',), lambda p, t: self.clip.encode_text(t, p,
                                                                      normalize=normalize)[0])
    return np.asarray(fn(self.clip.params, tokens))

  def text_to_image(self, prompts: Sequence[str], *, seed: int = 0,
                    prior: StageOptions = StageOptions(), decoder: StageOptions = StageOptions(),
                    upsamplers: StageOptions | Sequence[StageOptions] = StageOptions(),
                    noise: Optional[dict] = None, truncate: bool = False,
                    on_stage: Optional[Callable[[str, float], None]] = None) -> Generation:
    """Images for prompts: the prior samples `num_candidates` image embeddings per prompt and
    keeps the one closest to the text embedding; the decoder draws them with the prompt as its
    caption; the upsamplers enlarge them.

    Args:
      prompts: B strings (see `encode_prompts` for what is refused).
      seed: the call's seed; stage i uses fold_in(seed, i) unless its options give a seed.
      prior, decoder, upsamplers: sampling settings per stage (one StageOptions for all
        upsamplers, or one each).
      noise: optional initial noise per stage for exact reproducibility: {'prior': [B·K, D],
        'decoder': [B, r, r, 3], 'upsamplers': [[B, R, R, 3], ...]} (any subset).
      on_stage: called with (stage name, seconds) after each stage (progress reporting).
    """
    tokens = self._place(self.encode_prompts(prompts, truncate))
    noise = dict(noise or {})
    unknown = set(noise) - {'prior', 'decoder', 'upsamplers'}
    if unknown:
      raise ValueError(f'noise: unknown stages {sorted(unknown)}; use prior, decoder, upsamplers')
    prior, decoder = self._diffusers_guidance(prior=prior, decoder=decoder)
    stage, params = self._require('prior')
    stage = self._variant('prior', stage, prior)
    b, k, d = len(tokens), stage.config.sampling.num_candidates, self.clip.config.model.embed_dim
    prior_noise = noise.get('prior')
    if prior_noise is not None:
      prior_noise = _check_noise('prior', prior_noise, (b * k, d))
    start = time.perf_counter()
    emb, scores, text_emb = self._prior_call(stage)(params, self.clip.params, tokens,
                                                    _stage_rng(seed, 0, prior), prior_noise)
    emb = jax.block_until_ready(emb)
    seconds = {'prior': time.perf_counter() - start}
    if on_stage:
      on_stage('prior', seconds['prior'])
    out = self._decode_and_upsample(emb, tokens, np.ones((b,), bool), seed, decoder, upsamplers,
                                    noise, on_stage)
    out.text_embeddings = np.asarray(text_emb)
    out.prior_scores = np.asarray(scores)
    out.seconds = {**seconds, **out.seconds}
    return out

  def decode(self, image_embeddings: np.ndarray, *, prompts: Optional[Sequence[str]] = None,
             seed: int = 0, decoder: StageOptions = StageOptions(),
             upsamplers: StageOptions | Sequence[StageOptions] = StageOptions(),
             noise: Optional[dict] = None, shared_noise: bool = False,
             on_stage: Optional[Callable[[str, float], None]] = None) -> Generation:
    """Images for CLIP image embeddings [B, D] (decoder, then upsamplers), optionally with
    captions. `shared_noise`: every image starts from the same initial noise (interpolations)."""
    (decoder,) = self._diffusers_guidance(decoder=decoder)
    emb = jnp.asarray(image_embeddings, jnp.float32)
    if emb.ndim != 2 or emb.shape[1] != self.clip.config.model.embed_dim:
      raise ValueError(f'image_embeddings: expected [B, {self.clip.config.model.embed_dim}], '
                       f'got {tuple(emb.shape)}')
    b = emb.shape[0]
    if prompts is None:
      tokens = np.asarray(self.clip.tokenizer([''] * b))
      use_caption = np.zeros((b,), bool)
    else:
      tokens = self.encode_prompts(prompts)
      use_caption = np.ones((b,), bool)
    if shared_noise:
      noise = dict(noise or {})
      rng = jax.random.PRNGKey(seed)
      r = self._require('decoder')[0].config.data.resolution
      noise.setdefault('decoder', jnp.broadcast_to(
          jax.random.normal(jax.random.fold_in(rng, 100), (1, r, r, 3)), (b, r, r, 3)))
      ups = []
      for i, (stage, _) in enumerate(self.upsamplers):
        s = stage.high_res
        ups.append(jnp.broadcast_to(jax.random.normal(jax.random.fold_in(rng, 101 + i),
                                                      (1, s, s, 3)), (b, s, s, 3)))
      noise.setdefault('upsamplers', ups)
    return self._decode_and_upsample(emb, tokens, use_caption, seed, decoder, upsamplers,
                                     noise or {}, on_stage)

  def _decode_and_upsample(self, emb, tokens, use_caption, seed, decoder, upsamplers, noise,
                           on_stage) -> Generation:
    stage, params = self._require('decoder')
    stage = self._variant('decoder', stage, decoder)
    b, r = emb.shape[0], stage.config.data.resolution
    dec_noise = noise.get('decoder')
    if dec_noise is not None:
      dec_noise = _check_noise('decoder', dec_noise, (b, r, r, 3))
    seconds = {}
    start = time.perf_counter()
    images = self._decoder_call(stage)(params, self.clip.params, emb, tokens,
                                       jnp.asarray(use_caption), _stage_rng(seed, 1, decoder),
                                       dec_noise)
    stage_images = [np.asarray(images)]
    seconds['decoder'] = time.perf_counter() - start
    if on_stage:
      on_stage('decoder', seconds['decoder'])
    options = (list(upsamplers) if isinstance(upsamplers, (list, tuple))
               else [upsamplers] * len(self.upsamplers))
    if len(options) != len(self.upsamplers):
      raise ValueError(f'{len(options)} upsampler options for {len(self.upsamplers)} upsamplers')
    up_noise = list(noise.get('upsamplers') or [None] * len(self.upsamplers))
    if len(up_noise) != len(self.upsamplers):
      raise ValueError(f"noise['upsamplers']: {len(up_noise)} arrays for "
                       f'{len(self.upsamplers)} upsamplers')
    for i, ((up, up_params), opts, z) in enumerate(zip(self.upsamplers, options, up_noise)):
      name = f'upsampler_{i}'
      up = self._variant(name, up, opts)
      if z is not None:
        z = _check_noise(f"upsamplers[{i}]", z, (b, up.high_res, up.high_res, 3))
      start = time.perf_counter()
      images = self._upsampler_call(up)(up_params, images, _stage_rng(seed, 2 + i, opts), z)
      stage_images.append(np.asarray(images))
      seconds[name] = time.perf_counter() - start
      if on_stage:
        on_stage(name, seconds[name])
    return Generation(images=stage_images[-1], stage_images=stage_images,
                      image_embeddings=np.asarray(emb), seconds=seconds)

  # --- variations, interpolations, text diffs ---------------------------------------------------

  def _image_input(self, image) -> np.ndarray:
    """A path or an [H, W, 3] array in [-1, 1] → [1, H, W, 3] (paths read at the CLIP's size)."""
    if not self.clip.config.model.get('vision'):
      raise ValueError('this CLIP has no image tower, which image variations, interpolations '
                       'and text diffs need; convert one with --vision')
    if isinstance(image, (str, os.PathLike)):
      image = load_image(os.fspath(image), self.clip.config.model.vision.image_size)
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'image: expected [H, W, 3], got {image.shape}')
    return image[None]

  def variations(self, image, num: int, *, seed: int = 0, **kwargs) -> Generation:
    """`num` images decoded from one image's CLIP embedding (a path or [H, W, 3] in [-1, 1])."""
    emb = self.image_embeddings(self._image_input(image))
    return self.decode(np.repeat(emb, num, 0), seed=seed, **kwargs)

  def interpolate(self, image_a, image_b, num_frames: int, *, seed: int = 0,
                  decoder: StageOptions = StageOptions(sampler='ddim', eta=0.0),
                  **kwargs) -> Generation:
    """`num_frames` images along the slerp between two images' CLIP embeddings, all decoded
    from the same initial noise (deterministic DDIM by default, as in the paper). With raw
    embeddings (karlo's stages) the norm is interpolated linearly between the two."""
    if num_frames < 2:
      raise ValueError(f'num_frames must be at least 2, got {num_frames}')
    a = self.image_embeddings(self._image_input(image_a))[0]
    b = self.image_embeddings(self._image_input(image_b))[0]
    t = np.linspace(0.0, 1.0, num_frames)
    frames = np.array(slerp(a, b, t))
    if not self._normalize:
      # Stages trained on raw embeddings (karlo's): the direction is slerped, the norm
      # interpolated between the two images' own, so the decoder sees embeddings of its scale.
      frames *= ((1 - t) * np.linalg.norm(a) + t * np.linalg.norm(b))[:, None]
    return self.decode(frames, seed=seed, decoder=decoder, shared_noise=True, **kwargs)

  def text_diff(self, image, source: str, target: str, num_frames: int = 4, *,
                max_angle: float = 0.5, seed: int = 0,
                decoder: StageOptions = StageOptions(sampler='ddim', eta=0.0),
                **kwargs) -> Generation:
    """Edits an image toward a caption change: its embedding z_i is slerped toward the unit
    text diff z_d = norm(z_t(target) − z_t(source)) at angles θ ∈ linspace(0, max_angle) (the
    paper uses θ up to 0.5), decoded from shared noise. With raw embeddings (karlo's stages)
    the frames keep z_i's norm."""
    z_i = self.image_embeddings(self._image_input(image))[0]
    z_t = self.text_embeddings([source, target])
    z_d = z_t[1] - z_t[0]
    if np.linalg.norm(z_d) < 1e-6:
      raise ValueError('source and target captions have the same CLIP embedding')
    frames = np.array(slerp(z_i, z_d, jnp.linspace(0.0, max_angle, num_frames)))
    if not self._normalize:     # raw embeddings: the image embedding's own norm is kept
      frames *= np.linalg.norm(z_i)
    return self.decode(frames, seed=seed, decoder=decoder, shared_noise=True, **kwargs)


def _check_kind(config: ml_collections.ConfigDict, name: str, path: str):
  """Refuses an export of another stage where `name` is expected (e.g. a decoder in prior/)."""
  kind = config.get('stage')
  if kind and kind != name:
    raise ValueError(f'{path} holds a {kind} export where a {name} is expected')


def _for_inference(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A loaded stage config without training-only inputs (precomputed embeddings)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if 'data' in config and config.data.get('embeddings_dir'):
    config.data.embeddings_dir = None
  return config


def _with_dtype(config: ml_collections.ConfigDict, dtype: Optional[str]):
  """A copy of a stage config computing in `dtype` (None: as it is)."""
  if dtype is None:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.dtype = dtype
  return config


def _stage_rng(seed: int, index: int, options: StageOptions) -> jax.Array:
  if options.seed is not None:
    return jax.random.PRNGKey(options.seed)
  return jax.random.fold_in(jax.random.PRNGKey(seed), index)


def _check_noise(name: str, noise, shape: tuple) -> jax.Array:
  noise = jnp.asarray(noise, jnp.float32)
  if noise.size == int(np.prod(shape)) and noise.shape != shape and name == 'prior':
    noise = noise.reshape(shape)  # [B, K, D] is accepted for [B·K, D]
  if noise.shape != shape:
    raise ValueError(f"noise['{name}']: expected shape {shape}, got {tuple(noise.shape)}")
  return noise


def _unit(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
