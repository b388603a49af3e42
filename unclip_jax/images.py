"""Image helpers shared by the trainer, the stages and the pipeline."""

import textwrap
from typing import Optional

import numpy as np


def image_grid(images: np.ndarray, columns: Optional[int] = None) -> np.ndarray:
  """[N, H, W, 3] images (uint8, or float in [-1, 1]) → one uint8 grid image, row-major."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / columns))
  grid = np.zeros((rows * h, columns * w, c), np.uint8)
  for i, image in enumerate(images):
    r, k = divmod(i, columns)
    grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = image
  return grid


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Images in [-1, 1] → uint8."""
  return np.round((np.clip(np.asarray(images), -1, 1) + 1) * 127.5).astype(np.uint8)


def contact_sheet(images: np.ndarray, captions: list[str], columns: int, cell: int = 128):
  """uint8 images [N, H, W, 3] and their captions → one PIL image: a grid of `cell`-px tiles,
  each caption wrapped beneath its image."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  n = len(images)
  columns = max(1, min(columns, n))
  rows = -(-n // columns)
  text_h = 56
  sheet = Image.new('RGB', (columns * cell, rows * (cell + text_h)), 'white')
  draw = ImageDraw.Draw(sheet)
  for i, (image, caption) in enumerate(zip(images, captions)):
    r, c = divmod(i, columns)
    x, y = c * cell, r * (cell + text_h)
    sheet.paste(Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
    lines = textwrap.wrap(caption, width=cell // 6)[:4]
    draw.multiline_text((x + 2, y + cell + 1), '\n'.join(lines), fill='black', spacing=1)
  return sheet


def save_with_sheet(images: np.ndarray, captions: list[str], image_dir: str, sheet_path: str,
                    columns: int = 8) -> None:
  """Images in [-1, 1] → image_dir/NNNN.png, and a contact sheet (each caption beneath its
  image) at sheet_path. Local or remote (gs://) paths."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = epath.Path(image_dir)
  folder.mkdir(parents=True, exist_ok=True)
  pixels = to_uint8(images)
  for i, image in enumerate(pixels):
    with (folder / f'{i:04d}.png').open('wb') as f:
      Image.fromarray(image).save(f, format='PNG')
  with epath.Path(sheet_path).open('wb') as f:
    contact_sheet(pixels, captions, columns).save(f, format='PNG')
