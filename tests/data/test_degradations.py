"""Upsampler conditioning augmentation: blur (torch parity), down-up resize, JPEG, noise, BSR."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unclip_jax.data import degradations as dg


def _random(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).uniform(-1, 1, shape), jnp.float32)


def _smooth(shape, seed=0):
  """A smooth random image: a 4x4 random image bilinearly upsampled."""
  b, h, w, c = shape
  coarse = np.random.RandomState(seed).uniform(-0.9, 0.9, (b, 4, 4, c))
  return jax.image.resize(jnp.asarray(coarse, jnp.float32), shape, 'linear')


def _checkerboard(h, w, amplitude=0.5, mean=0.1):
  sign = (np.indices((h, w)).sum(0) % 2) * 2.0 - 1.0
  image = mean + amplitude * sign
  return jnp.asarray(np.broadcast_to(image[None, :, :, None], (1, h, w, 3)), jnp.float32), sign


def _torch_gaussian_blur(images, kernel_size, sigma):
  """torchvision.transforms.functional.gaussian_blur's math, with plain torch ops."""
  half = (kernel_size - 1) * 0.5
  x = torch.linspace(-half, half, steps=kernel_size, dtype=torch.float32)
  pdf = torch.exp(-0.5 * (x / sigma).pow(2))
  k1d = pdf / pdf.sum()
  k2d = torch.mm(k1d[:, None], k1d[None, :])
  img = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # NCHW
  c = img.shape[1]
  weight = k2d.expand(c, 1, kernel_size, kernel_size)
  pad = kernel_size // 2
  img = F.pad(img, [pad, pad, pad, pad], mode='reflect')
  out = F.conv2d(img, weight, groups=c)
  return out.permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- Gaussian blur


def test_gaussian_kernel():
  k = np.asarray(dg.gaussian_kernel(0.6, 3))
  x = np.array([-1.0, 0.0, 1.0])
  want = np.exp(-0.5 * (x / 0.6) ** 2)
  np.testing.assert_allclose(k, want / want.sum(), atol=1e-7)
  k7 = np.asarray(dg.gaussian_kernel(jnp.float32(1.5), 7))
  assert k7.shape == (7,)
  np.testing.assert_allclose(k7.sum(), 1.0, atol=1e-6)
  np.testing.assert_allclose(k7, k7[::-1], atol=1e-7)
  np.testing.assert_allclose(dg.gaussian_kernel(0.0, 3), [0, 1, 0], atol=1e-7)  # sigma -> 0


@pytest.mark.parametrize('kernel_size,sigma', [(3, 0.6), (7, 1.5)])
def test_blur_matches_torch_reference(kernel_size, sigma):
  images = _random((2, 13, 17, 3))
  got = dg.gaussian_blur(images, sigma, kernel_size)
  assert got.shape == images.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _torch_gaussian_blur(images, kernel_size, sigma), atol=1e-5)


def test_blur_per_example_sigma():
  images = _random((2, 12, 12, 3))
  got = dg.gaussian_blur(images, jnp.array([0.5, 2.0]), 7)
  np.testing.assert_allclose(got[:1], dg.gaussian_blur(images[:1], 0.5, 7), atol=1e-6)
  np.testing.assert_allclose(got[1:], dg.gaussian_blur(images[1:], 2.0, 7), atol=1e-6)
  assert not np.allclose(got[0], got[1])


def test_blur_preserves_constant_image():
  images = jnp.full((2, 9, 11, 3), 0.37, jnp.float32)
  np.testing.assert_allclose(dg.gaussian_blur(images, jnp.array([0.6, 1.9]), 7), images,
                             atol=1e-6)


# ---------------------------------------------------------------- down-up resize


@pytest.mark.parametrize('method', ['linear', 'cubic'])
def test_resize_factor_one_is_identity(method):
  images = _random((2, 12, 20, 3))
  np.testing.assert_allclose(dg.resize_down_up(images, 1.0, method), images, atol=1e-5)
  np.testing.assert_allclose(dg.resize_down_up(images, jnp.ones(2), method), images,
                             atol=1e-5)


@pytest.mark.parametrize('method', ['linear', 'cubic'])
def test_resize_removes_high_frequencies_and_keeps_mean(method):
  images, sign = _checkerboard(32, 32, amplitude=0.5, mean=0.1)
  out = np.asarray(dg.resize_down_up(images, 4.0, method))
  assert out.shape == images.shape
  amplitude = np.abs(((out - out.mean()) * sign[None, :, :, None]).mean())
  assert amplitude < 0.01  # from 0.5
  np.testing.assert_allclose(out.mean(), 0.1, atol=1e-3)


def test_resize_per_example_factor_and_constant_image():
  images = _smooth((2, 16, 24, 3))
  factors = jnp.array([1.0, 3.3])
  got = dg.resize_down_up(images, factors)
  np.testing.assert_allclose(got[:1], images[:1], atol=1e-5)
  np.testing.assert_allclose(got[1:], dg.resize_down_up(images[1:], 3.3), atol=1e-6)
  assert np.abs(got[1] - images[1]).max() > 1e-3
  constant = jnp.full((2, 15, 15, 3), -0.4, jnp.float32)
  for method in ('linear', 'cubic'):
    np.testing.assert_allclose(dg.resize_down_up(constant, factors, method), constant,
                               atol=1e-5)


# ---------------------------------------------------------------- JPEG


def test_jpeg_quant_table_follows_libjpeg():
  tables = np.asarray(dg.jpeg_quant_table(dg.JPEG_LUMA_TABLE, jnp.array([50.0, 100.0, 10.0])))
  np.testing.assert_array_equal(tables[0], dg.JPEG_LUMA_TABLE)  # scale 100
  np.testing.assert_array_equal(tables[1], np.ones((8, 8)))  # scale 0, clipped to 1
  want = np.clip(np.floor((dg.JPEG_LUMA_TABLE * 500 + 50) / 100), 1, 255)  # scale 5000 / 10
  np.testing.assert_array_equal(tables[2], want)


def test_jpeg_quality_100_is_close_to_identity():
  images = _smooth((2, 24, 24, 3))
  out = dg.jpeg_like(images, 100)
  assert out.shape == images.shape
  assert float(jnp.abs(out - images).mean()) < 0.02
  # Decoded pixels are 8-bit levels in [-1, 1].
  levels = (np.asarray(out) + 1) * 127.5
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
  assert out.min() >= -1 and out.max() <= 1


def test_jpeg_low_quality_is_much_worse():
  images = _random((1, 16, 16, 3))
  err10 = float(jnp.square(dg.jpeg_like(images, 10) - images).mean())
  err90 = float(jnp.square(dg.jpeg_like(images, 90) - images).mean())
  assert err10 > 4 * err90


def test_jpeg_per_example_quality():
  images = _random((2, 16, 16, 3))
  got = dg.jpeg_like(images, jnp.array([20.0, 80.0]))
  np.testing.assert_allclose(got[:1], dg.jpeg_like(images[:1], 20), atol=1e-6)
  np.testing.assert_allclose(got[1:], dg.jpeg_like(images[1:], 80), atol=1e-6)


def test_jpeg_works_on_8x8_blocks():
  images = _random((1, 16, 24, 3))
  base = np.asarray(dg.jpeg_like(images, 50))
  # A change to one pixel changes the output only inside that pixel's 8x8 block.
  for row, col in [(3, 3), (11, 20)]:
    changed = np.asarray(dg.jpeg_like(images.at[0, row, col].set(-images[0, row, col]), 50))
    diff = np.abs(changed - base).max(axis=(0, 3)) > 0
    assert diff.any()
    block = np.zeros_like(diff)
    block[row // 8 * 8:row // 8 * 8 + 8, col // 8 * 8:col // 8 * 8 + 8] = True
    assert not diff[~block].any()
  # An image constant on each 8x8 block is only DC: it stays blockwise constant.
  means = np.random.RandomState(3).uniform(-0.8, 0.8, (1, 2, 3, 3))
  blocky = jnp.asarray(np.repeat(np.repeat(means, 8, axis=1), 8, axis=2), jnp.float32)
  out = np.asarray(dg.jpeg_like(blocky, 30)).reshape(1, 2, 8, 3, 8, 3)
  np.testing.assert_allclose(out, np.broadcast_to(out[:, :, :1, :, :1], out.shape), atol=1e-6)


@pytest.mark.parametrize('size', [(20, 20), (13, 21)])
def test_jpeg_odd_sizes(size):
  images = _smooth((2, *size, 3))
  out = dg.jpeg_like(images, 95)
  assert out.shape == images.shape
  assert float(jnp.abs(out - images).mean()) < 0.02
  assert out.min() >= -1 and out.max() <= 1


def test_jpeg_chroma_subsampling():
  # A grey image has constant chroma: subsampling it loses nothing.
  grey = jnp.repeat(_smooth((1, 13, 21, 1)), 3, axis=-1)
  out = dg.jpeg_like(grey, 95, chroma_subsampling=True)
  assert out.shape == grey.shape
  assert float(jnp.abs(out - grey).mean()) < 0.02
  # A colourful one loses colour detail.
  colour = _random((1, 16, 16, 3))
  err_444 = float(jnp.abs(dg.jpeg_like(colour, 95) - colour).mean())
  err_420 = float(jnp.abs(dg.jpeg_like(colour, 95, chroma_subsampling=True) - colour).mean())
  assert err_420 > 2 * err_444


# ---------------------------------------------------------------- noise


def test_add_gaussian_noise():
  images = jnp.zeros((2, 32, 32, 3), jnp.float32)
  out = np.asarray(dg.add_gaussian_noise(jax.random.key(0), images, jnp.array([0.0, 0.1])))
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_allclose(out[1].std(), 0.1, rtol=0.1)
  assert np.abs(np.asarray(dg.add_gaussian_noise(jax.random.key(0), images + 0.99, 0.5))).max() <= 1


# ---------------------------------------------------------------- BSR and dispatch


def test_bsr_degrade_shape_range_determinism():
  images = _random((8, 16, 16, 3))
  out = dg.bsr_degrade(jax.random.key(0), images)
  assert out.shape == images.shape and out.dtype == images.dtype
  assert out.min() >= -1 and out.max() <= 1
  np.testing.assert_array_equal(out, dg.bsr_degrade(jax.random.key(0), images))
  assert not np.allclose(out, dg.bsr_degrade(jax.random.key(1), images))


def test_bsr_degrade_differs_per_example():
  images = jnp.broadcast_to(_smooth((1, 16, 16, 3)), (8, 16, 16, 3))
  out = np.asarray(dg.bsr_degrade(jax.random.key(2), images))
  distinct = {out[i].tobytes() for i in range(8)}
  assert len(distinct) >= 6


def test_bsr_degrade_zero_probabilities_is_identity():
  images = _random((8, 16, 16, 3))
  config = dg.BSRConfig(blur_prob=0, resize_prob=0, noise_prob=0, jpeg_prob=0)
  np.testing.assert_array_equal(dg.bsr_degrade(jax.random.key(0), images, config), images)
  # And with every operation always on, the images do change.
  always = dataclasses.replace(config, blur_prob=1, resize_prob=1, noise_prob=1, jpeg_prob=1)
  assert float(jnp.abs(dg.bsr_degrade(jax.random.key(0), images, always) - images).mean()) > 0.05


def test_bsr_degrade_under_jit():
  images = _random((8, 16, 16, 3))
  degrade = jax.jit(dg.bsr_degrade, static_argnums=2)
  out = degrade(jax.random.key(5), images, dg.BSRConfig())
  np.testing.assert_allclose(out, dg.bsr_degrade(jax.random.key(5), images), atol=1e-5)


def test_degrade_dispatch():
  images = _random((8, 16, 16, 3))
  key = jax.random.key(0)
  np.testing.assert_array_equal(dg.degrade(key, images, 'none'), images)
  np.testing.assert_allclose(dg.degrade(key, images, 'blur'), dg.gaussian_blur(images, 0.6, 3),
                             atol=1e-7)
  assert dg.degrade(key, images, 'bsr').shape == images.shape
  with pytest.raises(ValueError, match=r"'sharpen'.*'none', 'blur', 'bsr'"):
    dg.degrade(key, images, 'sharpen')
