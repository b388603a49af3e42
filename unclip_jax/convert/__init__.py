"""Converters from PyTorch checkpoints (Hugging Face / OpenAI CLIP, open_clip, diffusers' karlo
UnCLIPPipeline) to unclip_jax params and stage configs. Command line: `python -m unclip_jax.convert`.
"""

import importlib.util
import os

import ml_collections


def base_config(stage: str, preset: str) -> ml_collections.ConfigDict:
  """`configs/<stage>.py`'s `get_config(preset)`: the stage config a converter starts from."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__)))), 'configs', f'{stage}.py')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: converters need the configs/ folder of the '
                            'unclip_jax source tree (install it with pip install -e .)')
  spec = importlib.util.spec_from_file_location(f'unclip_jax_configs_{stage}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)
