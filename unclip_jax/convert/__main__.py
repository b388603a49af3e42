"""Converts PyTorch checkpoints into unclip_jax exports.

  python -m unclip_jax.convert karlo     SRC DST   # diffusers UnCLIPPipeline folder → run folder
  python -m unclip_jax.convert hf-clip   SRC DST [--vision VISION_SRC]
  python -m unclip_jax.convert open-clip SRC DST [--model-config JSON] [--tokenizer PATH]

karlo writes DST/{clip,prior,decoder,upsampler}: `unclip-sample --run DST "a prompt"` samples
from it. The CLIP kinds write one CLIP export (params, config.json and the tokenizer), which a
prior or decoder config names in `--config.clip.workdir` to train on it.

The conversion is written to DST.partial and moved to DST when complete, so a failed conversion
leaves no half-written DST; an existing DST is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

KINDS = ('karlo', 'hf-clip', 'open-clip')


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m unclip_jax.convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('kind', help=f'one of {", ".join(KINDS)}')
  p.add_argument('src', help='the checkpoint (a folder, or a weights file for open-clip)')
  p.add_argument('dst', help='the folder to write')
  p.add_argument('--vision', help='karlo / hf-clip: a CLIPVisionModelWithProjection folder '
                 'for the image tower')
  p.add_argument('--model-config', help='open-clip: the model config JSON (default: inferred '
                 'from the tensor shapes, as for OpenAI checkpoints)')
  p.add_argument('--tokenizer', help='hf-clip / open-clip: a tokenizer file or folder (default: '
                 'the files in SRC)')
  p.add_argument('--overwrite', action='store_true', help='replace an existing DST')
  return p


def convert(kind: str, src: str, dst: str, *, vision: str | None = None,
            model_config: str | None = None, tokenizer: str | None = None,
            overwrite: bool = False) -> str:
  """Runs one conversion into `dst` (atomically, see the module docstring); returns dst."""
  from unclip_jax.convert.torch_io import ConversionError  # pylint: disable=g-import-not-at-top
  if kind not in KINDS:
    raise ConversionError(f'unknown kind {kind!r}; use one of {", ".join(KINDS)}')
  if not os.path.exists(src):
    raise ConversionError(f'{src} does not exist')
  if os.path.exists(dst) and os.listdir(dst) and not overwrite:
    raise ConversionError(f'{dst} exists and is not empty; pass --overwrite to replace it')
  partial = dst.rstrip(os.sep) + '.partial'
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    if kind == 'karlo':
      from unclip_jax.convert import karlo  # pylint: disable=g-import-not-at-top
      karlo.convert_karlo(src, partial, vision=vision, final_dst=dst)
    else:
      from unclip_jax.convert import clip  # pylint: disable=g-import-not-at-top
      if kind == 'hf-clip':
        config, params = clip.convert_hf_clip(text=src, vision=vision)
      else:
        config, params = clip.convert_open_clip(src, model_config)
      clip.save_converted_clip(partial, config, params, tokenizer or src)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  if os.path.exists(dst):
    shutil.rmtree(dst)
  os.replace(partial, dst)
  return dst


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  from unclip_jax.convert.torch_io import ConversionError  # pylint: disable=g-import-not-at-top
  try:
    out = convert(args.kind, args.src, args.dst, vision=args.vision,
                  model_config=args.model_config, tokenizer=args.tokenizer,
                  overwrite=args.overwrite)
  except (ConversionError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
