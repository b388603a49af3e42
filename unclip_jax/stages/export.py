"""Saving and loading a stage's trained parameters with its config (what later stages load).

An export is a folder, local or remote (gs://...): `params/` (orbax), `config.json`, and any
files the stage needs beside them (a CLIP's tokenizer). `config.json` is what makes it whole:
it is written last, so a folder without it is an export whose writing was cut short."""

import contextlib
import json
import os
from typing import Optional

import jax
import ml_collections

from unclip_jax import multihost
from unclip_jax import workdir as workdir_lib


def save_export(path: str, params, config: ml_collections.ConfigDict,
                files: Optional[dict[str, str]] = None):
  """Writes `params` (orbax), `config.json` and `files` ({name inside the export: source file,
  local or remote}) under `path`, replacing an older export.

  On a local disk everything goes to `path.partial` first, which is renamed into place once
  whole: a kill mid-write leaves the old export (or none), never a torn one. On an object store,
  where a rename is a copy, the old export's config.json is removed first and the new one
  written last, in place: a kill leaves a folder without config.json, which no loader takes for
  an export (the run that wrote it exports again)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  root = workdir_lib.path(path)
  remote = workdir_lib.is_remote(root)
  target = root if remote else root.parent / (root.name + '.partial')
  main = jax.process_index() == 0
  # Read first: a re-export's files may come from the export it replaces.
  contents = {name: workdir_lib.path(source).read_bytes()
              for name, source in (files or {}).items()} if main else {}
  if main:
    if remote:
      workdir_lib.remove_tree(root / 'config.json')
    workdir_lib.remove_tree(target)
  multihost.barrier('export_start')
  ckpt = ocp.StandardCheckpointer()
  try:
    ckpt.save(target / 'params', params, force=True)
    ckpt.wait_until_finished()
    if main:
      for name, content in contents.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(content)
      workdir_lib.atomic_write_text(target / 'config.json', config.to_json_best_effort(indent=2))
  except Exception as e:  # pylint: disable=broad-except
    with contextlib.suppress(Exception):
      ckpt.close()                          # its writer threads are done with the folder
    removed = workdir_lib.remove_partial(target) if main else True
    previous = ('the previous export is in place' if not remote and root.exists() else
                'no export exists')
    partial = 'The partial export was removed' if removed else (
        f'The partial export {target} could not be removed (the next export removes it)')
    raise workdir_lib.WriteError(
        f'could not write the export {root}: {workdir_lib.os_error(e)}. {partial} and '
        f'{previous}; the same command writes it again once the cause is fixed.') from e
  if main and not remote:
    old = root.parent / (root.name + '.old')
    workdir_lib.remove_tree(old)
    if root.exists():
      os.rename(root, old)
    os.rename(target, root)
    workdir_lib.remove_tree(old)
  multihost.barrier('export_done')


def export_dir(path: str) -> str:
  """The export directory of `path` (local ones absolute): `path/export` when a run directory
  holds one."""
  root = workdir_lib.path(path)
  if (root / 'export').is_dir():
    root = root / 'export'
  return os.fspath(root)


def load_config(path: str, what: str = 'stage') -> ml_collections.ConfigDict:
  """The config of an export directory, or of a run directory holding `export/`."""
  config_path = workdir_lib.path(export_dir(path)) / 'config.json'
  if not config_path.exists():
    raise FileNotFoundError(f'no exported {what} at {export_dir(path)}: {config_path} is missing '
                            f'(train the {what} stage first, or convert a checkpoint)')
  return ml_collections.ConfigDict(json.loads(config_path.read_text()))


def load_export(path: str, what: str = 'stage') -> tuple[ml_collections.ConfigDict, dict]:
  """(config, params) from an export directory, or from a run directory holding `export/`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = load_config(path, what)
  params = ocp.StandardCheckpointer().restore(workdir_lib.path(export_dir(path)) / 'params')
  return config, params
