"""`webdataset`: tar shards as img2dataset (and webdataset) write them.

A sample is the run of consecutive members that share a key: the member's path up to the first
'.' of its file name (`00001234.jpg`, `00001234.txt`, `00001234.json` → key `00001234`). The
image is the first member whose extension is one of `config.data.image_key` (';'-separated,
default 'jpg;jpeg;png;webp'); the caption is the member with extension `config.data.caption_key`
(default 'txt'), else that field of the sample's JSON (a list there gives several captions); the
JSON's fields are the sample's labels.

Shards are read with Python's `tarfile` over fsspec file objects (local, gs://, s3://,
memory://, ...). A position is the byte offset of the next sample's first header, so a resumed
reader seeks straight to it. A truncated shard or an unreadable member ends in a counted skip,
never an exception.
"""

from __future__ import annotations

import re
import tarfile

from unclip_jax.data import paths as paths_lib
from unclip_jax.data import sources

IMAGE_EXTENSIONS = 'jpg;jpeg;png;webp'
_KEY_RE = re.compile(r'^((?:.*/|)[^./]+)\.([^/]*)$')


def split_name(name: str) -> tuple[str, str] | None:
  """'dir/00001.jpg' → ('dir/00001', 'jpg'); None for a name without an extension."""
  m = _KEY_RE.match(name)
  return (m.group(1), m.group(2).lower()) if m else None


class WebDatasetSource(sources.StreamingSource):
  """Samples of tar shards; a unit is one shard (its path)."""

  def __init__(self, shards: list[str], *, image_key: str = IMAGE_EXTENSIONS,
               caption_key: str = 'txt', field: str = 'config.data.paths'):
    self.shards = shards
    self.image_exts = tuple(e.strip().lower() for e in image_key.split(';') if e.strip())
    self.caption_key = caption_key
    self.field = field

  def units(self) -> list[str]:
    return list(self.shards)

  def describe(self) -> str:
    n = len(self.shards)
    return f'{n} tar shard{"s" * (n != 1)} of {self.field} ({self.shards[0]}' + \
        (f' ... {self.shards[-1]})' if n > 1 else ')')

  def _sample(self, key: str, members: dict, shard: str) -> dict:
    image = next((members[e] for e in self.image_exts if e in members), None)
    labels = {}
    if 'json' in members:
      try:
        labels = sources.read_json(members['json'])
      except ValueError as e:
        return sources.skip('bad_json', key, paths_lib.short(shard), e)
    caption = members.get(self.caption_key)
    if caption is None:
      caption = labels.get(self.caption_key)
    elif isinstance(caption, bytes):
      caption = caption.decode('utf-8', errors='replace')
    return {'key': key, 'image': image, 'caption': caption, 'labels': labels}

  def read(self, unit: str, position=None):
    """Yields (byte offset of the next sample, sample) through shard `unit`."""
    where = paths_lib.short(unit)
    try:
      f = paths_lib.open_file(unit)
    except Exception as e:  # pylint: disable=broad-except
      yield 'end', sources.skip('unreadable_shard', '', where, e)
      return
    with f:
      try:
        if position:
          f.seek(int(position))
        tar = tarfile.open(fileobj=f, mode='r:')
      except Exception as e:  # pylint: disable=broad-except
        if not position:   # an empty file, or not a tar at all
          yield 'end', sources.skip('unreadable_shard', '', where, e)
        return
      key, members = None, {}
      while True:
        try:
          member = tar.next()
        except Exception as e:  # pylint: disable=broad-except
          # A header or data cut short: what came before is kept, the rest is lost.
          yield 'end', sources.skip('truncated_shard', key or '', where, e)
          return
        if member is None:
          trouble = _after_last_header(f, tar.offset)
          if trouble:   # tarfile stops quietly at a bad header; the rest of the shard is lost
            yield 'end', sources.skip(trouble, key or '', where,
                                      f'no valid tar header at byte {tar.offset}')
            return
          break
        if not member.isfile():
          continue
        parts = split_name(member.name)
        if parts is None:
          continue
        member_key, ext = parts
        if member_key != key:
          if key is not None:
            yield member.offset, self._sample(key, members, unit)
          key, members = member_key, {}
        try:
          members[ext] = tar.extractfile(member).read()
        except Exception as e:  # pylint: disable=broad-except
          yield 'end', sources.skip('truncated_shard', member_key, where, e)
          return
      if key is not None:
        yield 'end', self._sample(key, members, unit)


def _after_last_header(f, offset: int) -> str | None:
  """Why tarfile found no header at `offset`: None at a proper end (zero blocks or end of
  file), 'truncated_shard' for a header cut short, 'unreadable_member' for a corrupt one."""
  f.seek(offset)
  block = f.read(tarfile.BLOCKSIZE)
  if not block or not block.strip(b'\0'):
    return None
  return 'truncated_shard' if len(block) < tarfile.BLOCKSIZE else 'unreadable_member'


def make(data_config, split: str) -> WebDatasetSource:
  field = 'config.data.paths' if split == 'train' else 'config.data.eval_paths'
  shards = paths_lib.expand(data_config.get('paths' if split == 'train' else 'eval_paths'),
                            field)
  return WebDatasetSource(
      shards, image_key=sources.data_field(data_config, 'image_key', IMAGE_EXTENSIONS),
      caption_key=sources.data_field(data_config, 'caption_key', 'txt'), field=field)
