"""Where examples come from: one module per source, chosen by `config.data.source`.

A source yields *raw examples*, dicts with

  key       str, unique within the split (a webdataset key, a file path, a row id)
  image     encoded bytes, or a decoded uint8 array [H, W(, C)]; None when missing
  caption   str, or a list of str (several captions of one image); None when missing
  labels    dict of extra fields (a webdataset sample's JSON, a manifest's other columns,
            the built-in data's attributes), some of which `config.data.label_key` may name

or, for something unreadable found while reading (a truncated shard, an unreadable tar member),
a *skip* `{'skip': reason, 'key': ..., 'where': ..., 'error': ...}`, which the pipeline counts.

Sources come in two kinds:
  * random access (`RandomAccessSource`: `len()` and `[i]`): the built-in data, folders, tfds,
    array_record. The pipeline shuffles them globally.
  * streaming (`StreamingSource`): a list of `units()` (tar shards, parquet row groups), each
    read in order from a resumable position (`read(unit, position)` yields (next position,
    example)). The pipeline splits units across processes and shuffles within a buffer.

`get(data_config, split)` builds the source of a split ('train' reads `config.data.paths`,
'test' `config.data.eval_paths`).
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import json
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np

# config.data.source → module under unclip_jax.data.sources
REGISTRY = {
    'shapes': 'shapes',
    'webdataset': 'webdataset',
    'folder': 'folder',
    'parquet': 'parquet',
    'tfds': 'tfds',
    'array_record': 'array_record',
    'clip_embeddings': 'clip_embeddings',
}
SPLITS = ('train', 'test')


def source_name(data_config: ml_collections.ConfigDict) -> str:
  """`config.data.source` (configs written before it existed name the built-in data by
  `data.name = 'captioned_shapes'`)."""
  name = data_config.get('source')
  if not name and data_config.get('name') == 'captioned_shapes':
    return 'shapes'
  return name or ''


def get(data_config: ml_collections.ConfigDict, split: str):
  """The source of `split` ('train' or 'test') for `config.data`.

  Raises:
    ValueError naming `config.data.source` when it is unknown.
  """
  name = source_name(data_config)
  if name not in REGISTRY:
    raise ValueError(f'config.data.source: unknown source {name!r}; known: '
                     f'{", ".join(REGISTRY)}')
  if split not in SPLITS:
    raise ValueError(f'split {split!r} is not one of {SPLITS}')
  module = importlib.import_module(f'unclip_jax.data.sources.{REGISTRY[name]}')
  return module.make(data_config, split)


def is_streaming(source) -> bool:
  return isinstance(source, StreamingSource)


class RandomAccessSource(abc.ABC):
  """Base of sources with `len()` and `[index] → raw example`; `describe()` names the data."""

  @abc.abstractmethod
  def __len__(self) -> int:
    """The number of examples."""

  @abc.abstractmethod
  def __getitem__(self, index: int) -> dict:
    """The raw example at `index`."""

  @abc.abstractmethod
  def describe(self) -> str:
    """What data this is (paths, settings), for messages and grain's state check."""

  def __repr__(self) -> str:   # grain compares it on restore
    return f'{type(self).__name__}({self.describe()})'


class StreamingSource(abc.ABC):
  """Base of sources read unit by unit (shards, row groups), each from a resumable position."""

  @abc.abstractmethod
  def units(self) -> list:
    """JSON-serialisable descriptions of the independent pieces of the data, in a fixed order."""

  @abc.abstractmethod
  def read(self, unit, position=None) -> Iterator[tuple[Any, dict]]:
    """Yields (position of the next example, example) through `unit`, starting at `position`
    (None: the unit's start). The positions are JSON-serialisable."""

  @abc.abstractmethod
  def describe(self) -> str:
    """What data this is (paths, settings), for messages and grain's state check."""

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.describe()})'


def skip(reason: str, key: Any, where: str, error: Any) -> dict:
  """A raw element that the pipeline counts under `reason` and logs with `key` and `where`."""
  return {'skip': reason, 'key': str(key), 'where': where, 'error': str(error)[:300]}


def key_id(key: str) -> int:
  """A stable 63-bit id of a sample key (embedding tables are indexed by it)."""
  return int.from_bytes(hashlib.blake2b(key.encode('utf-8'), digest_size=8).digest(),
                        'little') >> 1


def key_ids(keys: Sequence[str]) -> np.ndarray:
  return np.fromiter((key_id(str(k)) for k in keys), np.int64, count=len(keys))


def text(value) -> str | None:
  """A caption value as str (bytes decoded as UTF-8), None when missing."""
  if value is None:
    return None
  if isinstance(value, (bytes, np.bytes_)):
    return value.decode('utf-8', errors='replace')
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return text(value.item())
  return str(value)


def captions(value) -> list[str]:
  """A caption field (str, bytes, a list of them, a JSON list as text) → non-empty captions."""
  if value is None:
    return []
  if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
    out = [text(v) for v in value]
  else:
    out = [text(value)]
  return [c.strip() for c in out if c is not None and c.strip()]


def field(record: dict, name: str):
  """`record[name]`, where `name` may be a path 'a/b' into nested dicts; None when absent."""
  node = record
  for part in name.split('/'):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def read_json(data: bytes) -> dict:
  value = json.loads(data)
  return value if isinstance(value, dict) else {'json': value}


def data_field(data_config, name: str, default=None):
  """A `config.data` field that older configs may lack."""
  value = data_config.get(name, default)
  return default if value is None else value
