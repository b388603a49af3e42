"""Saving and loading a stage's trained parameters with its config (what later stages load)."""

import json
import os

import jax
import ml_collections


def save_export(path: str, params, config: ml_collections.ConfigDict):
  """Writes `params` (orbax) and `config.json` under `path`, replacing an older export."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(path, 'params'), params, force=True)
  ckpt.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(path, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))


def export_dir(path: str) -> str:
  """The absolute export directory of `path`: `path/export` when a run directory holds one."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'export')):
    path = os.path.join(path, 'export')
  return path


def load_export(path: str, what: str = 'stage') -> tuple[ml_collections.ConfigDict, dict]:
  """(config, params) from an export directory, or from a run directory holding `export/`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = export_dir(path)
  config_path = os.path.join(path, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'no exported {what} at {path}: {config_path} is missing (train '
                            f'the {what} stage first, or convert a checkpoint)')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  params = ocp.StandardCheckpointer().restore(os.path.join(path, 'params'))
  return config, params
