r"""Prepares any source as array_record shards: decoded, resized and centre-cropped once.

  python -m unclip_jax.data.prepare --data.source=webdataset \
      --data.paths='/data/cc3m/{00000..00331}.tar' --data.eval_paths='/data/cc3m_val/*.tar' \
      --resolution=256 --out=/data/cc3m_256 [--format=jpg] [--workers=8] [--distributed]

writes `OUT/{split}-UUUUU-of-NNNNN.array_record`, one output shard per input unit (a tar shard,
a parquet row group, or `--records_per_shard` records of a random-access source), and
`OUT/info.json` (counts, skips by reason, the settings). Train on it with
`--config.data.source=array_record --config.data.paths='OUT/train-*.array_record'`
(`eval_paths` likewise): random access, so global shuffling and exact resume. Every `--data.*`
field of `config.data` applies (image_key, caption_key, min_size, ...).

Each process of a multi-host job (`--distributed`) takes every P-th unit; within a process
`--workers` processes share them. A shard is written under a temporary name and renamed when
complete, so a killed run started again skips the finished ones.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import multiprocessing
import os
import time

import jax
import ml_collections

from unclip_jax import config_lib
from unclip_jax import multihost
from unclip_jax.data import image_processing
from unclip_jax.data import input_pipeline
from unclip_jax.data import sources
from unclip_jax.data.sources import array_record as array_record_source


def input_units(data_config, split: str, records_per_shard: int) -> tuple[object, list]:
  """(the source, its units): a streaming source's own, or index ranges of a random-access
  one."""
  source = sources.get(data_config, split)
  if sources.is_streaming(source):
    return source, source.units()
  n = len(source)
  return source, [[i, min(i + records_per_shard, n)] for i in range(0, n, records_per_shard)]


def _raw_examples(source, unit):
  if sources.is_streaming(source):
    for _, raw in source.read(unit):
      yield raw
  else:
    for i in range(*unit):
      yield source[i]


def shard_path(out_dir: str, split: str, index: int, total: int) -> str:
  return os.path.join(out_dir, f'{split}-{index:05d}-of-{total:05d}'
                      f'{array_record_source.SUFFIX}')


def prepare_unit(data_config: dict, split: str, unit, out_path: str, resolution: int,
                 fmt: str, quality: int) -> dict:
  """Writes one input unit as one array_record shard; returns {'count', 'skipped'}."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  data_config = ml_collections.ConfigDict(data_config)
  source = sources.get(data_config, split)
  min_size = int(data_config.get('min_size') or 0)
  skipped = collections.Counter()
  count = 0
  tmp = out_path + '.tmp'
  writer = ArrayRecordWriter(tmp, 'group_size:1')
  try:
    for raw in _raw_examples(source, unit):
      if 'skip' in raw:
        skipped[raw['skip']] += 1
        continue
      captions = sources.captions(raw.get('caption'))
      if not captions:
        skipped['missing_caption'] += 1
        continue
      try:
        image = image_processing.process(raw.get('image'), resolution, min_size=min_size)
      except image_processing.ImageError as e:
        skipped[e.reason] += 1
        continue
      labels = {k: v for k, v in (raw.get('labels') or {}).items()
                if v is None or isinstance(v, (str, int, float, bool))}
      writer.write(array_record_source.encode_record({
          'key': str(raw['key']), 'image': image_processing.encode(image, fmt, quality),
          'captions': captions, 'labels': labels}))
      count += 1
  finally:
    writer.close()
  os.replace(tmp, out_path)
  return {'count': count, 'skipped': dict(skipped)}


def prepare(data_config: ml_collections.ConfigDict, out_dir: str, *, resolution: int,
            splits=('train', 'test'), fmt: str = 'png', quality: int = 95, workers: int = 0,
            records_per_shard: int = 2000, process_index: int = 0, process_count: int = 1,
            progress: bool = True) -> dict:
  """Writes this process's share of the shards of `splits` (skipping finished ones); returns
  {split: {'shards', 'count', 'skipped'}} of what this call wrote."""
  input_pipeline.check_data_config(data_config)
  os.makedirs(out_dir, exist_ok=True)
  report = {}
  for split in splits:
    _, units = input_units(data_config, split, records_per_shard)
    jobs = [(i, unit) for i, unit in enumerate(units)][process_index::process_count]
    todo = [(i, u) for i, u in jobs if not os.path.exists(shard_path(out_dir, split, i,
                                                                     len(units)))]
    stats = {'shards': len(todo), 'count': 0, 'skipped': collections.Counter()}
    bar = None
    if progress:
      from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm.tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit='shard',
                      desc=f'prepare {split}', dynamic_ncols=True)
    args = lambda i, u: (data_config.to_dict(), split, u, shard_path(out_dir, split, i,
                                                                      len(units)),
                         resolution, fmt, quality)
    start = time.perf_counter()

    def add(result):
      stats['count'] += result['count']
      stats['skipped'].update(result['skipped'])
      if bar is not None:
        bar.update(1)
        bar.set_postfix(images_per_s=f'{stats["count"] / (time.perf_counter() - start):.0f}')

    if workers > 0 and len(todo) > 1:
      context = multiprocessing.get_context('spawn')
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for result in pool.map(prepare_unit, *zip(*[args(i, u) for i, u in todo])):
          add(result)
    else:
      for i, u in todo:
        add(prepare_unit(*args(i, u)))
    if bar is not None:
      bar.close()
    stats['skipped'] = dict(stats['skipped'])
    report[split] = stats
  return report


def write_info(out_dir: str, data_config, resolution: int, fmt: str, splits) -> dict:
  """Counts every finished shard of `splits` and writes OUT/info.json."""
  from unclip_jax.data.sources.array_record import ArrayRecordSource  # pylint: disable=g-import-not-at-top
  info = {'resolution': resolution, 'format': fmt,
          'source': {k: v for k, v in data_config.to_dict().items() if v is not None},
          'splits': {}}
  for split in splits:
    files = sorted(f for f in os.listdir(out_dir)
                   if f.startswith(f'{split}-') and f.endswith(array_record_source.SUFFIX))
    count = len(ArrayRecordSource([os.path.join(out_dir, f) for f in files], 'out')) if files \
        else 0
    info['splits'][split] = {'shards': len(files), 'count': count,
                             'paths': os.path.join(out_dir, f'{split}-*'
                                                   f'{array_record_source.SUFFIX}')}
  with open(os.path.join(out_dir, 'info.json.tmp'), 'w') as f:
    json.dump(info, f, indent=2)
  os.replace(os.path.join(out_dir, 'info.json.tmp'), os.path.join(out_dir, 'info.json'))
  return info


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if FLAGS.distributed:
    multihost.initialize()
  data = FLAGS.data
  try:
    report = prepare(data, FLAGS.out, resolution=FLAGS.resolution, splits=FLAGS.splits,
                     fmt=FLAGS.format, quality=FLAGS.quality, workers=FLAGS.workers,
                     records_per_shard=FLAGS.records_per_shard,
                     process_index=jax.process_index(), process_count=jax.process_count())
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f'prepare: {e}') from None
  multihost.barrier('prepare_done')
  if jax.process_index() == 0:
    info = write_info(FLAGS.out, data, FLAGS.resolution, FLAGS.format, FLAGS.splits)
    print(json.dumps({'written': report, 'info': info}, indent=2))


def run():
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from unclip_jax import cli  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_dict('data', config_lib.data_defaults(), 'The data to prepare '
                                  '(any field of config.data: --data.source, --data.paths, ...).')
  flags.DEFINE_string('out', None, 'Output folder.')
  flags.DEFINE_integer('resolution', None, 'Side of the square images written.')
  flags.DEFINE_list('splits', ['train', 'test'], "Splits: 'train' reads data.paths, 'test' "
                    'data.eval_paths.')
  flags.DEFINE_enum('format', 'png', ['png', 'jpg', 'webp'], 'Image encoding.')
  flags.DEFINE_integer('quality', 95, 'JPEG/WebP quality.')
  flags.DEFINE_integer('workers', 0, 'Worker processes per process (0: this one).')
  flags.DEFINE_integer('records_per_shard', 2000, 'Random-access sources: records per shard.')
  flags.DEFINE_bool('distributed', False, 'Join a multi-process job first (TPU pods, SLURM: '
                    'unclip_jax.multihost).')
  flags.mark_flags_as_required(['out', 'resolution'])
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
