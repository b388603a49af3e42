"""Data fixtures the tests write themselves: webdataset tars, image folders with manifests,
parquet files, and shards holding the built-in dataset's images."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def gradient(w: int, h: int, seed: int = 0) -> np.ndarray:
  """A smooth uint8 RGB image [h, w, 3] (compresses well, resizes predictably)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  base = rng.uniform(0, 255, 3)
  img = np.stack([(x * 255 / max(w - 1, 1)), (y * 255 / max(h - 1, 1)),
                  np.full((h, w), base[2])], -1)
  return np.clip(img * 0.5 + base * 0.5, 0, 255).astype(np.uint8)


def write_tar(path: str, samples: list[tuple[str, dict]]):
  """samples: [(key, {extension: bytes})] in order."""
  with tarfile.open(path, 'w') as tar:
    for key, members in samples:
      for ext, data in members.items():
        info = tarfile.TarInfo(f'{key}.{ext}')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


# The mixed shards: what each sample is, and what the pipeline must make of it.
MIXED_GOOD = ('rgb_jpeg', 'grey_png', 'rgba_png', 'palette_png', 'cmyk_jpeg', 'odd_webp',
              'tall_png', 'two_captions')
MIXED_SKIPS = {'undecodable_image': 1, 'missing_caption': 2, 'missing_image': 1,
               'truncated_shard': 1}


def write_mixed_shards(folder: str) -> dict:
  """Four tars: 00000 (formats and modes), 00001 (bad samples), 00002 (empty), 00003 (cut in
  the middle of its second sample). Returns {'pattern', 'good': keys, 'skips'}."""
  os.makedirs(folder, exist_ok=True)
  rgb = Image.fromarray(gradient(40, 30, 1))
  alpha = np.zeros((24, 24, 4), np.uint8)
  alpha[..., 0] = 200
  alpha[6:18, 6:18, 3] = 255         # a red square on a transparent field → red on white
  caption = lambda t: t.encode()
  shard0 = [
      ('rgb_jpeg', {'jpg': encode(rgb, 'JPEG', quality=95), 'txt': caption('a wide gradient'),
                    'json': json.dumps({'label': 'cat', 'width': 40}).encode()}),
      ('grey_png', {'png': encode(Image.fromarray(gradient(32, 32, 2)[..., 0], 'L'), 'PNG'),
                    'txt': caption('a grey gradient'),
                    'json': json.dumps({'label': 'dog'}).encode()}),
      ('rgba_png', {'png': encode(Image.fromarray(alpha, 'RGBA'), 'PNG'),
                    'txt': caption('a red square on white')}),
      ('palette_png', {'png': encode(rgb.convert('P'), 'PNG'), 'txt': caption('a palette')}),
      ('cmyk_jpeg', {'jpeg': encode(rgb.convert('CMYK'), 'JPEG'), 'txt': caption('in cmyk')}),
      ('odd_webp', {'webp': encode(Image.fromarray(gradient(17, 53, 3)), 'WEBP', lossless=True),
                    'txt': caption('odd sized')}),
  ]
  good_jpeg = encode(rgb, 'JPEG')
  shard1 = [
      ('truncated_jpeg', {'jpg': good_jpeg[:len(good_jpeg) // 2], 'txt': caption('cut')}),
      ('no_caption', {'jpg': good_jpeg}),
      ('empty_caption', {'jpg': good_jpeg, 'txt': b'  \n'}),
      ('no_image', {'txt': caption('only words')}),
      ('tall_png', {'png': encode(Image.fromarray(gradient(20, 60, 4)), 'PNG'),
                    'txt': caption('tall')}),
      ('two_captions', {'jpg': good_jpeg,
                        'json': json.dumps({'txt': ['first caption', 'second caption'],
                                            'label': 'cat'}).encode()}),
  ]
  write_tar(os.path.join(folder, '00000.tar'), shard0)
  write_tar(os.path.join(folder, '00001.tar'), shard1)
  write_tar(os.path.join(folder, '00002.tar'), [])
  cut = os.path.join(folder, '00003.tar')
  write_tar(cut, [('cut_first', {'png': encode(rgb, 'PNG'), 'txt': caption('kept')}),
                  ('cut_second', {'png': encode(rgb, 'PNG'), 'txt': caption('lost')})])
  with tarfile.open(cut) as tar:
    member = tar.getmember('cut_second.png')
  data = open(cut, 'rb').read()
  with open(cut, 'wb') as f:   # cut in the middle of the second sample's image
    f.write(data[:member.offset_data + member.size // 2])
  return {'pattern': os.path.join(folder, '{00000..00003}.tar'),
          'good': set(MIXED_GOOD) | {'cut_first'}, 'skips': dict(MIXED_SKIPS)}


def shapes_examples(data_config, split: str, n: int | None = None) -> list[dict]:
  """The built-in dataset's raw records (PNG bytes, caption, attributes)."""
  from unclip_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
  from unclip_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.get(data_config, split)
  n = len(source) if n is None else min(n, len(source))
  out = []
  for i in range(n):
    raw = source[i]
    labels = {k: captioned_shapes.ATTRIBUTES[k][v] if k in captioned_shapes.ATTRIBUTES else v
              for k, v in raw['labels'].items()}
    out.append({'key': f'{int(raw["labels"]["id"]):06d}', 'image': raw['image'],
                'caption': raw['caption'], 'labels': labels})
  return out


def write_shapes_shards(examples: list[dict], folder: str, prefix: str,
                        per_shard: int) -> str:
  """The examples as webdataset tars (`png`, `txt`, `json` with the attribute names); returns
  the brace pattern of the shards."""
  os.makedirs(folder, exist_ok=True)
  n = (len(examples) + per_shard - 1) // per_shard
  for s in range(n):
    chunk = examples[s * per_shard:(s + 1) * per_shard]
    write_tar(os.path.join(folder, f'{prefix}{s:05d}.tar'),
              [(ex['key'], {'png': ex['image'], 'txt': ex['caption'].encode(),
                            'json': json.dumps(ex['labels']).encode()}) for ex in chunk])
  return os.path.join(folder, f'{prefix}{{{0:05d}..{n - 1:05d}}}.tar')


def write_job_shards(folder: str, data_dir: str, resolution: int, num_train: int,
                     num_test: int, per_shard: int) -> dict:
  """The built-in dataset at `resolution` as training and held-out tars for the suite's
  end-to-end job: {'paths', 'eval_paths'} (brace patterns)."""
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  d = config_lib.data_defaults(resolution)
  d.update(data_dir=data_dir, num_train=num_train, num_test=num_test)
  return {'paths': write_shapes_shards(shapes_examples(d, 'train'), folder, 'train-', per_shard),
          'eval_paths': write_shapes_shards(shapes_examples(d, 'test'), folder, 'eval-',
                                            per_shard)}


def job_shard_paths(folder: str, num_train: int, num_test: int, per_shard: int) -> dict:
  """The patterns `write_job_shards` writes, known before it runs."""
  n = lambda count: (count + per_shard - 1) // per_shard
  return {'paths': os.path.join(folder, f'train-{{00000..{n(num_train) - 1:05d}}}.tar'),
          'eval_paths': os.path.join(folder, f'eval-{{00000..{n(num_test) - 1:05d}}}.tar')}


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  folder, data_dir, *numbers = sys.argv[1:]
  print(write_job_shards(folder, data_dir, *map(int, numbers)))
