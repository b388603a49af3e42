"""Two JAX processes on 127.0.0.1, started as launch/slurm.sbatch starts them: sharded data, global
batches, checkpoints and resuming."""

import json
import os
import shlex
import subprocess

import portpicker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_process_training_and_resume(data_dir, tmp_path):
  from unclip_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
  captioned_shapes.prepare(data_dir, resolution=16, num_train=256, num_test=64)  # once, up front
  port = portpicker.pick_unused_port()
  # The SLURM launcher's dry run for one node of two processes: the command srun would start and
  # the environment each process gets; the processes below start with exactly those.
  command, envs = slurm_dry_run(['python', 'tests/multihost_worker.py', str(tmp_path), data_dir],
                                DRY_NODES='1', DRY_TASKS_PER_NODE='2', DRY_GPUS_PER_NODE='0',
                                DRY_NODELIST='127.0.0.1', JAX_COORDINATOR_PORT=str(port))
  assert command[-3:] == [str(tmp_path), data_dir, '--distributed']
  assert [e['SLURM_PROCID'] for e in envs] == ['0', '1']
  assert {e['JAX_COORDINATOR_ADDRESS'] for e in envs} == {f'127.0.0.1:{port}'}
  base = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', UNCLIP_DATA_DIR=data_dir)
  procs = [subprocess.Popen(command, cwd=REPO, env={**base, **e}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for e in envs]
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


def slurm_dry_run(command: list[str], **env) -> tuple[list[str], list[dict]]:
  """`bash launch/slurm.sbatch --dry_run COMMAND` with `env`: (the command srun runs, without
  srun and its options; the environment of each process)."""
  result = subprocess.run(['bash', 'launch/slurm.sbatch', '--dry_run', *command], cwd=REPO,
                          env=dict(os.environ, **env), capture_output=True, text=True,
                          check=True, timeout=60)
  lines = result.stdout.splitlines()
  srun = shlex.split(lines[0][2:])
  assert srun[0] == 'srun', lines[0]
  ran = [a for a in srun[1:] if not a.startswith('--')][:1]
  command_out = srun[srun.index(ran[0]):]
  envs = [dict(kv.split('=', 1) for kv in shlex.split(line.split(': env ', 1)[1]))
          for line in lines if ': env ' in line]
  return command_out, envs
