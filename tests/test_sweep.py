"""Config sweeps: building points, checking them, emitting cluster commands, and a 3-point sweep
of tiny CLIP runs that is stopped, resumed and summarised."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests import xla_flags
from unclip_jax import config_lib
from unclip_jax import sweep as sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_product_and_zipit_build_the_points_in_order():
  lrs = sweep_lib.sweep('optim.lr', [1e-4, 1e-3])
  batches = sweep_lib.sweep('batch_size', [16, 32])
  assert sweep_lib.product(lrs, batches) == [
      {'optim.lr': 1e-4, 'batch_size': 16}, {'optim.lr': 1e-4, 'batch_size': 32},
      {'optim.lr': 1e-3, 'batch_size': 16}, {'optim.lr': 1e-3, 'batch_size': 32}]
  assert sweep_lib.zipit(lrs, batches) == [{'optim.lr': 1e-4, 'batch_size': 16},
                                           {'optim.lr': 1e-3, 'batch_size': 32}]
  with pytest.raises(sweep_lib.SweepError, match='different lengths'):
    sweep_lib.zipit(lrs, sweep_lib.sweep('seed', [0, 1, 2]))
  with pytest.raises(sweep_lib.SweepError, match="'optim.lr' is swept twice"):
    sweep_lib.product(lrs, lrs)
  with pytest.raises(sweep_lib.SweepError, match='no values'):
    sweep_lib.sweep('seed', [])


def test_point_names_and_flag_values():
  assert sweep_lib.point_name({'optim.lr': 0.001, 'batch_size': 16}) == (
      'optim.lr=0.001,batch_size=16')
  assert sweep_lib.point_name({'model.unet.channel_mult': (1, 2, 2)}) == (
      'model.unet.channel_mult=1,2,2')
  assert sweep_lib.point_name({'data.name': 'a/b c'}) == 'data.name=a-b-c'
  long = sweep_lib.point_name({f'field_{i}': i for i in range(30)})
  assert len(long) <= 100 and long != sweep_lib.point_name({f'field_{i}': i + 1
                                                           for i in range(30)})
  assert sweep_lib.format_value((1, 2, 2)) == '(1,2,2)'
  assert sweep_lib.format_value((4,)) == '(4,)'
  assert sweep_lib.format_value(True) == 'True' and sweep_lib.format_value(3e-4) == '0.0003'


def _write(path, text):
  with open(path, 'w') as f:
    f.write(text)
  return str(path)


def test_sweep_files_and_points_are_checked_before_anything_runs(tmp_path):
  config = config_lib.load_config_file(os.path.join(REPO, 'configs', 'clip.py')).get_config(
      'tiny')
  config.lock()
  points = sweep_lib.load_sweep(os.path.join(REPO, 'configs', 'sweeps', 'clip_tiny.py:product'))
  assert len(points) == 9
  sweep_lib.check_points(config, points)
  assert len(sweep_lib.load_sweep(os.path.join(REPO, 'configs', 'sweeps', 'decoder_lr.py'))) == 6
  with pytest.raises(sweep_lib.SweepError, match=r"no field 'optim.lrr' \(did you mean "
                                                 r"'optim.lr'\?\)"):
    sweep_lib.check_points(config, [{'optim.lrr': 1e-3}])
  with pytest.raises(sweep_lib.SweepError, match='point batch_size=big: .*batch_size'):
    sweep_lib.check_points(config, [{'batch_size': 'big'}])
  with pytest.raises(sweep_lib.SweepError, match='defines no get_sweep'):
    sweep_lib.load_sweep(_write(tmp_path / 'a.py', 'x = 1\n'))
  with pytest.raises(sweep_lib.SweepError, match='points repeat: seed=1'):
    sweep_lib.load_sweep(_write(tmp_path / 'b.py', 'def get_sweep():\n'
                                '  return [{"seed": 1}, {"seed": 1}]\n'))
  with pytest.raises(sweep_lib.SweepError, match='non-empty list'):
    sweep_lib.load_sweep(_write(tmp_path / 'c.py', 'def get_sweep():\n  return []\n'))
  with pytest.raises(sweep_lib.SweepError, match='does not exist'):
    sweep_lib.load_sweep(str(tmp_path / 'missing.py'))


def _sweep_command(*args, env=None, **kw):
  return subprocess.run([sys.executable, '-m', 'unclip_jax.sweep', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False, **kw)


def test_emitted_commands_and_slurm_array_script(tmp_path):
  args = ['--config=configs/clip.py:tiny', '--config.num_train_steps=50',
          '--sweep=configs/sweeps/clip_tiny.py', f'--workdir={tmp_path}/sw']
  result = _sweep_command(*args, '--emit=commands')
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3
  assert lines[1].endswith('--workdir=' + f'{tmp_path}/sw --point=optim.lr=0.001,batch_size=128')
  assert '--config.num_train_steps=50' in lines[0]
  result = _sweep_command(*args, '--emit=slurm')
  assert result.returncode == 0, result.stderr[-2000:]
  script = _write(tmp_path / 'sweep.sbatch', result.stdout)
  assert '#SBATCH --array=0-2' in result.stdout
  assert '"--point=$SLURM_ARRAY_TASK_ID"' in result.stdout
  shellcheck = os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  checked = subprocess.run([shellcheck, '--shell=bash', script], capture_output=True, text=True,
                           check=False)
  assert checked.returncode == 0, checked.stdout
  # Nothing ran, and a bad point is refused in one line.
  assert not os.path.exists(tmp_path / 'sw')
  result = _sweep_command(*args[:2], '--sweep=' + _write(
      tmp_path / 'bad.py', 'def get_sweep():\n  return [{"optim.lrr": 1}]\n'),
      f'--workdir={tmp_path}/sw')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "Error: point optim.lrr=1: the config has no field 'optim.lrr' (did you mean 'optim.lr'?)")


def test_a_three_point_sweep_runs_is_stopped_resumes_and_summarises(data_dir, tmp_path):
  """Tiny CLIP runs: point 0 first on its own; then the whole sweep skips it, is sent SIGTERM
  while point 1 trains (point 1 checkpoints, point 2 does not start), and the same command
  resumes point 1 and runs point 2; the summary has every point's metrics and a plot."""
  sweep_file = _write(tmp_path / 'lr.py', (
      'from unclip_jax.sweep import sweep, zipit\n'
      'def get_sweep():\n'
      '  return zipit(sweep("optim.lr", [1e-3, 2e-3, 4e-3]),\n'
      '               sweep("num_train_steps", [4, 150, 4]))\n'))
  workdir = str(tmp_path / 'sweep')
  args = ['--config=configs/clip.py:tiny', f'--sweep={sweep_file}', f'--workdir={workdir}',
          '--config.log_every_steps=1', '--config.checkpoint.every_steps=0',
          '--config.data.resolution=16', '--config.data.num_train=256',
          '--config.data.num_test=64', '--config.batch_size=16', '--config.eval.batch_size=64',
          f'--config.data.data_dir={data_dir}', '--config.model.text.depth=1',
          '--config.model.vision.depth=1', '--config.sample_every_steps=0']
  env = dict(os.environ, UNCLIP_DATA_DIR=data_dir, TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS='--xla_backend_optimization_level=0' + xla_flags.fast_compile())
  names = ['optim.lr=0.001,num_train_steps=4', 'optim.lr=0.002,num_train_steps=150',
           'optim.lr=0.004,num_train_steps=4']

  result = _sweep_command(*args, '--point=0', env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  first = os.path.join(workdir, names[0])
  finished_at = os.path.getmtime(os.path.join(first, 'eval_metrics.json'))

  log = open(tmp_path / 'sweep.log', 'w+')  # pylint: disable=consider-using-with
  process = subprocess.Popen([sys.executable, '-m', 'unclip_jax.sweep', *args], cwd=REPO,
                             env=env, stdout=log, stderr=subprocess.STDOUT)
  point_log = os.path.join(workdir, names[1], 'run.log')
  try:
    for _ in range(1800):   # until point 1 is training (at most 180 s)
      if process.poll() is not None:
        break
      if os.path.exists(point_log) and re.search(r'\[3\] .*train/loss=', open(point_log).read()):
        break
      time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    returncode = process.wait(timeout=180)
  finally:
    process.kill()
  log.seek(0)
  output = log.read()
  assert returncode == 0, output[-3000:]
  assert f'Point 1/3 {names[0]}: finished earlier; skipped' in output
  assert f'Point {names[1]} stopped' in output and 'the same command resumes it' in output
  assert not os.path.exists(os.path.join(workdir, names[2]))
  stopped = sweep_lib.summarize(workdir)
  assert [r['status'] for r in stopped['rows']][0] == 'finished'
  assert re.fullmatch(r'checkpoint at step \d+', stopped['rows'][1]['status'])
  assert stopped['rows'][2]['status'] == 'not started'

  result = _sweep_command(*args, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.getmtime(os.path.join(first, 'eval_metrics.json')) == finished_at
  assert re.search(r'Resumed from .* at step \d+', open(point_log).read())
  assert 'Sweep ' in result.stderr and '1 skipped, 2 finished' in result.stderr

  result = _sweep_command(f'--summarize={workdir}', '--metric=zero_shot_shape_accuracy', env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, 'summary.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['point'] for r in rows] == names
  assert all(r['status'] == 'finished' for r in rows)
  assert [float(r['optim.lr']) for r in rows] == [1e-3, 2e-3, 4e-3]
  for name, row in zip(names, rows):
    with open(os.path.join(workdir, name, 'eval_metrics.json')) as f:
      metrics = json.load(f)
    assert float(row['zero_shot_shape_accuracy']) == pytest.approx(
        metrics['zero_shot_shape_accuracy'], rel=1e-3)
  assert result.stdout.count('| finished |') == 3
  with open(os.path.join(workdir, 'summary.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  # Other common overrides would resume the points under another config: refused.
  result = _sweep_command(*args[:3], '--config.batch_size=32', env=env)
  assert result.returncode == 1
  assert 'records overrides' in result.stderr.strip().splitlines()[-1]


def test_a_sweep_directory_on_cloud_storage_records_runs_and_summarises(
    gcs_bucket, monkeypatch, tmp_path):
  """A gs:// sweep directory (a local emulator): the record, a finished point skipped, a point
  run with its log copied beside it, and the summary (table, CSV, plot) written in the bucket;
  nothing lands on the local disk but the running point's log in the user's cache."""
  from unclip_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  workdir = f'{gcs_bucket}/sweep-{time.time_ns()}'
  points = [{'optim.lr': 1e-3}, {'optim.lr': 2e-3}, {'optim.lr': 4e-3}]
  s = sweep_lib.Sweep('configs/clip.py:tiny', [], 'lr.py', points, workdir, job=False)
  s.record()
  finished = workdir_lib.path(s.point_dir(0))
  config = config_lib.preset('clip', 'tiny')
  config.num_train_steps = 5
  for name in ('config.json', 'export/config.json'):
    workdir_lib.atomic_write_text(finished / name, config.to_json())
  workdir_lib.atomic_write_json(finished / 'eval_metrics.json', {'accuracy': 0.5})
  (finished / 'checkpoints' / '5').mkdir(parents=True)
  (finished / 'checkpoints' / '5' / 'commit_success.txt').write_text('')
  (workdir_lib.path(s.point_dir(1)) / 'checkpoints' / '3').mkdir(parents=True)
  (workdir_lib.path(s.point_dir(1)) / 'checkpoints' / '3' / 'x').write_text('')
  monkeypatch.setattr(s, 'command', lambda i: [sys.executable, '-c', f'print("point {i} ran")'])
  stopper = sweep_lib._Forwarder()  # pylint: disable=protected-access
  assert s.run_point(0, stopper) == 'skipped'
  assert s.run_point(2, stopper) == 'stopped'   # the fake command trains nothing
  assert 'point 2 ran' in (workdir_lib.path(s.point_dir(2)) / 'run.log').read_text()
  summary = sweep_lib.summarize(workdir)
  assert [r['status'] for r in summary['rows']] == ['finished', 'checkpoint at step 3',
                                                    'not started']
  root = workdir_lib.path(workdir)
  assert workdir_lib.read_json(root / sweep_lib.SWEEP_RECORD)['points'] == {
      n: p for n, p in zip(s.names, points)}
  assert '| finished |' in (root / 'summary.md').read_text()
  assert (root / 'summary.csv').read_text().splitlines()[1].startswith(s.names[0])
  assert os.listdir(tmp_path) == ['home']
  for s_ in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s_, signal.SIG_DFL)
