"""Converters from PyTorch checkpoints (Hugging Face / OpenAI CLIP, open_clip, diffusers' karlo
UnCLIPPipeline) to unclip_jax params and stage configs. Command line: `python -m unclip_jax.convert`.
"""

import ml_collections

from unclip_jax import config_lib


def base_config(stage: str, preset: str) -> ml_collections.ConfigDict:
  """`configs/<stage>.py`'s `get_config(preset)` (installed as `unclip_jax.presets`): the stage
  config a converter starts from."""
  return config_lib.preset(stage, preset)
