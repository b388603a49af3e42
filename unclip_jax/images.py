"""Image helpers shared by the trainer, the stages and the pipeline."""

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
