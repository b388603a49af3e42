"""`tfds`: any prepared tensorflow-datasets dataset, by `config.data.name` and `data_dir`.

The dataset must be prepared in array_record format (`tfds build --file_format=array_record`,
or `file_format='array_record'` in `download_and_prepare`) so that it has random access; tfds
then parses records with numpy, without TensorFlow. `config.data.train_split` and `eval_split`
name the splits (default 'train' and 'test'; tfds slicing such as 'train[:95%]' works).
`config.data.image_key` names the image feature (default 'image'), `caption_key` the caption
feature (default 'caption'; a path such as 'captions/text' reaches into nested features, and a
sequence feature, as `coco_captions` has, gives several captions per image), `key_key` an id
feature (default: split and index). The other scalar features are labels.
"""

from __future__ import annotations

import numpy as np

from unclip_jax.data import sources


def _scalar(value):
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    return value.decode('utf-8', errors='replace')
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  return value if isinstance(value, (str, int, float, bool)) else None


class TfdsSource(sources.RandomAccessSource):
  """Examples of one split of a prepared tfds dataset."""

  def __init__(self, records, name: str, split: str, *, image_key='image', caption_key='caption',
               key_key=None):
    self._records = records
    self._name = f'{name}/{split}'
    self._split = split
    self.image_key = image_key
    self.caption_key = caption_key
    self.key_key = key_key

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    record = self._records[index]
    image = sources.field(record, self.image_key)
    caption = sources.field(record, self.caption_key)
    key = sources.field(record, self.key_key) if self.key_key else None
    key = f'{self._split}/{index}' if key is None else str(_scalar(key))
    labels = {k: _scalar(v) for k, v in record.items()
              if k not in (self.image_key, self.caption_key) and _scalar(v) is not None}
    return {'key': key, 'image': image, 'caption': caption, 'labels': labels}

  def describe(self) -> str:
    return self._name


def make(data_config, split: str) -> TfdsSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = data_config.get('name')
  if not name:
    raise ValueError("config.data.name: name the tfds dataset (e.g. 'coco_captions') for "
                     "source 'tfds'")
  tfds_split = sources.data_field(data_config, 'train_split' if split == 'train' else
                                  'eval_split', 'train' if split == 'train' else 'test')
  try:
    builder = tfds.builder(name, data_dir=data_config.get('data_dir'))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'config.data.name: no tfds dataset {name!r} in data_dir '
                     f'{data_config.get("data_dir")!r}: {e}') from e
  if not builder.is_prepared():
    raise FileNotFoundError(f'config.data.name: the tfds dataset {name!r} is not prepared in '
                            f'{builder.data_dir}; build it first (tfds build {name} '
                            '--file_format=array_record)')
  try:
    records = builder.as_data_source(tfds_split)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'config.data.name: {name!r} split {tfds_split!r} has no random access '
                     f'({e}); prepare it with file_format=array_record, or convert it with '
                     'python -m unclip_jax.data.prepare') from e
  return TfdsSource(records, name, tfds_split,
                    image_key=sources.data_field(data_config, 'image_key', 'image'),
                    caption_key=sources.data_field(data_config, 'caption_key', 'caption'),
                    key_key=data_config.get('key_key'))
