"""Conditioning augmentation for the diffusion upsamplers: blur, resize, noise and JPEG in JAX.

unCLIP (Ramesh et al. 2022, appendix C) trains its two upsamplers on corrupted low-resolution
conditioning images, so that at sampling time they are robust to the artefacts of the stage
below them:

  64 -> 256     Gaussian blur with kernel size 3 and sigma 0.6 (`degrade(..., 'blur')`);
  256 -> 1024   a "BSR degradation" (Zhang et al. 2021, BSRGAN): random blur, random down- and
                up-sampling, Gaussian noise and JPEG compression (`degrade(..., 'bsr')`).

Everything here runs *inside* a jitted training step on device, so it is pure JAX: no host
callbacks (no PIL or OpenCV JPEG encoder), static output shapes, and every random parameter is
drawn per example from a `jax.random` key. Operations that would change shapes (downsampling to
a random size) work on a static canvas instead; random choices between "apply" and "skip" are
made by computing both and selecting per example with `jnp.where`.

Images are NHWC float arrays in [-1, 1] ([B, H, W, C]; C = 3 for `jpeg_like`). Per-example
parameters may be given as a Python or JAX scalar (the same for the whole batch) or as a [B]
array. All functions compute in float32 and return the input's dtype. The array functions are
wrapped in `jax.jit` (sizes, methods and configs static), so eager calls compile once per shape
and calls from inside a jitted step simply inline.

  gaussian_kernel     normalised 1-D Gaussian taps (torchvision's formula)
  gaussian_blur       separable blur, reflect padding, per-example sigma
  resize_down_up      per-example (real-valued) downsample factor, then back to the input size
  jpeg_like           8x8 block DCT + libjpeg-style quantisation at a per-example quality
  add_gaussian_noise  i.i.d. Gaussian noise with a per-example sigma
  BSRConfig, bsr_degrade   the random BSR pipeline (blur, resize, noise, JPEG)
  degrade             'none' | 'blur' | 'bsr', as selected by an upsampler's config
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

KINDS = ('none', 'blur', 'bsr')

# unCLIP's 64 -> 256 upsampler setting.
PAPER_BLUR_SIGMA = 0.6
PAPER_BLUR_KERNEL = 3

# JPEG standard (ITU T.81, Annex K) quantisation tables, rows = vertical frequency.
JPEG_LUMA_TABLE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
], np.float32)
JPEG_CHROMA_TABLE = np.array([
    [17, 18, 24, 47, 99, 99, 99, 99],
    [18, 21, 26, 66, 99, 99, 99, 99],
    [24, 26, 56, 99, 99, 99, 99, 99],
    [47, 66, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99],
], np.float32)

# JFIF RGB <-> YCbCr (full range, 0..255; chroma offset 128).
_RGB_TO_YCBCR = np.array([
    [0.299, 0.587, 0.114],
    [-0.168736, -0.331264, 0.5],
    [0.5, -0.418688, -0.081312],
], np.float32)
_YCBCR_TO_RGB = np.linalg.inv(_RGB_TO_YCBCR.astype(np.float64)).astype(np.float32)
_CHROMA_OFFSET = np.array([0.0, 128.0, 128.0], np.float32)


def _dct_matrix(n: int = 8) -> np.ndarray:
  """Orthonormal DCT-II matrix D [n, n]: coefficients = D @ x, and x = D.T @ coefficients."""
  k = np.arange(n)[:, None]
  i = np.arange(n)[None, :]
  d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
  d[0] /= np.sqrt(2.0)
  return d.astype(np.float32)


_DCT8 = _dct_matrix(8)


def _per_example(value, batch: int) -> Array:
  """A scalar or [B] parameter → float32 [B]."""
  value = jnp.asarray(value, jnp.float32)
  if value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in (1, batch)):
    raise ValueError(f'expected a scalar or a [{batch}] array, got shape {value.shape}')
  return jnp.broadcast_to(value.reshape(-1) if value.ndim else value, (batch,))


def _check_images(images) -> Array:
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'expected NHWC images [B, H, W, C], got shape {images.shape}')
  return images


# --------------------------------------------------------------------------
# Gaussian blur.
# --------------------------------------------------------------------------


def gaussian_kernel(sigma, size: int) -> Array:
  """Normalised 1-D Gaussian taps, as torchvision's `gaussian_blur` builds them.

  Taps sit at x = linspace(-(size - 1) / 2, (size - 1) / 2, size) and are proportional to
  exp(-0.5 (x / sigma)^2). sigma is clamped to >= 1e-6, so sigma -> 0 gives the identity tap.

  Args:
    sigma: scalar standard deviation in pixels (may be traced), or an array of them [...].
    size: static number of taps (odd for a centred kernel).

  Returns:
    float32 [size] (or [..., size] for an array of sigmas), summing to 1.
  """
  if size < 1:
    raise ValueError(f'kernel size must be >= 1, got {size}')
  x = jnp.linspace(-(size - 1) / 2, (size - 1) / 2, size, dtype=jnp.float32)
  sigma = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-6)[..., None]
  pdf = jnp.exp(-0.5 * jnp.square(x / sigma))
  return pdf / jnp.sum(pdf, axis=-1, keepdims=True)


def _filter_axis(x: Array, taps: Array, axis: int) -> Array:
  """Correlates [B, H, W, C] x along spatial `axis` (1 or 2) with per-example taps [B, K].

  Reflect padding (the edge pixel is not repeated), as torch's F.pad(mode='reflect').
  """
  k = taps.shape[-1]
  pad = [(0, 0)] * 4
  pad[axis] = (k // 2, (k - 1) // 2)
  padded = jnp.pad(x, pad, mode='reflect')
  n = x.shape[axis]
  out = jnp.zeros_like(x)
  for i in range(k):  # K shifted slices: cheap for the small kernels used here.
    window = jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
    out = out + taps[:, i, None, None, None] * window
  return out


@functools.partial(jax.jit, static_argnames=('kernel_size',))
def gaussian_blur(images, sigma, kernel_size: int = 3) -> Array:
  """Separable Gaussian blur with a per-example sigma and reflect padding.

  Same result as torchvision's `transforms.functional.gaussian_blur(img, kernel_size, sigma)`
  (a 2-D kernel that is the outer product of `gaussian_kernel` with itself, reflect padding),
  but applied as two 1-D passes.

  Args:
    images: [B, H, W, C] float images; H and W must exceed kernel_size // 2.
    sigma: blur standard deviation in pixels: a scalar or [B].
    kernel_size: static kernel size (odd).

  Returns:
    The blurred images, [B, H, W, C], same dtype.
  """
  images = _check_images(images)
  x = images.astype(jnp.float32)
  taps = gaussian_kernel(_per_example(sigma, x.shape[0]), kernel_size)  # [B, K]
  x = _filter_axis(x, taps, axis=1)
  x = _filter_axis(x, taps, axis=2)
  return x.astype(images.dtype)


# --------------------------------------------------------------------------
# Down- and up-sampling.
# --------------------------------------------------------------------------

# Canvas margin (pixels each side) for the downsampled image: covers the cubic kernel's radius
# of 2 input pixels when upsampling, so both image edges see edge replication.
_RESIZE_MARGIN = 2


def _down_up_axis(x: Array, size: int, small, axis: int, method: str) -> Array:
  """One example [H, W, C]: resizes `axis` to `small` pixels (traced) and back to `size`.

  The small image lives at offset _RESIZE_MARGIN on a static canvas of size + 2 * margin; the
  canvas outside it is filled by edge replication before upsampling.
  """
  margin = _RESIZE_MARGIN
  small = small.astype(jnp.float32)
  canvas_shape = list(x.shape)
  canvas_shape[axis] = size + 2 * margin
  down = jax.image.scale_and_translate(
      x, canvas_shape, (axis,), scale=(small / size)[None],
      translation=jnp.full((1,), float(margin), jnp.float32), method=method, antialias=True)
  index = jnp.clip(jnp.arange(size + 2 * margin), margin,
                   margin + small.astype(jnp.int32) - 1)
  down = jnp.take(down, index, axis=axis)
  up_scale = size / small
  return jax.image.scale_and_translate(
      down, x.shape, (axis,), scale=up_scale[None], translation=(-margin * up_scale)[None],
      method=method, antialias=True)


@functools.partial(jax.jit, static_argnames=('method',))
def resize_down_up(images, factor, method: str = 'linear') -> Array:
  """Downsamples each example by its own factor, then resizes back to the input size.

  The small size is round(H / factor) x round(W / factor) (at least 1 pixel), so the effective
  factor is H / round(H / factor); factor 1 is the identity. Downsampling is antialiased
  (`jax.image.scale_and_translate` with antialias=True, which widens the kernel by the factor);
  upsampling interpolates with the same kernel; image edges are handled by edge replication.
  The output shape is static: the small image is computed on a fixed-size canvas.

  Args:
    images: [B, H, W, C] float images.
    factor: downsampling factor >= 1 (values below 1 are clamped to 1): a scalar or [B].
    method: 'linear' (triangle filter) or 'cubic' (Keys cubic).

  Returns:
    [B, H, W, C], same dtype.
  """
  if method not in ('linear', 'cubic'):
    raise ValueError(f"method must be 'linear' or 'cubic', got {method!r}")
  images = _check_images(images)
  x = images.astype(jnp.float32)
  b, h, w, _ = x.shape
  factor = jnp.maximum(_per_example(factor, b), 1.0)
  small_h = jnp.clip(jnp.round(h / factor), 1, h)
  small_w = jnp.clip(jnp.round(w / factor), 1, w)

  def one(image, sh, sw):
    image = _down_up_axis(image, h, sh, axis=0, method=method)
    return _down_up_axis(image, w, sw, axis=1, method=method)

  return jax.vmap(one)(x, small_h, small_w).astype(images.dtype)


# --------------------------------------------------------------------------
# JPEG-like compression.
# --------------------------------------------------------------------------


def jpeg_quant_table(table, quality) -> Array:
  """libjpeg's quality scaling of a base table.

  Args:
    table: base quantisation table [8, 8].
    quality: [B] qualities, already integers in [1, 100].

  Returns:
    float32 [B, 8, 8]: clip(floor((table * scale + 50) / 100), 1, 255) with
    scale = 5000 / q for q < 50 and 200 - 2 q otherwise.
  """
  quality = jnp.asarray(quality, jnp.float32)
  scale = jnp.where(quality < 50, 5000.0 / quality, 200.0 - 2.0 * quality)
  q = jnp.floor((jnp.asarray(table, jnp.float32) * scale[:, None, None] + 50.0) / 100.0)
  return jnp.clip(q, 1.0, 255.0)


def _blocks(x: Array) -> Array:
  """[B, H, W] (H, W multiples of 8) → [B, H/8, W/8, 8, 8]."""
  b, h, w = x.shape
  return x.reshape(b, h // 8, 8, w // 8, 8).transpose(0, 1, 3, 2, 4)


def _unblocks(x: Array) -> Array:
  """[B, H/8, W/8, 8, 8] → [B, H, W]."""
  b, hb, wb = x.shape[:3]
  return x.transpose(0, 1, 3, 2, 4).reshape(b, hb * 8, wb * 8)


def _quantise_plane(plane: Array, table: Array) -> Array:
  """DCT, quantise, dequantise and inverse-DCT one level-shifted plane [B, H, W] (H, W % 8 == 0)
  with per-example tables [B, 8, 8]."""
  d = jnp.asarray(_DCT8)
  hi = jax.lax.Precision.HIGHEST
  blocks = _blocks(plane)
  coef = jnp.einsum('ki,bhwij,lj->bhwkl', d, blocks, d, precision=hi)
  table = table[:, None, None]
  coef = jnp.round(coef / table) * table
  blocks = jnp.einsum('ki,bhwkl,lj->bhwij', d, coef, d, precision=hi)
  return _unblocks(blocks)


@functools.partial(jax.jit, static_argnames=('chroma_subsampling',))
def jpeg_like(images, quality, chroma_subsampling: bool = False) -> Array:
  """JPEG-style lossy compression and decompression, in JAX (no entropy coding: it is lossless).

  As a baseline JPEG codec does, in the 0..255 domain: round to 8-bit levels, convert RGB to
  YCbCr (JFIF), level-shift by -128, take the orthonormal 8x8 DCT-II of each block of each
  channel, divide by the standard luminance (Y) or chrominance (Cb, Cr) table scaled by the
  libjpeg quality formula, round, multiply back, inverse DCT, convert back to RGB and round and
  clip to 8-bit levels. H and W are edge-padded up to a multiple of 8 (16 with chroma
  subsampling) and cropped back. Not differentiable (rounding).

  By default all channels keep full resolution (4:4:4, as libjpeg at high quality settings).
  With chroma_subsampling=True the chroma planes are averaged over 2x2 pixels before the DCT
  and upsampled by pixel repetition afterwards (4:2:0 without libjpeg's "fancy upsampling").

  Args:
    images: [B, H, W, 3] RGB images in [-1, 1].
    quality: JPEG quality, rounded to an integer and clipped to [1, 100]: a scalar or [B].
    chroma_subsampling: static; whether to subsample chroma 4:2:0.

  Returns:
    [B, H, W, 3] decompressed images in [-1, 1], same dtype.
  """
  images = _check_images(images)
  b, h, w, c = images.shape
  if c != 3:
    raise ValueError(f'jpeg_like needs RGB images [B, H, W, 3], got shape {images.shape}')
  quality = jnp.clip(jnp.round(_per_example(quality, b)), 1.0, 100.0)
  luma_table = jpeg_quant_table(JPEG_LUMA_TABLE, quality)
  chroma_table = jpeg_quant_table(JPEG_CHROMA_TABLE, quality)

  block = 16 if chroma_subsampling else 8
  ph, pw = -h % block, -w % block
  x = jnp.round(jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0))
  x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode='edge')
  hi = jax.lax.Precision.HIGHEST
  ycc = jnp.einsum('bhwc,dc->bhwd', x, jnp.asarray(_RGB_TO_YCBCR), precision=hi)
  ycc = ycc + jnp.asarray(_CHROMA_OFFSET) - 128.0  # level shift: all channels centred on 0

  planes = [_quantise_plane(ycc[..., 0], luma_table)]
  for i in (1, 2):
    plane = ycc[..., i]
    if chroma_subsampling:
      hh, ww = plane.shape[1] // 2, plane.shape[2] // 2
      plane = plane.reshape(b, hh, 2, ww, 2).mean(axis=(2, 4))
      plane = _quantise_plane(plane, chroma_table)
      plane = jnp.repeat(jnp.repeat(plane, 2, axis=1), 2, axis=2)
    else:
      plane = _quantise_plane(plane, chroma_table)
    planes.append(plane)
  ycc = jnp.stack(planes, axis=-1) + 128.0 - jnp.asarray(_CHROMA_OFFSET)
  rgb = jnp.einsum('bhwc,dc->bhwd', ycc, jnp.asarray(_YCBCR_TO_RGB), precision=hi)
  rgb = jnp.round(jnp.clip(rgb, 0.0, 255.0))[:, :h, :w]
  return (rgb / 127.5 - 1.0).astype(images.dtype)


# --------------------------------------------------------------------------
# Noise.
# --------------------------------------------------------------------------


@jax.jit
def add_gaussian_noise(rng: Array, images, sigma) -> Array:
  """Adds i.i.d. Gaussian noise (independent per pixel and channel) and clips to [-1, 1].

  Args:
    rng: a jax.random key.
    images: [B, H, W, C] float images in [-1, 1].
    sigma: noise standard deviation in [-1, 1] units (2/255 is one 8-bit level): scalar or [B].

  Returns:
    [B, H, W, C] noisy images in [-1, 1], same dtype.
  """
  images = _check_images(images)
  x = images.astype(jnp.float32)
  sigma = _per_example(sigma, x.shape[0])[:, None, None, None]
  noise = jax.random.normal(rng, x.shape, jnp.float32)
  return jnp.clip(x + sigma * noise, -1.0, 1.0).astype(images.dtype)


# --------------------------------------------------------------------------
# The BSR pipeline and the dispatcher.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BSRConfig:
  """Probabilities and parameter ranges of `bsr_degrade` (each range is [low, high]).

  Attributes:
    blur_prob: probability of a Gaussian blur.
    blur_sigma: range of the blur's sigma, in pixels.
    blur_kernel: static blur kernel size.
    resize_prob: probability of a down-up resize.
    resize_factor: range of the (real-valued) downsampling factor.
    noise_prob: probability of additive Gaussian noise.
    noise_sigma: range of the noise's standard deviation, in [-1, 1] units (1 to 25 levels).
    jpeg_prob: probability of JPEG-like compression.
    jpeg_quality: range of the JPEG quality (rounded to an integer).
  """
  blur_prob: float = 0.5
  blur_sigma: tuple[float, float] = (0.2, 2.0)
  blur_kernel: int = 7
  resize_prob: float = 0.5
  resize_factor: tuple[float, float] = (1.0, 4.0)
  noise_prob: float = 0.5
  noise_sigma: tuple[float, float] = (1 / 255 * 2, 25 / 255 * 2)
  jpeg_prob: float = 0.5
  jpeg_quality: tuple[float, float] = (30, 95)


def _uniform(rng: Array, batch: int, bounds) -> Array:
  low, high = bounds
  return jax.random.uniform(rng, (batch,), jnp.float32, low, high)


def _select(mask: Array, new: Array, old: Array) -> Array:
  return jnp.where(mask[:, None, None, None], new, old)


@functools.partial(jax.jit, static_argnames=('config',))
def bsr_degrade(rng: Array, images, config: BSRConfig = BSRConfig()) -> Array:
  """A random BSRGAN-style degradation of each example: blur, down-up resize, noise, JPEG.

  The four operations are applied in this order; each one to each example independently with
  its probability, with a parameter drawn uniformly from its range. Every operation runs on the
  whole batch and examples pick its result or their input with `jnp.where`, so shapes are
  static. The function is jitted with `config` static (a frozen, hashable dataclass).

  Args:
    rng: a jax.random key; the same key gives the same degradations.
    images: [B, H, W, 3] RGB images in [-1, 1].
    config: probabilities and ranges.

  Returns:
    [B, H, W, 3] degraded images in [-1, 1], same dtype.
  """
  images = _check_images(images)
  x = images.astype(jnp.float32)
  b = x.shape[0]
  keys = jax.random.split(rng, 9)

  def apply(key, prob):
    return jax.random.uniform(key, (b,)) < prob

  if config.blur_prob > 0:
    sigma = _uniform(keys[1], b, config.blur_sigma)
    x = _select(apply(keys[0], config.blur_prob),
                gaussian_blur(x, sigma, config.blur_kernel), x)
  if config.resize_prob > 0:
    factor = _uniform(keys[3], b, config.resize_factor)
    x = _select(apply(keys[2], config.resize_prob), resize_down_up(x, factor), x)
  if config.noise_prob > 0:
    sigma = _uniform(keys[5], b, config.noise_sigma)
    x = _select(apply(keys[4], config.noise_prob), add_gaussian_noise(keys[6], x, sigma), x)
  if config.jpeg_prob > 0:
    quality = _uniform(keys[8], b, config.jpeg_quality)
    x = _select(apply(keys[7], config.jpeg_prob), jpeg_like(x, quality), x)
  return jnp.clip(x, -1.0, 1.0).astype(images.dtype)


def degrade(rng: Array, images, kind: str) -> Array:
  """The conditioning augmentation of an upsampler, by name.

  Args:
    rng: a jax.random key (unused by 'none' and 'blur').
    images: [B, H, W, C] images in [-1, 1] (C = 3 for 'bsr').
    kind: 'none' (identity), 'blur' (Gaussian blur, sigma 0.6, kernel 3: the paper's 64 -> 256
      setting) or 'bsr' (`bsr_degrade` with the default `BSRConfig`: the 256 -> 1024 setting).

  Returns:
    [B, H, W, C] images, same dtype.

  Raises:
    ValueError: for an unknown kind.
  """
  if kind == 'none':
    return images
  if kind == 'blur':
    return gaussian_blur(images, PAPER_BLUR_SIGMA, PAPER_BLUR_KERNEL)
  if kind == 'bsr':
    return bsr_degrade(rng, images)
  raise ValueError(f'unknown degradation kind {kind!r}; expected one of {KINDS}')
