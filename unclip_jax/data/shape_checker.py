"""An independent, pixel-based judge of captioned_shapes images (no learned model).

Given an image, it estimates the background colour (the border's median), the shape's colour (the
median of the pixels far from the background) and the shape, from three features of its coverage
map (anti-aliased edges counted fractionally): the fraction of its bounding box it fills, where its
mass sits vertically, and how much of the box's corners it covers. Colours snap to the dataset's
own palette (`captioned_shapes.COLORS`); shapes to the nearest prototype of those features,
measured on the dataset's own renderer at the image's resolution. Used to score
generated images against their prompts, and validated on real dataset images.
"""

import numpy as np

from unclip_jax.data import captioned_shapes

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


SPECKLE = 0.35   # coverage below this (35% of the shape/background contrast) is noise


def _measure(img: np.ndarray):
  """(background RGB, shape RGB or None, coverage [H, W] or None, width, height) of an image in
  [0, 255]. Coverage counts anti-aliased edge pixels fractionally; width and height are the
  shape's sub-pixel extents."""
  h, w, _ = img.shape
  ring = max(1, min(h, w) // 16)
  border = np.concatenate([img[:ring].reshape(-1, 3), img[-ring:].reshape(-1, 3),
                           img[:, :ring].reshape(-1, 3), img[:, -ring:].reshape(-1, 3)])
  bg = np.median(border, axis=0)
  dist = np.linalg.norm(img - bg, axis=-1)
  core = dist > 80.0     # clearly not background (palette colours are > 100 apart)
  if core.sum() < 2:
    return bg, None, None, 0.0, 0.0
  fg = np.median(img[core], axis=0)
  contrast = max(float(np.linalg.norm(fg - bg)), 1.0)
  coverage = np.clip(dist / contrast, 0.0, 1.0)
  # Faint differences are noise, not shape: a generated image's speckle would otherwise add a
  # little coverage to every row and column and stretch the shape's extents.
  coverage = np.where(coverage < SPECKLE, 0.0, coverage)
  width = float(coverage.max(axis=0).sum())
  height = float(coverage.max(axis=1).sum())
  if width * height < 1.0 or not (coverage > 0.5).any():
    return bg, fg, None, width, height
  return bg, fg, coverage, width, height


def analyze(image: np.ndarray) -> dict:
  """Reads an image's attributes from its pixels.

  Args:
    image: [H, W, 3], uint8 or float in [-1, 1].
  Returns:
    {'background', 'color', 'shape': names (shape/color None if no shape is visible),
     'fill_ratio': float}.
  """
  img = to_uint8_range(image)
  bg, fg, coverage, width, height = _measure(img)
  result = {'background': nearest_color(bg), 'color': None, 'shape': None, 'fill_ratio': 0.0}
  if fg is None:
    return result
  result['color'] = nearest_color(fg)
  if coverage is None:
    return result
  features = _shape_features(coverage, width, height)
  result['fill_ratio'] = float(features[0])
  result['shape'] = _nearest_shape(features, img.shape[0])
  return result


def _shape_features(coverage: np.ndarray, width: float, height: float) -> np.ndarray:
  """(fill ratio, vertical centroid within the box, corner coverage) of a coverage map."""
  mass = coverage.sum()
  ys, xs = np.indices(coverage.shape)
  rows = np.nonzero(coverage.max(axis=1) > 0.5)[0]
  cols = np.nonzero(coverage.max(axis=0) > 0.5)[0]
  top, left = rows.min(), cols.min()
  bottom, right = rows.max(), cols.max()
  centroid = ((coverage * ys).sum() / mass - top + 0.5) / max(bottom - top + 1, 1)
  corners = np.mean([coverage[top, left], coverage[top, right], coverage[bottom, left],
                     coverage[bottom, right]])
  return np.array([mass / (width * height), centroid, corners])


_PROTOTYPES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _prototypes(resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """Mean and spread of each shape's features over dataset renders at this resolution."""
  if resolution not in _PROTOTYPES:
    rng = np.random.default_rng(1234)
    features = {s: [] for s in captioned_shapes.SHAPES}
    for _ in range(400):
      attrs = captioned_shapes.sample_attributes(rng)
      image = captioned_shapes.render(attrs, resolution, rng)
      _, _, coverage, width, height = _measure(to_uint8_range(image))
      if coverage is not None:
        features[captioned_shapes.SHAPES[attrs['shape']]].append(
            _shape_features(coverage, width, height))
    means = np.stack([np.mean(features[s], 0) for s in captioned_shapes.SHAPES])
    spread = np.std(np.concatenate([np.asarray(v) - m for v, m in
                                    zip(features.values(), means)]), 0) + 1e-3
    _PROTOTYPES[resolution] = means, spread
  return _PROTOTYPES[resolution]


def _nearest_shape(features: np.ndarray, resolution: int) -> str:
  means, spread = _prototypes(resolution)
  distance = np.linalg.norm((means - features) / spread, axis=1)
  return captioned_shapes.SHAPES[int(np.argmin(distance))]


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
