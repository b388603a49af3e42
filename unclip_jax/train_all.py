"""The whole system in one command: train CLIP, the prior, the decoder and the upsampler in order,
then draw images for held-out prompts and score them from pixels.

  python -m unclip_jax.train_all --config=configs/unclip.py:tiny --workdir=runs/unclip

See configs/unclip.py for what it writes. Each stage is an ordinary run directory under the
workdir (so `unclip_jax.main` and `unclip-sample` work on it); a stage whose checkpoint has
reached its `num_train_steps` and which has exported is skipped when the job runs again. A job
whose stages could not be chained (an upsampler that does not take the decoder's resolution,
a prior and decoder that disagree on unit-norm embeddings) is refused before anything trains.
"""

import concurrent.futures
import json
import os
import sys
import time
from typing import Optional

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from unclip_jax import cli
from unclip_jax import preemption
from unclip_jax import workdir as workdir_lib

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined on use, so that importing this module defines none)."""
  config_flags.DEFINE_config_file('config', None, 'Job config, e.g. configs/unclip.py:tiny.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory of the whole system.')
  cli.define_verbose_flag()
  flags.mark_flags_as_required(['config', 'workdir'])

STAGES = ('clip', 'prior', 'decoder', 'upsampler')
CLIP_CONDITIONED = ('prior', 'decoder')


def check_chain(config: ml_collections.ConfigDict):
  """Refuses, before anything trains, a job whose stages could not be chained at sampling time:
  the upsampler must take the decoder's images, and the prior and decoder must agree on whether
  CLIP embeddings are unit vectors. Raises config_lib.ConfigError naming the fields."""
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  decoder, up = config.decoder, config.upsampler
  scale, high = up.upsampler.scale, up.data.resolution
  if high % scale or high // scale != decoder.data.resolution:
    raise config_lib.ConfigError(
        f'config.upsampler.data.resolution: {high}px at upsampler.scale {scale} takes '
        f'{high / scale:g}px images, but the decoder draws {decoder.data.resolution}px '
        f'(config.decoder.data.resolution); set the upsampler to '
        f'{decoder.data.resolution * scale}px')
  prior_norm = config.prior.clip.get('normalize', True)
  decoder_norm = decoder.clip.get('normalize', True)
  if prior_norm != decoder_norm:
    raise config_lib.ConfigError(
        f'config.prior.clip.normalize ({prior_norm}) and config.decoder.clip.normalize '
        f'({decoder_norm}) differ: the decoder would not read the prior\'s embeddings')


# What a stage's parameters do not depend on: run bookkeeping, evaluation and sampling settings,
# the device layout, the step count (more steps resume a finished stage, they do not restart
# it), paths derived from the job's directory, and the data loader's performance knobs.
_NOT_INPUTS = ('checkpoint', 'eval', 'eval_every_steps', 'log_every_steps',
               'max_nonfinite_steps', 'mesh', 'num_train_steps', 'progress_bar',
               'sample_every_steps',
               'sampling', 'clip.workdir', 'data.embeddings_dir', 'data.eval_paths',
               'data.eval_split', 'data.num_test', 'data.read_buffer', 'data.read_threads',
               'data.worker_count')
INPUTS_NAME = 'inputs.json'
STALE_POLICIES = ('retrain', 'refuse', 'keep')


class StaleStageError(RuntimeError):
  """A stage trained on other inputs than the job's, and config.stale_stages='refuse'."""


def stage_inputs(config: ml_collections.ConfigDict, clip_fingerprint: Optional[str]) -> dict:
  """What a stage's trained parameters depend on: its config's training fields (model, data,
  optimiser, seed, ...; flattened to dotted names) and, for the prior and decoder, the
  fingerprint of the CLIP they train on."""
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      name = f'{prefix}{key}'
      if name in _NOT_INPUTS:
        continue
      if isinstance(value, dict):
        walk(value, f'{name}.')
      else:
        flat[name] = value
  walk(json.loads(config.to_json_best_effort()), '')
  return {'config': flat, 'clip_fingerprint': clip_fingerprint}


def input_changes(recorded: dict, current: dict) -> list[str]:
  """`recorded` → `current` for each input that differs. A field only one side has (one added
  or removed by another version of unclip_jax) is not a change."""
  changes = []
  if recorded.get('clip_fingerprint') != current.get('clip_fingerprint'):
    changes.append(f'CLIP {recorded.get("clip_fingerprint")} → '
                   f'{current.get("clip_fingerprint")}')
  old, new = recorded.get('config', {}), current['config']
  changes += [f'{k} {old[k]!r} → {new[k]!r}' for k in sorted(set(old) & set(new))
              if old[k] != new[k]]
  return changes


def _check_inputs(name: str, stage_dir: str, inputs: dict, policy: str, workdir: str):
  """Compares the inputs a stage's run recorded with the job's; a stage trained on others is
  moved to `WORKDIR/stale/` to be retrained (policy 'retrain'), refused ('refuse') or kept
  with a warning ('keep'). Then records the job's inputs for the stage about to train."""
  from unclip_jax import multihost  # pylint: disable=g-import-not-at-top
  if policy not in STALE_POLICIES:
    raise config_error(f'config.stale_stages: {policy!r}; use one of {STALE_POLICIES}')
  path = workdir_lib.path(stage_dir) / INPUTS_NAME
  recorded = workdir_lib.read_json(path) if path.exists() else None
  changes = input_changes(recorded, inputs) if recorded is not None else []
  if changes:
    what = '; '.join(changes)
    if len(what) > 400:
      what = what[:400] + f'… ({len(changes)} changes)'
    if policy == 'refuse':
      raise StaleStageError(
          f'stage {name} in {stage_dir} was trained on other inputs than this job\'s ({what}); '
          'set --config.stale_stages=retrain to retrain it (the old run is moved to '
          f'{workdir_lib.path(workdir) / "stale"}) or =keep to use it anyway')
    if policy == 'keep':
      logging.warning('Stage %s in %s was trained on other inputs (%s); kept as it is '
                      '(config.stale_stages=keep)', name, stage_dir, what)
      return
    target = workdir_lib.free_name(workdir_lib.path(workdir) / 'stale' / name)
    if _is_main():
      workdir_lib.move(stage_dir, target)
    multihost.barrier(f'stale_{name}')
    logging.warning('Stage %s was trained on other inputs (%s): retraining it; the old run is '
                    'in %s', name, what, target)
  elif recorded is None and (workdir_lib.path(stage_dir) / 'checkpoints').is_dir():
    logging.warning('Stage %s in %s records no inputs (an older version trained it); taking '
                    'them to be this job\'s', name, stage_dir)
  if _is_main():
    workdir_lib.atomic_write_json(path, inputs)
  multihost.barrier(f'inputs_{name}')


def _is_main() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def _clip_fingerprint(workdir: str) -> str:
  """The fingerprint of the job's trained CLIP (its export's parameters)."""
  from unclip_jax.data import embeddings  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import clip as clip_stage  # pylint: disable=g-import-not-at-top
  return embeddings.clip_fingerprint(clip_stage.load_frozen(_sub(workdir, 'clip')).params)


def _sub(workdir: str, name: str) -> str:
  """The path of `name` in the job's directory (local ones absolute; gs://... as it is)."""
  return os.fspath(workdir_lib.path(workdir) / name)


def _embeddings_dir(workdir: str, clip_resolution: int, stage: str = '') -> str:
  """The job's precomputed CLIP embeddings: of the images at the CLIP's resolution, one set for
  every stage whatever its own resolution (an embedding describes the image; see
  `unclip_jax.data.embeddings`), or a stage's own set if it reads other data."""
  return _sub(workdir, f'embeddings_{clip_resolution}px' + (f'_{stage}' if stage else ''))


def stage_configs(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Each stage's config, wired to the job's directories (the CLIP, precomputed embeddings) and
  given the job's data settings (`config.data`: every field set there replaces the stage's own;
  each stage keeps its resolution)."""
  from unclip_jax.data import embeddings  # pylint: disable=g-import-not-at-top
  job_data = {k: v for k, v in (config.get('data') or {}).items() if v is not None}
  out, shared = {}, None
  for name in STAGES:
    c = ml_collections.ConfigDict(config[name].to_dict())
    for key, value in job_data.items():
      if key == 'resolution':
        raise config_error('config.data.resolution: each stage has its own resolution; set '
                           f'config.{name}.data.resolution instead')
      c.data[key] = value
    if name in CLIP_CONDITIONED:
      c.clip.workdir = _sub(workdir, 'clip')
      if config.precompute_embeddings:
        settings = embeddings.compared_settings(embeddings.dataset_settings(c.data))
        shared = shared or settings
        c.data.embeddings_dir = _embeddings_dir(
            workdir, config.clip.data.resolution,
            '' if settings == shared else name)
    out[name] = c
  return out


def config_error(message: str):
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.ConfigError(message)


def _ensure_embeddings(configs: dict, workdir: str):
  from unclip_jax import embed  # pylint: disable=g-import-not-at-top
  from unclip_jax.data import embeddings  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import clip as clip_stage  # pylint: disable=g-import-not-at-top
  clip = clip_stage.load_frozen(_sub(workdir, 'clip'))
  for name in CLIP_CONDITIONED:
    data = ml_collections.ConfigDict(configs[name].data.to_dict())
    if not data.get('embeddings_dir'):
      continue
    data.resolution = configs['clip'].data.resolution
    try:
      embeddings.check(data.embeddings_dir, data, clip)
      continue
    except (FileNotFoundError, ValueError):
      pass
    logging.info('Writing CLIP embeddings of the %dpx data to %s', data.resolution,
                 data.embeddings_dir)
    embed.write(clip, data, data.embeddings_dir, overwrite=True, progress=False)


def train_stages(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or skips, if finished) every stage in order; {stage: {'seconds', 'eval'}}.

  With `config.overlap_upsampler` (single process only) the upsampler, which needs nothing but
  the dataset, trains in a second thread while the decoder trains: on a few CPU cores neither
  step uses every core, so the two together get more done than one after the other.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from unclip_jax import train  # pylint: disable=g-import-not-at-top
  check_chain(config)
  configs = stage_configs(config, workdir)
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  for name in STAGES:   # every stage's fields before the first trains (each trainer checks again)
    try:
      config_lib.validate(configs[name], jax.device_count(), jax.process_count())
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(str(e).replace('config.', f'config.{name}.', 1)) from None
  report = {}

  fingerprint = {}

  def run_stage(name):
    stage_dir = _sub(workdir, name)
    start = time.perf_counter()
    if name in CLIP_CONDITIONED and 'clip' not in fingerprint:
      fingerprint['clip'] = _clip_fingerprint(workdir)
    inputs = stage_inputs(configs[name], fingerprint['clip'] if name in CLIP_CONDITIONED
                          else None)
    _check_inputs(name, stage_dir, inputs, config.get('stale_stages', 'retrain'), workdir)
    if name in CLIP_CONDITIONED and config.precompute_embeddings:
      _ensure_embeddings(configs, workdir)
    if train.is_finished(stage_dir, configs[name]):
      logging.info('Stage %s: finished earlier in %s; skipped', name, stage_dir)
      metrics = workdir_lib.read_json(workdir_lib.path(stage_dir) / 'eval_metrics.json')
    else:
      logging.info('Stage %s: training %d steps in %s', name, configs[name].num_train_steps,
                   stage_dir)
      metrics = train.train_and_evaluate(configs[name], stage_dir)
    report[name] = {'seconds': round(time.perf_counter() - start, 1), 'eval': metrics}
    if preemption.received():
      raise Stopped(name)

  overlap = config.get('overlap_upsampler', False) and jax.process_count() == 1
  background = None
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    try:
      for name in STAGES:
        if overlap and name == 'upsampler':
          continue
        if overlap and name == 'decoder':
          background = pool.submit(run_stage, 'upsampler')
        run_stage(name)
    finally:
      if background is not None:
        # The upsampler's thread sees the same stop request and checkpoints too; its error,
        # if it had one, is re-raised (after the main thread's own).
        concurrent.futures.wait([background])
    if background is not None:
      background.result()
  return {name: report[name] for name in STAGES}


class Stopped(Exception):
  """The job was told to stop (SIGTERM / SIGINT); its stages checkpointed."""


def sample_and_score(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Held-out captions → images through the pipeline, scored: the CLIP score of each image
  against its prompt under the job's CLIP, beside the held-out images' own and that of each
  generated image against another image's prompt (any data); on the
  built-in data (or data labelled with its attributes, `config.data.attribute_labels`) also the
  pixel checker's reading of them and of the dataset's own images at the same resolution. Writes
  workdir/sample/."""
  from unclip_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from unclip_jax import train  # pylint: disable=g-import-not-at-top
  from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from unclip_jax.data import sources  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import clip as clip_stage  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import prior as prior_stage  # pylint: disable=g-import-not-at-top
  s = config.sample
  out_dir = _sub(workdir, 'sample')
  pipe = pipeline_lib.UnclipPipeline.from_run(workdir)
  configs = stage_configs(config, workdir)
  final = configs['upsampler'] if pipe.upsamplers else configs['decoder']
  builtin = sources.source_name(final.data) == 'shapes'
  # The pixel checker reads the samples wherever the held-out data has the built-in attributes.
  checked = builtin or bool(final.data.get('attribute_labels'))
  if builtin and final.data.get('held_out_combinations', True):
    real = _seen_and_unseen_prompts(final.data, s.num_prompts)
  else:
    real = input_pipeline.load_split(final.data, 'test', max_examples=s.num_prompts)
  prompts = [str(c) for c in real['caption']]
  start = time.perf_counter()
  images, stage_seconds = [], {}
  for i in range(0, len(prompts), s.batch_size):
    chunk = list(prior_stage.pad_to(np.asarray(prompts[i:i + s.batch_size], object),
                                    s.batch_size))
    out = pipe.text_to_image(chunk, seed=s.seed + i, truncate=True)
    images.append(out.images[:min(s.batch_size, len(prompts) - i)])
    for k, v in out.seconds.items():
      stage_seconds[k] = stage_seconds.get(k, 0.0) + v
  images = np.concatenate(images)
  seconds = time.perf_counter() - start
  text_emb = pipe.clip.embed_texts(prompts)
  image_emb = pipe.clip.embed_images(images)
  scores = clip_stage.clip_score(image_emb, text_emb)
  real_scores = clip_stage.clip_score(pipe.clip.embed_images(real['image']), text_emb)
  # Each image against another image's prompt: the level of images that ignore their prompt.
  mismatched = clip_stage.clip_score(image_emb, np.roll(text_emb, 1, axis=0))
  report = {'num_prompts': len(prompts), 'resolution': int(images.shape[1]),
            'clip_score': float(scores.mean()), 'clip_score_real': float(real_scores.mean()),
            'clip_score_mismatched': float(mismatched.mean())}
  scalars = {'generated/clip_score': report['clip_score'],
             'real/clip_score': report['clip_score_real']}
  readings = None
  if checked:
    from unclip_jax.data import shape_checker  # pylint: disable=g-import-not-at-top
    labels = {k: real[k] for k in ('color', 'background', 'shape', 'size', 'position')}
    readings = [shape_checker.analyze(image) for image in images]
    # Size and position only where the prompt asks for them.
    report['generated'] = shape_checker.score_readings(readings, labels, prompts)
    if 'unseen' in real:
      # Prompts asking for a combination the training split never shows, and the others.
      for name, keep in (('unseen', real['unseen']), ('seen', ~real['unseen'])):
        if keep.any():
          report[f'generated_{name}'] = dict(
              shape_checker.score_readings([r for r, k in zip(readings, keep) if k],
                                           {k: v[keep] for k, v in labels.items()},
                                           [p for p, k in zip(prompts, keep) if k]),
              num_prompts=int(keep.sum()))
    report['real'] = shape_checker.score(real['image'], labels)
    report['generated_shapes'] = shape_checker.shape_confusion(readings, labels)
    scalars.update({**{f'generated/{k}': v for k, v in report['generated'].items()},
                    **{f'real/{k}': v for k, v in report['real'].items()}})
  _write_samples(out_dir, prompts, images, s.grid_columns)
  _write_readings(_sub(out_dir, 'readings.tsv'), prompts, scores, readings)
  writer = train.create_writer(out_dir)
  writer.write_scalars(0, scalars)
  from unclip_jax.images import image_grid  # pylint: disable=g-import-not-at-top
  writer.write_images(0, {'generated': image_grid(images[:s.grid_columns ** 2],
                                                  s.grid_columns)[None]})
  writer.flush()
  report['seconds'] = round(seconds, 1)
  report['stage_seconds'] = {k: round(v, 1) for k, v in stage_seconds.items()}
  return report


def _seen_and_unseen_prompts(data_config, num: int) -> dict:
  """`num` held-out examples of the built-in data, half (rounded up) of them with captions that
  ask for a combination the training split never shows (`captioned_shapes.asks_for_unseen`), the
  rest with none in their scene, each half in the split's order; with 'unseen' marking the
  first kind. Fewer unseen ones than half: all there are, the rest seen."""
  from unclip_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
  from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  data = input_pipeline.load_split(data_config, 'test')
  attrs = [{k: int(data[k][i]) for k in captioned_shapes.ATTRIBUTES}
           for i in range(len(data['caption']))]
  unseen = [i for i, a in enumerate(attrs)
            if captioned_shapes.asks_for_unseen(str(data['caption'][i]), a)]
  seen = [i for i, a in enumerate(attrs) if not captioned_shapes.unseen_combinations(a)]
  unseen = unseen[:(num + 1) // 2]
  chosen = np.array(unseen + seen[:num - len(unseen)])
  out = {k: np.asarray(v)[chosen] for k, v in data.items()}
  out['unseen'] = np.arange(len(chosen)) < len(unseen)
  return out


def _write_samples(out_dir: str, prompts: list[str], images: np.ndarray, columns: int):
  """images/NNNN.png, prompts.txt, and grid.png: each image with its prompt beneath."""
  from unclip_jax import images as images_lib  # pylint: disable=g-import-not-at-top
  images_lib.save_with_sheet(images, prompts, _sub(out_dir, 'images'),
                             _sub(out_dir, 'grid.png'), columns)
  (workdir_lib.path(out_dir) / 'prompts.txt').write_text('\n'.join(prompts) + '\n')


def _write_readings(path: str, prompts: list[str], scores: np.ndarray, readings=None):
  """One line per image: its file, its prompt, its CLIP score and (built-in data) what the
  pixel checker reads in it."""
  with workdir_lib.path(path).open('w') as f:
    f.write('image\tprompt\tclip_score' +
            ('\tcolor\tbackground\tshape\tshape_iou' if readings is not None else '') + '\n')
    for i, prompt in enumerate(prompts):
      line = f'images/{i:04d}.png\t{prompt}\t{scores[i]:.2f}'
      if readings is not None:
        r = readings[i]
        line += f"\t{r['color']}\t{r['background']}\t{r['shape']}\t{r['shape_iou']:.3f}"
      f.write(line + '\n')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains every stage, samples, writes and returns the report (also workdir/report.json)."""
  start = time.perf_counter()
  workdir_lib.path(workdir).mkdir(parents=True, exist_ok=True)
  with workdir_lib.locked(workdir, 'train_all'), preemption.handle_signals():
    try:
      report = {'stages': train_stages(config, workdir)}
    except Stopped as e:
      logging.warning('Stopped (%s) during stage %s: every stage that was training saved a '
                      'checkpoint; the same command resumes the job', preemption.received(), e)
      return {}
    report['sample'] = sample_and_score(config, workdir)
    report['total_seconds'] = round(time.perf_counter() - start, 1)
    workdir_lib.atomic_write_json(_sub(workdir, 'report.json'), report)
  sample = report['sample']
  logging.info('Generated images: CLIP score %.1f (held-out images: %.1f); %.0f s in all; '
               'report: %s', sample['clip_score'], sample['clip_score_real'],
               report['total_seconds'], _sub(workdir, 'report.json'))
  for name in ('seen', 'unseen'):
    if f'generated_{name}' in sample:
      g = sample[f'generated_{name}']
      logging.info('%d prompts with %s combinations: colour %.2f, background %.2f, shape %.2f, '
                   'size %.2f, position %.2f, all asked for %.2f', g['num_prompts'], name,
                   g['color_accuracy'], g['background_accuracy'], g['shape_accuracy'],
                   g['size_accuracy'], g['position_accuracy'], g['all_accuracy'])
  if 'generated' in sample:
    g, r = sample['generated'], sample['real']
    logging.info('Generated images read as prompted: shape colour %.2f, background %.2f, shape '
                 '%.2f, size %.2f (of %d asking), position %.2f (of %d asking); dataset images: '
                 '%.2f, %.2f, %.2f, %.2f, %.2f', g['color_accuracy'], g['background_accuracy'],
                 g['shape_accuracy'], g['size_accuracy'], g['size_asked'],
                 g['position_accuracy'], g['position_asked'],
                 *(r[f'{k}_accuracy'] for k in ('color', 'background', 'shape', 'size',
                                                'position')))
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import jax  # pylint: disable=g-import-not-at-top
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  cli.quiet_logging()
  try:
    for name in STAGES:
      config_lib.validate(FLAGS.config[name], jax.device_count(), jax.process_count())
    name = 'job'
    check_chain(FLAGS.config)
  except config_lib.ConfigError as e:
    sys.exit(f'Invalid config ({name}): {e}')
  from unclip_jax import train  # pylint: disable=g-import-not-at-top
  try:
    run(FLAGS.config, FLAGS.workdir)
  except (*train.RUN_ERRORS, StaleStageError) as e:
    cli.exit_on(e)


def run_cli():
  """Console entry point (`unclip-train-all`)."""
  cli.console_setup()
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run_cli()
