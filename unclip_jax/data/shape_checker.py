"""An independent, pixel-based judge of captioned_shapes images (no learned model).

Given an image, it estimates the background colour (the border's median), the shape's colour (the
median of the pixels far from the background), the shape, and its size and position (the nearest of
the dataset's box sides and 3x3 grid cells to the fitted outline's). Colours snap to the dataset's
own palette (`captioned_shapes.COLORS`). The shape is the one whose outline, drawn by the dataset's
own renderer (`captioned_shapes.shape_coverage`) at the region's measured position and size, best
overlaps the image's coverage map (anti-aliased edges counted fractionally; soft IoU over a few
sizes and sub-pixel offsets). Whole outlines, not summary features such as the bounding box's fill
ratio, so that a generated shape's imperfections (rounded corners, wavy edges, blur) do not move it
to another class: a square with soft corners fills less of its box, as a circle does, but it still
fits a square's outline far better than a circle's.

Used to score generated images against their prompts. Validated on real dataset images (all read
right at 32 and 64px), on real outlines degraded as a generator's are, and on 96 generated images
read by eye without their prompts (tests/data/generated_shapes_64px.*).
"""

import functools

import numpy as np
from scipy import ndimage

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
    {'background', 'color', 'shape', 'size', 'position': names (all but the background None
     if no shape is visible; size and position are read whether or not the outline fits a
     shape), 'fill_ratio': the shape's coverage over its bounding box's area, 'shape_iou': how
     well the read shape's outline fits (soft IoU, 0 if none)}.
  """
  img = to_uint8_range(image)
  bg, fg, coverage, width, height = _measure(img)
  result = {'background': nearest_color(bg), 'color': None, 'shape': None, 'size': None,
            'position': None, 'fill_ratio': 0.0, 'shape_iou': 0.0}
  if fg is None:
    return result
  result['color'] = nearest_color(fg)
  if coverage is None:
    return result
  result['fill_ratio'] = float(coverage.sum() / (width * height))
  fits = _fit_outlines(coverage)
  best = max(fits, key=lambda shape: fits[shape][0])
  iou, side, cx, cy = fits[best]
  if iou >= MIN_IOU:
    result['shape'], result['shape_iou'] = best, float(iou)
    # The fitted outline's box side and centre: exact for any shape, where the region's own
    # extents under-read thin points (a star's) and rounded corners.
    result['size'], result['position'] = _size_word(side), _position_word(cx, cy)
  else:
    result['size'], result['position'] = size_and_position(coverage)
  return result


MIN_IOU = 0.5       # a region that no shape's outline overlaps by half is not read as a shape
MAX_EXTENT = 0.6    # nor one wider or taller than this fraction of the image (the dataset's
                    # largest shapes span 0.47): a noise field is not a square
# Sizes (relative to the measured extents) and centre offsets (pixels) each outline is tried at:
# a generated shape's edges are ragged and its extents a pixel or so off.
_FIT_SCALES = (0.85, 0.925, 1.0, 1.075)
_FIT_OFFSETS = (-0.5, 0.0, 0.5)
# Every (scale, dy, dx) combination, flattened.
_FIT_GRID = tuple(a.ravel() for a in np.meshgrid(_FIT_SCALES, _FIT_OFFSETS, _FIT_OFFSETS,
                                                 indexing='ij'))


def _main_region(coverage: np.ndarray) -> np.ndarray:
  """The coverage of the largest connected shape region (with its anti-aliased rim): a stray
  blob elsewhere must not stretch the extents the outlines are fitted to."""
  labels, n = ndimage.label(coverage > 0.5)
  if n <= 1:
    return coverage
  mass = ndimage.sum(coverage, labels, range(1, n + 1))
  keep = ndimage.binary_dilation(labels == 1 + int(np.argmax(mass)))
  return np.where(keep, coverage, 0.0)


def shape_fits(coverage: np.ndarray) -> dict[str, float]:
  """How well each shape's outline, drawn by the dataset's own renderer, matches a coverage map
  [H, W] in [0, 1] (with some coverage above 0.5): the best soft IoU (sum of minima over sum of
  maxima) over a few sizes and centre offsets around the largest region's measured extents; all
  0 for a region larger than any shape the dataset draws (`MAX_EXTENT`).

  Matching whole outlines, rather than summary features such as the bounding box's fill ratio,
  keeps a generated square with slightly rounded corners or a wavy edge a square: its fill ratio
  falls towards a circle's, but it still overlaps a square's outline far better than a circle's.
  """
  return {shape: fit[0] for shape, fit in _fit_outlines(coverage).items()}


def _fit_outlines(coverage: np.ndarray) -> dict[str, tuple[float, float, float, float]]:
  """`shape_fits`, with each shape's best outline: {shape: (soft IoU, box side, centre x,
  centre y)}, the last three as fractions of the image side."""
  coverage = np.asarray(coverage, np.float32)
  if coverage.ndim != 2 or coverage.shape[0] != coverage.shape[1]:
    raise ValueError(f'shape_checker reads square images (as the dataset draws them); got '
                     f'{coverage.shape[:2]}')
  coverage = _main_region(coverage)
  res = coverage.shape[0]
  rows = np.nonzero(coverage.max(axis=1) > 0.5)[0]
  cols = np.nonzero(coverage.max(axis=0) > 0.5)[0]
  if max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 > MAX_EXTENT * res:
    return dict.fromkeys(captioned_shapes.SHAPES, (0.0, 0.0, 0.5, 0.5))
  cy, cx = (rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2
  width, height = float(coverage.max(axis=0).sum()), float(coverage.max(axis=1).sum())
  sides = {shape: (width + height / _aspect(shape)) / 2 for shape in captioned_shapes.SHAPES}
  # Outlines are drawn only over a window that holds the region and every outline tried (all
  # coverage outside it is 0): the same fit as over the whole image, at a fraction of the cost.
  reach = max(sides.values()) * max(_FIT_SCALES) / 2 + max(_FIT_OFFSETS) + 1
  ys, xs = np.nonzero(coverage.max(axis=1))[0], np.nonzero(coverage.max(axis=0))[0]
  top, left = max(0, min(ys.min(), int(cy - reach))), max(0, min(xs.min(), int(cx - reach)))
  bottom = min(res, max(ys.max() + 1, int(np.ceil(cy + reach))))
  right = min(res, max(xs.max() + 1, int(np.ceil(cx + reach))))
  window = (top, left, bottom - top, right - left)
  region = coverage[top:bottom, left:right]
  k, dy, dx = _FIT_GRID
  fits = {}
  for shape, side in sides.items():
    templates = captioned_shapes.shape_coverages(shape, (cx + dx) / res, (cy + dy) / res,
                                                 side * k / res, res, window)
    iou = (np.minimum(templates, region).sum((1, 2)) /
           np.maximum(templates, region).sum((1, 2)))
    i = int(np.argmax(iou))
    fits[shape] = (float(iou[i]), side * k[i] / res, (cx + dx[i]) / res, (cy + dy[i]) / res)
  return fits


# The dataset's definitions: the box side as a fraction of the image side, and the centre's
# 3x3 grid coordinates (every shape's box is as wide as its side; its bounding box is centred
# on the centre the dataset draws it at).
_SIZE_FRACTIONS = np.array([captioned_shapes.SIZE_FRACTIONS[s] for s in captioned_shapes.SIZES])
_GRID = np.array(captioned_shapes._GRID)  # pylint: disable=protected-access


def _size_word(side: float) -> str:
  return captioned_shapes.SIZES[int(np.argmin(np.abs(_SIZE_FRACTIONS - side)))]


def _position_word(cx: float, cy: float) -> str:
  row, col = int(np.argmin(np.abs(_GRID - cy))), int(np.argmin(np.abs(_GRID - cx)))
  return captioned_shapes.POSITIONS[3 * row + col]


def size_and_position(coverage: np.ndarray) -> tuple[str, str]:
  """The size and position words of the largest region of a coverage map [H, W] that fits no
  shape: the nearest of the dataset's box sides to the region's (sub-pixel) width, and the
  nearest 3x3 grid cell to its bounding box's centre."""
  coverage = _main_region(np.asarray(coverage, np.float32))
  res = coverage.shape[1]
  rows = np.nonzero(coverage.max(axis=1) > 0.5)[0]
  cols = np.nonzero(coverage.max(axis=0) > 0.5)[0]
  cy = (rows.min() + rows.max() + 1) / 2 / coverage.shape[0]
  cx = (cols.min() + cols.max() + 1) / 2 / res
  return _size_word(float(coverage.max(axis=0).sum()) / res), _position_word(cx, cy)


@functools.cache
def _aspect(shape: str) -> float:
  """Height over width of a shape's bounding box as the dataset draws it (a star's 0.95)."""
  c = captioned_shapes.shape_coverage(shape, 0.5, 0.5, 0.5, 256) > 0.5
  rows, cols = np.nonzero(c.any(axis=1))[0], np.nonzero(c.any(axis=0))[0]
  return (rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1)


def score(images: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, float]:
  """Fractions of images whose read attributes match the labels.

  Args:
    images: [N, H, W, 3] (uint8 or float in [-1, 1]).
    labels: integer arrays [N] for 'color', 'background' and 'shape' (dataset indices), and
      optionally 'size' and 'position'.
  Returns:
    {'ATTRIBUTE_accuracy' for each attribute labelled, 'all_accuracy': every one right}.
  """
  return score_readings([analyze(image) for image in images], labels)


def score_readings(readings: list[dict], labels: dict[str, np.ndarray],
                   captions=None) -> dict[str, float]:
  """`score` from readings already made by `analyze`. With the images' `captions` (generated
  images: the prompts), size and position count only where the caption asks for them
  (`captioned_shapes.mentions`; their counts as `size_asked` / `position_asked`), and
  `all_accuracy` is every attribute asked for right."""
  hits = _hits(readings, labels)
  asked = {k: np.ones(len(readings), bool) for k in hits}
  if captions is not None:
    for k in ('size', 'position'):
      if k in hits:
        asked[k] = np.array([captioned_shapes.mentions(str(c), k, int(labels[k][i]))
                             for i, c in enumerate(captions)], bool)
  out = {}
  for k, v in hits.items():
    v = np.asarray(v, bool)
    out[f'{k}_accuracy'] = float(v[asked[k]].mean()) if asked[k].any() else float('nan')
    if captions is not None and k in ('size', 'position'):
      out[f'{k}_asked'] = int(asked[k].sum())
  right = np.all([np.asarray(hits[k], bool) | ~asked[k] for k in hits], axis=0)
  out['all_accuracy'] = float(np.mean(right))
  return out


def shape_confusion(readings: list[dict], labels: dict[str, np.ndarray]) -> dict:
  """How the shapes asked for were read: {shape asked for: {shape read ('none' if none): count}}
  (the dataset's shape order; shapes never asked for are left out)."""
  out = {}
  for reading, asked in zip(readings, labels['shape']):
    counts = out.setdefault(captioned_shapes.SHAPES[int(asked)], {})
    read = reading['shape'] or 'none'
    counts[read] = counts.get(read, 0) + 1
  return {s: out[s] for s in captioned_shapes.SHAPES if s in out}


def _hits(readings: list[dict], labels: dict[str, np.ndarray]) -> dict[str, list[bool]]:
  names = captioned_shapes.ATTRIBUTES
  if len(readings) != len(labels['shape']):
    raise ValueError(f'{len(readings)} images but {len(labels["shape"])} labels')
  return {k: [r[k] == names[k][int(labels[k][i])] for i, r in enumerate(readings)]
          for k in ('color', 'background', 'shape', 'size', 'position') if k in labels}
