"""`parquet`: parquet files holding each image's bytes and caption in columns.

img2dataset's parquet output stores the image bytes in a binary column (`jpg`) and the caption
in `caption`; Hugging Face datasets store images as a struct column `{'bytes', 'path'}`. Both are
read: `config.data.image_key` names the column (default: the first of 'image', 'jpg', 'png',
'webp', 'jpeg' the file has), `config.data.caption_key` the caption column (default 'caption';
a list column gives several captions), `config.data.key_key` an id column (default 'key' when
present, else file name and row). The other scalar columns are the sample's labels.

A unit is one row group of one file, so row groups are split across processes; a position is
the next row within the row group.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from unclip_jax.data import paths as paths_lib
from unclip_jax.data import sources

IMAGE_COLUMNS = ('image', 'jpg', 'png', 'webp', 'jpeg')


def image_bytes(value):
  """A cell of an image column → bytes (plain binary, or Hugging Face's {'bytes', 'path'})."""
  if isinstance(value, dict):
    return value.get('bytes')
  return value


def open_parquet(path: str) -> pq.ParquetFile:
  return pq.ParquetFile(paths_lib.open_file(path))


class ParquetSource(sources.StreamingSource):
  """Rows of parquet files; a unit is [file, row group]."""

  def __init__(self, files: list[str], *, image_key=None, caption_key='caption', key_key=None,
               field='config.data.paths'):
    self.files = files
    self.image_key = image_key
    self.caption_key = caption_key
    self.key_key = key_key
    self.field = field
    self._units = None

  def units(self) -> list:
    if self._units is None:
      units = []
      for path in self.files:
        try:
          with paths_lib.open_file(path) as f:
            n = pq.ParquetFile(f).metadata.num_row_groups
        except Exception as e:  # pylint: disable=broad-except
          raise ValueError(f'{self.field}: {path} is not a readable parquet file: {e}') from e
        units.extend([path, g] for g in range(n))
      self._units = units
    return self._units

  def describe(self) -> str:
    n = len(self.files)
    return f'{n} parquet file{"s" * (n != 1)} of {self.field} ({self.files[0]})'

  def _columns(self, schema_names: list[str], path: str) -> tuple[str, list[str]]:
    image = self.image_key or next((c for c in IMAGE_COLUMNS if c in schema_names), None)
    if image is None or image not in schema_names:
      wanted = repr(image) if image else f'(none of {IMAGE_COLUMNS})'
      raise ValueError(f'config.data.image_key: {path} has no image column {wanted}; its '
                       f'columns: {schema_names}')
    return image, schema_names

  def read(self, unit, position=None):
    path, group = unit
    where = f'{paths_lib.short(path)} row group {group}'
    try:
      with paths_lib.open_file(path) as f:
        pf = pq.ParquetFile(f)
        image_col, names = self._columns(pf.schema_arrow.names, path)
        table = pf.read_row_group(group)
    except ValueError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      yield 'end', sources.skip('unreadable_shard', '', where, e)
      return
    key_col = self.key_key or ('key' if 'key' in names else None)
    rows = table.num_rows
    start = int(position or 0)
    columns = {name: table.column(name).to_pylist() for name in names}
    for row in range(start, rows):
      cell = lambda name: columns[name][row] if name in columns else None  # pylint: disable=cell-var-from-loop
      key = cell(key_col) if key_col else None
      key = str(key) if key is not None else f'{paths_lib.short(path)}:{group}:{row}'
      labels = {}
      for name in names:
        if name in (image_col, self.caption_key):
          continue
        value = cell(name)
        if value is None or isinstance(value, (str, int, float, bool)):
          labels[name] = value
      example = {'key': key, 'image': image_bytes(cell(image_col)),
                 'caption': cell(self.caption_key), 'labels': labels}
      yield (row + 1 if row + 1 < rows else 'end'), example


def make(data_config, split: str) -> ParquetSource:
  field = 'config.data.paths' if split == 'train' else 'config.data.eval_paths'
  files = paths_lib.expand(data_config.get('paths' if split == 'train' else 'eval_paths'), field)
  return ParquetSource(files, image_key=data_config.get('image_key'),
                       caption_key=sources.data_field(data_config, 'caption_key', 'caption'),
                       key_key=data_config.get('key_key'), field=field)
