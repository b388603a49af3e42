"""`array_record`: shards written by `python -m unclip_jax.data.prepare` from any source.

Each record is a msgpack map `{key, image (encoded bytes, already resized and cropped), captions
(list of str), labels (map)}`. Random access over all files of `config.data.paths` (grain's
`ArrayRecordDataSource`), so the pipeline shuffles globally and resumes exactly.
"""

from __future__ import annotations

import grain
import msgpack

from unclip_jax.data import paths as paths_lib
from unclip_jax.data import sources

SUFFIX = '.array_record'


def encode_record(example: dict) -> bytes:
  """A prepared example {key, image bytes, captions list, labels} → record bytes."""
  return msgpack.packb({'key': example['key'], 'image': example['image'],
                        'captions': list(example['captions']),
                        'labels': dict(example.get('labels') or {})}, use_bin_type=True)


def decode_record(data: bytes) -> dict:
  record = msgpack.unpackb(data, raw=False)
  return {'key': record['key'], 'image': record['image'], 'caption': record['captions'],
          'labels': record.get('labels') or {}}


class ArrayRecordSource(sources.RandomAccessSource):
  """Prepared records of array_record files."""

  def __init__(self, files: list[str], field: str):
    for f in files:
      if '://' in f and not f.startswith('file://'):
        raise ValueError(f'{field}: {f} is remote; array_record files are read from local (or '
                         'mounted) storage')
    self.files = files
    self.field = field
    self._source = None

  def _records(self):
    if self._source is None:   # opened lazily: the source pickles small into grain workers
      self._source = grain.sources.ArrayRecordDataSource(self.files)
    return self._source

  def __getstate__(self):
    return {'files': self.files, 'field': self.field, '_source': None}

  def __len__(self) -> int:
    return len(self._records())

  def __getitem__(self, index: int) -> dict:
    data = self._records()[index]
    try:
      return decode_record(data)
    except Exception as e:  # pylint: disable=broad-except
      return sources.skip('bad_record', index, self.describe(), e)

  def describe(self) -> str:
    n = len(self.files)
    return f'{n} array_record file{"s" * (n != 1)} of {self.field} ({self.files[0]})'


def make(data_config, split: str) -> ArrayRecordSource:
  field = 'config.data.paths' if split == 'train' else 'config.data.eval_paths'
  return ArrayRecordSource(
      paths_lib.expand(data_config.get('paths' if split == 'train' else 'eval_paths'), field),
      field)
