"""Saving and loading a stage's trained parameters with its config (what later stages load)."""

import json
import os
import shutil
from typing import Optional

import jax
import ml_collections

from unclip_jax import multihost


def save_export(path: str, params, config: ml_collections.ConfigDict,
                files: Optional[dict[str, str]] = None):
  """Writes `params` (orbax), `config.json` and `files` ({name inside the export: source file})
  under `path`, replacing an older export.

  Everything goes to `path.partial` first, which is renamed into place once whole: a kill
  mid-write leaves the old export (or none), never a torn one."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from unclip_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  partial, old = path + '.partial', path + '.old'
  main = jax.process_index() == 0
  if main and os.path.exists(partial):
    shutil.rmtree(partial)
  multihost.barrier('export_start')
  try:
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(partial, 'params'), params, force=True)
    ckpt.wait_until_finished()
    if main:
      for name, source in (files or {}).items():
        os.makedirs(os.path.dirname(os.path.join(partial, name)), exist_ok=True)
        shutil.copyfile(source, os.path.join(partial, name))
      workdir_lib.atomic_write_text(os.path.join(partial, 'config.json'),
                                    config.to_json_best_effort(indent=2))
  except Exception as e:  # pylint: disable=broad-except
    if main:
      shutil.rmtree(partial, ignore_errors=True)
    previous = 'the previous export is in place' if os.path.exists(path) else 'no export exists'
    raise workdir_lib.WriteError(
        f'could not write the export {path}: {workdir_lib.os_error(e)}. The partial export was '
        f'removed and {previous}; the same command writes it again once the cause is '
        'fixed.') from e
  if main:
    if os.path.exists(old):
      shutil.rmtree(old)
    if os.path.exists(path):
      os.rename(path, old)
    os.rename(partial, path)
    shutil.rmtree(old, ignore_errors=True)
  multihost.barrier('export_done')


def export_dir(path: str) -> str:
  """The absolute export directory of `path`: `path/export` when a run directory holds one."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'export')):
    path = os.path.join(path, 'export')
  return path


def load_config(path: str, what: str = 'stage') -> ml_collections.ConfigDict:
  """The config of an export directory, or of a run directory holding `export/`."""
  config_path = os.path.join(export_dir(path), 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'no exported {what} at {export_dir(path)}: {config_path} is missing '
                            f'(train the {what} stage first, or convert a checkpoint)')
  with open(config_path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_export(path: str, what: str = 'stage') -> tuple[ml_collections.ConfigDict, dict]:
  """(config, params) from an export directory, or from a run directory holding `export/`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = load_config(path, what)
  params = ocp.StandardCheckpointer().restore(os.path.join(export_dir(path), 'params'))
  return config, params
