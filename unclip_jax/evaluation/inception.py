"""The Inception-v3 network of the standard FID, in Flax, and its pool features.

This is the network of TensorFlow's FID graph (`pt_inception-2015-12-05`, the one pytorch-fid and
torch-fidelity use), not torchvision's ImageNet Inception: its average pools ignore the padding,
the last block max-pools its pool branch, the classifier has 1008 classes, and batch
normalisation uses eps 1e-3. FID and KID use the 2048 features of the global average pool after
`Mixed_7c`.

Images are NHWC in [-1, 1] at any size. They are resized to 299x299 as pytorch-fid does (bilinear,
half-pixel centres, no antialiasing: `F.interpolate(mode='bilinear', align_corners=False)`), and
fed as they are (pytorch-fid's `2x - 1` of [0, 1] images).

Weights: `load_params(path)` converts the PyTorch file users have (pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`, the same tensors as torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth`); nothing is downloaded.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURES = 2048
NUM_CLASSES = 1008
_BN_EPS = 1e-3


class BasicConv(nn.Module):
  """Convolution (no bias), batch normalisation with running statistics, ReLU."""
  features: int
  kernel: Sequence[int]
  strides: int = 1
  padding: Sequence[int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel, x.shape[-1], self.features))
    ph, pw = self.padding
    x = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (self.strides, self.strides), ((ph, ph), (pw, pw)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    scale = self.param('scale', nn.initializers.ones, (self.features,))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    x = (x - mean) * (scale * jax.lax.rsqrt(var + _BN_EPS)) + bias
    return nn.relu(x)


def _conv(features, kernel, strides=1, padding=(0, 0), name=None):
  kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
  padding = (padding, padding) if isinstance(padding, int) else padding
  return BasicConv(features, kernel, strides, padding, name=name)


def _avg_pool_3x3(x):   # TensorFlow's: the padded zeros are not counted
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), 'VALID')


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _conv(64, 1, name='branch1x1')(x)
    b5 = _conv(64, 5, padding=2, name='branch5x5_2')(_conv(48, 1, name='branch5x5_1')(x))
    b3 = _conv(64, 1, name='branch3x3dbl_1')(x)
    b3 = _conv(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = _conv(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = _conv(self.pool_features, 1, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = _conv(384, 3, strides=2, name='branch3x3')(x)
    bd = _conv(64, 1, name='branch3x3dbl_1')(x)
    bd = _conv(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = _conv(96, 3, strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], -1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = _conv(192, 1, name='branch1x1')(x)
    b7 = _conv(c7, 1, name='branch7x7_1')(x)
    b7 = _conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = _conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = _conv(c7, 1, name='branch7x7dbl_1')(x)
    bd = _conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = _conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = _conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = _conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = _conv(192, 1, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = _conv(320, 3, strides=2, name='branch3x3_2')(_conv(192, 1, name='branch3x3_1')(x))
    b7 = _conv(192, 1, name='branch7x7x3_1')(x)
    b7 = _conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = _conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = _conv(192, 3, strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], -1)


class InceptionE(nn.Module):
  """`max_pool`: the FID graph's last block max-pools its pool branch (the first averages)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = _conv(320, 1, name='branch1x1')(x)
    b3 = _conv(384, 1, name='branch3x3_1')(x)
    b3 = jnp.concatenate([_conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          _conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], -1)
    bd = _conv(448, 1, name='branch3x3dbl_1')(x)
    bd = _conv(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([_conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                          _conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], -1)
    pooled = (nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.max_pool
              else _avg_pool_3x3(x))
    bp = _conv(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class FIDInceptionV3(nn.Module):
  """Images [B, 299, 299, 3] in [-1, 1] → pool features [B, 2048] (and, with `logits=True`,
  also the 1008-class logits)."""

  @nn.compact
  def __call__(self, x, logits: bool = False):
    x = _conv(32, 3, strides=2, name='Conv2d_1a_3x3')(x)
    x = _conv(32, 3, name='Conv2d_2a_3x3')(x)
    x = _conv(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = _conv(80, 1, name='Conv2d_3b_1x1')(x)
    x = _conv(192, 3, name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    features = jnp.mean(x, axis=(1, 2))
    if not logits:
      return features
    return features, nn.Dense(NUM_CLASSES, name='fc')(features)


def resize_for_inception(images: jax.Array) -> jax.Array:
  """[B, H, W, 3] → [B, 299, 299, 3], bilinear with half-pixel centres and no antialiasing
  (pytorch-fid's `F.interpolate(..., mode='bilinear', align_corners=False)`)."""
  images = jnp.asarray(images, jnp.float32)
  if images.shape[1:3] == (INPUT_SIZE, INPUT_SIZE):
    return images
  return jax.image.resize(images, (images.shape[0], INPUT_SIZE, INPUT_SIZE, images.shape[3]),
                          'bilinear', antialias=False)


@jax.jit
def _features(params, images):
  return FIDInceptionV3().apply({'params': params}, resize_for_inception(images))


def pool_features(params, images) -> np.ndarray:
  """FID pool features [B, 2048] (float32, numpy) of images [B, H, W, 3] in [-1, 1]."""
  return np.asarray(_features(params, images))


# --- weights ---------------------------------------------------------------------------------

def abstract_params():
  """The parameter shapes (no allocation)."""
  return jax.eval_shape(lambda: FIDInceptionV3().init(
      jax.random.PRNGKey(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)), logits=True))['params']


# Our parameter (module path, leaf) ↔ the PyTorch tensor of pytorch-fid's / torch-fidelity's
# layout: convolutions OIHW ↔ HWIO, the classifier's weight transposed, batch norm's four.
_BN_NAMES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def _leaves(tree, path=()):
  """(module path, leaf name, value) of every parameter."""
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, path + (key,))
    else:
      yield path, key, value


def _torch_name(path: tuple, key: str) -> str:
  module = '.'.join(path)
  if path[-1] == 'fc':
    return f'{module}.{"weight" if key == "kernel" else "bias"}'
  return f'{module}.conv.weight' if key == 'kernel' else f'{module}.bn.{_BN_NAMES[key]}'


def _from_torch(path: tuple, key: str, value) -> np.ndarray:
  value = np.asarray(value, np.float32)
  if key != 'kernel':
    return value
  return value.T if path[-1] == 'fc' else np.transpose(value, (2, 3, 1, 0))


def state_dict_from_params(params) -> dict:
  """Our parameters as the PyTorch state dict of the FID Inception (pytorch-fid's names)."""
  out = {}
  for path, key, value in _leaves(params):
    value = np.asarray(value, np.float32)
    if key == 'kernel':
      value = value.T if path[-1] == 'fc' else np.transpose(value, (3, 2, 0, 1))
    out[_torch_name(path, key)] = np.ascontiguousarray(value)
  return out


def params_from_state_dict(state: dict) -> dict:
  """Our parameters from the PyTorch state dict of the FID Inception ({name: array}: pytorch-fid's
  or torch-fidelity's names, `Mixed_5b.branch1x1.conv.weight`, `...bn.running_var`, `fc.*`).
  Raises ConversionError naming a missing or mis-shaped tensor."""
  from unclip_jax.convert import torch_io  # pylint: disable=g-import-not-at-top
  expected = abstract_params()
  params: dict = {}
  for path, key, _ in _leaves(expected):
    name = _torch_name(path, key)
    if name not in state:
      raise torch_io.ConversionError(f'the FID Inception weights have no tensor {name!r}')
    node = params
    for module in path:
      node = node.setdefault(module, {})
    node[key] = _from_torch(path, key, state[name])
  torch_io.check_params(params, expected, 'the FID Inception weights')
  return params


def load_params(path: str) -> dict:
  """Our parameters from a PyTorch file of the FID Inception (e.g. pytorch-fid's
  `pt_inception-2015-12-05-6726825d.pth`), given by path."""
  from unclip_jax.convert import torch_io  # pylint: disable=g-import-not-at-top
  return params_from_state_dict(torch_io.load_state_dict(path))
