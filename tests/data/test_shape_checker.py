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
