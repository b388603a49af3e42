"""`shapes`: the built-in CaptionedShapes data (generated on first use; see `captioned_shapes`).

Records are read with tfds' random-access `ArrayRecordDataSource`, which parses the stored
`tf.train.Example` protos with tfds' numpy/protobuf parser: reading never imports TensorFlow.
Each raw example carries the scene's attributes and record id as labels.
"""

from __future__ import annotations

from unclip_jax.data import captioned_shapes
from unclip_jax.data import sources

LABEL_KEYS = tuple(captioned_shapes.ATTRIBUTES) + ('id',)


class ShapesSource(sources.RandomAccessSource):
  """Random-access CaptionedShapes records as raw examples."""

  def __init__(self, records, name: str):
    self._records = records
    self._name = name

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    try:
      record = self._records[index]
    except Exception as e:  # pylint: disable=broad-except
      # A damaged file (a checksum mismatch): counted and logged with the file and record; the
      # data is generated again once its folder is deleted.
      return sources.skip('bad_record', index, self._locate(index), e)
    return {'key': str(int(record['id'])), 'image': record['image'],
            'caption': sources.text(record['caption']),
            'labels': {k: int(record[k]) for k in LABEL_KEYS}}

  def describe(self) -> str:
    return self._name

  def _locate(self, index: int) -> str:
    """'FILE record N' for the split's `index`-th record (delete FILE's folder to regenerate)."""
    try:
      split = self._records.dataset_info.splits[self._records.split]
      for path, length in zip(split.filepaths, split.shard_lengths):
        if index < length:
          return f'{path} record {index}'
        index -= length
    except Exception:  # pylint: disable=broad-except
      pass
    return f'{self._name} record {index}'


def make(data_config, split: str) -> ShapesSource:
  builder = captioned_shapes.prepare(
      data_config.get('data_dir'), resolution=data_config.resolution,
      num_train=data_config.num_train, num_test=data_config.num_test, seed=data_config.seed,
      held_out_combinations=data_config.get('held_out_combinations', True))
  return ShapesSource(builder.as_data_source(split),
                      f'{builder.name}/{builder.builder_config.name}/{split}')
