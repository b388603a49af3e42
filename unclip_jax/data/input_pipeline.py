"""Grain input pipeline for the built-in CaptionedShapes dataset.

Records are read with tfds' random-access ``ArrayRecordDataSource``
(``builder.as_data_source``), which parses the stored ``tf.train.Example``
protos with tfds' pure numpy/protobuf parser -- reading never imports
TensorFlow. PNG images are decoded with PIL inside a grain map; a record
whose image cannot be decoded (or has the wrong shape) is skipped, counted in
``skip_counts()`` and logged with its id.

Batches are dicts of numpy arrays::

  image     float32 [B, H, W, 3] in [-1, 1]
  tokens    int32   [B, L]       tokenizer(captions)
  shape, color, background, size, position, id   int32 [B]
  caption   str     [B]          (non-numeric; dropped before sharding)

With ``data_config.embeddings_dir`` (see ``unclip_jax.data.embeddings``) batches also carry
``clip_image_emb`` and ``clip_text_emb`` float32 [B, D], looked up by ``id``.
"""

from __future__ import annotations

import collections
import io
import logging
import threading
from typing import Any, Callable, Sequence

from absl import flags
import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from unclip_jax.data import captioned_shapes

Tokenizer = Callable[[Sequence[str]], np.ndarray]
LABEL_KEYS = tuple(captioned_shapes.ATTRIBUTES) + ('id',)

_SKIP_COUNTS: collections.Counter = collections.Counter()
_SKIP_LOCK = threading.Lock()


def skip_counts() -> dict[str, int]:
  """Records skipped so far in this process, e.g. ``{'corrupt_image': 2}``.

  Counts are per process: with ``worker_count > 0`` skips happen in worker
  processes and are only logged there.
  """
  with _SKIP_LOCK:
    return {'corrupt_image': 0, **_SKIP_COUNTS}


def reset_skip_counts() -> None:
  """Sets every skip count back to zero."""
  with _SKIP_LOCK:
    _SKIP_COUNTS.clear()


def _count_skip(reason: str, record_id: Any, error: Exception) -> None:
  with _SKIP_LOCK:
    _SKIP_COUNTS[reason] += 1
  logging.warning('Skipping record id=%s (%s): %r', record_id, reason, error)


def decode_image(data: bytes, resolution: int) -> np.ndarray:
  """PNG bytes -> float32 [resolution, resolution, 3] in [-1, 1].

  Raises:
    ValueError (or a PIL error) if the bytes are not a valid RGB image of the
    expected size.
  """
  with Image.open(io.BytesIO(data)) as img:
    img.load()
    if img.mode != 'RGB' or img.size != (resolution, resolution):
      raise ValueError(f'expected RGB {resolution}x{resolution}, '
                       f'got {img.mode} {img.size[0]}x{img.size[1]}')
    arr = np.asarray(img, dtype=np.float32)
  return arr / 127.5 - 1.0


def _to_str(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class RecordSource:
  """Random-access source with a stable ``repr`` (grain checks it on restore).

  Wraps any ``len()``/``[]`` source of raw records, e.g. tfds'
  ``builder.as_data_source(split)``.
  """

  def __init__(self, source, name: str):
    self._source = source
    self._name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return self._source[index]

  def __repr__(self) -> str:
    return f'RecordSource({self._name})'


class DecodeExample(grain.transforms.Map):
  """Raw record -> example dict (decoded image, str caption, int32 labels).

  Returns None for a record whose image cannot be decoded (counted in
  ``skip_counts()``); ``DropNone`` removes those.
  """

  def __init__(self, resolution: int):
    self.resolution = resolution

  def map(self, record: dict) -> dict | None:
    try:
      image = decode_image(record['image'], self.resolution)
    except Exception as e:  # pylint: disable=broad-except
      _count_skip('corrupt_image', record.get('id'), e)
      return None
    example = {k: np.int32(record[k]) for k in LABEL_KEYS}
    example['image'] = image
    example['caption'] = _to_str(record['caption'])
    return example


class DropNone(grain.transforms.Filter):
  """Drops the records ``DecodeExample`` rejected."""

  def filter(self, element) -> bool:
    return element is not None


class Tokenize(grain.transforms.Map):
  """Adds ``tokens`` int32 [B, L] = tokenizer(captions) to a batch."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def map(self, batch: dict) -> dict:
    captions = [_to_str(c) for c in batch['caption']]
    batch['tokens'] = np.asarray(self.tokenizer(captions), dtype=np.int32)
    return batch


def get_source(data_config: ml_collections.ConfigDict, split: str) -> RecordSource:
  """Prepares the dataset if needed and returns the raw records of ``split``.

  Args:
    data_config: dataset config (name, data_dir, resolution, num_train,
      num_test, seed).
    split: 'train' or 'test'.
  Returns:
    random-access source of raw records (dicts with PNG bytes under 'image').
  Raises:
    ValueError: unknown ``data_config.name``.
  """
  if data_config.name != 'captioned_shapes':
    raise ValueError(f'Unknown dataset name {data_config.name!r}; '
                     "supported: 'captioned_shapes'.")
  builder = captioned_shapes.prepare(
      data_config.get('data_dir'), resolution=data_config.resolution,
      num_train=data_config.num_train, num_test=data_config.num_test,
      seed=data_config.seed)
  return RecordSource(builder.as_data_source(split),
                      f'{builder.name}/{builder.builder_config.name}/{split}')


def make_iterator(data_config: ml_collections.ConfigDict, *, split: str,
                  batch_size: int, tokenizer: Tokenizer | None, seed: int,
                  shuffle: bool = True, num_epochs: int | None = None,
                  process_index: int | None = None,
                  process_count: int | None = None,
                  data_source=None) -> grain.DataLoaderIterator:
  """Returns a checkpointable iterator over per-process batches.

  Args:
    data_config: dataset config (see ``get_source``), plus ``worker_count``
      (0 = decode in this process), ``read_threads`` (0 = read records in the
      consuming thread) and ``read_buffer`` (records read ahead by them).
    split: 'train' or 'test'.
    batch_size: per-process batch size; incomplete batches are dropped.
    tokenizer: callable list[str] -> int32 [B, L]; must be picklable when
      ``worker_count > 0``. None: batches carry no ``tokens``.
    seed: shuffling seed (same seed and worker_count -> same order).
    shuffle: shuffle globally (per epoch) with grain's IndexSampler.
    num_epochs: None repeats forever.
    process_index, process_count: this process' shard of the records
      (defaults: ``jax.process_index()``, ``jax.process_count()``).
    data_source: optional random-access source of raw records to read instead
      of the prepared dataset (e.g. to inject corrupt records in tests).
  Returns:
    grain ``DataLoaderIterator`` (``get_state()``/``set_state()``) yielding
    dicts: image float32 [B, H, W, 3] in [-1, 1], tokens int32 [B, L],
    shape/color/background/size/position/id int32 [B], caption str [B].
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if data_source is None:
    data_source = get_source(data_config, split)
  sampler = grain.samplers.IndexSampler(
      num_records=len(data_source),
      shard_options=grain.sharding.ShardOptions(
          shard_index=process_index, shard_count=process_count,
          drop_remainder=True),
      shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  worker_count = data_config.get('worker_count', 0) or 0
  if worker_count > 0 and not flags.FLAGS.is_parsed():
    # Grain's worker processes read absl flags; outside absl.app they are
    # unparsed, which would crash the workers. Use the defaults.
    flags.FLAGS.mark_as_parsed()
  operations = [DecodeExample(data_config.resolution), DropNone(),
                grain.transforms.Batch(batch_size, drop_remainder=True)]
  if tokenizer is not None:
    operations.append(Tokenize(tokenizer))
  operations += _embedding_ops(data_config, split)
  read_threads = data_config.get('read_threads', 16)
  read_options = grain.ReadOptions(
      num_threads=read_threads,
      prefetch_buffer_size=data_config.get('read_buffer', 500) if read_threads else 0)
  loader = grain.DataLoader(data_source=data_source, sampler=sampler, operations=operations,
                            worker_count=worker_count, read_options=read_options)
  return iter(loader)


def load_split(data_config: ml_collections.ConfigDict, split: str,
               tokenizer: Tokenizer | None = None,
               max_examples: int | None = None,
               data_source=None) -> dict[str, np.ndarray]:
  """Loads a whole split (or its first ``max_examples`` records), in order.

  Records with corrupt images are skipped and counted as in ``make_iterator``.

  Returns:
    dict with the batch keys (``tokens`` only if a tokenizer is given):
    image float32 [N, H, W, 3], labels/id int32 [N], caption str [N].
  """
  if data_source is None:
    data_source = get_source(data_config, split)
  n = len(data_source) if max_examples is None else min(max_examples, len(data_source))
  decode = DecodeExample(data_config.resolution)
  examples = [ex for ex in (decode.map(data_source[i]) for i in range(n))
              if ex is not None]
  keys = ('image', 'caption') + LABEL_KEYS
  out = {k: np.stack([ex[k] for ex in examples]) for k in keys}
  if tokenizer is not None:
    out = Tokenize(tokenizer).map(out)
  for op in _embedding_ops(data_config, split):
    out = op.map(out)
  return out


def _embedding_ops(data_config: ml_collections.ConfigDict, split: str) -> list:
  """[AttachEmbeddings] when ``data_config.embeddings_dir`` is set, else []."""
  if not data_config.get('embeddings_dir'):
    return []
  from unclip_jax.data import embeddings  # pylint: disable=g-import-not-at-top
  embeddings.check(data_config.embeddings_dir, data_config)
  return [embeddings.AttachEmbeddings(
      embeddings.EmbeddingTable(data_config.embeddings_dir, split))]
