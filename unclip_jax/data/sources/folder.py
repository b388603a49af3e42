"""`folder`: image files on disk (or any fsspec filesystem) with their captions.

`config.data.paths` names either
  * a manifest: `.jsonl` (one JSON object per line), `.csv` (with a header) or `.parquet`, one
    row per image, the image's path (relative to the manifest's folder, or absolute) in column
    `config.data.image_key` (default 'image') and its caption in `config.data.caption_key`
    (default 'caption'; a JSON list gives several captions). The other columns are labels; a
    `config.data.key_key` column (default: the image path) gives the key;
  * or a folder: every .jpg/.jpeg/.png/.webp under it, recursively, sorted, each captioned by
    the `.txt` file of the same name beside it (key: the path under the folder, without the
    extension).
Several manifests or folders may be listed (comma-separated). Random access: the file list is
read once, images are read when their example is.
"""

from __future__ import annotations

import csv
import io
import json

import pyarrow.parquet as pq

from unclip_jax.data import paths as paths_lib
from unclip_jax.data import sources

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp')
MANIFEST_SUFFIXES = ('.jsonl', '.csv', '.parquet')


def _manifest_rows(path: str) -> list[dict]:
  if path.endswith('.jsonl'):
    with paths_lib.open_file(path, 'rb') as f:
      lines = f.read().decode('utf-8').splitlines()
    rows = []
    for n, line in enumerate(lines):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except ValueError as e:
          raise ValueError(f'config.data.paths: {path} line {n + 1} is not JSON: {e}') from e
    return rows
  if path.endswith('.csv'):
    with paths_lib.open_file(path, 'rb') as f:
      return list(csv.DictReader(io.StringIO(f.read().decode('utf-8'))))
  with paths_lib.open_file(path) as f:
    return pq.read_table(f).to_pylist()


class FolderSource(sources.RandomAccessSource):
  """Images named by manifests or found in folders; entries are (key, path, caption, labels)."""

  def __init__(self, entries: list[tuple[str, str, object, dict]], description: str):
    self.entries = entries
    self.description = description

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, index: int) -> dict:
    key, path, caption, labels = self.entries[index]
    try:
      image = paths_lib.read_bytes(path)
    except Exception as e:  # pylint: disable=broad-except
      return sources.skip('missing_image', key, path, e)
    if '_txt' in labels:   # a folder's image: its caption is the .txt file beside it
      try:
        caption = paths_lib.read_bytes(labels['_txt']).decode('utf-8', errors='replace')
      except Exception:  # pylint: disable=broad-except
        caption = None    # counted as a missing caption
      labels = {k: v for k, v in labels.items() if k != '_txt'}
    return {'key': key, 'image': image, 'caption': caption, 'labels': labels}

  def describe(self) -> str:
    return self.description


def _from_manifest(path, image_key, caption_key, key_key):
  rows = _manifest_rows(path)
  base = paths_lib.dirname(path)
  entries = []
  for n, row in enumerate(rows):
    image = row.get(image_key)
    if image is None:
      raise ValueError(f'config.data.image_key: row {n + 1} of {path} has no {image_key!r} '
                       f'column; its columns: {sorted(row)}')
    caption = row.get(caption_key)
    if isinstance(caption, str) and caption.startswith('['):
      try:
        caption = json.loads(caption)   # a JSON list of captions in a CSV cell
      except ValueError:
        pass
    key = str(row[key_key]) if key_key and row.get(key_key) is not None else str(image)
    labels = {k: v for k, v in row.items() if k not in (image_key, caption_key)}
    entries.append((key, paths_lib.join(base, str(image)), caption, labels))
  return entries


def _from_folder(path):
  fs, root = paths_lib.filesystem(path)
  found = sorted(fs.find(root))
  files = set(found)
  entries = []
  for f in found:
    if not f.lower().endswith(IMAGE_SUFFIXES):
      continue
    stem = f.rsplit('.', 1)[0]
    txt = stem + '.txt'
    key = stem[len(root.rstrip('/')) + 1:]
    full = lambda p: p if '://' not in path else f'{path.split("://", 1)[0]}://{p.lstrip("/")}'
    labels = {'_txt': full(txt)} if txt in files else {}
    entries.append((key, full(f), None, labels))
  return entries


def make(data_config, split: str) -> FolderSource:
  field = 'config.data.paths' if split == 'train' else 'config.data.eval_paths'
  spec = data_config.get('paths' if split == 'train' else 'eval_paths')
  image_key = sources.data_field(data_config, 'image_key', 'image')
  caption_key = sources.data_field(data_config, 'caption_key', 'caption')
  key_key = data_config.get('key_key')
  entries = []
  items = paths_lib.split_list(spec)
  if not items:
    raise FileNotFoundError(f'{field} is empty: name a manifest (.jsonl, .csv, .parquet) or a '
                            'folder of images')
  for item in items:
    fs, local = paths_lib.filesystem(item)
    if fs.isdir(local):
      found = _from_folder(item)
      if not found:
        raise FileNotFoundError(f'{field}: the folder {item!r} holds no {IMAGE_SUFFIXES} image')
      entries.extend(found)
      continue
    for manifest in paths_lib.expand(item, field):
      if not manifest.endswith(MANIFEST_SUFFIXES):
        raise ValueError(f'{field}: {manifest!r} is neither a folder nor a manifest '
                         f'({", ".join(MANIFEST_SUFFIXES)})')
      entries.extend(_from_manifest(manifest, image_key, caption_key, key_key))
  if not entries:
    raise ValueError(f'{field}: {spec!r} lists no image')
  return FolderSource(entries, f'{len(entries)} images of {field}={spec!r}')
