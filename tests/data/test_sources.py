"""Every source: webdataset tars (local and on a remote filesystem), image folders with
manifests, parquet (plain and Hugging Face image structs), tfds, prepared array_record shards
and the embedding-reader layout. For each: the right images and captions, skips counted by
reason, processes reading disjoint samples that together cover the data, and an iterator that
continues exactly where it was stopped."""

import io
import json
import os
import shutil

import fsspec
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unclip_jax import config_lib
from unclip_jax.data import input_pipeline as ip
from unclip_jax.data import prepare
from unclip_jax.data import sources

from tests import helpers
from tests.data import fixtures

RES = 16


def data_config(**fields) -> ml_collections.ConfigDict:
  d = config_lib.data_defaults(RES)
  d.shuffle_buffer = 8
  d.update(fields)
  return d


def iterator(d, **kw):
  kw = dict(split='train', batch_size=4, tokenizer=None, seed=0, process_index=0,
            process_count=1) | kw
  return ip.make_iterator(d, **kw)


def keys(batches):
  return [k for b in batches for k in b['key'].tolist()]


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_resumes_exactly(d, steps_before=5, steps_after=7, **kw):
  """Stopped after `steps_before` batches and restored into a fresh iterator, the next batches
  equal those of the uninterrupted one."""
  it = iterator(d, **kw)
  take(it, steps_before)
  state = json.loads(json.dumps(it.get_state()))     # what a checkpoint holds
  expected = take(it, steps_after)
  restored = iterator(d, **kw)
  restored.set_state(state)
  got = take(restored, steps_after)
  for a, b in zip(expected, got):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def assert_processes_split(d, total: int):
  """Two processes read disjoint samples that together are every sample (one epoch; a
  random-access source gives each process the same number, dropping an odd one out)."""
  shares = [keys(list(iterator(d, batch_size=1, num_epochs=1, shuffle=False,
                               process_index=p, process_count=2))) for p in range(2)]
  assert not set(shares[0]) & set(shares[1])
  if not sources.is_streaming(sources.get(d, 'train')):
    total -= total % 2
    assert len(shares[0]) == len(shares[1])
  assert len(set(shares[0]) | set(shares[1])) == total
  assert all(shares)


@pytest.fixture(scope='module')
def shapes_config(data_dir):
  return helpers.tiny_clip_config(data_dir).data


@pytest.fixture(scope='module')
def shapes_shards(shapes_config, tmp_path_factory):
  """The built-in data (16px, 256 + 64) as webdataset tars: 4 training shards and 1 held-out."""
  folder = str(tmp_path_factory.mktemp('shards'))
  train = fixtures.shapes_examples(shapes_config, 'train')
  test = fixtures.shapes_examples(shapes_config, 'test')
  return {'train': fixtures.write_shapes_shards(train, folder, 'train-', 64),
          'test': fixtures.write_shapes_shards(test, folder, 'eval-', 64),
          'examples': {ex['key']: ex for ex in train + test}, 'folder': folder}


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
  return fixtures.write_mixed_shards(str(tmp_path_factory.mktemp('mixed')))


# ---------------------------------------------------------------------------------------------
# webdataset


def test_webdataset_decodes_every_format_and_mode_and_counts_what_it_skips(mixed):
  d = data_config(source='webdataset', paths=mixed['pattern'], label_key='label',
                  class_names='cat,dog')
  ip.reset_skip_counts()
  examples = {ex['key']: ex for ex in ip.iterate_examples(d, 'train')[0]}
  assert set(examples) == mixed['good']
  assert {k: v for k, v in ip.skip_counts().items() if v} == mixed['skips']
  for ex in examples.values():
    assert ex['image'].shape == (RES, RES, 3) and ex['image'].dtype == np.float32
    assert -1 <= ex['image'].min() and ex['image'].max() <= 1
  grey = examples['grey_png']['image']
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])          # greyscale → RGB
  rgba = examples['rgba_png']['image']                               # red square over white
  np.testing.assert_allclose(rgba[RES // 2, RES // 2], [200 / 127.5 - 1, -1, -1], atol=0.02)
  np.testing.assert_allclose(rgba[0, 0], [1, 1, 1], atol=0.02)
  assert examples['two_captions']['caption'] == 'first caption'     # held-out: the first
  assert [examples[k]['label'] for k in ('rgb_jpeg', 'grey_png', 'two_captions', 'tall_png')] \
      == [0, 1, 0, -1]
  # Training picks among an image's captions, the same way for the same epoch and seed.
  it = iterator(data_config(source='webdataset', paths=mixed['pattern'], shuffle_buffer=0),
                batch_size=1, num_epochs=12, shuffle=False)
  chosen = {b['caption'][0] for b in it if b['key'][0] == 'two_captions'}
  assert chosen == {'first caption', 'second caption'}


def test_webdataset_batches_hold_the_shards_images_and_captions(shapes_shards, shapes_config):
  d = data_config(source='webdataset', paths=shapes_shards['train'],
                  eval_paths=shapes_shards['test'])
  tokenize = lambda caps: np.array([[len(c), 7] for c in caps], np.int32)
  batch = next(iterator(d, tokenizer=tokenize, batch_size=8))
  assert set(batch) == {'image', 'caption', 'key', 'tokens'}
  assert batch['image'].shape == (8, RES, RES, 3) and batch['tokens'].shape == (8, 2)
  reference = ip.load_split(shapes_config, 'train')
  by_id = {f'{i:06d}': n for n, i in enumerate(reference['id'])}
  for i, key in enumerate(batch['key']):
    np.testing.assert_array_equal(batch['image'][i], reference['image'][by_id[key]])
    assert batch['caption'][i] == reference['caption'][by_id[key]]
    assert batch['tokens'][i, 0] == len(batch['caption'][i])
  held_out = ip.load_split(d, 'test')
  assert len(held_out['key']) == 64


def test_webdataset_shuffles_splits_across_processes_and_resumes_exactly(shapes_shards):
  d = data_config(source='webdataset', paths=shapes_shards['train'], shuffle_buffer=16)
  first = keys(take(iterator(d), 16))
  assert first == keys(take(iterator(d), 16))                  # deterministic
  assert first != keys(take(iterator(d, seed=1), 16))          # the seed matters
  assert sorted(first) != first
  one_epoch = keys(take(iterator(d, batch_size=8), 32))        # 4 shards x 64 = 32 batches
  assert sorted(one_epoch) == sorted(shapes_shards['examples'])[:256]
  assert_processes_split(d, 256)
  assert_resumes_exactly(d, steps_before=30, steps_after=10, batch_size=8)   # over the epoch end
  with pytest.raises(ValueError, match='1 units .* for 2 processes'):
    iterator(data_config(source='webdataset', paths=shapes_shards['test']), process_count=2)


def test_webdataset_grain_workers_decode_count_skips_and_resume(mixed):
  d = data_config(source='webdataset', paths=mixed['pattern'], worker_count=2)
  ip.reset_skip_counts()
  it = iterator(d, batch_size=3)
  seen = keys(take(it, 6))       # each worker reads its own shards (2 of the 4), epoch after epoch
  assert set(seen) == mixed['good']
  counts = ip.skip_counts()        # counted in the workers, reported here
  assert all(counts[reason] >= n for reason, n in mixed['skips'].items())
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 3)
  restored = iterator(d, batch_size=3)
  restored.set_state(state)
  for a, b in zip(expected, take(restored, 3)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_webdataset_reads_remote_filesystems(shapes_shards):
  """Shards on an fsspec filesystem (memory:// here; gs:// and s3:// the same way), named by a
  brace pattern and by a glob."""
  fs = fsspec.filesystem('memory')
  for name in sorted(os.listdir(shapes_shards['folder'])):
    with open(os.path.join(shapes_shards['folder'], name), 'rb') as f:
      fs.pipe(f'/remote_shards/{name}', f.read())
  local = data_config(source='webdataset', paths=shapes_shards['train'])
  want = keys(take(iterator(local), 6))
  for pattern in ('memory://remote_shards/train-{00000..00003}.tar',
                  'memory://remote_shards/train-*.tar'):
    remote = data_config(source='webdataset', paths=pattern)
    assert keys(take(iterator(remote), 6)) == want
  assert_resumes_exactly(data_config(source='webdataset',
                                     paths='memory://remote_shards/train-*.tar'))


def test_nothing_readable_is_a_clear_error_not_a_hang(tmp_path):
  fixtures.write_tar(str(tmp_path / 'bad.tar'), [('a', {'jpg': b'junk', 'txt': b'x'}),
                                                 ('b', {'txt': b'no image'})])
  fixtures.write_tar(str(tmp_path / 'empty.tar'), [])
  with pytest.raises(ValueError, match=r'no usable sample in 1 tar shard .*bad.tar.*all skipped'):
    next(iterator(data_config(source='webdataset', paths=str(tmp_path / 'bad.tar'))))
  with pytest.raises(ValueError, match='no sample at all in .*empty.tar'):
    next(iterator(data_config(source='webdataset', paths=str(tmp_path / 'empty.tar'))))
  with pytest.raises(FileNotFoundError, match=r"config.data.paths: '.*nothing-\*.tar' matches "
                                              'no file'):
    iterator(data_config(source='webdataset', paths=str(tmp_path / 'nothing-*.tar')))


# ---------------------------------------------------------------------------------------------
# folder


def _save(path, array, fmt='PNG'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format=fmt)


def test_folder_with_manifests_or_captions_beside_the_images(tmp_path):
  root = tmp_path / 'photos'
  rows = []
  for i in range(12):
    name = f'sub/img{i:02d}.' + ('jpg' if i % 2 else 'png')
    _save(str(root / name), fixtures.gradient(20 + i, 24, i), 'JPEG' if i % 2 else 'PNG')
    (root / name).with_suffix('.txt').write_text(f'photo number {i}')
    rows.append({'file': name, 'text': f'photo number {i}', 'kind': 'odd' if i % 2 else 'even'})
  rows.append({'file': 'sub/missing.png', 'text': 'a file that is not there', 'kind': 'odd'})
  with open(root / 'manifest.jsonl', 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in rows) + '\n')
  with open(root / 'manifest.csv', 'w') as f:
    f.write('file,text,kind\n' + ''.join(f'{r["file"]},{r["text"]},{r["kind"]}\n' for r in rows))
  pq.write_table(pa.Table.from_pylist(rows), str(root / 'manifest.parquet'))

  fields = dict(source='folder', image_key='file', caption_key='text', label_key='kind',
                class_names='even, odd')
  read = {}
  for manifest in ('manifest.jsonl', 'manifest.csv', 'manifest.parquet'):
    ip.reset_skip_counts()
    d = data_config(paths=str(root / manifest), **fields)
    examples = list(ip.iterate_examples(d, 'train')[0])
    assert ip.skip_counts()['missing_image'] == 1
    assert [ex['caption'] for ex in examples] == [f'photo number {i}' for i in range(12)]
    assert [int(ex['label']) for ex in examples] == [i % 2 for i in range(12)]
    read[manifest] = np.stack([ex['image'] for ex in examples])
  np.testing.assert_array_equal(read['manifest.jsonl'], read['manifest.csv'])
  np.testing.assert_array_equal(read['manifest.jsonl'], read['manifest.parquet'])

  beside = data_config(source='folder', paths=str(root))       # .txt files beside the images
  examples = list(ip.iterate_examples(beside, 'train')[0])
  assert [ex['key'] for ex in examples] == [f'sub/img{i:02d}' for i in range(12)]
  np.testing.assert_array_equal(np.stack([ex['image'] for ex in examples]),
                                read['manifest.jsonl'])
  assert_processes_split(beside, 12)
  assert_resumes_exactly(beside, steps_before=4, steps_after=4, batch_size=2)


# ---------------------------------------------------------------------------------------------
# parquet


def test_parquet_plain_and_hugging_face_image_columns(shapes_shards, tmp_path):
  examples = sorted(shapes_shards['examples'].values(), key=lambda ex: ex['key'])[:96]
  plain = pa.table({'key': [ex['key'] for ex in examples],
                    'jpg': [ex['image'] for ex in examples],
                    'caption': [ex['caption'] for ex in examples],
                    'shape': [ex['labels']['shape'] for ex in examples]})
  pq.write_table(plain, str(tmp_path / 'img2dataset.parquet'), row_group_size=24)
  hf = pa.table({'image': [{'bytes': ex['image'], 'path': None} for ex in examples],
                 'text': [[ex['caption'], 'another caption'] for ex in examples]})
  pq.write_table(hf.slice(0, 48), str(tmp_path / 'hf-00000.parquet'), row_group_size=16)
  pq.write_table(hf.slice(48), str(tmp_path / 'hf-00001.parquet'), row_group_size=16)

  (tmp_path / 'shapes.json').write_text(json.dumps({'circle': 0, 'square': 1, 'triangle': 2,
                                                    'cross': 3, 'star': 4}))
  d = data_config(source='parquet', paths=str(tmp_path / 'img2dataset.parquet'),
                  label_key='shape', class_names=str(tmp_path / 'shapes.json'))
  read = list(ip.iterate_examples(d, 'train')[0])
  assert [ex['key'] for ex in read] == [ex['key'] for ex in examples]
  assert [ex['caption'] for ex in read] == [ex['caption'] for ex in examples]
  assert [int(ex['label']) for ex in read] == [
      ['circle', 'square', 'triangle', 'cross', 'star'].index(ex['labels']['shape'])
      for ex in examples]
  assert len(sources.get(d, 'train').units()) == 4        # row groups are the units
  assert_processes_split(d, 96)
  assert_resumes_exactly(d, steps_before=7, steps_after=9)

  hf_config = data_config(source='parquet', paths=str(tmp_path / 'hf-*.parquet'),
                          caption_key='text')
  hf_read = list(ip.iterate_examples(hf_config, 'train')[0])
  np.testing.assert_array_equal(np.stack([ex['image'] for ex in hf_read]),
                                np.stack([ex['image'] for ex in read]))
  assert [ex['caption'] for ex in hf_read] == [ex['caption'] for ex in examples]
  assert len(sources.get(hf_config, 'train').units()) == 6
  with pytest.raises(ValueError, match="config.data.image_key: .* has no image column 'png'"):
    list(ip.iterate_examples(data_config(source='parquet', image_key='png',
                                         paths=str(tmp_path / 'hf-00000.parquet')), 'train')[0])


# ---------------------------------------------------------------------------------------------
# tfds


def _tiny_tfds_builder(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Images with several captions each, like coco_captions."""
    VERSION = tfds.core.Version('1.0.0')
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'captions': tfds.features.Sequence({'text': tfds.features.Text()}),
          'label': tfds.features.ClassLabel(names=['warm', 'cool']),
          'image_id': tfds.features.Scalar(np.int64)}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(0, 20),
              'validation': self._generate_examples(20, 26)}

    def _generate_examples(self, start, stop):  # pylint: disable=arguments-differ
      for i in range(start, stop):
        yield i, {'image': fixtures.gradient(18 + i % 5, 22, i), 'label': i % 2, 'image_id': i,
                  'captions': {'text': [f'picture {i}', f'another view of picture {i}']}}

  builder = TinyCaptions(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return builder


def test_tfds_dataset_by_name_with_nested_caption_features(tmp_path):
  builder = _tiny_tfds_builder(str(tmp_path))
  d = data_config(source='tfds', name=builder.name, data_dir=str(tmp_path),
                  eval_split='validation', caption_key='captions/text', key_key='image_id',
                  label_key='label', class_names='0,1')
  train = list(ip.iterate_examples(d, 'train')[0])
  assert [ex['key'] for ex in train] == [str(i) for i in range(20)]
  assert [ex['caption'] for ex in train] == [f'picture {i}' for i in range(20)]
  assert [int(ex['label']) for ex in train] == [i % 2 for i in range(20)]
  held_out = ip.load_split(d, 'test')
  assert held_out['key'].tolist() == [str(i) for i in range(20, 26)]
  assert held_out['image'].shape == (6, RES, RES, 3)
  captions = {c for b in iterator(d, batch_size=1, num_epochs=8) for c in b['caption']}
  assert 'another view of picture 3' in captions and 'picture 3' in captions
  assert_processes_split(d, 20)
  assert_resumes_exactly(d, steps_before=3, steps_after=5, batch_size=2)
  with pytest.raises(FileNotFoundError, match="config.data.name: the tfds dataset 'tiny_captions'"
                                              ' is not prepared'):
    sources.get(data_config(source='tfds', name='tiny_captions',
                            data_dir=str(tmp_path / 'elsewhere')), 'train')


# ---------------------------------------------------------------------------------------------
# array_record, prepared from any source


def test_prepared_array_record_shards_resume_and_shuffle_globally(mixed, shapes_shards,
                                                                  tmp_path):
  out = str(tmp_path / 'prepared')
  d = data_config(source='webdataset', paths=mixed['pattern'], eval_paths=shapes_shards['test'])
  report = prepare.prepare(d, out, resolution=RES, progress=False)
  assert report['train']['count'] == len(mixed['good'])
  assert report['train']['skipped'] == mixed['skips']
  assert report['test']['count'] == 64
  # Killed after the fact: a missing shard is written again, finished ones are kept.
  shards = sorted(f for f in os.listdir(out) if f.startswith('train-'))
  assert len(shards) == 4
  os.remove(os.path.join(out, shards[1]))
  mtime = os.path.getmtime(os.path.join(out, shards[0]))
  again = prepare.prepare(d, out, resolution=RES, splits=('train',), progress=False)
  assert again['train']['shards'] == 1 and os.path.getmtime(os.path.join(out, shards[0])) == mtime
  info = prepare.write_info(out, d, RES, 'png', ('train', 'test'))
  assert info['splits']['train']['count'] == len(mixed['good'])

  prepared = data_config(source='array_record', paths=info['splits']['train']['paths'],
                         eval_paths=info['splits']['test']['paths'])
  got = {ex['key']: ex for ex in ip.iterate_examples(prepared, 'train')[0]}
  want = {ex['key']: ex for ex in ip.iterate_examples(d, 'train')[0]}
  assert set(got) == set(want)
  for key in want:                         # PNG at the resolution: the same pixels
    np.testing.assert_allclose(got[key]['image'], want[key]['image'], atol=1e-6)
    assert got[key]['caption'] == want[key]['caption']
  assert_processes_split(prepared, len(want))
  assert_resumes_exactly(prepared, steps_before=3, steps_after=4, batch_size=2)
  np.testing.assert_array_equal(ip.load_split(prepared, 'test')['image'],
                                ip.load_split(d, 'test')['image'])


# ---------------------------------------------------------------------------------------------
# the embedding-reader layout


def write_embedding_folder(folder, sizes, dim, seed=0, text=True):
  """The clip-retrieval layout: img_emb/img_emb_N.npy, text_emb/, metadata/metadata_N.parquet."""
  rng = np.random.default_rng(seed)
  for sub in ('img_emb', 'text_emb', 'metadata'):
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
  written = []
  for n, size in enumerate(sizes):
    image = rng.standard_normal((size, dim)).astype(np.float16)
    np.save(os.path.join(folder, 'img_emb', f'img_emb_{n}.npy'), image)
    if text:
      np.save(os.path.join(folder, 'text_emb', f'text_emb_{n}.npy'),
              rng.standard_normal((size, dim)).astype(np.float16))
    keys = [f'{n:05d}{i:04d}' for i in range(size)]
    captions = [f'caption {n}-{i}' for i in range(size)]
    pq.write_table(pa.table({'caption': captions, 'key': keys,
                             'url': [f'http://x/{k}.jpg' for k in keys]}),
                   os.path.join(folder, 'metadata', f'metadata_{n}.parquet'))
    written += [(k, c, e) for k, c, e in zip(keys, captions, image)]
  return written


def test_embedding_reader_layout_is_read_back_exactly(tmp_path):
  folder = str(tmp_path / 'laion_like')
  written = write_embedding_folder(folder, [5, 7, 3], dim=8)
  d = data_config(source='clip_embeddings', paths=folder)
  read = list(ip.iterate_examples(d, 'train')[0])
  assert [ex['key'] for ex in read] == [k for k, _, _ in written]
  assert [ex['caption'] for ex in read] == [c for _, c, _ in written]
  for ex, (_, _, emb) in zip(read, written):
    want = emb.astype(np.float32) / np.linalg.norm(emb.astype(np.float32))
    np.testing.assert_allclose(ex['clip_image_emb'], want, rtol=1e-6)
    assert 'image' not in ex
  assert_processes_split(d, 15)
  assert_resumes_exactly(d, steps_before=2, steps_after=3, batch_size=2)
  np.save(os.path.join(folder, 'img_emb', 'img_emb_1.npy'), np.zeros((6, 8), np.float16))
  with pytest.raises(ValueError, match='img_emb_1.npy has 6 embeddings but metadata_1.parquet 7'):
    sources.get(d, 'train')
  shutil.rmtree(os.path.join(folder, 'metadata'))
  with pytest.raises(FileNotFoundError, match='no metadata/metadata_0.parquet'):
    sources.get(d, 'train')


def test_image_processing_resizes_the_shorter_side_and_crops(tmp_path):
  from unclip_jax.data import image_processing  # pylint: disable=g-import-not-at-top
  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, 10:30] = 255                              # the centre 20x20 is white
  buf = io.BytesIO()
  Image.fromarray(wide).save(buf, format='PNG')
  centre = image_processing.process(buf.getvalue(), 10)      # 40x20 → 20x10 → the middle 10
  assert centre.shape == (10, 10, 3)
  np.testing.assert_allclose(centre[:, 1:-1], 1.0, atol=1e-6)
  rng = np.random.default_rng(0)
  crops = [image_processing.process(buf.getvalue(), 10, crop='random', rng=rng)
           for _ in range(20)]
  resized = np.asarray(Image.fromarray(wide).resize((20, 10), Image.BICUBIC, reducing_gap=None),
                       np.float32) / 127.5 - 1
  offsets = set()
  for crop in crops:           # each is a window of the resized image, at a random offset
    offsets |= {o for o in range(11) if np.array_equal(crop, resized[:, o:o + 10])}
  assert len(offsets) >= 5
  with pytest.raises(image_processing.ImageError, match='below config.data.min_size=32'):
    image_processing.process(buf.getvalue(), 10, min_size=32)
  del tmp_path


def test_webdataset_with_attribute_labels_carries_the_built_in_attributes(shapes_shards,
                                                                          tmp_path):
  from unclip_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
  d = data_config(source='webdataset', paths=shapes_shards['train'], attribute_labels=True)
  batch = next(iterator(d, batch_size=8))
  for i, key in enumerate(batch['key']):
    names = shapes_shards['examples'][key]['labels']
    for k, values in captioned_shapes.ATTRIBUTES.items():
      assert batch[k].dtype == np.int32 and values[batch[k][i]] == names[k], (key, k)
  assert 'shape' not in next(iterator(data_config(source='webdataset',
                                                  paths=shapes_shards['train'])))
  # A sample whose label is not one of the dataset's names is skipped as bad JSON, named.
  ex = dict(next(iter(shapes_shards['examples'].values())))
  bad = dict(ex, key='bad', labels=dict(ex['labels'], position='upstairs'))
  pattern = fixtures.write_shapes_shards([bad, ex], str(tmp_path), 'mixed-', 2)
  ip.reset_skip_counts()
  it = iterator(data_config(source='webdataset', paths=pattern, attribute_labels=True),
                batch_size=1, num_epochs=1, shuffle=False)
  assert [b['key'][0] for b in it] == [ex['key']]
  assert ip.skip_counts()['bad_json'] == 1
