"""The grain input pipeline, the same for every source (`unclip_jax.data.sources`).

  raw examples ─ process: caption chosen, image decoded → RGB, resized, cropped ─ skips counted
  ─ batch ─ tokenize ─ (CLIP embeddings attached) ─ worker processes ─ batches

Random-access sources (the built-in data, folders, tfds, array_record) are shuffled globally by
grain's `IndexSampler` (each process takes its share of the records; every epoch reshuffled);
streaming sources (webdataset tars, parquet row groups) are split across processes by unit
(shard or row group; fewer units than processes is an error), read in a per-epoch random unit
order and shuffled within a window of `config.data.shuffle_buffer` examples. Either way the
iterator's state (position, shuffle window, skip bookkeeping) is small JSON, saved in the
checkpoint, and a restored iterator continues exactly where it stopped.

Bad samples never stop a run: an undecodable or truncated image, a missing or empty caption,
an image below `config.data.min_size`, an unreadable tar member or a truncated shard are skipped,
counted by reason (`skip_counts()`; `data/skipped/<reason>` in the training metrics, also from
worker processes: the counts travel with the batches) and logged with their key and shard. When
two passes over the data yield nothing usable, the iterator raises an error naming the data.

Batches are dicts of numpy arrays::

  image     float32 [B, H, W, 3] in [-1, 1]
  tokens    int32   [B, L]       tokenizer(captions)
  caption   str     [B]          one caption per image (chosen at random per epoch when an
                                 image has several; the first one in `load_split`)
  key       str     [B]          the sample's key within its split
  label     int32   [B]          with `config.data.label_key`: the index of the sample's class in
                                 `config.data.class_names` (-1 for none of them)
  shape, color, background, size, position, id   int32 [B]   the built-in data's attributes
                                 (and, but for `id`, another source's with
                                 `config.data.attribute_labels`)

With `config.data.embeddings_dir` (see `unclip_jax.data.embeddings`) batches also carry
`clip_image_emb` and `clip_text_emb` float32 [B, D], looked up by key.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from typing import Callable, Sequence

from absl import flags
import grain
import jax
import ml_collections
import numpy as np

from unclip_jax.data import captioned_shapes
from unclip_jax.data import embeddings
from unclip_jax.data import image_processing
from unclip_jax.data import paths as paths_lib
from unclip_jax.data import sources
from unclip_jax.data.sources import shapes as shapes_source

Tokenizer = Callable[[Sequence[str]], np.ndarray]
LABEL_KEYS = shapes_source.LABEL_KEYS
SKIP_REASONS = ('missing_image', 'undecodable_image', 'too_small', 'missing_caption',
                'bad_json', 'bad_record', 'unreadable_shard', 'unreadable_member',
                'truncated_shard')
_LOGGED_SKIPS = 20     # per reason and iterator; then one line in every 1000

_SKIP_COUNTS: collections.Counter = collections.Counter()
_SKIP_LOCK = threading.Lock()


def skip_counts() -> dict[str, int]:
  """Samples skipped so far by this process's pipelines (and their workers), by reason."""
  with _SKIP_LOCK:
    return {reason: _SKIP_COUNTS[reason] for reason in SKIP_REASONS}


def reset_skip_counts() -> None:
  """Sets every skip count back to zero."""
  with _SKIP_LOCK:
    _SKIP_COUNTS.clear()


def _record_skips(counts) -> None:
  with _SKIP_LOCK:
    for reason, n in zip(SKIP_REASONS, counts):
      if n:
        _SKIP_COUNTS[reason] += int(n)


# ---------------------------------------------------------------------------------------------
# Per-example processing


def class_names(data_config) -> list[str] | None:
  """`config.data.class_names`: comma-separated names, the path of a JSON file holding a list
  (or a {name: index} map), or a list; None when unset."""
  names = data_config.get('class_names')
  if names is None or names == '':
    return None
  if isinstance(names, str) and names.endswith('.json'):
    try:
      with paths_lib.open_file(names, 'rb') as f:
        value = json.loads(f.read())
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'config.data.class_names: {names!r} is not a readable JSON file: '
                       f'{e}') from e
    if isinstance(value, dict):
      value = [k for k, _ in sorted(value.items(), key=lambda kv: kv[1])]
    names = value
  elif isinstance(names, str):
    names = [n.strip() for n in names.split(',')]
  names = [str(n) for n in names if str(n)]
  if not names:
    raise ValueError('config.data.class_names is empty')
  return names


def check_data_config(data_config) -> None:
  """Refuses settings the pipeline cannot use, naming the field."""
  crop = data_config.get('crop') or 'center'
  if crop not in image_processing.CROPS:
    raise ValueError(f'config.data.crop: {crop!r} is not one of {image_processing.CROPS}')
  if data_config.get('counterfactual_negatives') and (
      sources.source_name(data_config) != 'shapes' or data_config.get('embeddings_dir')):
    raise ValueError('config.data.counterfactual_negatives: only the built-in data (source '
                     "'shapes', images rather than embeddings) can draw a scene's "
                     'counterfactual; set it to False')
  if data_config.get('label_key') and class_names(data_config) is None:
    raise ValueError(f'config.data.class_names: config.data.label_key is '
                     f'{data_config.label_key!r}, so the class names (a list, or a JSON file) '
                     'are needed')


class ProcessExample(grain.transforms.Map):
  """Raw example → example dict (or a skip, counted by `_CountSkips`).

  The caption is the first of an example's captions or, with `random_caption`, one chosen by a
  generator seeded by (seed, key, epoch), as is a random crop: the same sample gets the same
  choice in a resumed run.
  """

  def __init__(self, data_config, *, seed: int = 0, train: bool = True, where: str = '',
               counterfactuals: bool = False):
    check_data_config(data_config)
    self.resolution = int(data_config.resolution)
    self.crop = (data_config.get('crop') or 'center') if train else 'center'
    self.min_size = int(data_config.get('min_size') or 0)
    self.random_caption = train
    self.seed = seed
    self.label_key = data_config.get('label_key')
    names = class_names(data_config)
    self.class_index = {n: i for i, n in enumerate(names)} if names else None
    self.shapes = sources.source_name(data_config) == 'shapes'
    self.attribute_labels = not self.shapes and bool(data_config.get('attribute_labels'))
    self.where = where
    # The built-in data's counterfactual negatives (see `check_data_config`): each example comes
    # with its twin, stacked ([2, ...] per field); `_Unpair` makes a batch of them flat again.
    self.counterfactuals = counterfactuals
    self.exclude_held_out = bool(data_config.get('held_out_combinations', True))

  def _rng(self, key: str, epoch: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, sources.key_id(key), int(epoch)])

  def _label(self, value) -> int:
    """A class name → its index in the class names; an int (a tfds ClassLabel, the built-in
    data's attributes) is the index itself; -1 for anything else."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
      return int(value) if 0 <= value < len(self.class_index) else -1
    return self.class_index.get(str(value), -1) if value is not None else -1

  def map(self, raw: dict) -> dict:
    if 'skip' in raw:
      return raw
    key = str(raw['key'])
    epoch = raw.get('epoch', 0)
    captions = sources.captions(raw.get('caption'))
    if not captions:
      return dict(sources.skip('missing_caption', key, raw.get('where') or self.where,
                               'no caption'), epoch=epoch)
    rng = None
    if (self.random_caption and len(captions) > 1) or self.crop == 'random':
      rng = self._rng(key, epoch)
    caption = captions[int(rng.integers(len(captions)))] if (
        self.random_caption and len(captions) > 1) else captions[0]
    example = {'caption': caption, 'key': key}
    if 'clip_image_emb' in raw:    # precomputed embeddings in place of an image
      for name in ('clip_image_emb', 'clip_text_emb'):
        example[name] = np.asarray(raw[name], np.float32)
    else:
      try:
        example['image'] = image_processing.process(
            raw.get('image'), self.resolution, crop=self.crop, min_size=self.min_size, rng=rng,
            as_uint8=True)
      except image_processing.ImageError as e:
        return dict(sources.skip(e.reason, key, raw.get('where') or self.where, e), epoch=epoch)
    labels = raw.get('labels') or {}
    if self.shapes:
      for k in LABEL_KEYS:
        example[k] = np.int32(labels[k])
    elif self.attribute_labels:
      for k, names in captioned_shapes.ATTRIBUTES.items():
        value = sources.field(labels, k)
        if value not in names:
          return dict(sources.skip('bad_json', key, raw.get('where') or self.where,
                                   f'config.data.attribute_labels: the {k!r} label is {value!r}, '
                                   f'not one of {list(names)}'), epoch=epoch)
        example[k] = np.int32(names.index(value))
    if self.label_key:
      example['label'] = np.int32(self._label(sources.field(labels, self.label_key)))
    if self.counterfactuals:
      example = self._with_counterfactual(example, key, epoch)
    return example

  def _with_counterfactual(self, example: dict, key: str, epoch: int) -> dict:
    """The example and its counterfactual (`captioned_shapes.counterfactual`), stacked."""
    rng = np.random.default_rng([self.seed, sources.key_id(key), int(epoch), 1])
    attrs, image, text = captioned_shapes.counterfactual(
        {k: example[k] for k in captioned_shapes.ATTRIBUTES}, self.resolution, rng,
        exclude_held_out=self.exclude_held_out)
    twin = dict(example, caption=text, key=f'{key}~counterfactual', image=image,
                **{k: np.int32(v) for k, v in attrs.items()})
    return {k: np.stack([v, twin[k]]) for k, v in example.items()}


# ---------------------------------------------------------------------------------------------
# grain datasets: sampled random-access records, streamed units, skip counting


class _SampledRecords:
  """Element i of this process's share of `IndexSampler`'s order: the record the grain
  DataLoader would read, with its epoch."""

  def __init__(self, source, sampler, process_index, process_count, per_epoch):
    self._source, self._sampler = source, sampler
    self._index, self._count, self._per_epoch = process_index, process_count, per_epoch

  def __len__(self) -> int:
    return len(self._sampler) // self._count

  def __getitem__(self, i: int) -> dict:
    meta = self._sampler[i * self._count + self._index]
    raw = self._source[meta.record_key]
    return dict(raw, epoch=i // self._per_epoch)

  def __repr__(self) -> str:
    return f'_SampledRecords({self._source!r}, {self._sampler!r})'


class _UnitsIterDataset(grain.IterDataset):
  """The examples of a streaming source's units (this process's), unit after unit, epoch after
  epoch (the unit order reshuffled per epoch when `shuffle`)."""

  def __init__(self, source, units: list, *, seed: int, shuffle: bool, num_epochs):
    super().__init__()
    self._source, self._units = source, list(units)
    self._seed, self._shuffle, self._num_epochs = seed, shuffle, num_epochs

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """grain's worker processes each take a slice of the units."""
    del sequential_slice
    total = len(self._units)
    self._units = self._units[sl]
    if not self._units:
      raise ValueError(f'config.data.worker_count: more grain workers than the {total} units '
                       f'(shards or row groups) of {self._source.describe()} that this process '
                       'reads; use fewer workers or more, smaller shards')

  def __iter__(self):
    return _UnitsIterator(self._source, self._units, self._seed, self._shuffle, self._num_epochs)

  def __str__(self) -> str:
    return f'_UnitsIterDataset({self._source.describe()})'


class _UnitsIterator(grain.DatasetIterator):

  def __init__(self, source, units, seed, shuffle, num_epochs):
    super().__init__()
    self._source, self._units = source, units
    self._seed, self._shuffle, self._num_epochs = seed, shuffle, num_epochs
    self._epoch, self._unit, self._position, self._in_epoch = 0, 0, None, 0
    self._reader = None

  def _order(self, epoch: int) -> np.ndarray:
    if not self._shuffle:
      return np.arange(len(self._units))
    return np.random.default_rng([self._seed, epoch]).permutation(len(self._units))

  def _advance_unit(self):
    self._reader, self._position = None, None
    self._unit += 1
    if self._unit == len(self._units):
      if self._in_epoch == 0:
        raise ValueError(f'no sample at all in {self._source.describe()}: every unit read is '
                         'empty')
      self._epoch, self._unit, self._in_epoch = self._epoch + 1, 0, 0

  def __next__(self) -> dict:
    while True:
      if self._num_epochs is not None and self._epoch >= self._num_epochs:
        raise StopIteration
      if self._reader is None:
        unit = self._units[int(self._order(self._epoch)[self._unit])]
        self._reader = self._source.read(unit, self._position)
      try:
        position, example = next(self._reader)
      except StopIteration:
        self._advance_unit()
        continue
      epoch, unit = self._epoch, self._units[int(self._order(self._epoch)[self._unit])]
      self._in_epoch += 1
      if position == 'end':
        self._advance_unit()
      else:
        self._position = position
      where = paths_lib.short(unit) if isinstance(unit, str) else str(unit)
      return {'where': where, **example, 'epoch': epoch}

  def get_state(self) -> dict:
    return {'epoch': self._epoch, 'unit': self._unit, 'position': self._position,
            'in_epoch': self._in_epoch}

  def set_state(self, state: dict) -> None:
    self._epoch, self._unit = state['epoch'], state['unit']
    self._position, self._in_epoch = state['position'], state['in_epoch']
    self._reader = None


class _CountSkips(grain.IterDataset):
  """Drops skips, logging each; the counts since the last kept example ride along with the
  next one (`skipped`, int32 [len(SKIP_REASONS)]). Raises when two whole epochs pass with
  nothing kept."""

  def __init__(self, parent, description: str, window: int = 0):
    super().__init__(parent)
    self._description, self._window = description, window

  def __iter__(self):
    return _CountSkipsIterator(self._parent.__iter__(), self._description, self._window)

  def __str__(self) -> str:
    return '_CountSkips'


class _CountSkipsIterator(grain.DatasetIterator):

  def __init__(self, parent, description, window):
    super().__init__(parent)
    self._description, self._window = description, window
    self._pending = [0] * len(SKIP_REASONS)
    self._streak, self._streak_epoch, self._totals = 0, None, [0] * len(SKIP_REASONS)

  def __next__(self) -> dict:
    while True:
      try:
        element = next(self._parent)
      except StopIteration:
        # The end of a finite pass: skips after the last example have nothing to ride on.
        _record_skips(self._pending)
        self._pending = [0] * len(SKIP_REASONS)
        raise
      if 'skip' not in element:
        element = dict(element)
        element.pop('epoch', None)
        element['skipped'] = np.asarray(self._pending, np.int32)
        self._pending = [0] * len(SKIP_REASONS)
        self._streak, self._streak_epoch = 0, None
        return element
      reason = element['skip']
      i = SKIP_REASONS.index(reason) if reason in SKIP_REASONS else SKIP_REASONS.index(
          'undecodable_image')
      self._pending[i] += 1
      self._totals[i] += 1
      if self._totals[i] <= _LOGGED_SKIPS or self._totals[i] % 1000 == 0:
        logging.warning('Skipping sample key=%r in %s (%s, %d so far%s): %s', element.get('key'),
                        element.get('where') or self._description, reason, self._totals[i],
                        '; further ones logged every 1000th' if self._totals[i] == _LOGGED_SKIPS
                        else '', element.get('error'))
      self._streak += 1
      epoch = element.get('epoch', 0)
      if self._streak_epoch is None:
        self._streak_epoch = epoch
      if epoch - self._streak_epoch >= 2 and self._streak > self._window:
        counts = {r: n for r, n in zip(SKIP_REASONS, self._totals) if n}
        raise ValueError(f'no usable sample in {self._description}: the last {self._streak} '
                         f'samples, over two passes, were all skipped ({counts})')

  def get_state(self) -> dict:
    return {'parent': self._parent.get_state(), 'pending': list(self._pending),
            'streak': self._streak, 'streak_epoch': self._streak_epoch}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state['parent'])
    self._pending = list(state['pending'])
    self._streak, self._streak_epoch = state['streak'], state['streak_epoch']


class _RecordSkips(grain.transforms.Map):
  """In the consuming process: moves a batch's `skipped` counts into `skip_counts()`, and makes
  its uint8 pixels (decoded so, to move a quarter of the bytes between processes) float32 in
  [-1, 1]."""

  def map(self, batch: dict) -> dict:
    counts = batch.pop('skipped', None)
    if counts is not None:
      _record_skips(np.asarray(counts).reshape(-1, len(SKIP_REASONS)).sum(0))
    if 'image' in batch and batch['image'].dtype == np.uint8:
      batch['image'] = image_processing.to_model_range(batch['image'])
    return batch


class _Unpair(grain.transforms.Map):
  """A batch of stacked (example, counterfactual) pairs, [B/2, 2, ...] per field → [B, ...]:
  each example next to its counterfactual."""

  def map(self, batch: dict) -> dict:
    return {k: v if k == 'skipped' else np.asarray(v).reshape((-1,) + np.shape(v)[2:])
            for k, v in batch.items()}


class Tokenize(grain.transforms.Map):
  """Adds `tokens` int32 [B, L] = tokenizer(captions) to a batch."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def map(self, batch: dict) -> dict:
    captions = [sources.text(c) for c in batch['caption']]
    batch['tokens'] = np.asarray(self.tokenizer(captions), dtype=np.int32)
    return batch


# ---------------------------------------------------------------------------------------------
# Public API


def get_source(data_config: ml_collections.ConfigDict, split: str):
  """The raw examples of `split` ('train' or 'test'): see `unclip_jax.data.sources`."""
  return sources.get(data_config, split)


def _process_units(source, process_index: int, process_count: int) -> list:
  units = source.units()
  if len(units) < process_count:
    raise ValueError(f'{source.describe()}: {len(units)} units (shards or row groups) for '
                     f'{process_count} processes; every process needs at least one: write more, '
                     'smaller shards')
  return units[process_index::process_count]


def _raw_dataset(data_config, source, *, seed, shuffle, num_epochs, process_index,
                 process_count):
  """(grain IterDataset of raw examples of this process, the shuffle window in examples)."""
  if sources.is_streaming(source):
    units = _process_units(source, process_index, process_count)
    ds = _UnitsIterDataset(source, units, seed=seed, shuffle=shuffle, num_epochs=num_epochs)
    window = int(data_config.get('shuffle_buffer') or 0) if shuffle else 0
    if window > 1:
      ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=window, seed=seed)
    return ds, window
  sampler = grain.samplers.IndexSampler(
      num_records=len(source),
      shard_options=grain.sharding.ShardOptions(
          shard_index=process_index, shard_count=process_count, drop_remainder=True),
      shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  per_epoch = len(source) // process_count    # this process's records, the remainder dropped
  if per_epoch == 0:
    raise ValueError(f'{source.describe()}: {len(source)} records for {process_count} '
                     'processes; every process needs at least one')
  records = _SampledRecords(source, sampler, process_index, process_count, per_epoch)
  return grain.MapDataset.source(records).to_iter_dataset(_read_options(data_config)), 0


def _read_options(data_config) -> grain.ReadOptions:
  read_threads = data_config.get('read_threads', 0) or 0
  return grain.ReadOptions(
      num_threads=read_threads,
      prefetch_buffer_size=(data_config.get('read_buffer', 64) or 0) if read_threads else 0)


def make_iterator(data_config: ml_collections.ConfigDict, *, split: str,
                  batch_size: int, tokenizer: Tokenizer | None, seed: int,
                  shuffle: bool = True, num_epochs: int | None = None,
                  process_index: int | None = None,
                  process_count: int | None = None,
                  data_source=None) -> grain.DatasetIterator:
  """Returns a checkpointable iterator over per-process batches.

  Args:
    data_config: `config.data` (source, paths, resolution, ...; see configs), plus
      `worker_count` (grain worker processes decoding; 0 = in this process), `read_threads`
      and `read_buffer` (random-access sources: records read ahead), `shuffle_buffer`
      (streaming sources: the shuffle window).
    split: 'train' or 'test'.
    batch_size: per-process batch size; incomplete batches are dropped.
    tokenizer: callable list[str] -> int32 [B, L]; must be picklable when
      `worker_count > 0`. None: batches carry no `tokens`.
    seed: shuffling seed (same seed and worker_count -> same order).
    shuffle: shuffle (globally, or by unit order and window for streaming sources).
    num_epochs: None repeats forever.
    process_index, process_count: this process' share of the data (defaults:
      `jax.process_index()`, `jax.process_count()`).
    data_source: a source to read instead of the configured one (e.g. to inject corrupt
      records in tests): a `sources.RandomAccessSource` / `StreamingSource`, or any
      `len()`/`[]` sequence of raw examples.
  Returns:
    a grain `DatasetIterator` (`get_state()`/`set_state()`) yielding the batches described in
    the module docstring.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  source = get_source(data_config, split) if data_source is None else data_source
  description = source.describe() if hasattr(source, 'describe') else repr(source)
  ds, window = _raw_dataset(data_config, source, seed=seed, shuffle=shuffle,
                            num_epochs=num_epochs, process_index=process_index,
                            process_count=process_count)
  # The built-in data's counterfactual negatives are for training batches (see ProcessExample).
  pairs = bool(data_config.get('counterfactual_negatives')) and split == 'train'
  ds = ds.map(ProcessExample(data_config, seed=seed, train=True, where=description,
                             counterfactuals=pairs))
  ds = _CountSkips(ds, description, window)
  if pairs:
    if batch_size % 2:
      raise ValueError(f'config.data.counterfactual_negatives: the per-process batch size '
                       f'({batch_size}) must be even: each example comes with its '
                       'counterfactual')
    ds = ds.batch(batch_size // 2, drop_remainder=True).map(_Unpair())
  else:
    ds = ds.batch(batch_size, drop_remainder=True)
  if tokenizer is not None:
    ds = ds.map(Tokenize(tokenizer))
  for op in _embedding_ops(data_config, split, source):
    ds = ds.map(op)
  worker_count = data_config.get('worker_count', 0) or 0
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # Grain's worker processes read absl flags; outside absl.app they are
      # unparsed, which would crash the workers. Use the defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds.map(_RecordSkips()))


def make_example_iterator(data_config: ml_collections.ConfigDict, split: str, *,
                          process_index: int = 0, process_count: int = 1,
                          data_source=None) -> grain.DatasetIterator:
  """Every usable example of this process's share of `split` once, in the source's order,
  unbatched, centre-cropped with its first caption: a checkpointable iterator (for computing
  embeddings or writing prepared shards; nothing is dropped to even out the shares)."""
  source = get_source(data_config, split) if data_source is None else data_source
  description = source.describe() if hasattr(source, 'describe') else repr(source)
  if sources.is_streaming(source):
    units = source.units()[process_index::process_count]
    if not units:
      return iter(grain.MapDataset.source([]).to_iter_dataset())
    ds = _UnitsIterDataset(source, units, seed=0, shuffle=False, num_epochs=1)
  else:
    ds = grain.MapDataset.source(source)[process_index::process_count].to_iter_dataset(
        _read_options(data_config))
  ds = _CountSkips(ds.map(ProcessExample(data_config, train=False, where=description)),
                   description)
  return iter(ds.map(_RecordSkips()))


def iterate_examples(data_config: ml_collections.ConfigDict, split: str, data_source=None):
  """(every usable example of `split` once, in order: an iterator of example dicts, the
  source); see `make_example_iterator`."""
  source = get_source(data_config, split) if data_source is None else data_source
  return make_example_iterator(data_config, split, data_source=source), source


def load_split(data_config: ml_collections.ConfigDict, split: str,
               tokenizer: Tokenizer | None = None,
               max_examples: int | None = None,
               data_source=None) -> dict[str, np.ndarray]:
  """Loads a whole split (or its first `max_examples` usable examples), in order, centre
  cropped, each image with its first caption.

  Returns:
    dict with the batch keys (`tokens` only if a tokenizer is given), stacked over N examples.
  Raises:
    ValueError naming the data when it holds no usable example.
  """
  examples, source = iterate_examples(data_config, split, data_source)
  out = []
  for ex in examples:
    if max_examples is not None and len(out) >= max_examples:
      break
    out.append(ex)
  if not out:
    name = source.describe() if hasattr(source, 'describe') else repr(source)
    raise ValueError(f'no usable example in {name} ({split} split)')
  batch = {k: np.stack([ex[k] for ex in out]) for k in out[0]}
  if tokenizer is not None:
    batch = Tokenize(tokenizer).map(batch)
  for op in _embedding_ops(data_config, split, source):
    batch = op.map(batch)
  return batch


def _embedding_ops(data_config: ml_collections.ConfigDict, split: str, source=None) -> list:
  """[AttachEmbeddings] when `data_config.embeddings_dir` is set, else []. Embeddings of another
  number of samples than a random-access source holds are refused here, before any batch."""
  if not data_config.get('embeddings_dir'):
    return []
  info = embeddings.check(data_config.embeddings_dir, data_config, splits=(split,))
  if source is not None and not sources.is_streaming(source) and hasattr(source, '__len__'):
    written = info['splits'][split]
    total = written['count'] + sum(written.get('skipped', {}).values())
    if total != len(source):
      raise ValueError(f'config.data.embeddings_dir: {data_config.embeddings_dir!r} holds '
                       f'{written["count"]} {split} embeddings (and {total - written["count"]} '
                       f'skipped samples) for {total} samples, but the data has {len(source)}; '
                       'recompute them for this data')
  return [embeddings.AttachEmbeddings(
      embeddings.EmbeddingTable(data_config.embeddings_dir, split))]
