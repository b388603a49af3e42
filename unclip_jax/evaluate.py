r"""Evaluate generation as the field does: `unclip-evaluate` / `python -m unclip_jax.evaluate`.

  # FID/KID against the run's own held-out images, CLIP score, 2000 images from held-out captions
  python -m unclip_jax.evaluate --run=runs/unclip --captions=held_out --reference=held_out \
      --num=2000 --inception=pt_inception-2015-12-05-6726825d.pth --out=runs/unclip/eval
  # MS-COCO-style: captions from a file, reference statistics computed once elsewhere (.npz),
  # and the guidance trade-off curve over prior x decoder scales
  python -m unclip_jax.evaluate --run=runs/karlo --captions=captions.jsonl --reference=coco.npz \
      --num=30000 --inception=pt_inception.pth --decoder_guidance=1,2,4,8 --out=eval

--captions: `held_out` (the captions of the run's held-out split, from its data config: any
source the run trained on), or a file: `.txt` (one per line) or `.jsonl` (`--caption_key`).
--reference: an `.npz` of FID statistics (`mu`, `sigma`: ours or pytorch-fid's), or `held_out`
(the run's held-out images, whose statistics are written to OUT/reference.npz and reused).
--inception: the PyTorch weights of the FID Inception (pytorch-fid's file); nothing is downloaded.

Images are generated `--batch_size` at a time; each batch's Inception features, CLIP scores and
images are written to OUT/<setting>/batch_NNNNN.npz as soon as it is done, so a stopped or
killed run resumes without regenerating finished batches. Each batch is split over the process's
devices (as many as divide --batch_size); with `--distributed` each process generates every
process_count-th batch and process 0 writes the report.

Writes OUT/report.json (per guidance setting: FID, KID, precision/recall, CLIP score, the number
of images), OUT/<setting>/grid.png (the first images with their prompts) and, with more than one
setting, OUT/guidance_curve.png (FID against CLIP score, one line per prior scale).
"""

from __future__ import annotations

import io
import itertools
import json
import os
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from unclip_jax import cli
from unclip_jax import workdir as workdir_lib

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined on use, so that importing this module defines none)."""
  cli.define_verbose_flag()
  flags.DEFINE_string('run', None, 'Run directory of unclip_jax.train_all (or a converted one).')
  flags.DEFINE_string('captions', 'held_out', "'held_out' or a .txt / .jsonl file of captions.")
  flags.DEFINE_string('caption_key', 'caption', 'The caption field of a .jsonl captions file.')
  flags.DEFINE_string('reference', 'held_out', "FID statistics (.npz) or 'held_out'.")
  flags.DEFINE_integer('num', 1000, 'Images to generate per guidance setting.')
  flags.DEFINE_string('inception', None, 'PyTorch weights of the FID Inception (pytorch-fid).')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_integer('batch_size', 16, 'Images per generated batch.')
  flags.DEFINE_integer('seed', 0, 'Seed; batch k uses seed + k.')
  flags.DEFINE_list('prior_guidance', None, 'Prior guidance scales (default: the config\'s).')
  flags.DEFINE_list('decoder_guidance', None, 'Decoder guidance scales (default: the config\'s).')
  flags.DEFINE_integer('kid_subset_size', 1000, 'KID subset size (cut to the number of images).')
  flags.DEFINE_bool('distributed', False, 'Join a multi-process job first (TPU pods, SLURM: '
                    'unclip_jax.multihost).')
  flags.mark_flags_as_required(['run', 'inception', 'out'])


# --- captions and reference -------------------------------------------------------------------

def read_captions(spec: str, num: int, run: Optional[str] = None,
                  caption_key: str = 'caption') -> list[str]:
  """`num` captions (cycled if the source holds fewer) from a .txt/.jsonl file or, for
  'held_out', the run's held-out split."""
  if spec == 'held_out':
    captions = [str(c) for c in _held_out(run, num)['caption']]
  elif spec.endswith('.jsonl'):
    captions = []
    with open(spec, encoding='utf-8') as f:
      for line_no, line in enumerate(f, 1):
        if line.strip():
          try:
            captions.append(str(json.loads(line)[caption_key]))
          except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f'{spec}, line {line_no}: no {caption_key!r} field ({e})') from e
  elif os.path.isfile(spec):
    with open(spec, encoding='utf-8') as f:
      captions = [line.strip() for line in f if line.strip()]
  else:
    raise ValueError(f"--captions: {spec} is neither 'held_out' nor a file")
  if not captions:
    raise ValueError(f'--captions: {spec} holds no captions')
  return [captions[i % len(captions)] for i in range(num)]


def _final_data_config(run: str):
  """The data config of the run's last stage (the one whose images the chain outputs)."""
  from unclip_jax.stages import export  # pylint: disable=g-import-not-at-top
  for name in ('upsampler', 'decoder'):
    if (workdir_lib.path(run) / name).is_dir():
      return export.load_config(_join(run, name), name).data
  raise ValueError(f'{run} holds no decoder or upsampler run')


def _held_out(run: str, num: int) -> dict:
  from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  if run is None:
    raise ValueError("'held_out' needs --run")
  return input_pipeline.load_split(_final_data_config(run), 'test', max_examples=num)


def reference_statistics(spec: str, run: str, num: int, features_fn: Callable, out_dir: str):
  """FID Statistics from an .npz, or from the run's held-out images (cached in OUT)."""
  from unclip_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
  if spec != 'held_out':
    return fid.load_statistics(spec), None
  cached = _join(out_dir, 'reference.npz')
  features_path = _join(out_dir, 'reference_features.npy')
  if workdir_lib.path(cached).exists() and workdir_lib.path(features_path).exists():
    return fid.load_statistics(cached), np.load(_read(features_path))
  images = _held_out(run, num)['image']
  features = features_fn(images)
  stats = fid.statistics(features)
  if _is_main():
    buffer = io.BytesIO()
    np.save(buffer, features)
    workdir_lib.atomic_write_bytes(features_path, buffer.getvalue())
    fid.save_statistics(cached, stats)
  return stats, features


# --- generation, resumable --------------------------------------------------------------------

def _is_main() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def setting_name(prior: Optional[float], decoder: Optional[float]) -> str:
  fmt = lambda v: 'default' if v is None else f'{v:g}'
  return f'prior_{fmt(prior)}_decoder_{fmt(decoder)}'


def generate_batches(pipe, captions: Sequence[str], directory: str, *, batch_size: int,
                     seed: int, prior_guidance: Optional[float],
                     decoder_guidance: Optional[float], features_fn: Callable,
                     process_index: int = 0, process_count: int = 1, progress: bool = True):
  """Generates this process's batches that `directory` does not hold yet; each is written as
  batch_NNNNN.npz (uint8 images, Inception features, CLIP scores) through a temporary file."""
  from unclip_jax import images as images_lib  # pylint: disable=g-import-not-at-top
  from unclip_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from unclip_jax.evaluation import clip_score  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  workdir_lib.path(directory).mkdir(parents=True, exist_ok=True)
  n = len(captions)
  mine = [k for k in range(-(-n // batch_size)) if k % process_count == process_index]
  todo = [k for k in mine if not workdir_lib.path(_batch_path(directory, k)).exists()]
  if len(todo) < len(mine):
    logging.info('%s: %d of %d batches already written; generating the other %d', directory,
                 len(mine) - len(todo), len(mine), len(todo))
  prior = pipeline_lib.StageOptions(guidance_scale=prior_guidance)
  decoder = pipeline_lib.StageOptions(guidance_scale=decoder_guidance)
  for k in tqdm.tqdm(todo, desc=os.path.basename(directory), unit='batch',
                     disable=not progress):
    chunk = list(captions[k * batch_size:(k + 1) * batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)      # one compiled shape
    out = pipe.text_to_image(chunk, seed=seed + k, prior=prior, decoder=decoder, truncate=True)
    images = np.asarray(out.images[:real])
    scores = clip_score.pairwise(np.asarray(pipe.clip.embed_images(images)),
                                 np.asarray(out.text_embeddings[:real]))
    buffer = io.BytesIO()
    np.savez(buffer, images=images_lib.to_uint8(images), features=features_fn(images),
             clip_scores=scores, captions=np.asarray(chunk[:real], object))
    workdir_lib.atomic_write_bytes(_batch_path(directory, k), buffer.getvalue())


def _join(base: str, name: str) -> str:
  return os.fspath(workdir_lib.path(base) / name)


def _read(path: str) -> io.BytesIO:
  return io.BytesIO(workdir_lib.path(path).read_bytes())


def _batch_path(directory: str, k: int) -> str:
  return _join(directory, f'batch_{k:05d}.npz')


def read_batches(directory: str, n: int, batch_size: int) -> dict:
  """Every batch of a setting, in order: {images, features, clip_scores, captions}."""
  parts = []
  for k in range(-(-n // batch_size)):
    path = _batch_path(directory, k)
    if not workdir_lib.path(path).exists():
      raise ValueError(f'{path} is missing: a process did not finish its batches')
    with np.load(_read(path), allow_pickle=True) as f:
      parts.append({key: f[key] for key in f.files})
  return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# --- metrics, report, plot --------------------------------------------------------------------

def score(generated: dict, reference, reference_features, kid_subset_size: int) -> dict:
  from unclip_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
  features = generated['features']
  result = {'num_images': int(len(features)),
            'fid': fid.frechet_distance(fid.statistics(features), reference),
            'clip_score': float(np.mean(generated['clip_scores']))}
  if reference_features is not None:
    result['kid'], result['kid_std'] = fid.kernel_inception_distance(
        features, reference_features, subset_size=kid_subset_size)
    k = min(3, len(features) - 1, len(reference_features) - 1)
    result['precision'], result['recall'] = fid.precision_recall(reference_features, features,
                                                                 k=k)
  return result


def plot_curve(settings: list[dict], path: str):
  """FID against CLIP score, one line per prior scale, each point labelled by its decoder's."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
  key = lambda s: (s['prior_guidance'] is None, s['prior_guidance'] or 0)
  for prior, group in itertools.groupby(sorted(settings, key=key), lambda s: s['prior_guidance']):
    group = sorted(group, key=lambda s: s['decoder_guidance'] or 0)
    ax.plot([s['clip_score'] for s in group], [s['fid'] for s in group], marker='o',
            label=f'prior guidance {prior if prior is not None else "default"}')
    for s in group:
      ax.annotate(f"{s['decoder_guidance'] if s['decoder_guidance'] is not None else 'default'}",
                  (s['clip_score'], s['fid']), textcoords='offset points', xytext=(4, 4),
                  fontsize=7)
  ax.set_xlabel('CLIP score')
  ax.set_ylabel('FID')
  ax.set_title('Guidance trade-off (labels: decoder guidance)')
  ax.legend(fontsize=7)
  fig.tight_layout()
  with workdir_lib.path(path).open('wb') as f:
    fig.savefig(f, format='png')
  plt.close(fig)


def _scales(values) -> list[Optional[float]]:
  return [None] if not values else [float(v) for v in values]


def evaluate(run: str, inception_path: str, out_dir: str, *, captions: str = 'held_out',
             reference: str = 'held_out', num: int = 1000, batch_size: int = 16, seed: int = 0,
             prior_guidance=None, decoder_guidance=None, caption_key: str = 'caption',
             kid_subset_size: int = 1000, progress: bool = True) -> dict:
  """The command's work (see the module docstring); returns the report."""
  import jax  # pylint: disable=g-import-not-at-top
  from unclip_jax import images as images_lib  # pylint: disable=g-import-not-at-top
  from unclip_jax import multihost  # pylint: disable=g-import-not-at-top
  from unclip_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from unclip_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  workdir_lib.path(out_dir).mkdir(parents=True, exist_ok=True)
  params = inception.load_params(inception_path)
  features_fn = lambda images: _batched_features(params, images)
  prompts = read_captions(captions, num, run, caption_key)
  pipe = pipeline_lib.UnclipPipeline.from_run(run)
  pipe.encode_prompts(prompts, truncate=True)        # refuse bad prompts before generating
  devices = jax.local_devices()
  if len(devices) > 1:
    # Each batch split over this process's devices: as many as divide the batch.
    used = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
    if used < len(devices):
      logging.warning('--batch_size=%d splits over %d of this process\'s %d devices; a multiple '
                      'of %d uses them all', batch_size, used, len(devices), len(devices))
    if used > 1:
      pipe.shard_over(devices[:used])
  ref_stats, ref_features = reference_statistics(reference, run, num, features_fn, out_dir)
  settings = []
  for prior, decoder in itertools.product(_scales(prior_guidance), _scales(decoder_guidance)):
    directory = _join(out_dir, setting_name(prior, decoder))
    generate_batches(pipe, prompts, directory, batch_size=batch_size, seed=seed,
                     prior_guidance=prior, decoder_guidance=decoder, features_fn=features_fn,
                     process_index=jax.process_index(), process_count=jax.process_count(),
                     progress=progress)
    multihost.barrier(f'evaluate_{setting_name(prior, decoder)}')
    if not _is_main():
      continue
    # A setting scored before (a resumed run) is not scored again: its metrics.json records
    # what it was scored against.
    metrics_path = _join(directory, 'metrics.json')
    against = {'num': num, 'batch_size': batch_size, 'seed': seed, 'captions': captions,
               'reference': reference, 'inception': os.path.abspath(inception_path)}
    result = _read_json(metrics_path)
    if result is None or result.get('against') != against:
      generated = read_batches(directory, num, batch_size)
      result = {'setting': setting_name(prior, decoder), 'prior_guidance': prior,
                'decoder_guidance': decoder,
                **score(generated, ref_stats, ref_features, kid_subset_size), 'against': against}
      shown = min(16, len(prompts))
      images_lib.save_with_sheet(generated['images'][:shown] / 127.5 - 1.0, prompts[:shown],
                                 _join(directory, 'grid_images'),
                                 _join(directory, 'grid.png'), columns=4)
      workdir_lib.atomic_write_json(metrics_path, result)
    result = {k: v for k, v in result.items() if k != 'against'}
    settings.append(result)
    logging.info('%s: FID %.2f, CLIP score %.2f (%d images)', result['setting'], result['fid'],
                 result['clip_score'], result['num_images'])
  report = {'run': os.fspath(workdir_lib.path(run)), 'captions': captions, 'reference': reference,
            'inception': os.path.abspath(inception_path), 'num': num, 'settings': settings}
  if _is_main():
    if len(settings) > 1:
      plot_curve(settings, _join(out_dir, 'guidance_curve.png'))
    workdir_lib.atomic_write_json(_join(out_dir, 'report.json'), report)
  return report


def _read_json(path: str):
  return workdir_lib.read_json(path) if workdir_lib.path(path).exists() else None


def _batched_features(params, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """Pool features of images in [-1, 1] (or uint8), in fixed-size batches (one compile)."""
  from unclip_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import clip as clip_stage  # pylint: disable=g-import-not-at-top
  images = np.asarray(images)
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 127.5 - 1.0
  return clip_stage.batched(lambda x: inception.pool_features(params, x), images,
                            min(batch_size, len(images)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.quiet_logging()
  if FLAGS.distributed:
    from unclip_jax import multihost  # pylint: disable=g-import-not-at-top
    multihost.initialize()
  try:
    report = evaluate(FLAGS.run, FLAGS.inception, FLAGS.out, captions=FLAGS.captions,
                      reference=FLAGS.reference, num=FLAGS.num, batch_size=FLAGS.batch_size,
                      seed=FLAGS.seed, prior_guidance=FLAGS.prior_guidance,
                      decoder_guidance=FLAGS.decoder_guidance, caption_key=FLAGS.caption_key,
                      kid_subset_size=FLAGS.kid_subset_size)
  except (FileNotFoundError, ValueError) as e:
    cli.exit_on(e)
  if report['settings']:
    for s in report['settings']:
      print(f"{s['setting']}: FID {s['fid']:.2f}, CLIP score {s['clip_score']:.2f}")
    print(f'report: {_join(FLAGS.out, "report.json")}')


def run():
  """Console entry point (`unclip-evaluate`)."""
  cli.console_setup()
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
