r"""Input pipeline throughput per process, for each source, beside a webdataset-package peer.

  python benchmarks/input_pipeline.py                       # 64 and 256 px, 0/1/2 workers
  python benchmarks/input_pipeline.py --images=256 --resolutions=64 --workers=0 --batches=4

Writes the same synthetic photos (JPEG, 512x384, captions) once as webdataset tars, parquet
files, an image folder with a jsonl manifest and prepared array_record shards (PNG at each
resolution, as `python -m unclip_jax.data.prepare` writes them), then times batches of decoded,
resized, centre-cropped images from `input_pipeline.make_iterator` for each (after the first
batch: worker start-up is reported apart as `first_batch_s`). The peer reads the same tars with
the `webdataset` package and PIL, with the same resize (shorter side, bicubic) and crop, batched
alike, in the same number of worker processes (`WebLoader`, i.e. torch's DataLoader). Prints one
JSON object: images/s of each case, per process and per busy core, and ours/peer for the tars.
"""

import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
from unclip_jax import cli  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_integer('images', 1024, 'Synthetic images written (per source).')
flags.DEFINE_integer('per_shard', 128, 'Images per tar / parquet file.')
flags.DEFINE_list('resolutions', ['64', '256'], 'Output sides.')
flags.DEFINE_list('workers', ['0', '1', '2'], 'Worker process counts.')
flags.DEFINE_list('sources', ['webdataset', 'parquet', 'folder', 'array_record'], 'Sources.')
flags.DEFINE_integer('batch_size', 32, 'Images per batch.')
flags.DEFINE_integer('batches', 16, 'Timed batches per case (after the first).')
flags.DEFINE_bool('peer', True, 'Also time the webdataset-package peer.')
flags.DEFINE_string('dir', None, 'Where to write the data (default: a temporary folder).')


def synthetic_photo(rng, w=512, h=384) -> np.ndarray:
  """A photo-like uint8 image: smooth colour fields, edges and noise (JPEG-compresses like a
  photo, ~40 KB at quality 90)."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.zeros((h, w, 3), np.float32)
  for c in range(3):
    fx, fy, phase = rng.uniform(0.002, 0.02, 2).tolist() + [rng.uniform(0, 6.3)]
    img[..., c] = 128 + 90 * np.sin(x * fx + y * fy + phase)
  for _ in range(6):
    x0, y0 = rng.integers(0, w), rng.integers(0, h)
    r = rng.integers(10, 80)
    img[(x - x0) ** 2 + (y - y0) ** 2 < r * r] = rng.uniform(0, 255, 3)
  img += rng.normal(0, 6, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def write_data(root: str, n: int, per_shard: int, resolutions) -> dict:
  """The same n photos as tars, parquet, a folder, and array_record shards per resolution."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tests.data import fixtures  # pylint: disable=g-import-not-at-top
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  from unclip_jax.data import prepare  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  samples = []
  for i in range(n):
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(rng)).save(buf, format='JPEG', quality=90)
    samples.append((f'{i:08d}', buf.getvalue(), f'a synthetic photo number {i}'))
  os.makedirs(f'{root}/tars', exist_ok=True)
  os.makedirs(f'{root}/parquet', exist_ok=True)
  os.makedirs(f'{root}/folder', exist_ok=True)
  shards = (n + per_shard - 1) // per_shard
  rows = []
  for s in range(shards):
    chunk = samples[s * per_shard:(s + 1) * per_shard]
    fixtures.write_tar(f'{root}/tars/{s:05d}.tar',
                       [(k, {'jpg': b, 'txt': c.encode()}) for k, b, c in chunk])
    pq.write_table(pa.table({'key': [k for k, _, _ in chunk], 'jpg': [b for _, b, _ in chunk],
                             'caption': [c for _, _, c in chunk]}),
                   f'{root}/parquet/{s:05d}.parquet', row_group_size=per_shard // 2)
  for k, b, c in samples:
    with open(f'{root}/folder/{k}.jpg', 'wb') as f:
      f.write(b)
    rows.append({'image': f'{k}.jpg', 'caption': c})
  with open(f'{root}/folder/manifest.jsonl', 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in rows) + '\n')
  paths = {'webdataset': f'{root}/tars/{{00000..{shards - 1:05d}}}.tar',
           'parquet': f'{root}/parquet/*.parquet', 'folder': f'{root}/folder/manifest.jsonl'}
  for res in resolutions:
    d = config_lib.data_defaults(res)
    d.update(source='webdataset', paths=paths['webdataset'])
    prepare.prepare(d, f'{root}/array_record_{res}', resolution=res, splits=('train',),
                    progress=False)
    paths[f'array_record_{res}'] = f'{root}/array_record_{res}/train-*.array_record'
  return paths


def time_ours(source: str, path: str, res: int, workers: int, batch_size: int,
              batches: int) -> dict:
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  d = config_lib.data_defaults(res)
  d.update(source=source, paths=path, worker_count=workers, shuffle_buffer=256)
  start = time.perf_counter()
  it = input_pipeline.make_iterator(d, split='train', batch_size=batch_size, tokenizer=None,
                                    seed=0, process_index=0, process_count=1)
  batch = next(it)
  first = time.perf_counter() - start
  assert batch['image'].shape == (batch_size, res, res, 3)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - start
  if hasattr(it, 'close'):
    it.close()
  return {'images_per_s': batches * batch_size / seconds, 'first_batch_s': first}


def _peer_resize_crop(res):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def fn(sample):
    img, caption = sample
    img = img.convert('RGB')
    w, h = img.size
    scale = res / min(w, h)
    size = (max(res, round(w * scale)), max(res, round(h * scale)))
    img = img.resize(size, Image.BICUBIC, reducing_gap=None)
    left, top = (size[0] - res) // 2, (size[1] - res) // 2
    arr = np.asarray(img.crop((left, top, left + res, top + res)), np.float32) / 127.5 - 1.0
    return arr, caption
  return fn


def time_peer(path: str, res: int, workers: int, batch_size: int, batches: int) -> dict:
  """The webdataset package reading the same tars, PIL decoding, the same resize and crop."""
  import webdataset as wds  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  ds = (wds.WebDataset(path, shardshuffle=False, empty_check=False)
        .shuffle(256).decode('pil').to_tuple('jpg', 'txt').map(_peer_resize_crop(res))
        .batched(batch_size, partial=False).repeat())
  loader = iter(wds.WebLoader(ds, batch_size=None, num_workers=workers) if workers else ds)
  batch = next(loader)
  first = time.perf_counter() - start
  assert np.asarray(batch[0]).shape == (batch_size, res, res, 3)
  start = time.perf_counter()
  for _ in range(batches):
    next(loader)
  return {'images_per_s': batches * batch_size / (time.perf_counter() - start),
          'first_batch_s': first}


def main(argv):
  del argv
  resolutions = [int(r) for r in FLAGS.resolutions]
  root = FLAGS.dir or tempfile.mkdtemp(prefix='unclip_input_bench_')
  start = time.perf_counter()
  paths = write_data(root, FLAGS.images, FLAGS.per_shard, resolutions)
  result = {'images': FLAGS.images, 'batch_size': FLAGS.batch_size, 'cpu_count': os.cpu_count(),
            'source_image': '512x384 JPEG q90', 'write_seconds': round(time.perf_counter() -
                                                                       start, 1),
            'cases': []}
  for res in resolutions:
    for workers in (int(w) for w in FLAGS.workers):
      busy_cores = max(workers, 1)
      for source in FLAGS.sources:
        path = paths[f'array_record_{res}'] if source == 'array_record' else paths[source]
        case = {'source': source, 'resolution': res, 'workers': workers,
                **time_ours(source, path, res, workers, FLAGS.batch_size, FLAGS.batches)}
        case['images_per_s_per_core'] = case['images_per_s'] / busy_cores
        if source == 'webdataset' and FLAGS.peer:
          peer = time_peer(paths['webdataset'], res, workers, FLAGS.batch_size, FLAGS.batches)
          case['peer'] = {'name': 'webdataset package + PIL', **peer}
          case['ratio_to_peer'] = case['images_per_s'] / peer['images_per_s']
        result['cases'].append({k: round(v, 3) if isinstance(v, float) else v
                                for k, v in case.items()})
        print(json.dumps(result['cases'][-1]), file=sys.stderr)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
