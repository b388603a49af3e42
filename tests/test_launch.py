"""The launchers: shellcheck, the TPU launcher against a stand-in gcloud (creation, the run on
every worker, restarts after preemption, --resume, --dry_run), the SLURM script's dry run and its
run under stand-in scontrol/srun, and the environment → jax.distributed mapping."""

import glob
import json
import os
import shlex
import subprocess
import sys

import pytest

from unclip_jax import multihost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELLCHECK = os.path.join(os.path.dirname(sys.executable), 'shellcheck')


def test_the_shell_scripts_pass_shellcheck():
  scripts = sorted(glob.glob(os.path.join(REPO, 'launch', '*.sh')) +
                   glob.glob(os.path.join(REPO, 'launch', '*.sbatch')) +
                   glob.glob(os.path.join(REPO, '.ci', '*')))
  assert len(scripts) >= 5
  result = subprocess.run([SHELLCHECK, '--shell=bash', *scripts], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout


def _bash(args, env=None, cwd=REPO):
  return subprocess.run(['bash', *args], cwd=cwd, env=dict(os.environ, **(env or {})),
                        capture_output=True, text=True, timeout=120, check=False)


def _commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


TRAIN = ['python', '-m', 'unclip_jax.main', '--config=configs/decoder.py:karlo',
         '--workdir=gs://bucket/runs/decoder', "--config.data.name=it's here"]


def test_tpu_dry_run_prints_every_command(tmp_path):
  result = _bash(['launch/tpu.sh', '--name=pod', '--zone=us-east5-a', '--accelerator=v5p-64',
                  '--project=proj', '--spot', '--dry_run', '--', *TRAIN],
                 env={'UNCLIP_LAUNCH_STATE': str(tmp_path)})
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  where = ['--zone=us-east5-a', '--project=proj']
  tpu = ['gcloud', 'compute', 'tpus', 'tpu-vm']
  assert commands[0] == [*tpu, 'describe', 'pod', *where, '--format=value(state)']
  assert commands[1] == [*tpu, 'create', 'pod', *where, '--accelerator-type=v5p-64',
                         '--version=v2-alpha-tpuv5', '--spot']
  assert commands[3][:4] == [*tpu[:3], 'tpu-vm'] and commands[3][4] == 'scp'
  assert commands[3][-1] == '--worker=all'
  ssh = [c for c in commands if c[4:5] == ['ssh']]
  assert [c[:8] for c in ssh] == [[*tpu, 'ssh', 'pod', *where]] * 3
  assert all('--worker=all' in c for c in ssh)
  assert ssh[1][-1] == '--command=set -e; cd unclip_jax && bash launch/setup.sh --tpu'
  remote = shlex.split(ssh[2][-1][len('--command='):])
  # The training command, word for word, on the workers' interpreter, with --distributed, its
  # output in a per-worker log.
  start = remote.index('.venv/bin/python')
  assert remote[start:start + len(TRAIN) + 1] == ['.venv/bin/python', *TRAIN[1:],
                                                  '--distributed']
  assert 'logs/$(hostname).log;' in remote
  assert os.listdir(tmp_path) == []   # a dry run saves no command for --resume


def _fake_gcloud(tmp_path, states):
  """A `gcloud` on PATH that logs its arguments and answers `describe` with the next of `states`
  (NONE: no such VM); `ssh --command` runs nothing and succeeds."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (tmp_path / 'states').write_text('\n'.join(states) + '\n')
  script = bin_dir / 'gcloud'
  script.write_text(
      '#!/bin/bash\n'
      'printf "%s\\n" "$*" >> "$FAKE_DIR/calls"\n'
      'if [[ " $* " == *" describe "* ]]; then\n'
      '  state=$(head -n 1 "$FAKE_DIR/states"); sed -i 1d "$FAKE_DIR/states"\n'
      '  [ "$state" = NONE ] && exit 1\n'
      '  echo "$state"\n'
      'fi\n')
  script.chmod(0o755)
  return {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'FAKE_DIR': str(tmp_path),
          'UNCLIP_LAUNCH_STATE': str(tmp_path / 'state')}


def test_tpu_launcher_creates_runs_restarts_after_preemption_and_resumes(tmp_path):
  # Absent → created; after the run the VM is PREEMPTED → deleted, created, rerun; then READY.
  env = _fake_gcloud(tmp_path, ['NONE', 'PREEMPTED', 'PREEMPTED', 'READY'])
  result = _bash(['launch/tpu.sh', '--name=pod', '--zone=z', '--accelerator=v4-32', '--spot',
                  '--max_restarts=1', '--', *TRAIN], env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  calls = (tmp_path / 'calls').read_text().splitlines()
  verbs = [c.split()[3] if c.startswith('compute tpus tpu-vm') else c for c in calls]
  assert verbs == ['describe', 'create', 'scp', 'ssh', 'ssh', 'ssh', 'describe',
                   'describe', 'delete', 'create', 'scp', 'ssh', 'ssh', 'ssh', 'describe']
  assert 'restart 1 of 1' in result.stdout
  assert 'the command finished on every worker of pod' in result.stdout
  assert sum('--distributed' in c for c in calls) == 2
  # --resume: the saved command again, on the VM that is still there.
  (tmp_path / 'calls').unlink()
  (tmp_path / 'states').write_text('READY\nREADY\n')
  result = _bash(['launch/tpu.sh', '--name=pod', '--zone=z', '--resume'], env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  calls = (tmp_path / 'calls').read_text().splitlines()
  assert not any(' create ' in c for c in calls)
  remote = shlex.split(calls[-2].split('--command=', 1)[1])
  assert remote[remote.index('.venv/bin/python') + len(TRAIN) - 1] == "--config.data.name=it's here"
  # Preempted with no restarts left: exit 1 and the command to resume.
  (tmp_path / 'states').write_text('READY\nPREEMPTED\n')
  result = _bash(['launch/tpu.sh', '--name=pod', '--zone=z', '--resume'], env=env)
  assert result.returncode == 1
  assert "--resume' reruns the command" in result.stderr


@pytest.mark.parametrize('args, message', [
    (['--zone=z', '--', 'x'], '--name is required'),
    (['--name=a', '--zone=z', '--bogus'], 'unknown flag --bogus'),
    (['--name=a', '--zone=z', '--max_restarts=two', '--', 'x'], '--max_restarts must be a number'),
    (['--name=a', '--zone=z'], 'no training command'),
])
def test_tpu_launcher_refuses_bad_flags_in_one_line(tmp_path, args, message):
  result = _bash(['launch/tpu.sh', *args], env={'UNCLIP_LAUNCH_STATE': str(tmp_path)})
  assert result.returncode == 2
  assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_tpu_launcher_needs_an_accelerator_to_create(tmp_path):
  env = _fake_gcloud(tmp_path, ['NONE'])
  result = _bash(['launch/tpu.sh', '--name=pod', '--zone=z', '--', *TRAIN], env=env)
  assert result.returncode == 2
  assert 'pod does not exist: --accelerator is needed to create it' in result.stderr


def _slurm_dry_run(**env):
  result = _bash(['launch/slurm.sbatch', '--dry_run', *TRAIN], env=env)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  args = [json.loads(line.split('initialize(**', 1)[1][:-1]) for line in lines
          if 'initialize(**' in line]
  return _commands(result.stdout)[0], args


def test_slurm_dry_run_one_process_per_gpu_and_per_node():
  srun, args = _slurm_dry_run(DRY_NODES='2', DRY_TASKS_PER_NODE='4', DRY_GPUS_PER_NODE='4',
                              DRY_NODELIST='gpu-a,gpu-b', DRY_JOB_ID='7')
  assert srun[:5] == ['srun', '--kill-on-bad-exit=1', '--nodes=2', '--ntasks=8',
                      '--ntasks-per-node=4']
  assert srun[5].endswith('.venv/bin/python') and srun[6:] == [*TRAIN[1:], '--distributed']
  assert [a['process_id'] for a in args] == list(range(8))
  assert {a['num_processes'] for a in args} == {8}
  assert {a['coordinator_address'] for a in args} == {f'gpu-a:{61440 + 7}'}
  assert [a['local_device_ids'] for a in args] == [[0], [1], [2], [3]] * 2
  _, args = _slurm_dry_run(DRY_NODES='3', DRY_TASKS_PER_NODE='1', DRY_GPUS_PER_NODE='8',
                           JAX_COORDINATOR_PORT='1234')
  assert [a['local_device_ids'] for a in args] == [list(range(8))] * 3
  assert {a['coordinator_address'] for a in args} == {'node1:1234'}


def test_slurm_script_runs_srun_inside_an_allocation_and_refuses_outside(tmp_path):
  result = _bash(['launch/slurm.sbatch', *TRAIN])
  assert result.returncode == 2 and 'not inside a SLURM allocation' in result.stderr
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'scontrol').write_text('#!/bin/bash\nprintf "n01\\nn02\\n"\n')
  (bin_dir / 'srun').write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_DIR/srun_args"\n'
                                'echo "$JAX_COORDINATOR_ADDRESS" > "$FAKE_DIR/coordinator"\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'FAKE_DIR': str(tmp_path),
         'SLURM_JOB_ID': '100', 'SLURM_JOB_NODELIST': 'n[01-02]', 'SLURM_JOB_NUM_NODES': '2',
         'SLURM_NTASKS': '2', 'SLURM_GPUS_ON_NODE': '8', 'SLURM_SUBMIT_DIR': REPO}
  result = _bash([os.path.join(REPO, 'launch', 'slurm.sbatch'), *TRAIN], env=env,
                 cwd=str(tmp_path))
  assert result.returncode == 0, result.stdout + result.stderr
  assert '2 processes on 2 nodes (1 per node), coordinator n01:61540' in result.stdout
  srun = (tmp_path / 'srun_args').read_text().splitlines()
  assert srun[:4] == ['--kill-on-bad-exit=1', '--nodes=2', '--ntasks=2', '--ntasks-per-node=1']
  assert srun[5:] == [*TRAIN[1:], '--distributed']
  assert (tmp_path / 'coordinator').read_text().strip() == 'n01:61540'


SLURM = {'SLURM_JOB_ID': '5', 'SLURM_NTASKS': '16', 'SLURM_PROCID': '9', 'SLURM_LOCALID': '1',
         'SLURM_STEP_NUM_NODES': '2', 'SLURM_GPUS_ON_NODE': '8'}


def test_distributed_args_from_the_environment():
  assert multihost.distributed_args({}) == {}     # TPU VMs: JAX detects the pod itself
  assert multihost.distributed_args({'TPU_WORKER_ID': '3'}) == {}
  assert multihost.distributed_args(SLURM) == {'num_processes': 16, 'process_id': 9,
                                               'local_device_ids': [1]}
  # One process per node drives all its GPUs; a task that sees one GPU drives that one.
  per_node = dict(SLURM, SLURM_NTASKS='2', SLURM_PROCID='1', SLURM_LOCALID='0')
  assert multihost.distributed_args(per_node)['local_device_ids'] == list(range(8))
  assert multihost.distributed_args(dict(per_node, CUDA_VISIBLE_DEVICES='4,5'))[
      'local_device_ids'] == [0, 1]
  assert multihost.distributed_args(dict(SLURM, CUDA_VISIBLE_DEVICES='3'))[
      'local_device_ids'] == [0]
  explicit = {'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '2',
              'JAX_LOCAL_DEVICE_IDS': '0,1'}
  assert multihost.distributed_args(explicit) == {
      'coordinator_address': 'h:1', 'num_processes': 4, 'process_id': 2,
      'local_device_ids': [0, 1]}
  assert multihost.distributed_args(dict(SLURM, **explicit))['process_id'] == 2
  with pytest.raises(ValueError, match="SLURM_PROCID='x' is not an integer"):
    multihost.distributed_args(dict(SLURM, SLURM_PROCID='x'))
  with pytest.raises(ValueError, match='process id 16 is not below the process count 16'):
    multihost.distributed_args(dict(SLURM, SLURM_PROCID='16'))
  with pytest.raises(ValueError, match='JAX_LOCAL_DEVICE_IDS'):
    multihost.distributed_args({'JAX_LOCAL_DEVICE_IDS': 'a,b'})


def test_tpu_launcher_clones_a_repository_at_a_ref_when_asked(tmp_path):
  result = _bash(['launch/tpu.sh', '--name=pod', '--zone=z', '--accelerator=v6e-8', '--queued',
                  '--repo=https://example.com/unclip_jax.git', '--ref=v0.2', '--dry_run', '--',
                  *TRAIN], env={'UNCLIP_LAUNCH_STATE': str(tmp_path)})
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  assert commands[1] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'pod',
                         '--node-id=pod', '--zone=z', '--accelerator-type=v6e-8',
                         '--runtime-version=v2-alpha-tpuv6e']
  assert not any('scp' in c for c in commands)
  clone = shlex.split(commands[2][-1][len('--command='):].replace(';', ' ;'))
  assert clone[clone.index('clone'):clone.index('clone') + 4] == [
      'clone', '--quiet', 'https://example.com/unclip_jax.git', 'unclip_jax']
  assert ['fetch', '--quiet', 'origin', 'v0.2'] == clone[clone.index('fetch'):
                                                       clone.index('fetch') + 4]
