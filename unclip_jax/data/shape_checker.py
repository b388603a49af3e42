"""An independent, pixel-based judge of captioned_shapes images (no learned model).

Given an image, it estimates the background colour (the border's median), the shape's colour (the
median of the pixels far from the background) and the shape (the fraction of its bounding box the
shape covers, with anti-aliased edges counted fractionally), each snapped to the nearest entry of
the dataset's own definitions (`captioned_shapes.COLORS`, the shapes' fill ratios). Used to score
generated images against their prompts, and validated on real dataset images.
"""

import numpy as np

from unclip_jax.data import captioned_shapes

# Fraction of its bounding box each shape covers (from the dataset's geometry).
FILL_RATIOS = {'square': 1.0, 'circle': np.pi / 4, 'cross': 0.64, 'triangle': 0.5,
               'star': 0.35}

_PALETTE_NAMES = tuple(captioned_shapes.COLORS)
_PALETTE = np.array([captioned_shapes.COLORS[n] for n in _PALETTE_NAMES], np.float32)


def to_uint8_range(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] or float [-1, 1] image [H, W, 3] → float32 in [0, 255]."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float32)
  return (np.clip(image, -1, 1).astype(np.float32) + 1) * 127.5


def nearest_color(rgb: np.ndarray) -> str:
  """The palette colour name nearest to an RGB triple in [0, 255]."""
  return _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=-1)))]


def analyze(image: np.ndarray) -> dict:
  """Reads an image's attributes from its pixels.

  Args:
    image: [H, W, 3], uint8 or float in [-1, 1].
  Returns:
    {'background', 'color', 'shape': names (shape/color None if no shape is visible),
     'fill_ratio': float}.
  """
  img = to_uint8_range(image)
  h, w, _ = img.shape
  ring = max(1, min(h, w) // 16)
  border = np.concatenate([img[:ring].reshape(-1, 3), img[-ring:].reshape(-1, 3),
                           img[:, :ring].reshape(-1, 3), img[:, -ring:].reshape(-1, 3)])
  bg = np.median(border, axis=0)
  dist = np.linalg.norm(img - bg, axis=-1)
  core = dist > 80.0     # clearly not background (palette colours are > 100 apart)
  result = {'background': nearest_color(bg), 'color': None, 'shape': None, 'fill_ratio': 0.0}
  if core.sum() < 2:
    return result
  fg = np.median(img[core], axis=0)
  result['color'] = nearest_color(fg)
  # Coverage per pixel, from how far it moved from the background towards the shape colour.
  contrast = max(float(np.linalg.norm(fg - bg)), 1.0)
  coverage = np.clip(dist / contrast, 0.0, 1.0)
  # Sub-pixel extents of the bounding box: the column (row) profile's coverage, summed.
  width = float(coverage.max(axis=0).sum())
  height = float(coverage.max(axis=1).sum())
  if width * height < 1.0:
    return result
  fill = float(coverage.sum() / (width * height))
  result['fill_ratio'] = fill
  result['shape'] = min(FILL_RATIOS, key=lambda s: abs(FILL_RATIOS[s] - fill))
  return result


def score(images: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, float]:
  """Fractions of images whose read attributes match the labels.

  Args:
    images: [N, H, W, 3] (uint8 or float in [-1, 1]).
    labels: integer arrays [N] for 'color', 'background' and 'shape' (dataset indices).
  Returns:
    {'color_accuracy', 'background_accuracy', 'shape_accuracy', 'all_accuracy'}.
  """
  names = captioned_shapes.ATTRIBUTES
  hits = {k: [] for k in ('color', 'background', 'shape')}
  for i, image in enumerate(images):
    found = analyze(image)
    for k in hits:
      hits[k].append(found[k] == names[k][int(labels[k][i])])
  out = {f'{k}_accuracy': float(np.mean(v)) for k, v in hits.items()}
  out['all_accuracy'] = float(np.mean(np.all([hits[k] for k in hits], axis=0)))
  return out
