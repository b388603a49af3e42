"""The pixel-based checker reads real captioned_shapes images correctly."""

import numpy as np
import pytest

from unclip_jax.data import captioned_shapes as cs
from unclip_jax.data import shape_checker


def _examples(resolution, n=300):
  examples = [cs.generate_example(0, 'test', i, resolution) for i in range(n)]
  images = np.stack([e['image'] for e in examples])
  labels = {k: np.array([e[k] for e in examples]) for k in ('color', 'background', 'shape')}
  return images, labels


@pytest.mark.parametrize('resolution', [32, 64])
def test_colours_of_real_images(resolution):
  images, labels = _examples(resolution)
  scores = shape_checker.score(images, labels)
  assert scores['background_accuracy'] == 1.0
  assert scores['color_accuracy'] >= 0.99


@pytest.mark.parametrize('resolution', [32, 64])
def test_shapes_of_real_images(resolution):
  images, labels = _examples(resolution)
  assert shape_checker.score(images, labels)['shape_accuracy'] >= 0.97


def test_float_images_and_blank_images():
  images, labels = _examples(32, n=20)
  as_float = images.astype(np.float32) / 127.5 - 1
  assert shape_checker.score(as_float, labels) == shape_checker.score(images, labels)
  blank = np.full((32, 32, 3), cs.COLORS['blue'], np.uint8)
  found = shape_checker.analyze(blank)
  assert found['background'] == 'blue' and found['color'] is None and found['shape'] is None


def test_shapes_of_noisy_images():
  """Speckle like a short-trained sampler's (noise of std 10 levels on every pixel) must not
  stretch the shapes' extents."""
  images, labels = _examples(64, n=200)
  rng = np.random.default_rng(0)
  noisy = np.clip(images + rng.normal(0, 10, images.shape), 0, 255).astype(np.uint8)
  scores = shape_checker.score(noisy, labels)
  assert scores['background_accuracy'] == 1.0 and scores['color_accuracy'] >= 0.99
  assert scores['shape_accuracy'] >= 0.9
