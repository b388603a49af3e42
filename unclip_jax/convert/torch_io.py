"""Reading PyTorch checkpoints and checking converted parameter trees.

Everything here is framework-neutral numpy: a state dict is `{name: np.ndarray}` in float32, read
from safetensors files, torch pickles (`.bin`, `.pt`, `.pth`) or a sharded
`*.safetensors.index.json` / `*.bin.index.json`. Converters turn one into our Flax params and
check the result against the tree that `model.init` would make (`check_params`), so that a wrong
checkpoint fails with the tensor's name and both shapes instead of a silent wrong result.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import numpy as np

StateDict = dict[str, np.ndarray]

_WEIGHT_FILES = ('model.safetensors', 'diffusion_pytorch_model.safetensors',
                 'pytorch_model.bin', 'diffusion_pytorch_model.bin', 'open_clip_model.safetensors',
                 'open_clip_pytorch_model.bin')


class ConversionError(ValueError):
  """A checkpoint that cannot be converted: missing files, unknown layout, mismatched shapes."""


def find_weights(path: str) -> str:
  """The weights file of a checkpoint: `path` itself, or the known file (or index) in a folder."""
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise ConversionError(f'{path} does not exist')
  for name in _WEIGHT_FILES:
    for candidate in (name + '.index.json', name):
      if os.path.isfile(os.path.join(path, candidate)):
        return os.path.join(path, candidate)
  found = sorted(os.listdir(path))
  raise ConversionError(f'no weights in {path}: expected one of {", ".join(_WEIGHT_FILES)} '
                        f'(or a sharded .index.json); the folder holds {found}')


def load_state_dict(path: str) -> StateDict:
  """{name: float32 numpy array} from a weights file, a sharded index or a folder holding one.

  A pickle holding a dict with a 'state_dict' or 'model' entry (training checkpoints) is
  unwrapped; the 'module.' prefix of DistributedDataParallel checkpoints is removed.
  """
  path = find_weights(path)
  if path.endswith('.index.json'):
    with open(path) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    state = {}
    for shard in shards:
      state.update(load_state_dict(os.path.join(os.path.dirname(path), shard)))
    return state
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      raw = load_file(path)
    except Exception as e:  # safetensors raises its own error types
      raise ConversionError(f'{path} is not a readable safetensors file: {e}') from e
    return {k: np.asarray(v, np.float32) for k, v in raw.items()}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f'reading the torch pickle {path} needs PyTorch (pip install torch), '
                          'or convert it to safetensors first') from e
  try:
    raw = torch.load(path, map_location='cpu', weights_only=False)
  except Exception as e:
    raw = _load_torchscript(path)
    if raw is None:
      raise ConversionError(f'{path} is not a readable torch checkpoint: {e}') from e
  if hasattr(raw, 'state_dict') and not isinstance(raw, Mapping):  # a whole pickled module
    raw = raw.state_dict()
  for key in ('state_dict', 'model'):
    if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
      raw = raw[key]
  if not isinstance(raw, Mapping):
    raise ConversionError(f'{path} holds a {type(raw).__name__}, not a state dict')
  state = {}
  for k, v in raw.items():
    if hasattr(v, 'detach'):
      state[k[len('module.'):] if k.startswith('module.') else k] = (
          v.detach().float().cpu().numpy())
  return state


def _load_torchscript(path: str):
  """The state dict of a TorchScript archive (OpenAI's original CLIP .pt files), or None."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    return torch.jit.load(path, map_location='cpu').state_dict()
  except Exception:  # not TorchScript either; the caller reports torch.load's error
    return None


def read_json(folder: str, name: str = 'config.json') -> dict[str, Any]:
  """A JSON file of a checkpoint folder, with a clear error when it is missing."""
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise ConversionError(f'{path} is missing')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


class Reader:
  """Takes tensors out of a state dict by name, remembering which were used.

  `take(name, shape)` checks the shape (when given) and raises a ConversionError naming the
  tensor and both shapes; `unused()` lists what no converter rule read, so that converters can
  refuse checkpoints with parts they do not understand.
  """

  def __init__(self, state: StateDict, what: str = 'checkpoint'):
    self.state = state
    self.what = what
    self.used: set[str] = set()

  def __contains__(self, name: str) -> bool:
    return name in self.state

  def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if name not in self.state:
      raise ConversionError(f'{self.what}: tensor {name!r} is missing')
    value = self.state[name]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ConversionError(f'{self.what}: tensor {name!r} has shape {tuple(value.shape)}, '
                            f'expected {tuple(shape)}')
    self.used.add(name)
    return value

  # Layer helpers: PyTorch layouts → Flax layouts.
  def linear(self, name: str, bias: bool = True) -> dict[str, np.ndarray]:
    """nn.Linear [out, in] → Dense kernel [in, out] (+ bias)."""
    out = {'kernel': self.take(name + '.weight').T}
    if bias:
      out['bias'] = self.take(name + '.bias')
    return out

  def conv(self, name: str, bias: bool = True) -> dict[str, np.ndarray]:
    """nn.Conv2d [out, in, kh, kw] → Conv kernel [kh, kw, in, out] (+ bias)."""
    out = {'kernel': self.take(name + '.weight').transpose(2, 3, 1, 0)}
    if bias:
      out['bias'] = self.take(name + '.bias')
    return out

  def norm(self, name: str) -> dict[str, np.ndarray]:
    """LayerNorm / GroupNorm weight, bias → scale, bias."""
    return {'scale': self.take(name + '.weight'), 'bias': self.take(name + '.bias')}

  def unused(self, ignore: Callable[[str], bool] = lambda name: False) -> list[str]:
    return sorted(k for k in self.state if k not in self.used and not ignore(k))

  def check_all_used(self, ignore: Callable[[str], bool] = lambda name: False):
    left = self.unused(ignore)
    if left:
      more = f' and {len(left) - 8} more' if len(left) > 8 else ''
      raise ConversionError(f'{self.what}: {len(left)} tensors have no place in the converted '
                            f'model (a different architecture?): {left[:8]}{more}')


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


def check_params(params, expected, what: str = 'converted model'):
  """Raises ConversionError unless `params` has exactly the names and shapes of `expected`.

  `expected` is the tree `jax.eval_shape(model.init, ...)['params']` gives (boxed or not).
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  got = _flatten(params)
  want = _flatten(nn.unbox(expected))
  missing = sorted('/'.join(k) for k in want if k not in got)
  extra = sorted('/'.join(k) for k in got if k not in want)
  if missing or extra:
    raise ConversionError(f'{what}: the parameter tree does not fit the model: missing '
                          f'{missing[:8]}, unexpected {extra[:8]}')
  for k, v in want.items():
    if tuple(np.shape(got[k])) != tuple(v.shape):
      raise ConversionError(f'{what}: parameter {"/".join(k)} has shape '
                            f'{tuple(np.shape(got[k]))}, the model expects {tuple(v.shape)}')


def as_float32(tree):
  """Every leaf as a float32 numpy array (the dtype our params are stored in)."""
  if isinstance(tree, Mapping):
    return {k: as_float32(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)
