r"""Draw images with trained (or converted) stages: `unclip-sample` / `python -m unclip_jax.sample`.

  # prompts as arguments, from the whole-system run of unclip_jax.train_all
  python -m unclip_jax.sample --run=runs/unclip --out=out "a red circle on a blue background"
  # prompts from a UTF-8 file (one per line; blank lines are ignored)
  python -m unclip_jax.sample --run=runs/unclip --prompts_file=prompts.txt --out=out
  # stages from separate runs, per-stage settings
  python -m unclip_jax.sample --prior=runs/prior --decoder=runs/decoder \
      --upsampler=runs/upsampler --decoder_steps=50 --decoder_guidance=5 --seed=3 "..."
  # image variations and interpolations (no prompts)
  python -m unclip_jax.sample --run=runs/unclip --variations=cat.png --num=8 --out=out
  python -m unclip_jax.sample --run=runs/unclip --interpolate=a.png,b.png --num=6 --out=out

Writes OUT/0000.png, …, OUT/contact_sheet.png (each image with its prompt), and
OUT/generation.json (prompts, settings, seconds per stage). Prints progress per stage.
Prompts that are empty, not UTF-8, or longer than the CLIP's context are refused with the
prompt's number; --truncate cuts long prompts to fit instead (with a warning), as CLIP does.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

from unclip_jax import cli

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined on use, so that importing this module defines none)."""
  cli.define_verbose_flag()
  flags.DEFINE_string('run', None, 'Run directory of unclip_jax.train_all (clip/, prior/, '
                      'decoder/, upsampler*/).')
  flags.DEFINE_string('clip', None, 'CLIP run or export (default: the one the prior was '
                      'trained on).')
  flags.DEFINE_string('prior', None, 'Prior run or export.')
  flags.DEFINE_string('decoder', None, 'Decoder run or export.')
  flags.DEFINE_multi_string('upsampler', [], 'Upsampler run or export (repeat, in order).')
  flags.DEFINE_string('out', 'samples', 'Output directory.')
  flags.DEFINE_string('prompts_file', None, 'UTF-8 text file, one prompt per line.')
  flags.DEFINE_string('variations', None, 'Image file: draw --num variations of it.')
  flags.DEFINE_list('interpolate', None, 'Two image files A,B: --num frames between them.')
  flags.DEFINE_integer('num', 4, 'Images per variation / frames per interpolation.')
  flags.DEFINE_integer('seed', 0, 'Seed of the whole call; stage i uses fold_in(seed, i).')
  flags.DEFINE_integer('batch_size', 16, 'Prompts per compiled call (the last batch is padded).')
  flags.DEFINE_bool('truncate', False, 'Cut over-long prompts to the CLIP context instead of '
                    'refusing them.')
  for stage in ('prior', 'decoder', 'upsampler'):
    flags.DEFINE_string(f'{stage}_steps', None, f'{stage} respaced steps (e.g. 25, ddim27).')
    flags.DEFINE_enum(f'{stage}_sampler', None, ['ddpm', 'ddim'], f'{stage} sampler.')
    flags.DEFINE_integer(f'{stage}_seed', None, f'{stage} seed (overrides --seed).')
    if stage != 'upsampler':
      flags.DEFINE_float(f'{stage}_guidance', None, f'{stage} classifier-free guidance scale.')


def read_prompts(args: list[str], path: str | None) -> list[str]:
  """Prompts from the command line's arguments and/or a file; raises PromptError naming the
  prompt (argument number or file line) that is not valid UTF-8."""
  from unclip_jax.pipeline import PromptError  # pylint: disable=g-import-not-at-top
  prompts = []
  for i, arg in enumerate(args):
    try:
      arg.encode('utf-8')       # undecodable argv bytes arrive as lone surrogates
    except UnicodeEncodeError as e:
      raise PromptError(f'prompt argument {i + 1} is not valid UTF-8 text') from e
    prompts.append(arg)
  if path:
    if not os.path.isfile(path):
      raise PromptError(f'prompts file not found: {path}')
    with open(path, 'rb') as f:
      for line_no, raw in enumerate(f, 1):
        try:
          line = raw.decode('utf-8').strip()
        except UnicodeDecodeError as e:
          raise PromptError(f'{path}, line {line_no}: not valid UTF-8 ({e.reason} at byte '
                            f'{e.start})') from e
        if line:
          prompts.append(line)
    if not prompts:
      raise PromptError(f'{path} holds no prompts')
  return prompts


def stage_options(stage: str):
  from unclip_jax.pipeline import StageOptions  # pylint: disable=g-import-not-at-top
  get = lambda name: getattr(FLAGS, f'{stage}_{name}', None)
  return StageOptions(steps=get('steps'), sampler=get('sampler'), guidance_scale=get('guidance'),
                      seed=get('seed'))


def load_pipeline():
  from unclip_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  if FLAGS.run:
    return pipeline_lib.UnclipPipeline.from_run(FLAGS.run)
  if not FLAGS.decoder:
    raise ValueError('give --run, or at least --decoder (and --prior for prompts)')
  return pipeline_lib.UnclipPipeline.from_workdirs(clip=FLAGS.clip, prior=FLAGS.prior,
                                                   decoder=FLAGS.decoder,
                                                   upsamplers=FLAGS.upsampler)


def generate(pipe, prompts: list[str], log=print):
  """Images for all prompts in padded batches of --batch_size; (images, seconds per stage)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  pipe.encode_prompts(prompts, FLAGS.truncate)      # refuse bad prompts before any compiling
  n, bs = len(prompts), FLAGS.batch_size
  batches = -(-n // bs)
  images, seconds = [], {}
  for k, i in enumerate(range(0, n, bs)):
    chunk = prompts[i:i + bs]
    chunk = chunk + [chunk[-1]] * (bs - len(chunk)) if batches > 1 else chunk

    def progress(stage, s, k=k):
      seconds[stage] = seconds.get(stage, 0.0) + s
      log(f'batch {k + 1}/{batches}: {stage} done in {s:.1f} s')

    out = pipe.text_to_image(chunk, seed=FLAGS.seed + i, prior=stage_options('prior'),
                             decoder=stage_options('decoder'),
                             upsamplers=stage_options('upsampler'), truncate=FLAGS.truncate,
                             on_stage=progress)
    images.append(out.images[:min(bs, n - i)])
  return np.concatenate(images), seconds


def write(out_dir: str, images, captions: list[str], info: dict):
  """NNNN.png, contact_sheet.png and generation.json into `out_dir` (local or gs://)."""
  from unclip_jax import images as images_lib  # pylint: disable=g-import-not-at-top
  from unclip_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  folder = workdir_lib.path(out_dir)
  images_lib.save_with_sheet(images, captions, os.fspath(folder),
                             os.fspath(folder / 'contact_sheet.png'), columns=min(8, len(images)))
  (folder / 'generation.json').write_text(json.dumps(info, indent=2, ensure_ascii=False))


def main(argv):
  cli.quiet_logging()
  from unclip_jax.pipeline import PromptError  # pylint: disable=g-import-not-at-top
  args = argv[1:]
  modes = sum(bool(x) for x in (args or FLAGS.prompts_file, FLAGS.variations, FLAGS.interpolate))
  if modes != 1:
    sys.exit('Give prompts (arguments or --prompts_file), or --variations, or --interpolate: '
             'exactly one of them.')
  try:
    prompts = read_prompts(args, FLAGS.prompts_file) if not (FLAGS.variations or
                                                             FLAGS.interpolate) else None
    start = time.perf_counter()
    pipe = load_pipeline()
    print(f'loaded the stages in {time.perf_counter() - start:.1f} s; output {pipe.resolution}px')
    info = {'seed': FLAGS.seed, 'settings': {s: stage_options(s).overrides()
                                             for s in ('prior', 'decoder', 'upsampler')}}
    if prompts is not None:
      images, seconds = generate(pipe, prompts)
      captions = prompts
      info['prompts'] = prompts
    elif FLAGS.variations:
      out = pipe.variations(FLAGS.variations, FLAGS.num, seed=FLAGS.seed,
                            decoder=stage_options('decoder'),
                            upsamplers=stage_options('upsampler'))
      images, seconds = out.images, out.seconds
      captions = [f'variation {i + 1}' for i in range(FLAGS.num)]
      info['image'] = FLAGS.variations
    else:
      if len(FLAGS.interpolate) != 2:
        raise ValueError(f'--interpolate takes two image files A,B, got {FLAGS.interpolate}')
      out = pipe.interpolate(*FLAGS.interpolate, FLAGS.num, seed=FLAGS.seed)
      images, seconds = out.images, out.seconds
      captions = [f'frame {i + 1}' for i in range(FLAGS.num)]
      info['images'] = FLAGS.interpolate
  except PromptError as e:
    cli.exit_on(e, 'Bad prompt')
  except (FileNotFoundError, ValueError) as e:
    cli.exit_on(e)
  info['seconds'] = {k: round(v, 2) for k, v in seconds.items()}
  write(FLAGS.out, images, captions, info)
  print(f'wrote {len(images)} images and contact_sheet.png to {FLAGS.out}')


def run():
  """Console entry point (`unclip-sample`)."""
  cli.console_setup()
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
