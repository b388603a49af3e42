"""Two JAX processes on 127.0.0.1: sharded data, global batches, checkpoints and resuming."""

import json
import os
import subprocess
import sys

import portpicker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_process_training_and_resume(data_dir, tmp_path):
  from unclip_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
  captioned_shapes.prepare(data_dir, resolution=16, num_train=256, num_test=64)  # once, up front
  port = portpicker.pick_unused_port()
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', UNCLIP_DATA_DIR=data_dir)
  procs = [subprocess.Popen([sys.executable, 'tests/multihost_worker.py', str(port), str(i),
                             str(tmp_path), data_dir], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  results = [json.loads((tmp_path / f'result_{i}.json').read_text()) for i in range(2)]
  # SIGTERM to one process: both stopped after the same step (the other was told by JAX's
  # coordination service), each saying so, with a checkpoint there.
  stopped_at = results[0]['stopped_at']
  assert 3 <= stopped_at < 6 and results[1]['stopped_at'] == stopped_at, results
  assert [r['stopped'] for r in results] == [{}, {}]
  assert [r['received'] for r in results] == ['SIGTERM', 'SIGTERM']
  assert all(f'Stopped after step {stopped_at}' in out for out in outputs)
  # Resumed, both processes evaluate the same global parameters.
  assert results[0]['metrics'] and results[0]['metrics'] == results[1]['metrics']
  data_states = sorted(os.listdir(tmp_path / 'checkpoints' / '6' / 'data'))
  assert 'process_0-of-2.json' in data_states and 'process_1-of-2.json' in data_states
  assert sorted(os.listdir(tmp_path / 'checkpoints'), key=int) == sorted(
      {str(stopped_at), '4', '6'}, key=int)
