"""Tests for the grain input pipeline over CaptionedShapes."""

import glob
import io
import logging
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
from PIL import Image

from unclip_jax.data import captioned_shapes as cs
from unclip_jax.data import input_pipeline as ip

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
LABELS = ('shape', 'color', 'background', 'size', 'position')


def tokenize(captions):
  """Trivial tokenizer: caption length and word count, int32 [B, 2]."""
  return np.array([[len(c), len(c.split())] for c in captions])


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  cfg = ml_collections.ConfigDict(dict(
      source='shapes', name='captioned_shapes', data_dir=str(tmp_path_factory.mktemp('data')),
      resolution=32, num_train=200, num_test=50, seed=0, worker_count=0))
  cs.prepare(cfg.data_dir, resolution=32, num_train=200, num_test=50, seed=0)
  return cfg


def _iterator(config, **kw):
  kw = dict(split='train', batch_size=8, tokenizer=tokenize, seed=0,
            process_index=0, process_count=1) | kw
  return ip.make_iterator(config, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _ids(batches):
  return np.concatenate([b['id'] for b in batches]).tolist()


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_batch_format(config):
  batch = next(_iterator(config))
  assert set(batch) == {'image', 'tokens', 'caption', 'key', 'id', *LABELS}
  assert batch['image'].shape == (8, 32, 32, 3)
  assert batch['image'].dtype == np.float32
  assert -1 <= batch['image'].min() < 0 < batch['image'].max() <= 1
  assert batch['tokens'].shape == (8, 2) and batch['tokens'].dtype == np.int32
  for k in LABELS + ('id',):
    assert batch[k].shape == (8,) and batch[k].dtype == np.int32
    assert batch[k].min() >= 0
  assert batch['caption'].shape == (8,)
  for i, text in enumerate(batch['caption']):
    assert isinstance(text, str) and batch['tokens'][i, 0] == len(text)
    assert batch['key'][i] == str(batch['id'][i])
    ex = cs.generate_example(0, 'train', int(batch['id'][i]), 32)
    assert text == ex['caption']
    np.testing.assert_allclose(batch['image'][i], ex['image'] / 127.5 - 1, atol=1e-6)
    assert all(batch[k][i] == ex[k] for k in LABELS)


def test_deterministic_and_shuffled(config):
  a = _ids(_take(_iterator(config, seed=1), 5))
  b = _ids(_take(_iterator(config, seed=1), 5))
  c = _ids(_take(_iterator(config, seed=2), 5))
  assert a == b and a != c
  unshuffled = _iterator(config, shuffle=False)
  assert _ids([next(unshuffled)]) == list(range(8))


def test_epochs(config):
  one = _ids(list(_iterator(config, num_epochs=1, batch_size=16)))
  assert len(one) == 192 and len(set(one)) == 192  # drop_remainder
  it = _iterator(config, batch_size=20)  # repeats forever
  ids = _ids(_take(it, 20))
  assert sorted(ids) == sorted(list(range(200)) * 2)
  assert ids[:200] != ids[200:]  # reshuffled every epoch


def test_checkpoint_resume(config):
  it = _iterator(config, batch_size=16)
  for _ in range(10):
    next(it)
  state = it.get_state()
  expected = _take(it, 6)  # crosses the epoch boundary
  restored = _iterator(config, batch_size=16)
  next(restored)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 6), expected)


def test_process_shards_disjoint(config):
  shards = [set(_ids(list(_iterator(config, batch_size=10, num_epochs=1,
                                    process_index=i, process_count=2))))
            for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == 100
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == set(range(200))


class CorruptingSource:
  """Random-access source replacing the image or caption of some records."""

  def __init__(self, source, bad):
    self.source, self.bad = source, bad

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    record = dict(self.source[index])
    if index in self.bad:
      record.update(self.bad[index])
    return record


def test_bad_records_skipped_counted_by_reason_and_logged(config, caplog):
  source = ip.get_source(config, 'test')
  good = source[0]['image']
  bad = {3: {'image': b'not a png'}, 10: {'image': good[:len(good) // 2]},  # truncated
         20: {'image': b''}, 25: {'image': None}, 30: {'caption': '  '}, 31: {'caption': None}}
  bad_ids = {int(source[i]['key']) for i in bad}
  corrupt = CorruptingSource(source, bad)
  expected = {'undecodable_image': 2, 'missing_image': 2, 'missing_caption': 2}

  ip.reset_skip_counts()
  with caplog.at_level(logging.WARNING):
    ids = _ids(list(_iterator(config, split='test', batch_size=2, num_epochs=1,
                              data_source=corrupt)))
  assert {k: v for k, v in ip.skip_counts().items() if v} == expected
  assert sorted(ids) == sorted(set(range(50)) - bad_ids)
  assert all(f"key='{i}'" in caplog.text for i in bad_ids)

  ip.reset_skip_counts()
  data = ip.load_split(config, 'test', data_source=corrupt)
  assert {k: v for k, v in ip.skip_counts().items() if v} == expected
  assert len(data['id']) == 44 and not bad_ids & set(data['id'].tolist())


def test_a_damaged_record_of_the_built_in_data_is_skipped_naming_its_file_and_record(
    config, tmp_path, caplog):
  """Bytes of the built-in test split's file overwritten (its records' checksums fail): the
  damaged records are counted as bad and logged with the file and record; the rest is read."""
  import shutil  # pylint: disable=g-import-not-at-top
  damaged = ml_collections.ConfigDict(dict(config.to_dict(), data_dir=str(tmp_path / 'data')))
  shutil.copytree(config.data_dir, damaged.data_dir)
  (path,) = glob.glob(os.path.join(damaged.data_dir, '**', '*-test.array_record-*'),
                      recursive=True)
  with open(path, 'r+b') as f:
    f.seek(20000)     # inside a record's data (not a 64 kB block header: that loses them all)
    f.write(b'\0' * 64)
  ip.reset_skip_counts()
  with caplog.at_level(logging.WARNING):
    data = ip.load_split(damaged, 'test')
  bad = ip.skip_counts()['bad_record']
  assert 1 <= bad <= 5 and len(data['id']) == 50 - bad
  assert re.search(rf"Skipping sample key='\d+' in {re.escape(path)} record \d+ \(bad_record, "
                   r'1 so far\): Corrupted Riegeli/records file', caplog.text), caplog.text


def test_images_of_another_size_or_mode_are_converted_not_dropped(config):
  """The shorter side is resized to the resolution and the centre cropped; greyscale → RGB."""
  source = ip.get_source(config, 'test')
  big = np.zeros((48, 64, 3), np.uint8)
  big[:, 8:56] = 255                 # a white square in the middle of a black 64x48 image
  grey = np.full((32, 32), 77, np.uint8)
  corrupt = CorruptingSource(source, {0: {'image': _encoded(big)}, 1: {'image': _encoded(grey)}})
  data = ip.load_split(config, 'test', data_source=corrupt, max_examples=2)
  assert data['image'].shape == (2, 32, 32, 3)
  np.testing.assert_allclose(data['image'][0][4:-4, 4:-4], 1.0, atol=0.02)   # the square fills it
  np.testing.assert_allclose(data['image'][1], 77 / 127.5 - 1, atol=1e-6)


def _encoded(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def test_load_split(config):
  data = ip.load_split(config, 'test', tokenizer=tokenize)
  assert set(data) == {'image', 'tokens', 'caption', 'key', 'id', *LABELS}
  assert data['image'].shape == (50, 32, 32, 3)
  assert data['id'].tolist() == list(range(50))  # in dataset order
  first = ip.load_split(config, 'train', max_examples=7)
  assert 'tokens' not in first and first['image'].shape[0] == 7


def test_unknown_source(config):
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.source = 'imagenet'
  with pytest.raises(ValueError, match="config.data.source: unknown source 'imagenet'"):
    _iterator(cfg)


def test_reading_does_not_import_tensorflow(config):
  code = textwrap.dedent(f"""
      import sys
      import ml_collections
      import numpy as np
      from unclip_jax.data import input_pipeline as ip
      cfg = ml_collections.ConfigDict({config.to_dict()!r})
      tok = lambda caps: np.zeros((len(caps), 4), np.int32)
      it = ip.make_iterator(cfg, split='train', batch_size=4, tokenizer=tok,
                            seed=0, process_index=0, process_count=1)
      assert next(it)['image'].shape == (4, 32, 32, 3)
      assert len(ip.load_split(cfg, 'test')['id']) == 50
      assert 'tensorflow' not in sys.modules, 'tensorflow was imported'
      print('OK')
  """)
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('OK')


def test_counterfactual_negatives_pair_each_training_example_with_its_counterfactual(config):
  cfg = ml_collections.ConfigDict(config.to_dict() | {'counterfactual_negatives': True})
  it = _iterator(cfg, batch_size=8)
  batch = next(it)
  assert batch['image'].shape == (8, 32, 32, 3) and batch['tokens'].shape == (8, 2)
  assert batch['id'].shape == (8,) and batch['caption'].shape == (8,)
  plain = next(_iterator(config, batch_size=4))
  # The originals are the plain pipeline's examples, in its order, each followed by its twin.
  np.testing.assert_array_equal(batch['image'][::2], plain['image'])
  assert list(batch['caption'][::2]) == list(plain['caption'])
  for i in range(0, 8, 2):
    assert batch['key'][i + 1] == f"{batch['key'][i]}~counterfactual"
    diff = [k for k in LABELS if batch[k][i] != batch[k][i + 1]]
    assert diff in (['size'], ['position'])
    assert cs.mentions(batch['caption'][i + 1], diff[0], int(batch[diff[0]][i + 1]))
    assert np.abs(batch['image'][i] - batch['image'][i + 1]).max() > 0.5
  # Deterministic, and resumed exactly.
  state = it.get_state()
  expected = _take(it, 3)
  _assert_batches_equal(_take(_iterator(cfg, batch_size=8), 1), [batch])
  restored = _iterator(cfg, batch_size=8)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 3), expected)
  # The held-out split is read as it is.
  _assert_batches_equal(_take(_iterator(cfg, split='test', shuffle=False), 1),
                        _take(_iterator(config, split='test', shuffle=False), 1))


def test_counterfactual_negatives_refuse_what_cannot_have_them(config):
  cfg = ml_collections.ConfigDict(config.to_dict() | {'counterfactual_negatives': True})
  with pytest.raises(ValueError, match='batch size .7. must be even'):
    _iterator(cfg, batch_size=7)
  other = ml_collections.ConfigDict(cfg.to_dict() | {'source': 'folder', 'paths': '/nowhere'})
  with pytest.raises(ValueError, match='counterfactual_negatives: only the built-in data'):
    ip.check_data_config(other)
