"""Images as the stages want them: any encoded or decoded image → RGB, resized and cropped to a
square, as float32 in [-1, 1].

Decoding takes JPEG, PNG, WebP (and what else PIL reads) in any mode: greyscale and 16-bit,
palette, with transparency (composited over white), CMYK. The shorter side is resized to the
target resolution (bicubic, antialiased when shrinking) and the square is cut from the centre,
or at a random place (the upsamplers' crops) from a given generator. An image that is already
the target size is passed through untouched.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

CROPS = ('center', 'random')


class ImageError(ValueError):
  """An image that cannot be used: `reason` is the skip counter it goes to."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def open_image(data, draft: int | None = None) -> Image.Image:
  """Encoded bytes or a decoded uint8 array [H, W] / [H, W, C] → a loaded PIL image.

  With `draft`, a large JPEG is decoded at the smallest of its reduced scales (1/2, 1/4, 1/8)
  whose sides are still at least `draft` pixels: much faster, and resized further anyway.
  """
  if isinstance(data, np.ndarray):
    array = data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data
    return Image.fromarray(np.ascontiguousarray(array))
  if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
    raise ImageError('missing_image', 'no image bytes')
  try:
    img = Image.open(io.BytesIO(data))
    if draft and img.format == 'JPEG':
      img.draft('RGB', (draft, draft))
    img.load()
  except Exception as e:  # PIL raises many types for bad or truncated files
    raise ImageError('undecodable_image', f'cannot decode image: {e}') from e
  return img


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode → RGB: transparency composited over white, 16-bit and float greyscale scaled
  to 8 bits, CMYK and the rest converted by PIL."""
  if img.mode == 'RGB':
    return img
  if img.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
    a = np.asarray(img, np.float64)
    top = 65535.0 if img.mode.startswith('I;16') else max(float(a.max()), 1.0)
    if img.mode == 'I' and a.max() <= 255:
      top = 255.0
    a = np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(a, 'L').convert('RGB')
  if img.mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa') or (
      img.mode == 'P' and 'transparency' in img.info):
    rgba = img.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert('RGB')
  return img.convert('RGB')


def resize_and_crop(img: Image.Image, resolution: int, crop: str = 'center',
                    rng: np.random.Generator | None = None) -> Image.Image:
  """Shorter side → `resolution` (bicubic), then a `resolution`² square: centred, or at a
  uniformly random offset drawn from `rng` when crop='random'."""
  w, h = img.size
  if (w, h) == (resolution, resolution):
    return img
  scale = resolution / min(w, h)
  size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
  if size != (w, h):
    img = img.resize(size, Image.BICUBIC, reducing_gap=None)
  w, h = size
  if crop == 'random':
    if rng is None:
      raise ValueError("crop='random' needs a random generator")
    left = int(rng.integers(0, w - resolution + 1))
    top = int(rng.integers(0, h - resolution + 1))
  elif crop == 'center':
    left, top = (w - resolution) // 2, (h - resolution) // 2
  else:
    raise ValueError(f'config.data.crop: {crop!r} is not one of {CROPS}')
  return img.crop((left, top, left + resolution, top + resolution))


def process(data, resolution: int, *, crop: str = 'center', min_size: int = 0,
            rng: np.random.Generator | None = None, as_uint8: bool = False) -> np.ndarray:
  """Encoded bytes or a uint8 array → float32 [resolution, resolution, 3] in [-1, 1] (uint8
  pixels with `as_uint8`: a quarter of the bytes to move between processes; `to_model_range`
  converts them).

  Raises:
    ImageError with reason 'missing_image', 'undecodable_image' or 'too_small' (shorter side
    below `min_size`).
  """
  img = open_image(data, draft=max(resolution, min_size))
  w, h = img.size
  if min(w, h) < min_size:
    raise ImageError('too_small', f'{w}x{h} is below config.data.min_size={min_size}')
  try:
    img = resize_and_crop(to_rgb(img), resolution, crop, rng)
    arr = np.asarray(img, dtype=np.uint8)
  except ImageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ImageError('undecodable_image', f'cannot convert image: {e}') from e
  if arr.shape != (resolution, resolution, 3):
    raise ImageError('undecodable_image', f'unexpected decoded shape {arr.shape}')
  return arr if as_uint8 else to_model_range(arr)


def to_model_range(pixels: np.ndarray) -> np.ndarray:
  """uint8 pixels → float32 in [-1, 1] (x / 127.5 - 1)."""
  return np.asarray(pixels, np.float32) / 127.5 - 1.0


def encode(image: np.ndarray, fmt: str = 'png', quality: int = 95) -> bytes:
  """float32 [H, W, 3] in [-1, 1] or uint8 → PNG/JPEG/WebP bytes."""
  if image.dtype != np.uint8:
    image = np.clip(np.round((image + 1.0) * 127.5), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  fmt = fmt.lower()
  pil_format = {'png': 'PNG', 'jpg': 'JPEG', 'jpeg': 'JPEG', 'webp': 'WEBP'}[fmt]
  kwargs = {'compress_level': 1} if pil_format == 'PNG' else {'quality': quality}
  Image.fromarray(image).save(buf, format=pil_format, **kwargs)
  return buf.getvalue()
