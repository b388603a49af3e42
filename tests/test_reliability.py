"""How runs end when things go wrong: signals, diverged training, two trainers on one run
directory, and files written atomically."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from unclip_jax import preemption
from unclip_jax import train
from unclip_jax import workdir as workdir_lib
from tests import test_train
from tests import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _restore_state(workdir, step):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'state'))


class _LinearStage(test_train._RunnableLinearStage):  # pylint: disable=protected-access
  """test_train's least-squares stage (cheap to compile, with data and an export) with an
  evaluation that works, and optionally a loss that is never finite."""

  def __init__(self, config, poison: bool = False):
    super().__init__()
    self.config = config
    self.poison = poison

  def loss(self, params, batch, rng, constants):
    loss, metrics = super().loss(params, batch, rng, constants)
    return (loss * jnp.nan if self.poison else loss), metrics

  def evaluate(self, params, workdir):
    del workdir
    return {'kernel_norm': float(np.linalg.norm(np.asarray(params['kernel'])))}


def _signal_at_batch(monkeypatch, n: int, signum=signal.SIGTERM):
  """Sends `signum` to this process while the n-th batch is being assembled, i.e. during step
  n (counted from this call on)."""
  calls = {'n': 0}
  make = train.make_global_batch

  def wrapped(*args, **kwargs):
    calls['n'] += 1
    if calls['n'] == n:
      os.kill(os.getpid(), signum)
    return make(*args, **kwargs)
  monkeypatch.setattr(train, 'make_global_batch', wrapped)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(
    make_tiny_clip_config, tmp_path, monkeypatch, signum):
  """SIGTERM or SIGINT during step 3: the run finishes it, saves step 3, returns; the same
  call resumes and ends bit-identical to an uninterrupted run (parameters, optimizer state and
  data position). The handlers are the process's previous ones again afterwards."""
  config = make_tiny_clip_config(**{'num_train_steps': 6, 'checkpoint.every_steps': 0})
  whole, resumed = str(tmp_path / 'whole'), str(tmp_path / 'resumed')
  previous = signal.getsignal(signum)
  train.train_and_evaluate(config, whole, stage=_LinearStage(config))
  with monkeypatch.context() as m:
    _signal_at_batch(m, 3, signum)
    assert train.train_and_evaluate(config, resumed, stage=_LinearStage(config)) == {}
  assert preemption.received() == signal.Signals(signum).name
  assert sorted(os.listdir(os.path.join(resumed, 'checkpoints'))) == ['3']
  assert not os.path.exists(os.path.join(resumed, 'export'))
  assert signal.getsignal(signum) == previous
  preemption.clear()
  metrics = train.train_and_evaluate(config, resumed, stage=_LinearStage(config))
  assert set(metrics) == {'kernel_norm'}
  a, b = _restore_state(whole, 6), _restore_state(resumed, 6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  data = [sorted(glob.glob(os.path.join(w, 'checkpoints', '6', 'data', '*.json')))
          for w in (whole, resumed)]
  assert data[0] and [open(f).read() for f in data[0]] == [open(f).read() for f in data[1]]
  assert not os.path.exists(os.path.join(resumed, workdir_lib.LOCK_NAME))


def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_newest_intact_one_restored(
    make_tiny_clip_config, tmp_path, caplog):
  """The latest checkpoint's files overwritten: one warning naming its step, the step moved to
  checkpoints_damaged/ (not deleted), and the run resumes from the newest intact one (step 3),
  reaching the state the damaged one held. None intact: one error naming the directory and the
  steps, and nothing moved."""
  config = make_tiny_clip_config(**{'num_train_steps': 8, 'checkpoint.every_steps': 0})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir, stage=_LinearStage(config), stop_at_step=3)
  train.train_and_evaluate(config, workdir, stage=_LinearStage(config))
  whole = _restore_state(workdir, 8)

  def damage(step):
    for f in glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'state', '**', '*'),
                       recursive=True):
      if os.path.isfile(f):
        with open(f, 'wb') as fh:
          fh.write(b'garbage')
  damage(8)
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(config, workdir, stage=_LinearStage(config))
  assert re.search(r'Checkpoint step 8 in \S+ is damaged \(.*\); moved it to \S+'
                   r'checkpoints_damaged/8 and restored the newest intact one', caplog.text)
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_damaged', '8', 'state'))
  for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(_restore_state(workdir, 8))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for step in os.listdir(os.path.join(workdir, 'checkpoints')):
    damage(step)
  config.num_train_steps = 12
  with pytest.raises(RuntimeError, match=r'no checkpoint in .* can be restored \(steps \[8, 3\]\)'):
    train.train_and_evaluate(config, workdir, stage=_LinearStage(config))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '8']


def test_sigterm_to_the_training_command_checkpoints_and_exits_0(data_dir, tmp_path):
  """`python -m unclip_jax.main` on the tiny CLIP, SIGTERM once it is training: exit status 0,
  a log line saying where the checkpoint is, a checkpoint at a step before the last."""
  workdir = str(tmp_path / 'run')
  args = [sys.executable, '-m', 'unclip_jax.main', '--config=configs/clip.py:tiny',
          f'--workdir={workdir}', '--config.num_train_steps=100000',
          '--config.log_every_steps=1', '--config.checkpoint.every_steps=0',
          '--config.data.resolution=16', '--config.data.num_train=256',
          '--config.data.num_test=64', '--config.batch_size=16',
          f'--config.data.data_dir={data_dir}', '--config.model.text.depth=1',
          '--config.model.vision.depth=1']
  env = dict(os.environ, UNCLIP_DATA_DIR=data_dir,
             XLA_FLAGS='--xla_backend_optimization_level=0' + xla_flags.fast_compile())
  log = open(tmp_path / 'log.txt', 'w+')  # pylint: disable=consider-using-with
  process = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  try:
    events = os.path.join(workdir, 'events.out.tfevents.*')
    for _ in range(1200):   # until a logged step shows it is training (at most 120 s)
      if process.poll() is not None:
        break
      log.seek(0)
      if re.search(r'\[2\] .*train/loss=', log.read()):
        break
      import time  # pylint: disable=g-import-not-at-top
      time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    returncode = process.wait(timeout=120)
  finally:
    process.kill()
  log.seek(0)
  output = log.read()
  assert returncode == 0, output[-3000:]
  assert 'SIGTERM received: stopping after the current step' in output
  assert 'checkpoint saved in' in output and 'the same command resumes' in output
  (step,) = [int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))]
  assert 2 <= step < 100000 and glob.glob(events)


def test_a_diverged_run_stops_with_a_clear_error_and_never_exports(make_tiny_clip_config,
                                                                  tmp_path):
  """Every update non-finite: the run stops at the log step that sees
  `max_nonfinite_steps` of them in a row, exports nothing, and logs the true count."""
  config = make_tiny_clip_config(**{'num_train_steps': 20, 'checkpoint.every_steps': 0,
                                    'log_every_steps': 2, 'max_nonfinite_steps': 4})
  workdir = str(tmp_path / 'diverged')
  with pytest.raises(train.DivergedError,
                     match=r'training diverged: 4 updates in a row up to step 4 had a '
                           r'non-finite loss or gradient \(4 in all; '
                           r'config.max_nonfinite_steps=4\)\. Nothing was exported'):
    train.train_and_evaluate(config, workdir, stage=_LinearStage(config, poison=True))
  assert not os.path.exists(os.path.join(workdir, 'export'))
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_NAME))
  # The logged count is the run's total so far, not an average of it.
  assert train._mean_metrics([{'nonfinite_steps': 1, 'loss': 1.0},   # pylint: disable=protected-access
                              {'nonfinite_steps': 3, 'loss': 3.0}]) == {
                                  'nonfinite_steps': 3.0, 'loss': 2.0}
  # Skipped updates that are not in a row do not stop a run.
  divergence = train._Divergence(config, 0)   # pylint: disable=protected-access
  divergence.update([{'nonfinite_steps': n} for n in (1, 2, 3, 3, 4, 5, 6, 6)], 8)
  assert (divergence.total, divergence.in_a_row) == (6, 0)


def test_a_second_trainer_on_a_workdir_is_refused_and_a_stale_lock_taken_over(
    make_tiny_clip_config, tmp_path, caplog):
  config = make_tiny_clip_config(**{'num_train_steps': 2, 'checkpoint.every_steps': 0})
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  lock = os.path.join(workdir, workdir_lib.LOCK_NAME)
  import socket  # pylint: disable=g-import-not-at-top
  with open(lock, 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': holder.pid, 'started': 'earlier'}, f)
  try:
    with pytest.raises(workdir_lib.WorkdirLockedError,
                       match=rf'{workdir} is in use by another trainer \(pid {holder.pid} on '):
      train.train_and_evaluate(config, workdir, stage=_LinearStage(config))
    assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
  finally:
    holder.kill()
    holder.wait()
  # Its process gone, the lock is stale: taken over with a warning, and removed at the end.
  assert train.train_and_evaluate(config, workdir, stage=_LinearStage(config))
  assert 'Taking over the stale lock' in caplog.text
  assert not os.path.exists(lock)
  # A torn (unreadable) lock is stale too.
  with open(lock, 'w') as f:
    f.write('{"host": ')
  assert train.train_and_evaluate(config, workdir, stage=_LinearStage(config))


def test_a_partial_write_whose_writers_are_finishing_is_removed_once_they_stop(tmp_path,
                                                                             monkeypatch):
  """A failed orbax save's other writer threads add files for a moment after the error, so a
  removal can find a folder not yet empty (seen: `export.partial` under a full disk, with two
  test workers): the removal is tried again until the folder is gone, or gives up after its
  timeout and says so, without raising over the write's own error."""
  import errno  # pylint: disable=g-import-not-at-top
  folder = tmp_path / 'export.partial'
  (folder / 'params').mkdir(parents=True)
  (folder / 'params' / 'a').write_text('x')
  real, calls = workdir_lib.remove_tree, []

  def busy_for(n):
    def remove(p):
      calls.append(p)
      if len(calls) <= n:
        raise OSError(errno.ENOTEMPTY, 'Directory not empty', str(p))
      real(p)
    return remove
  monkeypatch.setattr(workdir_lib, 'remove_tree', busy_for(2))
  assert workdir_lib.remove_partial(folder) and not folder.exists() and len(calls) == 3
  folder.mkdir()
  calls.clear()
  monkeypatch.setattr(workdir_lib, 'remove_tree', busy_for(10 ** 6))
  assert not workdir_lib.remove_partial(folder, timeout=0.3) and folder.exists()
  assert 2 <= len(calls) <= 10


class _WriteLimit:
  """Files this process writes may not grow past `limit` bytes while on (RLIMIT_FSIZE: writes
  past it fail with EFBIG, as writes to a full disk fail with ENOSPC) — a real OS write error
  for orbax and tensorstore without a small filesystem to fill."""

  def __init__(self, limit):
    import resource  # pylint: disable=g-import-not-at-top
    self.resource, self.limit = resource, limit
    self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
    self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of a kill

  def on(self):
    self.resource.setrlimit(self.resource.RLIMIT_FSIZE, (self.limit, self.saved[1]))

  def off(self):
    self.resource.setrlimit(self.resource.RLIMIT_FSIZE, self.saved)

  def close(self):
    self.off()
    signal.signal(signal.SIGXFSZ, self.handler)


# orbax's writer threads, cut short by the error, leave an asyncio callback behind.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_failed_checkpoint_or_export_write_stops_at_once_and_keeps_what_was_written(
    make_tiny_clip_config, tmp_path, monkeypatch):
  """The disk refuses the checkpoint at step 4 (a 2 MB array over a 512 kB limit): the run
  stops before the next checkpoint is due with one line naming the step, the directory and the
  OS error; the partial directory is gone, step 2 intact, and the same call resumes from it.
  An export that fails likewise leaves no partial export, and the next run writes it."""
  config = make_tiny_clip_config(**{'num_train_steps': 8, 'checkpoint.every_steps': 2,
                                    'batch_size': 8})
  workdir = str(tmp_path / 'run')
  stage = _LinearStage(config)
  stage.width = 2 ** 17   # a 2 MB kernel
  stage.model = stage.model.clone(features=stage.width)
  limit = _WriteLimit(2 ** 19)
  batches, save, make = [], train.save_checkpoint, train.make_global_batch

  def limited_save(manager, state, *args):
    if int(state.step) == 4:
      limit.on()
    return save(manager, state, *args)

  def slow_batch(*args, **kwargs):   # steps slow enough for the failed write to be noticed
    batches.append(1)
    if len(batches) > 4:
      import time  # pylint: disable=g-import-not-at-top
      time.sleep(0.3)
    return make(*args, **kwargs)
  try:
    with monkeypatch.context() as m:
      m.setattr(train, 'save_checkpoint', limited_save)
      m.setattr(train, 'make_global_batch', slow_batch)
      with pytest.raises(train.CheckpointSaveError) as raised:
        train.train_and_evaluate(config, workdir, stage=stage)
  finally:
    limit.close()
  message = str(raised.value)
  assert '\n' not in message
  assert message.startswith(f'could not write checkpoint step 4 in {workdir}/checkpoints: '
                            '[Errno 27] File too large: '), message
  assert 'the checkpoints already there (steps [2]) are untouched' in message
  assert len(batches) < 6   # stopped before step 6's save would have noticed
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_NAME))

  # The space back, the same call resumes from step 2; its export fails, then is written.
  real_export = stage.export

  def limited_export(params, workdir):
    limit.on()
    try:
      real_export(params, workdir)
    finally:
      limit.off()
  limit = _WriteLimit(2 ** 19)
  try:
    stage.export = limited_export
    with pytest.raises(workdir_lib.WriteError,
                       match=rf'could not write the export {workdir}/export: \[Errno 27\] File '
                             r'too large: .*no export exists'):
      train.train_and_evaluate(config, workdir, stage=stage)
  finally:
    limit.close()
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '6', '8']   # keep=3
  assert not [n for n in os.listdir(workdir) if n.startswith('export')]
  stage.export = real_export
  assert set(train.train_and_evaluate(config, workdir, stage=stage)) == {'kernel_norm'}
  assert os.path.isdir(os.path.join(workdir, 'export', 'params'))


def test_library_errors_are_logged_without_their_tracebacks():
  """The commands' log filter: orbax's INFO chatter is dropped, its errors kept as one line
  (message and exception) without the traceback; our own records pass untouched."""
  import logging  # pylint: disable=g-import-not-at-top
  from unclip_jax import cli  # pylint: disable=g-import-not-at-top
  try:
    raise ValueError('OUT_OF_RANGE: Error writing "step/0"\nmore detail')
  except ValueError:
    exc_info = sys.exc_info()

  def record(path, level, exc=None):
    return logging.LogRecord('absl', level, path, 1, 'thread %s failed', ('t1',), exc)
  quiet = cli.QuietLibraries()
  assert not quiet.filter(record('/x/orbax/checkpoint/a.py', logging.INFO))
  error = record('/x/orbax/checkpoint/a.py', logging.ERROR, exc_info)
  assert quiet.filter(error) and error.exc_info is None
  assert error.getMessage() == 'thread t1 failed (ValueError: OUT_OF_RANGE: Error writing "step/0")'
  ours = record('/x/unclip_jax/train.py', logging.ERROR, exc_info)
  assert quiet.filter(ours) and ours.exc_info is exc_info


def test_an_error_that_ends_a_command_is_one_line_or_with_verbose_its_traceback(monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from unclip_jax import cli  # pylint: disable=g-import-not-at-top
  cli.define_verbose_flag()
  error = workdir_lib.WorkdirLockedError('runs/x is in use by another trainer')
  with pytest.raises(SystemExit, match=r'^Error: runs/x is in use by another trainer$'):
    cli.exit_on(error)
  monkeypatch.setattr(flags.FLAGS['verbose'], 'value', True)
  with pytest.raises(workdir_lib.WorkdirLockedError):
    cli.exit_on(error)
  assert cli.QuietLibraries(keep_tracebacks=cli.verbose()).keep_tracebacks


def test_json_files_are_replaced_atomically(tmp_path, monkeypatch):
  """A write that fails half-way leaves the old file whole and no temporary file behind."""
  path = str(tmp_path / 'eval_metrics.json')
  workdir_lib.atomic_write_json(path, {'a': 1})
  real_replace = os.replace

  def failing_replace(src, dst):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(os, 'replace', failing_replace)
  with pytest.raises(OSError, match='No space left'):
    workdir_lib.atomic_write_json(path, {'a': 2})
  monkeypatch.setattr(os, 'replace', real_replace)
  with open(path) as f:
    assert json.load(f) == {'a': 1}
  assert os.listdir(tmp_path) == ['eval_metrics.json']


def test_two_threads_replacing_one_json_file_never_collide(tmp_path):
  """A lock's heartbeat thread and the trainer's main thread may rewrite lock.json at the same
  moment (seen: one thread's rename took the other's temporary file); each write lands whole."""
  path = str(tmp_path / 'lock.json')
  errors = []
  start = threading.Barrier(2)

  def write(who):
    try:
      start.wait()
      for i in range(300):
        workdir_lib.atomic_write_json(path, {'who': who, 'i': i})
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  threads = [threading.Thread(target=write, args=(who,)) for who in ('main', 'heartbeat')]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []
  with open(path) as f:
    assert json.load(f) in ({'who': 'main', 'i': 299}, {'who': 'heartbeat', 'i': 299})
  assert os.listdir(tmp_path) == ['lock.json']


@pytest.mark.parametrize('module,expected', [
    ('unclip_jax.sample', ('--prior: Prior run or export.', '--decoder_steps: decoder respaced')),
    ('unclip_jax.train_all', ('--config: Job config', '--workdir: Run directory')),
    ('unclip_jax.evaluate', ('Evaluate generation as the field does',
                             '--inception: PyTorch weights of the FID Inception',
                             '--reference: FID statistics')),
    ('unclip_jax.main', ('--config: Stage config file', '--workdir:')),
    ('unclip_jax.convert', ('karlo     SRC DST', '--tokenizer TOKENIZER')),
    ('unclip_jax.data.embeddings', ('--out:', '--chunk_size:')),
    ('unclip_jax.data.prepare', ('--out:', '--resolution:')),
    ('unclip_jax.sweep', ('--sweep:', '--summarize:')),
    ('benchmarks/train_step.py', ('--peer:', '--steps:', '--profile_steps:')),
    ('benchmarks/attention.py', ('--[no]cpu_smoke:', '--repeats:')),
    ('benchmarks/sampling.py', ('--batch_sizes:', '--dtypes:')),
    ('benchmarks/compile_preset.py', ('--devices:', '--config:')),
    ('benchmarks/input_pipeline.py', ('--batch_size:', '--images:')),
])
def test_help_lists_the_commands_own_flags(module, expected, tmp_path):
  command = ([os.path.join(REPO, module)] if module.endswith('.py') else ['-m', module])
  result = subprocess.run([sys.executable, *command, '--help'], cwd=tmp_path,
                          capture_output=True, text=True, check=False,
                          env=dict(os.environ, XLA_FLAGS=''))
  assert result.returncode == 0, result.stderr[-2000:]
  for text in expected:
    assert text in result.stdout, result.stdout
  assert 'Try --helpfull' not in result.stdout and 'grain' not in result.stdout


def test_an_unknown_preset_is_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'unclip_jax.main', '--config=configs/clip.py:nosuch',
       f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True, check=False,
      env=dict(os.environ, XLA_FLAGS=''))
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      'Invalid command line: flag --config=configs/clip.py:nosuch: Error whilst parsing config '
      "file: ValueError: configs/clip.py: unknown preset 'nosuch'; use 'tiny', 'vit_b16' or "
      "'vit_l14'"), result.stderr
  assert 'Traceback' not in result.stderr


def test_running_the_trainer_library_points_to_the_command(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'unclip_jax.train'], cwd=tmp_path,
                          capture_output=True, text=True, check=False,
                          env=dict(os.environ, XLA_FLAGS=''))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      'unclip_jax.train is the trainer library; train a stage with `python -m unclip_jax.main')
  assert 'Traceback' not in result.stderr
