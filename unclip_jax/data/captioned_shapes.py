"""CaptionedShapes: a procedural dataset of captioned coloured shapes.

Each example is one shape (circle, square, triangle, cross or star) of one
colour, at one of three sizes and one of nine positions on a 3x3 grid, drawn
on a uniformly coloured background of a *different* colour, together with a
caption in varied wording.  It is small enough to train every unCLIP stage
(CLIP, diffusion prior, decoder, upsamplers) on a laptop CPU in minutes, and
its ground-truth attributes make evaluation objective.

Everything is generated offline from a seed:

* ``render(attrs, resolution, rng)``  -> uint8 image [res, res, 3]
* ``shape_coverage(shape, cx, cy, s, res)`` -> the fraction of each pixel a shape covers
* ``caption(attrs, rng)``             -> str
* ``counterfactual(attrs, res, rng)`` -> the scene at another position or size (a hard
  negative for contrastive training), its image and a caption naming the change
* ``CaptionedShapes``                 -> tfds builder (array_record files; in
  ``captioned_shapes_builder``, the one part that needs tensorflow-datasets)
* ``prepare(data_dir, ...)``          -> builds (once) and returns the builder

The train split never shows ``HELD_OUT_COMBINATIONS`` (five shape-colour and five
shape-position pairs; ``unseen_combinations(attrs)``), the test split is drawn from all scenes,
so prompts of the test split that ask for one (``asks_for_unseen``) measure composition.

Geometry lives in normalised [0, 1] coordinates, so the same attributes and
RNG state give the same scene at any resolution.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------
# Attribute vocabularies.
# --------------------------------------------------------------------------

# Fill ratios of the bounding box: square 1.0, circle 0.79, cross 0.64,
# triangle 0.5, star 0.35 -- distinguishable by area and outline.
SHAPES = ('circle', 'square', 'triangle', 'cross', 'star')

# Clearly distinct RGB values (pairwise L2 distance > 100).
COLORS: dict[str, tuple[int, int, int]] = {
    'red': (210, 20, 30),
    'green': (30, 170, 50),
    'blue': (30, 60, 220),
    'yellow': (250, 240, 40),
    'purple': (140, 40, 170),
    'orange': (250, 130, 0),
    'white': (245, 245, 245),
    'black': (15, 15, 15),
}

SIZES = ('small', 'medium', 'large')
# Side of the shape's bounding box as a fraction of the image side.
SIZE_FRACTIONS = {'small': 0.25, 'medium': 0.35, 'large': 0.45}

POSITIONS = (
    'top left', 'top', 'top right',
    'left', 'center', 'right',
    'bottom left', 'bottom', 'bottom right',
)
# Normalised grid coordinates of the shape centre (row-major 3x3 grid).
_GRID = (0.26, 0.5, 0.74)

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    'shape': SHAPES,
    'color': tuple(COLORS),
    'background': tuple(COLORS),
    'size': SIZES,
    'position': POSITIONS,
}

# Attribute combinations that the training split never shows, in its images or its captions
# (the held-out split keeps them), so that prompts asking for them measure composition rather
# than recall: one colour and one position per shape, each colour and each position held out
# with one shape at most (5 of the 40 shape-colour pairs, 5 of the 45 shape-position pairs).
HELD_OUT_COMBINATIONS: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ('shape', 'color'): (('circle', 'red'), ('square', 'blue'), ('triangle', 'yellow'),
                         ('cross', 'purple'), ('star', 'white')),
    ('shape', 'position'): (('circle', 'top left'), ('square', 'top right'),
                            ('triangle', 'center'), ('cross', 'bottom left'),
                            ('star', 'bottom right')),
}

# Jitter magnitudes: small enough that attributes stay unambiguous.
POSITION_JITTER = 0.02      # +- fraction of the image side
SIZE_JITTER = 0.05          # +- relative
COLOR_JITTER = 12           # +- per RGB channel
SUPERSAMPLE = 4


# --------------------------------------------------------------------------
# Sampling and rendering.
# --------------------------------------------------------------------------

def sample_attributes(rng: np.random.Generator,
                      exclude_held_out: bool = False) -> dict[str, int]:
  """Samples a random attribute assignment.

  Args:
    rng: numpy Generator.
    exclude_held_out: draw again until the scene has none of
      ``HELD_OUT_COMBINATIONS`` (the training split's rule).
  Returns:
    dict attribute name -> index into ``ATTRIBUTES[name]``; ``background``
    is always different from ``color``.
  """
  while True:
    attrs = {k: int(rng.integers(len(v))) for k, v in ATTRIBUTES.items()}
    n = len(COLORS)
    attrs['background'] = (attrs['color'] + 1 + int(rng.integers(n - 1))) % n
    if not (exclude_held_out and unseen_combinations(attrs)):
      return attrs


def unseen_combinations(attrs: dict[str, int]) -> list[tuple[str, str]]:
  """The attribute pairs of ``HELD_OUT_COMBINATIONS`` whose held-out values this scene has,
  e.g. ``[('shape', 'color')]`` for a red circle."""
  out = []
  for (a, b), pairs in HELD_OUT_COMBINATIONS.items():
    if (ATTRIBUTES[a][int(attrs[a])], ATTRIBUTES[b][int(attrs[b])]) in pairs:
      out.append((a, b))
  return out


def asks_for_unseen(text: str, attrs: dict[str, int]) -> bool:
  """Whether a caption asks for a combination the training split never shows: its scene has
  one and the caption names both of its values (shape and colour are always named; the
  position only sometimes)."""
  return any(b != 'position' or mentions(text, b, int(attrs[b]))
             for _, b in unseen_combinations(attrs))


def _shape_polygon(shape: str, cx: float, cy: float, s: float):
  """Vertices (normalised xy) of a polygonal shape in a box of side s."""
  h = s / 2
  if shape == 'square':
    return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
  if shape == 'triangle':
    return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
  if shape == 'cross':
    w = 0.2 * s  # half arm width -> arm width 0.4 s
    return [(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy - w), (cx + h, cy - w),
            (cx + h, cy + w), (cx + w, cy + w), (cx + w, cy + h), (cx - w, cy + h),
            (cx - w, cy + w), (cx - h, cy + w), (cx - h, cy - w), (cx - w, cy - w)]
  if shape == 'star':
    # Five-pointed star, point up, outer radius chosen so the width is s.
    r_out = h / np.sin(np.deg2rad(72))
    r_in = 0.382 * r_out
    height = r_out * (1 + np.cos(np.deg2rad(36)))
    top = cy - height / 2
    angles = np.deg2rad(-90 + 36 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, r_out, r_in)
    return [(cx + r * np.cos(a), top + r_out + r * np.sin(a))
            for r, a in zip(radii, angles)]
  raise ValueError(f'unknown polygonal shape {shape!r}')


def _jitter_color(rgb, rng: np.random.Generator) -> tuple[int, ...]:
  rgb = np.asarray(rgb) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3)
  return tuple(int(c) for c in np.clip(rgb, 0, 255))


def render(attrs: dict[str, int], resolution: int,
           rng: np.random.Generator) -> np.ndarray:
  """Draws one scene.

  Args:
    attrs: dict with integer indices for 'shape', 'color', 'background',
      'size', 'position' (see ``ATTRIBUTES``).
    resolution: output side length in pixels.
    rng: numpy Generator for the jitter. The same generator state gives the
      same scene (in normalised coordinates) at every resolution.
  Returns:
    uint8 array [resolution, resolution, 3].
  """
  shape = SHAPES[attrs['shape']]
  fg = _jitter_color(COLORS[ATTRIBUTES['color'][attrs['color']]], rng)
  bg = _jitter_color(COLORS[ATTRIBUTES['background'][attrs['background']]], rng)
  row, col = divmod(attrs['position'], 3)
  cx, cy = np.array([_GRID[col], _GRID[row]]) + rng.uniform(-1, 1, 2) * POSITION_JITTER
  s = SIZE_FRACTIONS[SIZES[attrs['size']]] * (1 + rng.uniform(-1, 1) * SIZE_JITTER)

  big = resolution * SUPERSAMPLE
  img = Image.new('RGB', (big, big), bg)
  _draw_shape(ImageDraw.Draw(img), shape, cx, cy, s, big, fg)
  arr = np.asarray(img, dtype=np.float32)
  arr = arr.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 3).mean((1, 3))
  return np.round(arr).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, s: float,
                big: int, fill, origin: tuple[int, int] = (0, 0)) -> None:
  """Draws a shape centred at normalised (cx, cy) with box side s, at scale `big` (pixels per
  unit), on a canvas whose top-left corner is at `origin` (x, y) of that scale."""
  # Pixel (i, j) covers [i, i+1) in PIL's coordinates: scale by `big`.
  ox, oy = origin
  if shape == 'circle':
    h = s / 2
    draw.ellipse([(cx - h) * big - ox, (cy - h) * big - oy, (cx + h) * big - 1 - ox,
                  (cy + h) * big - 1 - oy], fill=fill)
  else:
    draw.polygon([(x * big - ox, y * big - oy) for x, y in _shape_polygon(shape, cx, cy, s)],
                 fill=fill)


def shape_coverage(shape: str, cx: float, cy: float, s: float, resolution: int,
                   window: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """The fraction of each pixel a shape covers, as `render` draws it (to steps of 1/255).

  Args:
    shape: a name from SHAPES.
    cx, cy, s: the centre (normalised image coordinates) and the width of the shape's bounding
      box (a star's is 0.95 s high, every other shape's s).
    resolution: the image's side in pixels.
    window: (top, left, height, width) in pixels: only that part of the image (cheaper).
  Returns:
    float32 [resolution, resolution] (or [height, width]) in [0, 1].
  """
  top, left, height, width = window or (0, 0, resolution, resolution)
  big = resolution * SUPERSAMPLE
  img = Image.new('L', (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
  _draw_shape(ImageDraw.Draw(img), shape, cx, cy, s, big, 255,
              origin=(left * SUPERSAMPLE, top * SUPERSAMPLE))
  return np.asarray(img.reduce(SUPERSAMPLE), np.float32) * (1 / 255)


def shape_coverages(shape: str, cx, cy, s, resolution: int,
                    window: tuple[int, int, int, int]) -> np.ndarray:
  """`shape_coverage` for many centres and sizes ([n] arrays) over one window (top, left,
  height, width): [n, height, width]. Outlines that stay inside the window are drawn together on
  one canvas, one window below the other, which gives the same pixels as drawing them one by one
  at a fraction of the cost; the others (cut by the window's edge, where the rasteriser's edge
  pixels can differ by a sixteenth) are drawn one by one."""
  cx, cy, s = (np.atleast_1d(np.asarray(v, np.float64)) for v in np.broadcast_arrays(cx, cy, s))
  top, left, height, width = window
  big = resolution * SUPERSAMPLE
  # Every shape lies within its box of side s around its centre (a star's is lower than wide).
  x0, x1 = (cx - s / 2) * big - left * SUPERSAMPLE, (cx + s / 2) * big - left * SUPERSAMPLE
  y0, y1 = (cy - s / 2) * big - top * SUPERSAMPLE, (cy + s / 2) * big - top * SUPERSAMPLE
  inside = ((x0 >= 0) & (x1 <= width * SUPERSAMPLE - 1) & (y0 >= 0) &
            (y1 <= height * SUPERSAMPLE - 1))
  canvas = Image.new('L', (width * SUPERSAMPLE, height * SUPERSAMPLE * len(cx)), 0)
  draw = ImageDraw.Draw(canvas)
  for i in np.nonzero(inside)[0]:
    _draw_shape(draw, shape, cx[i], cy[i], s[i], big, 255,
                origin=(left * SUPERSAMPLE, (top - i * height) * SUPERSAMPLE))
  out = np.asarray(canvas.reduce(SUPERSAMPLE), np.float32).reshape(len(cx), height, width)
  out = out * (1 / 255)
  for i in np.nonzero(~inside)[0]:
    out[i] = shape_coverage(shape, cx[i], cy[i], s[i], resolution, window)
  return out


# --------------------------------------------------------------------------
# Captions.
# --------------------------------------------------------------------------

# Slots: {c} colour, {s} shape, {b} background, {z} size, {p} position phrase.
# A leading 'a' before a slot becomes 'an' when the next word is a vowel.
_TEMPLATES = (
    'a {c} {s} on a {b} background',
    '{c} {s}, {b} background',
    'a picture of a {c} {s} on {b}',
    'a {c} {s} against a {b} background',
    'an image of a {c} {s} on a {b} background',
    'a {z} {c} {s} on a {b} background',
    'a picture of a {z} {c} {s} on {b}',
    '{z} {c} {s}, {b} background',
    '{b} background with a {z} {c} {s}',
    'a {c} {s} {p} of a {b} image',
    'a {c} {s} {p}, {b} background',
    'a {z} {c} {s} {p} of a {b} image',
    'a {z} {c} {s} {p} on a {b} background',
    'an image of a {z} {c} {s} {p}, {b} background',
)
_CORNER_PHRASES = ('in the {p}', 'at the {p}', 'in the {p} corner')
_EDGE_PHRASES = {
    'top': ('at the top', 'near the top'),
    'bottom': ('at the bottom', 'near the bottom'),
    'left': ('on the left', 'on the left side'),
    'right': ('on the right', 'on the right side'),
    'center': ('in the center', 'in the middle', 'at the center'),
}
_WORD_RE = re.compile(r'[a-z]+')


def _position_phrase(position: str, rng: np.random.Generator) -> str:
  phrases = _EDGE_PHRASES.get(position, _CORNER_PHRASES)
  return str(rng.choice(phrases)).format(p=position)


def position_phrases(position: str) -> tuple[str, ...]:
  """The phrases captions use for a position ('top left' -> 'in the top left', ...)."""
  return tuple(p.format(p=position) for p in _EDGE_PHRASES.get(position, _CORNER_PHRASES))


def mentions(text: str, attribute: str, index: int) -> bool:
  """Whether a caption asks for its scene's size or position (captions name them only
  sometimes): the size word, or one of the position's phrases."""
  text = ' '.join(_WORD_RE.findall(text.lower()))
  if attribute == 'size':
    return re.search(rf'\b{SIZES[index]}\b', text) is not None
  if attribute == 'position':
    position = POSITIONS[index]
    # 'at the bottom' is the bottom edge, not the start of 'at the bottom right'.
    return any(re.search(rf'\b{re.escape(phrase.format(p=position))}\b(?! (left|right)\b)',
                         text) for phrase in _EDGE_PHRASES.get(position, _CORNER_PHRASES))
  raise ValueError(f'captions always name the {attribute}; mentions() reads size and position')


def fix_articles(text: str) -> str:
  """'a orange ...' → 'an orange ...'."""
  return re.sub(r'\ba (?=[aeiou])', 'an ', text)


_SLOTS = {'size': '{z}', 'position': '{p}'}


def caption(attrs: dict[str, int], rng: np.random.Generator, naming: str | None = None) -> str:
  """Writes a caption for ``attrs`` with a randomly chosen template.

  Args:
    attrs: attribute indices as for ``render``.
    rng: numpy Generator choosing the template.
    naming: 'size' or 'position': choose among the templates that name it.
  Returns:
    lower-case caption; always names the shape, its colour and the
    background colour, and sometimes the size and/or the position.
  """
  templates = _TEMPLATES if naming is None else tuple(
      t for t in _TEMPLATES if _SLOTS[naming] in t)
  template = templates[int(rng.integers(len(templates)))]
  text = template.format(
      c=ATTRIBUTES['color'][attrs['color']],
      s=SHAPES[attrs['shape']],
      b=ATTRIBUTES['background'][attrs['background']],
      z=SIZES[attrs['size']],
      p=_position_phrase(POSITIONS[attrs['position']], rng)
      if '{p}' in template else '')
  return fix_articles(text)


def counterfactual(attrs: dict[str, int], resolution: int, rng: np.random.Generator,
                   exclude_held_out: bool = False) -> tuple[dict[str, int], np.ndarray, str]:
  """A hard negative for contrastive training: the same shape, colour and background with
  another position (two times in three) or another size, drawn anew and captioned by a
  template that names the attribute that changed.

  Random batches seldom hold two captions that differ only in position or size, so a
  contrastive loss learns to ignore them; a scene next to its counterfactual in the batch makes
  them matter.

  Args:
    attrs: the scene's attribute indices.
    resolution: the image's side in pixels.
    rng: numpy Generator (the change, the jitter and the caption).
    exclude_held_out: never change into one of ``HELD_OUT_COMBINATIONS`` (the training split).
  Returns:
    (attribute indices, uint8 image [resolution, resolution, 3], caption).
  """
  attrs = {k: int(attrs[k]) for k in ATTRIBUTES}
  changed = 'position' if rng.random() < 2 / 3 else 'size'
  choices = []
  for value in range(len(ATTRIBUTES[changed])):
    other = dict(attrs, **{changed: value})
    if value != attrs[changed] and not (exclude_held_out and unseen_combinations(other)):
      choices.append(other)
  other = choices[int(rng.integers(len(choices)))]
  image = render(other, resolution, rng)
  return other, image, caption(other, rng, naming=changed)


def caption_words(text: str) -> list[str]:
  """Splits a caption into lower-case words (punctuation dropped)."""
  return _WORD_RE.findall(text.lower())


def caption_vocabulary() -> list[str]:
  """Every word any caption can contain (``caption_words`` split).

  Returns:
    sorted list of unique lower-case words.
  """
  words = {'a', 'an'}
  phrases = _CORNER_PHRASES + sum(_EDGE_PHRASES.values(), ())
  for template in _TEMPLATES + phrases:
    words.update(caption_words(re.sub(r'\{\w\}', ' ', template)))
  for values in ATTRIBUTES.values():
    for value in values:
      words.update(caption_words(value))
  return sorted(words)


# --------------------------------------------------------------------------
# Examples (the tfds builder is in captioned_shapes_builder).
# --------------------------------------------------------------------------

_SPLIT_STREAM = {'train': 0, 'test': 1}


def generate_example(seed: int, split: str, index: int, resolution: int,
                     held_out_combinations: bool = True) -> dict:
  """Generates example ``index`` of ``split`` deterministically.

  Each (seed, split, index) has its own independent RNG stream, so splits are
  disjoint streams and examples can be generated in any order. With
  ``held_out_combinations``, the train split never has one of
  ``HELD_OUT_COMBINATIONS``; the test split is drawn from all scenes.

  Returns:
    dict with 'image' (uint8 [res, res, 3]), 'caption' (str), the five
    attribute indices (int) and 'id' (int, = index).
  """
  rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
  attrs = sample_attributes(rng, exclude_held_out=held_out_combinations and split == 'train')
  image = render(attrs, resolution, rng)
  return dict(image=image, caption=caption(attrs, rng), id=index, **attrs)


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


def default_data_dir() -> str:
  """``$UNCLIP_DATA_DIR`` if set, else ``~/.cache/unclip_jax/datasets``."""
  return os.environ.get('UNCLIP_DATA_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'unclip_jax', 'datasets')


def prepare(data_dir: str | None = None, resolution: int = 32,
            num_train: int = 20000, num_test: int = 1000,
            seed: int = 0, held_out_combinations: bool = True):
  """Returns the tfds builder for this config, generating the data if missing (see
  `captioned_shapes_builder.prepare`, which holds the builder: tensorflow-datasets is imported
  only here, so the scenes, captions and vocabulary need only numpy and PIL)."""
  from unclip_jax.data import captioned_shapes_builder  # pylint: disable=g-import-not-at-top
  return captioned_shapes_builder.prepare(data_dir, resolution, num_train, num_test, seed,
                                          held_out_combinations)


def __getattr__(name: str):
  """`CaptionedShapes` and `CaptionedShapesConfig`, the tfds builder and its config, imported on
  first use."""
  if name in ('CaptionedShapes', 'CaptionedShapesConfig'):
    from unclip_jax.data import captioned_shapes_builder  # pylint: disable=g-import-not-at-top
    return getattr(captioned_shapes_builder, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
