"""Run directories on Cloud Storage (gs://, served by a local emulator) and the run lock on any
filesystem: a remote run checkpoints, resumes, falls back from a damaged checkpoint, exports and
locks as a local one does, with no I/O through `os` on its path."""

import json
import os
import re
import socket
import time

import fsspec
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from unclip_jax import train
from unclip_jax import workdir as workdir_lib
from unclip_jax.stages import export
from tests import test_reliability


@pytest.fixture
def remote_run(gcs_bucket, request, monkeypatch, tmp_path):
  """A fresh gs:// run directory; the working directory is an empty local folder (so that a
  path handled by `os` would show up in it as a folder named 'gs:'), and TensorBoard's writer,
  which TensorFlow would send to the real Cloud Storage, is the logging one."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(train, 'create_writer', lambda workdir: train._LoggingWriter())  # pylint: disable=protected-access
  return f'{gcs_bucket}/{request.node.name}-{time.time_ns()}/run'


def _state(workdir, step):
  return ocp.StandardCheckpointer().restore(workdir_lib.path(workdir) / 'checkpoints' /
                                            str(step) / 'state')


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_run_on_cloud_storage_resumes_exactly_falls_back_and_exports(
    make_tiny_clip_config, remote_run, tmp_path, caplog):
  """On gs://: stopped at step 3 and resumed, the run ends bit-identical to an uninterrupted
  local one, with config.json, eval_metrics.json and a whole export in the bucket and its lock
  gone. A damaged latest checkpoint is moved to checkpoints_damaged/ and the newest intact one
  restored. Nothing was written through `os` (no local 'gs:' folder)."""
  stage = lambda: test_reliability._LinearStage(config)  # pylint: disable=protected-access
  config = make_tiny_clip_config(**{'num_train_steps': 6, 'checkpoint.every_steps': 0})
  local = str(tmp_path / 'local')
  train.train_and_evaluate(config, local, stage=stage())
  assert train.train_and_evaluate(config, remote_run, stage=stage(), stop_at_step=3) == {}
  assert not train.is_finished(remote_run, config)
  metrics = train.train_and_evaluate(config, remote_run, stage=stage())
  _assert_equal(_state(local, 6), _state(remote_run, 6))
  run = workdir_lib.path(remote_run)
  assert json.loads((run / 'eval_metrics.json').read_text()) == metrics
  assert json.loads((run / 'config.json').read_text())['num_train_steps'] == 6
  assert train.is_finished(remote_run, config)
  loaded_config, params = export.load_export(remote_run)
  assert loaded_config.num_train_steps == 6
  _assert_equal(params, _state(remote_run, 6)['ema_params'])
  assert not (run / workdir_lib.LOCK_NAME).exists()
  assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['3', '6']

  fs, name = fsspec.core.url_to_fs(os.fspath(run / 'checkpoints' / '6' / 'state'))
  for f in fs.find(name):
    fs.pipe_file(f, b'garbage')
  config.num_train_steps = 8
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(config, remote_run, stage=stage())
  assert re.search(r'Checkpoint step 6 in gs://\S+ is damaged .*moved it to gs://\S+'
                   r'/checkpoints_damaged/6 and restored', caplog.text)
  assert (run / 'checkpoints_damaged' / '6' / 'state').is_dir()
  assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['3', '8']
  assert os.listdir(tmp_path) == ['local']


def test_a_second_trainer_on_a_cloud_storage_run_is_refused_until_its_heartbeat_stops(
    make_tiny_clip_config, remote_run, caplog):
  """A lock held on another host: refused while its heartbeat is fresh, taken over with a
  warning once it is older than STALE_AFTER_SECONDS (a preempted VM never removes its lock)."""
  config = make_tiny_clip_config(**{'num_train_steps': 2, 'checkpoint.every_steps': 0})
  lock = workdir_lib.path(remote_run) / workdir_lib.LOCK_NAME
  holder = {'host': 'tpu-vm-7', 'pid': 4242, 'started': '2026-01-01T00:00:00+00:00'}
  lock.write_text(json.dumps(dict(holder, heartbeat=workdir_lib._now())))  # pylint: disable=protected-access
  stage = test_reliability._LinearStage(config)  # pylint: disable=protected-access
  with pytest.raises(workdir_lib.WorkdirLockedError,
                     match=r'is in use by another trainer \(pid 4242 on tpu-vm-7 since'):
    train.train_and_evaluate(config, remote_run, stage=stage)
  assert not (workdir_lib.path(remote_run) / 'checkpoints').exists()
  lock.write_text(json.dumps(dict(holder, heartbeat='2026-01-01T00:10:00+00:00')))
  assert train.train_and_evaluate(config, remote_run, stage=stage)
  assert re.search(r'Taking over the stale lock of gs://\S+ \(pid 4242 on tpu-vm-7 since .*: no '
                   r'heartbeat for \d+ s\)', caplog.text)
  assert not lock.exists()


def test_the_lock_is_created_exclusively_and_kept_alive_by_its_heartbeat(
    gcs_bucket, monkeypatch, tmp_path):
  """On Cloud Storage (an upload with ifGenerationMatch=0), fsspec's memory:// and a local
  disk: of two creations the second fails, also when both checked that none exists; the
  holder's heartbeat advances while it runs, so a trainer elsewhere keeps refusing; a lock from
  another host that stopped beating is taken over; the lock is removed when the holder ends."""
  for workdir in (f'{gcs_bucket}/locks-{time.time_ns()}/run',
                  f'memory://locks-{time.time_ns()}/run', str(tmp_path / 'run')):
    monkeypatch.setattr(workdir_lib, 'HEARTBEAT_SECONDS', 0.05)
    lock = workdir_lib._LockFile(workdir)  # pylint: disable=protected-access
    assert lock.create({'pid': 1}) and not lock.create({'pid': 2})
    assert lock.read() == {'pid': 1}
    if lock.remote:   # two trainers that both found no lock: the store refuses the second
      with pytest.raises(FileExistsError):
        lock.fs.pipe_file(lock.name, b'{"pid": 2}', mode='create')
      assert lock.read() == {'pid': 1}
    lock.remove()
    with workdir_lib.locked(workdir):
      first = lock.read()
      assert (first['host'], first['pid']) == (socket.gethostname(), os.getpid())
      time.sleep(0.3)
      assert lock.read()['heartbeat'] > first['heartbeat']
      with workdir_lib.locked(workdir):   # re-entrant in the holder's own process
        pass
      assert lock.read()['pid'] == os.getpid()
      # Quiet this holder's heartbeat first (it sleeps on after one more beat), so that it cannot
      # write itself back between its read of the lock and the replacement below.
      monkeypatch.setattr(workdir_lib, 'HEARTBEAT_SECONDS', 3600.0)
      time.sleep(0.3)
      other = dict(first, host='elsewhere')
      lock.replace(other)
      with pytest.raises(workdir_lib.WorkdirLockedError, match='pid .* on elsewhere'):
        with workdir_lib.locked(workdir):
          pass
      monkeypatch.setattr(workdir_lib, 'STALE_AFTER_SECONDS', 0.2)
      time.sleep(0.5)
      with workdir_lib.locked(workdir):   # taken over: it is this process's now
        assert workdir_lib._is_mine(lock.read())  # pylint: disable=protected-access
      monkeypatch.setattr(workdir_lib, 'STALE_AFTER_SECONDS', 600.0)
    assert lock.read() is None


def test_files_written_whole_on_cloud_storage(gcs_bucket):
  """JSON files, moves and removals on gs:// (what exports, damaged checkpoints and stale
  stages use)."""
  root = workdir_lib.path(f'{gcs_bucket}/files-{time.time_ns()}')
  workdir_lib.atomic_write_json(root / 'a' / 'x.json', {'v': 1})
  workdir_lib.atomic_write_json(root / 'a' / 'x.json', {'v': 2})
  (root / 'a' / 'sub').mkdir(parents=True, exist_ok=True)
  (root / 'a' / 'sub' / 'y.bin').write_bytes(b'123')
  assert workdir_lib.read_json(root / 'a' / 'x.json') == {'v': 2}
  target = workdir_lib.free_name(root / 'b')
  workdir_lib.move(root / 'a', target)
  assert not (root / 'a').exists()
  assert (target / 'sub' / 'y.bin').read_bytes() == b'123'
  assert workdir_lib.free_name(root / 'b') == root / 'b.1'
  workdir_lib.remove_tree(target)
  assert not target.exists()
  fs, _ = fsspec.core.url_to_fs(os.fspath(root))
  assert not fs.exists(os.fspath(root / 'b'))


def test_a_clip_exported_to_cloud_storage_loads_with_its_tokenizer_and_re_exports(
    make_tiny_clip_config, gcs_bucket, tmp_path):
  """A CLIP with a BPE vocabulary (merges.txt + vocab.json) exported to gs:// carries its
  tokenizer there; loaded from the bucket it tokenizes and embeds as the original; exported
  again over itself (its tokenizer then read from the export being replaced) it still loads."""
  from unclip_jax.stages import clip as clip_stage  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  vocab, merges = helpers.tiny_clip_vocab()
  (tmp_path / 'vocab.json').write_text(json.dumps(vocab))
  (tmp_path / 'merges.txt').write_text(
      '#version: 0.2\n' + '\n'.join(f'{a} {b}' for a, b in merges) + '\n')
  config = make_tiny_clip_config(**{'tokenizer.kind': 'clip_bpe', 'model.text.vocab_size': 544,
                                    'model.text.eot_id': 524,
                                    'tokenizer.path': str(tmp_path / 'merges.txt')})
  original = clip_stage.random_clip(config)
  remote = f'{gcs_bucket}/clip-{time.time_ns()}/export'
  clip_stage.save_frozen(remote, original.params, config)
  saved = workdir_lib.read_json(f'{remote}/config.json')['tokenizer']
  assert saved['path'] == 'tokenizer/merges.txt'
  assert sorted(p.name for p in (workdir_lib.path(remote) / 'tokenizer').iterdir()) == [
      'merges.txt', 'vocab.json']
  texts = ['the cat', 'a photo of the dog']
  for _ in range(2):
    loaded = clip_stage.load_frozen(remote)
    np.testing.assert_array_equal(loaded.tokenizer(texts), original.tokenizer(texts))
    tokens = original.tokenizer(texts)
    np.testing.assert_array_equal(np.asarray(loaded.encode_text(tokens)[0]),
                                  np.asarray(original.encode_text(tokens)[0]))
    clip_stage.save_frozen(remote, loaded.params, loaded.config)   # over itself


def test_embedding_parts_on_cloud_storage_are_listed_only_when_whole_and_looked_up(gcs_bucket):
  """Precomputed embeddings in a gs:// job directory: parts written in place count once their
  state.json (written last) is there; the table reads them (whole, not memory-mapped) and
  looks samples up by key."""
  from unclip_jax.data import embeddings  # pylint: disable=g-import-not-at-top
  folder = f'{gcs_bucket}/embeddings-{time.time_ns()}'
  rng = np.random.default_rng(0)
  keys = [[f'a{i}' for i in range(5)], [f'b{i}' for i in range(3)]]
  emb = [rng.normal(size=(len(k), 4)).astype(np.float32) for k in keys]
  for chunk, (k, e) in enumerate(zip(keys, emb)):
    embeddings.write_part(folder, 'train', 0, chunk, k, e, -e, {'count': 5 * (chunk + 1)})
  (workdir_lib.path(folder) / 'train' / embeddings.part_name(0, 2)).mkdir()
  (workdir_lib.path(folder) / 'train' / embeddings.part_name(0, 2) / 'ids.npy').write_bytes(b'')
  parts = embeddings.finished_parts(folder, 'train', 0)
  assert [p.rsplit('/', 1)[1] for p in parts] == [embeddings.part_name(0, c) for c in (0, 1)]
  assert parts[0].startswith('gs://') and embeddings.part_state(parts[1]) == {'count': 10}
  table = embeddings.EmbeddingTable(folder, 'train')
  found = table.lookup(['b2', 'a0', 'a4'])
  np.testing.assert_array_equal(found['clip_image_emb'], np.stack([emb[1][2], emb[0][0],
                                                                   emb[0][4]]))
  np.testing.assert_array_equal(found['clip_text_emb'], -found['clip_image_emb'])


def test_fid_statistics_on_cloud_storage(gcs_bucket):
  """unclip-evaluate's reference statistics (pytorch-fid's .npz) written to and read from gs://;
  a file that is not one gets the one-line error."""
  from unclip_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
  stats = fid.statistics(np.random.default_rng(0).normal(size=(50, 8)))
  path = f'{gcs_bucket}/eval-{time.time_ns()}/reference.npz'
  fid.save_statistics(path, stats)
  loaded = fid.load_statistics(path)
  np.testing.assert_array_equal(loaded.mu, stats.mu)
  np.testing.assert_array_equal(loaded.sigma, stats.sigma)
  assert loaded.count == 50
  workdir_lib.path(path).write_bytes(b'not an npz')
  with pytest.raises(ValueError, match='reference.npz: cannot read FID statistics|not FID'):
    fid.load_statistics(path)
