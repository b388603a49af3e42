"""A diffusion upsampler stage: low-resolution image → image at `upsampler.scale` times the size.

The ADM U-Net without attention or text (Ramesh et al. 2022, §2.1 and appendix C): the
low-resolution image, upsampled (bicubic) to the target size, is concatenated to the noisy image
along the channels. Training corrupts the low-resolution conditioning (`upsampler.degradation`:
'blur', Gaussian blur with kernel 3 and sigma 0.6 as for the paper's 64→256 model, or 'bsr', the
BSR degradation of its 256→1024 model; 'none') so that the model tolerates the imperfect images
of the stage before it, and trains on random crops (`upsampler.crop_size`, a quarter of the
target size in the paper). The network is fully convolutional: it samples at full size.

Batches carry only the full-resolution image; the low-resolution input is made from it on
device (antialiased downsampling), so one dataset serves every upsampler.
"""

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax.data import degradations
from unclip_jax.data import sources
from unclip_jax.diffusion import gaussian_diffusion
from unclip_jax.diffusion import samplers
from unclip_jax.diffusion import schedules
from unclip_jax.images import image_grid
from unclip_jax.models.unet import UNet
from unclip_jax.stages import clip as clip_stage
from unclip_jax.stages import export
from unclip_jax.stages import prior as prior_stage


def downsample(images: jax.Array, size: int) -> jax.Array:
  """[B, H, W, C] → [B, size, size, C], antialiased (area-like) linear resize."""
  return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), 'linear',
                          antialias=True)


def upsample(images: jax.Array, size: int | tuple[int, int], clip: bool = True) -> jax.Array:
  """[B, h, w, C] → [B, size, size, C] (or [B, *size, C]), bicubic, clipped to [-1, 1] when
  `clip`. The same values as PyTorch's bicubic `interpolate` with antialias=True (Keys' cubic
  with a = -0.5), which karlo uses."""
  h, w = (size, size) if isinstance(size, int) else size
  up = jax.image.resize(images, (images.shape[0], h, w, images.shape[3]), 'cubic')
  return jnp.clip(up, -1.0, 1.0) if clip else up


def random_crops(rng, arrays: tuple[jax.Array, ...], size: int) -> tuple[jax.Array, ...]:
  """The same random size×size window of each example, cut from every array [B, H, W, C]."""
  b, h, w = arrays[0].shape[:3]
  ky, kx = jax.random.split(rng)
  ys = jax.random.randint(ky, (b,), 0, h - size + 1)
  xs = jax.random.randint(kx, (b,), 0, w - size + 1)
  def crop(a):
    return jax.vmap(lambda img, y, x: jax.lax.dynamic_slice(
        img, (y, x, 0), (size, size, img.shape[-1])))(a, ys, xs)
  return tuple(crop(a) for a in arrays)


def build_model(config) -> UNet:
  unet = {k: tuple(v) if isinstance(v, (list, tuple)) else v
          for k, v in config.model.unet.items()}
  out_channels = 6 if config.diffusion.var_type == 'learned_range' else 3
  return UNet(out_channels=out_channels, dtype=clip_stage.DTYPES[config.dtype], **unet)


def build_diffusion(config) -> gaussian_diffusion.GaussianDiffusion:
  d = config.diffusion
  return gaussian_diffusion.diffusion_from_config(d.schedule, d.num_steps, mean_type=d.mean_type,
                                                  var_type=d.var_type)


def check_config(config):
  """Raises ValueError naming the field for sizes the stage cannot use."""
  u, r = config.upsampler, config.data.resolution
  if r % u.scale:
    raise ValueError(f'config.data.resolution: {r} is not a multiple of upsampler.scale '
                     f'{u.scale}')
  if u.crop_size and not 0 < u.crop_size <= r:
    raise ValueError(f'config.upsampler.crop_size: {u.crop_size} must be in (0, {r}] '
                     '(0 trains on whole images)')
  unet = config.model.unet
  factor = unet.get('patch_size', 1) * 2 ** (len(unet.channel_mult) - 1)
  for name, size in (('crop_size', u.crop_size or r), ('data.resolution', r)):
    if size % factor:
      raise ValueError(f'config.upsampler.{name}: {size} is not divisible by {factor} '
                       '(patch_size · 2**(len(channel_mult) - 1))')
  if u.degradation not in degradations.KINDS:
    raise ValueError(f'config.upsampler.degradation: {u.degradation!r} is not one of '
                     f'{degradations.KINDS}')


class Stage:
  """See `unclip_jax.stages` for the interface."""

  def __init__(self, config: ml_collections.ConfigDict):
    check_config(config)
    self.config = config
    self.model = build_model(config)
    self.diffusion = build_diffusion(config)
    self.sampling_diffusion = self.diffusion.respace(
        schedules.stage_spacing(config.sampling))
    self.learned_variance = config.diffusion.var_type == 'learned_range'
    self.clip_conditioning = config.upsampler.get('clip_conditioning', True)
    # karlo's super-resolution: params {'all_but_last': ..., 'last': ...}, the second model
    # taking the last sampling step.
    self.last_step_model = config.upsampler.get('last_step_model', False)
    self._jitted = {}

  tokenizer = None

  @property
  def high_res(self) -> int:
    return self.config.data.resolution

  @property
  def low_res(self) -> int:
    return self.config.data.resolution // self.config.upsampler.scale

  # --- training ---------------------------------------------------------------------------------

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    r = self.high_res
    return {'image': jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.float32)}

  def init(self, rng, batch):
    b = batch['image'].shape[0]
    size = self.config.upsampler.crop_size or self.high_res
    init = lambda key: self.model.init(key, jnp.zeros((b, size, size, 6)),
                                       jnp.zeros((b,), jnp.int32))
    if self.last_step_model:
      first, last = (init(k) for k in jax.random.split(rng))
      return {'params': {'all_but_last': first['params'], 'last': last['params']}}
    return init(rng)

  def conditioning(self, images: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
    """Full-resolution images → their low-resolution version, degraded when `rng` is given
    (training), upsampled back to full size: the model's conditioning [B, R, R, 3]."""
    low = downsample(images, self.low_res)
    if rng is not None:
      low = degradations.degrade(rng, low, self.config.upsampler.degradation)
    return upsample(low, self.high_res)

  def loss(self, params, batch, rng, constants):
    del constants
    if self.last_step_model:
      raise ValueError('config.upsampler.last_step_model: a two-model upsampler (converted from '
                       'karlo) samples only; train a single-model upsampler instead')
    rng_degrade, rng_crop, rng_t, rng_noise, rng_dropout = jax.random.split(rng, 5)
    x0 = batch['image']
    cond = self.conditioning(x0, rng_degrade)
    if self.config.upsampler.crop_size:
      x0, cond = random_crops(rng_crop, (x0, cond), self.config.upsampler.crop_size)
    b = x0.shape[0]
    t = self.diffusion.sample_timesteps(rng_t, b)
    noise = jax.random.normal(rng_noise, x0.shape)
    x_t = self.diffusion.q_sample(x0, t, noise)
    out = self.model.apply({'params': params}, jnp.concatenate([x_t, cond], -1),
                           self.diffusion.model_timesteps(t), train=True,
                           rngs={'dropout': rng_dropout})
    gamma = self.config.diffusion.get('min_snr_gamma')
    mse_weights = None if gamma is None else self.diffusion.min_snr_weights(t, gamma)
    losses = self.diffusion.training_losses(out, x0, t, noise, mse_weights=mse_weights)
    metrics = {'mse': losses['mse'].mean()}
    if 'vb' in losses:
      metrics['vb'] = losses['vb'].mean()
    return losses['loss'].mean(), metrics

  def make_iterator(self, split, batch_size, *, seed, shuffle, process_index, process_count):
    from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    return input_pipeline.make_iterator(
        self.config.data, split=split, batch_size=batch_size, tokenizer=None, seed=seed,
        shuffle=shuffle, process_index=process_index, process_count=process_count)

  # --- sampling ---------------------------------------------------------------------------------

  def sample_fn(self, params, low_res: jax.Array, rng, noise=None) -> jax.Array:
    """Low-resolution images [B, h, w, 3] in [-1, 1] → [B, h·scale, w·scale, 3]. Pure, jit-able.

    Any size works (the model is fully convolutional) as long as the output size is divisible by
    2**(len(channel_mult) - 1). No degradation is applied.
    """
    s, scale = self.config.sampling, self.config.upsampler.scale
    b, h, w = low_res.shape[:3]
    cond = upsample(low_res, (h * scale, w * scale), clip=self.clip_conditioning)
    apply = lambda p, x, t: self.model.apply({'params': p}, jnp.concatenate([x, cond], -1), t)
    if self.last_step_model:
      last_t = int(self.sampling_diffusion.host_timestep_map[0])   # the final step's timestep
      model_fn = lambda x, t: jax.lax.cond(t[0] == last_t,
                                           lambda: apply(params['last'], x, t),
                                           lambda: apply(params['all_but_last'], x, t))
    else:
      model_fn = functools.partial(apply, params)
    shape = (b, h * scale, w * scale, 3)
    images = samplers.sample(self.sampling_diffusion, model_fn, shape, rng, s, noise=noise,
                             clip_range=s.get('clip_range', 1.0))
    return jnp.clip(images, -1.0, 1.0)

  def upsample_images(self, params, low_res, rng, noise=None) -> jax.Array:
    """`sample_fn` compiled once per input shape."""
    if 'sample' not in self._jitted:
      self._jitted['sample'] = jax.jit(self.sample_fn)
    return self._jitted['sample'](params, low_res, rng, noise)

  # --- evaluation and sample grids --------------------------------------------------------------

  def _held_out(self, n):
    from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    return input_pipeline.load_split(self.config.data, 'test', max_examples=n)

  def _upsample_held_out(self, params, data, seed):
    e = self.config.eval
    low = np.asarray(jax.jit(downsample, static_argnums=1)(data['image'], self.low_res))
    out, n = [], len(low)
    for i in range(0, n, e.batch_size):
      chunk = prior_stage.pad_to(low[i:i + e.batch_size], e.batch_size)
      images = self.upsample_images(params, chunk,
                                    jax.random.fold_in(jax.random.PRNGKey(seed), i))
      out.append(np.asarray(clip_stage.to_host(images))[:min(e.batch_size, n - i)])
    return low, np.concatenate(out)

  def evaluate(self, params, workdir: Optional[str] = None) -> dict[str, float]:
    """Held-out images downsampled and upsampled again: PSNR and SSIM against the originals,
    beside the bicubic baseline's (any data); on the built-in data also the pixel checker's
    reading of the upsampled images."""
    del workdir
    data = self._held_out(self.config.eval.num_examples)
    low, samples = self._upsample_held_out(params, data, self.config.seed + 1)
    bicubic = np.asarray(upsample(jnp.asarray(low), self.high_res))
    metrics = {'psnr': psnr(samples, data['image']), 'psnr_bicubic': psnr(bicubic, data['image']),
               'ssim': ssim(samples, data['image']), 'ssim_bicubic': ssim(bicubic, data['image'])}
    if sources.source_name(self.config.data) == 'shapes':
      from unclip_jax.data import shape_checker  # pylint: disable=g-import-not-at-top
      labels = {k: data[k] for k in ('color', 'background', 'shape', 'size', 'position')}
      metrics.update({f'samples_{k}': v for k, v in shape_checker.score(samples,
                                                                        labels).items()})
      metrics.update({f'bicubic_{k}': v for k, v in shape_checker.score(bicubic,
                                                                        labels).items()})
    return metrics

  def sample(self, params, workdir, step):
    """{'upsampled': one grid: bicubic upsampling above, the model's below, originals last}."""
    del workdir, step
    n = self.config.sampling.num_images
    data = self._held_out(n)
    low, samples = self._upsample_held_out(params, data, self.config.seed + 2)
    bicubic = np.asarray(upsample(jnp.asarray(low), self.high_res))
    rows = np.concatenate([bicubic[:n], samples[:n], data['image'][:n]])
    return {'upsampled': image_grid(rows, columns=n)[None]}

  def export(self, params, workdir: str):
    export.save_export(os.path.join(workdir, 'export'), params, self.config)


def psnr(images: np.ndarray, targets: np.ndarray) -> float:
  """Mean PSNR (dB) of images in [-1, 1] (peak-to-peak 2)."""
  mse = np.mean((np.asarray(images, np.float64) - targets) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(4.0 / np.maximum(mse, 1e-12))))


def ssim(images: np.ndarray, targets: np.ndarray) -> float:
  """Mean SSIM (Wang et al. 2004: Gaussian window sigma 1.5, 11 taps; K1 0.01, K2 0.03) of
  images in [-1, 1] [N, H, W, C], per channel, averaged over the pixels whose window lies inside
  the image (as `tf.image.ssim` and scikit-image compute it), channels and images."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  # SSIM's luminance term is not shift-invariant: it is defined on pixel values from 0 (here
  # [0, 1], data range 1), not on the model's [-1, 1].
  x = (np.asarray(images, np.float64) + 1.0) / 2.0
  y = (np.asarray(targets, np.float64) + 1.0) / 2.0
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  blur = lambda a: ndimage.gaussian_filter(a, sigma=(0, 1.5, 1.5, 0), truncate=3.5,
                                           mode='reflect')
  mx, my = blur(x), blur(y)
  vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
  ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
  pad = 5
  return float(ssim_map[:, pad:-pad, pad:-pad].mean())


def load_upsampler(path: str):
  """(Stage, params) of a trained upsampler (a run's workdir or its export/)."""
  config, params = export.load_export(path, what='upsampler')
  return Stage(config), params
