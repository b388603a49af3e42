r"""The config of an export (a stage's `export/` folder, a run holding one, or a converted model),
as a config file, so that a stage trains with exactly the architecture of the parameters it
starts from (`config.init_from`):

  python -m unclip_jax.main --config=configs/export.py:runs/karlo/decoder \
      --config.init_from=runs/karlo/decoder --workdir=runs/karlo_decoder_mine \
      --config.data.source=webdataset --config.data.paths='/data/mine/{00000..00099}.tar'

Every field can be overridden as for any config. A relative tokenizer path of a converted CLIP
is resolved against the export folder.
"""

import json
import os

import ml_collections


def get_config(arg: str) -> ml_collections.ConfigDict:
  from unclip_jax.stages import export  # pylint: disable=g-import-not-at-top
  if not arg:
    raise ValueError('configs/export.py: name the export, e.g. configs/export.py:runs/clip')
  folder = export.export_dir(arg)
  path = os.path.join(folder, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'configs/export.py: {path} is missing: {arg!r} is not an export '
                            '(or a run folder holding export/)')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  t = config.get('tokenizer')
  if t is not None and t.get('path') and not os.path.isabs(t.path):
    candidate = os.path.join(folder, t.path)
    if os.path.exists(candidate):
      t.path = candidate
  return config
