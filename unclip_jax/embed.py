r"""Computes a frozen CLIP's embeddings of a dataset (the format: `unclip_jax.data.embeddings`).

  python -m unclip_jax.data.embeddings --config=configs/prior.py:tiny \
      --config.clip.workdir=runs/clip --config.data.source=webdataset \
      --config.data.paths='/data/cc3m/{00000..00331}.tar' --out=runs/cc3m_embeddings

Each process embeds its own share of the data (its shards, or every P-th record) on all of its
devices, chunk by chunk; a killed run started again keeps its finished chunks and continues after
the last one (with `--distributed`, every process of a pod or cluster does the same). The
config's `clip` block names the CLIP, its `data` block the data (any source).
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax import multihost
from unclip_jax import workdir as workdir_lib
from unclip_jax.data import embeddings
from unclip_jax.data import input_pipeline


def _encoder(clip, batch_size: int):
  """(compiled (images, tokens) → (image, text) unit embeddings over this process's devices,
  the batch size rounded up to a multiple of the device count, the replicated params)."""
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  data, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  batch_size = -(-batch_size // len(devices)) * len(devices)
  encode = jax.jit(lambda p, images, tokens: (clip.encode_image(images, p),
                                              clip.encode_text(tokens, p)[0]),
                   in_shardings=(replicated, data, data), out_shardings=(data, data))
  return encode, batch_size, jax.device_put(clip.params, replicated)


def _embed(encode, params, batch_size, clip, examples: list[dict]):
  images = np.stack([ex['image'] for ex in examples])
  tokens = np.asarray(clip.tokenizer([ex['caption'] for ex in examples]), np.int32)
  image_out, text_out = [], []
  for i in range(0, len(examples), batch_size):
    im, tok = images[i:i + batch_size], tokens[i:i + batch_size]
    n = len(im)
    pad = batch_size - n          # one compiled shape for every batch
    im = np.concatenate([im, np.repeat(im[-1:], pad, 0)])
    tok = np.concatenate([tok, np.repeat(tok[-1:], pad, 0)])
    img, txt = jax.device_get(encode(params, im, tok))
    image_out.append(img[:n])
    text_out.append(txt[:n])
  return np.concatenate(image_out), np.concatenate(text_out)


def _done_path(out_dir, split, process_index):
  return os.fspath(workdir_lib.path(out_dir) / split / f'done-{process_index:05d}.json')


def _prepare_dir(clip, data_config, out_dir, overwrite: bool) -> dict:
  """Creates `out_dir`, or checks that what it holds belongs to this CLIP and data (else
  clears it with `overwrite`, refuses without)."""
  info = {'format': embeddings.FORMAT, 'clip_fingerprint': embeddings.clip_fingerprint(clip.params),
          'embed_dim': int(clip.config.model.embed_dim),
          'dataset': embeddings.dataset_settings(data_config), 'splits': {}}
  folder = workdir_lib.path(out_dir)
  old = embeddings.read_info(out_dir) if folder.is_dir() else None
  same = old is not None and all(old.get(k) == info[k] for k in
                                 ('format', 'clip_fingerprint', 'embed_dim', 'dataset'))
  if old is not None and not same or (old is None and folder.is_dir()
                                      and any(folder.iterdir())):
    if not overwrite:
      raise ValueError(f'--out: {out_dir!r} holds other embeddings (another CLIP, other data, '
                       'or another format); choose another folder, or pass --overwrite')
    if jax.process_index() == 0:
      workdir_lib.remove_tree(folder)
  multihost.barrier('embeddings_clear')
  folder.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0 and not same:
    embeddings.write_info(out_dir, info)
  return old if same else info


def write_split(clip, data_config, out_dir: str, split: str, *, batch_size: int = 256,
                chunk_size: int = 4096, process_index: int = 0, process_count: int = 1,
                progress: bool = True, max_chunks=None) -> dict:
  """Embeds this process's share of `split` into `out_dir/split/`, resuming after its last
  finished chunk. Returns {'count', 'skipped'} of this process (its done file).

  `max_chunks` stops after writing that many chunks (as a killed job would), for tests."""
  done = _done_path(out_dir, split, process_index)
  if workdir_lib.path(done).exists():
    return workdir_lib.read_json(done)
  (workdir_lib.path(out_dir) / split).mkdir(parents=True, exist_ok=True)
  it = input_pipeline.make_example_iterator(data_config, split, process_index=process_index,
                                            process_count=process_count)
  parts = embeddings.finished_parts(out_dir, split, process_index)
  count, skipped, chunk = 0, {}, len(parts)
  if parts:
    state = embeddings.part_state(parts[-1])
    it.set_state(state['reader'])
    count, skipped = state['count'], state['skipped']
  encode, batch_size, params = _encoder(clip, batch_size)
  before = input_pipeline.skip_counts()
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(desc=f'embedding {split}', unit='img', initial=count, dynamic_ncols=True)
  written = 0

  def skipped_now():
    now = input_pipeline.skip_counts()
    return {k: skipped.get(k, 0) + now[k] - before[k] for k in now if
            skipped.get(k, 0) + now[k] - before[k]}

  while True:
    examples = []
    for ex in it:
      examples.append(ex)
      if len(examples) == chunk_size:
        break
    if examples:
      image_emb, text_emb = _embed(encode, params, batch_size, clip, examples)
      count += len(examples)
      embeddings.write_part(out_dir, split, process_index, chunk,
                            [ex['key'] for ex in examples], image_emb, text_emb,
                            {'reader': it.get_state(), 'count': count,
                             'skipped': skipped_now()})
      chunk += 1
      written += 1
      if bar is not None:
        bar.update(len(examples))
    if len(examples) < chunk_size:
      break
    if max_chunks is not None and written >= max_chunks:
      return {'count': count, 'skipped': skipped_now(), 'stopped': True}
  if bar is not None:
    bar.close()
  result = {'count': count, 'skipped': skipped_now()}
  workdir_lib.atomic_write_json(done, result)
  return result


def write(clip, data_config: ml_collections.ConfigDict, out_dir: str,
          splits: Sequence[str] = ('train', 'test'), *, batch_size: int = 256,
          chunk_size: int = 4096, overwrite: bool = False, progress: bool = True) -> dict:
  """Embeds every sample of `splits` with the frozen `clip` (a `stages.clip.FrozenClip`), this
  process's share on its devices; returns the info written (process 0) once every process has
  finished. Resumes a folder that holds part of the same embeddings; `overwrite` replaces a
  folder holding others (else ValueError)."""
  info = _prepare_dir(clip, data_config, out_dir, overwrite)
  start = time.perf_counter()
  for split in splits:
    write_split(clip, data_config, out_dir, split, batch_size=batch_size, chunk_size=chunk_size,
                process_index=jax.process_index(), process_count=jax.process_count(),
                progress=progress)
  multihost.barrier('embeddings_written')
  for split in splits:
    counts = []
    for p in range(jax.process_count()):
      counts.append(workdir_lib.read_json(_done_path(out_dir, split, p)))
    skipped = {}
    for c in counts:
      for k, v in c['skipped'].items():
        skipped[k] = skipped.get(k, 0) + v
    info['splits'][split] = {'count': sum(c['count'] for c in counts), 'skipped': skipped,
                             'complete': True}
  info['seconds'] = round(time.perf_counter() - start, 1)
  if jax.process_index() == 0:
    embeddings.write_info(out_dir, info)
  multihost.barrier('embeddings_info')
  return info


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import prior as prior_stage  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if FLAGS.distributed:
    multihost.initialize()
  config = FLAGS.config
  if not config.clip.get('workdir'):
    raise SystemExit('embeddings: set --config.clip.workdir to the trained (or converted) CLIP')
  clip = prior_stage.load_clip(config)
  try:
    info = write(clip, config.data, FLAGS.out, splits=FLAGS.splits, batch_size=FLAGS.batch_size,
                 chunk_size=FLAGS.chunk_size, overwrite=FLAGS.overwrite)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f'embeddings: {e}') from None
  if jax.process_index() == 0:
    print(json.dumps(info, indent=2))


def run():
  """`python -m unclip_jax.data.embeddings` / `unclip-embed`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from unclip_jax import cli  # pylint: disable=g-import-not-at-top
  cli.console_setup()
  config_flags.DEFINE_config_file('config', None, 'A prior or decoder config (its clip and '
                                  'data blocks).', lock_config=False)
  flags.DEFINE_string('out', None, 'Output folder.')
  flags.DEFINE_list('splits', ['train', 'test'], 'Splits to embed.')
  flags.DEFINE_integer('batch_size', 256, 'Images per CLIP call (per process).')
  flags.DEFINE_integer('chunk_size', 4096, 'Embeddings per output part (the unit of resuming).')
  flags.DEFINE_bool('overwrite', False, 'Replace an --out folder holding other embeddings.')
  flags.DEFINE_bool('distributed', False, 'Join a multi-process job first (TPU pods, SLURM: '
                    'unclip_jax.multihost).')
  flags.mark_flags_as_required(['config', 'out'])
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
