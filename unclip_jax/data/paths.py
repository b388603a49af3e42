"""Data paths, local or remote: patterns expanded to files, files opened, through fsspec.

`config.data.paths` (and `eval_paths`) are comma-separated lists of paths, each a plain path,
a glob (`/data/*.tar`) or a brace pattern (`/data/{00000..00331}.tar`, `{a,b}.parquet`), on any
filesystem fsspec opens: local paths, `gs://`, `s3://`, `memory://` (tests), ... Nothing here
reads a whole file; sources open files with `open_file` and read what they need.
"""

from __future__ import annotations

import os
from typing import Sequence

import braceexpand
import fsspec

GLOB_CHARS = '*?['


def split_list(paths: str | Sequence[str] | None) -> list[str]:
  """'a,b, c' or ['a', 'b'] → ['a', 'b', 'c'] (commas inside braces do not split)."""
  if paths is None:
    return []
  if not isinstance(paths, str):
    return [p for item in paths for p in split_list(item)]
  out, depth, start = [], 0, 0
  for i, ch in enumerate(paths):
    depth += ch == '{'
    depth -= ch == '}'
    if ch == ',' and depth == 0:
      out.append(paths[start:i])
      start = i + 1
  out.append(paths[start:])
  return [p.strip() for p in out if p.strip()]


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
  """(fsspec filesystem, the path as that filesystem names it)."""
  return fsspec.core.url_to_fs(path)


def _with_protocol(fs: fsspec.AbstractFileSystem, original: str, path: str) -> str:
  """fsspec's glob drops the protocol ('gs://b/x' → 'b/x'); put it back."""
  if '://' not in original:
    return path
  protocol = original.split('://', 1)[0]
  return path if '://' in path else f'{protocol}://{path.lstrip("/")}'


def expand(paths: str | Sequence[str] | None, field: str = 'config.data.paths') -> list[str]:
  """Every file named by `paths` (see the module docstring), in the order given; globs sorted.

  Raises:
    FileNotFoundError naming `field` and the pattern when a pattern matches nothing.
  """
  files = []
  for item in split_list(paths):
    for pattern in braceexpand.braceexpand(item):
      fs, local = filesystem(pattern)
      if any(c in local for c in GLOB_CHARS):
        matches = sorted(fs.glob(local))
        matches = [m for m in matches if fs.isfile(m)]
        if not matches:
          raise FileNotFoundError(f'{field}: {pattern!r} matches no file')
        files.extend(_with_protocol(fs, pattern, m) for m in matches)
      else:
        if not fs.exists(local):
          raise FileNotFoundError(f'{field}: {pattern!r} does not exist')
        files.append(pattern)
  seen = set()
  unique = [f for f in files if not (f in seen or seen.add(f))]
  if not unique:
    raise FileNotFoundError(f'{field} is empty: name the data files (a glob, a brace pattern '
                            'or a comma-separated list)')
  return unique


def open_file(path: str, mode: str = 'rb'):
  """A file object for `path` on its filesystem (a context manager)."""
  return fsspec.open(path, mode).open()


def read_bytes(path: str) -> bytes:
  fs, local = filesystem(path)
  return fs.cat_file(local)


def join(base: str, relative: str) -> str:
  """`relative` resolved against the folder `base` (either may be remote); absolute and
  protocol-qualified paths are returned as they are."""
  if '://' in relative or os.path.isabs(relative):
    return relative
  return base.rstrip('/') + '/' + relative


def dirname(path: str) -> str:
  if '://' in path:
    protocol, rest = path.split('://', 1)
    return f'{protocol}://{rest.rsplit("/", 1)[0]}' if '/' in rest else f'{protocol}://'
  return os.path.dirname(path)


def short(path: str) -> str:
  """The last two components of a path, for log lines."""
  parts = path.rstrip('/').split('/')
  return '/'.join(parts[-2:])
