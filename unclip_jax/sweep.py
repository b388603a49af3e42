"""Config sweeps: one training run per point, each in its own run directory.

  python -m unclip_jax.sweep --config=configs/decoder.py:tiny \
      --sweep=configs/sweeps/decoder_lr.py --workdir=runs/sweep
  python -m unclip_jax.sweep --summarize=runs/sweep --metric=samples_shape_accuracy

A sweep file is Python: `get_sweep()` (or `get_sweep(arg)` for `--sweep=FILE.py:arg`) returns a
list of override dicts, one per point, whose keys are config fields (`'optim.lr'`); build them
with `sweep`, `product` and `zipit` from this module:

  from unclip_jax.sweep import product, sweep
  def get_sweep():
    return product(sweep('optim.lr', [3e-4, 1e-3]), sweep('batch_size', [16, 32]))

Every point is checked against the config before anything runs (an unknown field or a value of
the wrong type is a one-line error naming the point). Point `i` runs as
`python -m unclip_jax.main --config=... --workdir=WORKDIR/<name> --config.FIELD=VALUE...` (a job
config such as configs/unclip.py runs `unclip_jax.train_all`), named by its overrides, with its
output in `WORKDIR/<name>/run.log`. Points run one after another; a finished point is skipped, an
unfinished one resumes from its checkpoints, so re-running the same command completes a sweep.
SIGTERM or SIGINT is passed on to the running point, which checkpoints and stops; no further point
starts. `--config.FIELD=VALUE` given to this command applies to every point.

On a cluster, `--emit=commands` prints one command per point (`--point=NAME` runs only that
point) and `--emit=slurm` an array-job script with one task per point, for `sbatch`.

`--summarize=WORKDIR` gathers the points' evaluations (`eval_metrics.json`, or a job's
`report.json`) into WORKDIR/summary.md and summary.csv, and plots `--metric` against the swept
field `--x` (one line per value of the other swept fields) into WORKDIR/summary.png.
"""

import csv
import difflib
import hashlib
import importlib.util
import io
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Iterable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from unclip_jax import cli
from unclip_jax import workdir as workdir_lib

FLAGS = flags.FLAGS
SWEEP_RECORD = 'sweep.json'
POINT_RECORD = 'sweep_point.json'
EMIT_FORMATS = ('commands', 'slurm')


class SweepError(ValueError):
  """A sweep file, point or sweep directory that cannot be used; the message says why."""


# ---- building sweeps (the helpers sweep files use) ----

def sweep(field: str, values: Iterable[Any]) -> list[dict]:
  """One point per value: sweep('optim.lr', [1e-4, 3e-4]) → [{'optim.lr': 1e-4}, ...]."""
  values = list(values)
  if not isinstance(field, str) or not field:
    raise SweepError(f'sweep(): the field must be a non-empty string, got {field!r}')
  if not values:
    raise SweepError(f'sweep({field!r}): no values')
  return [{field: v} for v in values]


def product(*sweeps: Sequence[dict]) -> list[dict]:
  """Every combination of the given sweeps (the last one varies fastest)."""
  points = [{}]
  for s in sweeps:
    points = [_merge(p, q, 'product') for p in points for q in s]
  return points


def zipit(*sweeps: Sequence[dict]) -> list[dict]:
  """The i-th points of the given sweeps merged into one; they must have equal lengths."""
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise SweepError(f'zipit(): sweeps of different lengths {sorted(lengths)}')
  return [_merge_all(points, 'zipit') for points in zip(*sweeps)]


def _merge(a: dict, b: dict, what: str) -> dict:
  both = set(a) & set(b)
  if both:
    raise SweepError(f'{what}(): field {sorted(both)[0]!r} is swept twice')
  return {**a, **b}


def _merge_all(points, what):
  out = {}
  for p in points:
    out = _merge(out, p, what)
  return out


# ---- points: names, flags, checks ----

def format_value(value: Any) -> str:
  """A value as the config flag parser reads it: `--config.FIELD=<this>`."""
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(format_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  if isinstance(value, float):
    return repr(value)
  return str(value)


def point_name(overrides: dict) -> str:
  """A directory name made of the overrides: 'optim.lr=0.001,batch_size=16'."""
  text = ','.join(f'{k}={format_value(v)}' for k, v in overrides.items()) or 'base'
  name = re.sub(r'[^A-Za-z0-9._=,+-]+', '-', text.replace('(', '').replace(')', '')).strip('-')
  if len(name) > 100:   # file systems limit a name to 255 bytes; keep it readable and unique
    name = f'{name[:80]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}'
  return name


def load_sweep(spec: str) -> list[dict]:
  """The points of `FILE.py` or `FILE.py:arg`: its `get_sweep([arg])`, checked for form."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path) and os.path.dirname(path).rstrip('/').endswith('configs/sweeps'):
    # An installed package run from another directory: the sweep files installed with it.
    installed = os.path.join(os.path.dirname(os.path.abspath(cli.__file__)), 'presets',
                             'sweeps', os.path.basename(path))
    path = installed if os.path.isfile(installed) else path
  if not os.path.isfile(path):
    raise SweepError(f'sweep file {path} does not exist')
  module_spec = importlib.util.spec_from_file_location(
      'unclip_jax_sweep_' + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SweepError as e:
    raise SweepError(f'{path}: {e}') from None
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'sweep file {path} defines no get_sweep()')
  try:
    points = module.get_sweep(arg) if arg else module.get_sweep()
  except SweepError as e:
    raise SweepError(f'{path}: {e}') from None
  if not isinstance(points, (list, tuple)) or not points:
    raise SweepError(f'{path}: get_sweep() must return a non-empty list of override dicts, '
                     f'got {type(points).__name__}')
  for i, p in enumerate(points):
    if not isinstance(p, dict) or not all(isinstance(k, str) and k for k in p):
      raise SweepError(f'{path}: point {i} is not a dict of field names to values: {p!r}')
  names = [point_name(p) for p in points]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise SweepError(f'{path}: points repeat: {repeated[0]}')
  return [dict(p) for p in points]


def check_points(config: ml_collections.ConfigDict, points: list[dict]):
  """Applies every point to a copy of `config`: an unknown field or a value of the wrong type
  is a SweepError naming the point (before any run starts)."""
  known = set(_field_names(config))
  for p in points:
    for field in p:
      if field not in known:
        close = difflib.get_close_matches(field, sorted(known), n=1)
        raise SweepError(f'point {point_name(p)}: the config has no field {field!r}'
                         + (f' (did you mean {close[0]!r}?)' if close else ''))
    trial = config.copy_and_resolve_references()
    try:
      trial.update_from_flattened_dict(dict(p))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      message = str(e).strip('\'"').replace('\\\'', '\'')
      raise SweepError(f'point {point_name(p)}: {message}') from None


def _field_names(config, prefix=''):
  for k, v in config.items():
    yield f'{prefix}{k}'
    if isinstance(v, ml_collections.ConfigDict):
      yield from _field_names(v, f'{prefix}{k}.')


def is_job_config(config: ml_collections.ConfigDict) -> bool:
  """A whole-system config (configs/unclip.py), run by train_all, not a single stage's."""
  return all(name in config for name in ('clip', 'prior', 'decoder', 'upsampler'))


class Sweep:
  """The points of one sweep and how each one runs."""

  def __init__(self, config_arg: str, base_overrides: Sequence[str], sweep_arg: str,
               points: list[dict], workdir: str, job: bool, distributed: bool = False):
    self.config_arg, self.base_overrides = config_arg, list(base_overrides)
    self.sweep_arg, self.points, self.workdir = sweep_arg, points, workdir
    self.job, self.distributed = job, distributed
    self.names = [point_name(p) for p in points]

  def point_dir(self, i: int) -> str:
    return _join(self.workdir, self.names[i])

  def command(self, i: int) -> list[str]:
    """The training command of point `i` (argv)."""
    module = 'unclip_jax.train_all' if self.job else 'unclip_jax.main'
    argv = [sys.executable, '-m', module, f'--config={self.config_arg}',
            f'--workdir={self.point_dir(i)}', *self.base_overrides]
    argv += [f'--config.{k}={format_value(v)}' for k, v in self.points[i].items()]
    return argv + (['--distributed'] if self.distributed else [])

  def point_command(self, i: Optional[int]) -> list[str]:
    """This command restricted to point `i` (or, for None, to `--point=$SLURM_ARRAY_TASK_ID`)."""
    point = '$SLURM_ARRAY_TASK_ID' if i is None else self.names[i]
    return [sys.executable, '-m', 'unclip_jax.sweep', f'--config={self.config_arg}',
            *self.base_overrides, f'--sweep={self.sweep_arg}', f'--workdir={self.workdir}',
            f'--point={point}', *(['--distributed'] if self.distributed else [])]

  def select(self, point: str) -> int:
    """The index of `--point` (an index or a name)."""
    if point.isdigit() and int(point) < len(self.points):
      return int(point)
    if point in self.names:
      return self.names.index(point)
    raise SweepError(f'--point={point}: no such point (0..{len(self.points) - 1}, or one of '
                     f'{", ".join(self.names[:3])}{", ..." if len(self.names) > 3 else ""})')

  def finished(self, i: int) -> bool:
    directory = self.point_dir(i)
    folder = workdir_lib.path(directory)
    if self.job:
      return (folder / 'report.json').exists()
    if not ((folder / 'eval_metrics.json').exists() and (folder / 'config.json').exists()):
      return False
    from unclip_jax import train  # pylint: disable=g-import-not-at-top
    config = ml_collections.ConfigDict(workdir_lib.read_json(folder / 'config.json'))
    return train.is_finished(directory, config)

  def record(self):
    """Writes (or checks) WORKDIR/sweep.json: a sweep directory belongs to one config and one
    set of common overrides; points may be added to it."""
    workdir_lib.path(self.workdir).mkdir(parents=True, exist_ok=True)
    path = _join(self.workdir, SWEEP_RECORD)
    record = {'config': self.config_arg, 'overrides': self.base_overrides,
              'sweep': self.sweep_arg, 'job': self.job, 'points': {}}
    if workdir_lib.path(path).exists():
      old = workdir_lib.read_json(path)
      for key in ('config', 'overrides'):
        if old.get(key) != record[key]:
          raise SweepError(f'{path} records {key} {old.get(key)!r}, this command has '
                           f'{record[key]!r}: its points would resume under another config '
                           '(use another --workdir)')
      record['points'] = old.get('points', {})
    record['points'].update({n: _jsonable(p) for n, p in zip(self.names, self.points)})
    workdir_lib.atomic_write_json(path, record)

  def run_point(self, i: int, stopper: '_Forwarder') -> str:
    """Runs point `i` unless it is finished: 'skipped', 'finished', 'stopped' or 'failed'."""
    if self.finished(i):
      logging.info('Point %d/%d %s: finished earlier; skipped', i + 1, len(self.points),
                   self.names[i])
      return 'skipped'
    directory = self.point_dir(i)
    workdir_lib.path(directory).mkdir(parents=True, exist_ok=True)
    argv = self.command(i)
    workdir_lib.atomic_write_json(_join(directory, POINT_RECORD), {
        'overrides': _jsonable(self.points[i]), 'command': shlex.join(argv)})
    log_path = _local_log(directory)
    logging.info('Point %d/%d %s: running (log: %s)', i + 1, len(self.points), self.names[i],
                 log_path)
    start = time.perf_counter()
    with open(log_path, 'a') as log:
      log.write(f'$ {shlex.join(argv)}\n')
      log.flush()
      # Its own session: a Ctrl-C at the terminal reaches only this process, which passes it
      # on once (a second one would make the run stop without its checkpoint).
      process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
      returncode = stopper.wait(process)
    if workdir_lib.is_remote(directory):   # the log beside the run, as on a local disk
      (workdir_lib.path(directory) / 'run.log').write_bytes(_read_bytes(log_path))
    seconds = time.perf_counter() - start
    if returncode != 0:
      logging.error('Point %s failed (exit status %d) after %.0f s; the end of %s:\n%s',
                    self.names[i], returncode, seconds, log_path, _tail(log_path))
      return 'failed'
    if stopper.signal_name or not self.finished(i):
      logging.warning('Point %s stopped after %.0f s (%s); the same command resumes it',
                      self.names[i], seconds, stopper.signal_name or 'not finished')
      return 'stopped'
    logging.info('Point %s finished in %.0f s', self.names[i], seconds)
    return 'finished'


class _Forwarder:
  """While a point runs, SIGTERM/SIGINT to the sweep go on to it (it checkpoints and stops)."""

  def __init__(self):
    self.signal_name, self.process = None, None
    for s in (signal.SIGTERM, signal.SIGINT):
      signal.signal(s, self._handle)

  def _handle(self, signum, frame):
    del frame
    first = self.signal_name is None
    self.signal_name = signal.Signals(signum).name
    logging.warning('%s received: the running point stops with a checkpoint; no further point '
                    'starts', self.signal_name)
    if self.process is not None and self.process.poll() is None and first:
      self.process.send_signal(signum)

  def wait(self, process) -> int:
    self.process = process
    try:
      return process.wait()
    finally:
      self.process = None


def _join(base: str, name: str) -> str:
  """`base/name`; a remote base (gs://...) joined as a URL, a local one as given."""
  return f'{base.rstrip("/")}/{name}' if workdir_lib.is_remote(base) else os.path.join(base, name)


def _local_log(directory: str) -> str:
  """Where a point's output is written while it runs: `directory/run.log`, or for a remote
  directory a local file (copied beside the run when the point ends; a resumed point appends
  to it)."""
  if not workdir_lib.is_remote(directory):
    return os.path.join(directory, 'run.log')
  digest = hashlib.sha1(directory.encode()).hexdigest()[:12]
  folder = os.path.join(os.path.expanduser('~'), '.cache', 'unclip_jax', 'sweep_logs', digest)
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, 'run.log')


def _read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def _tail(path: str, lines: int = 15) -> str:
  with open(path, errors='replace') as f:
    return ''.join(f.readlines()[-lines:]).rstrip()


def _jsonable(overrides: dict) -> dict:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}


def run(s: Sweep, only: Optional[int] = None) -> dict:
  """Runs the points (or point `only`) one after another; {name: outcome}."""
  s.record()
  stopper = _Forwarder()
  outcomes = {}
  for i in ([only] if only is not None else range(len(s.points))):
    outcomes[s.names[i]] = s.run_point(i, stopper)
    if stopper.signal_name:
      break
  return outcomes


def emit(s: Sweep, form: str) -> str:
  """The commands that run the sweep elsewhere: one per point, or a SLURM array script."""
  if form == 'commands':
    return '\n'.join(shlex.join(s.point_command(i)) for i in range(len(s.points))) + '\n'
  command = ' '.join(shlex.quote(a) if '$' not in a else f'"{a}"' for a in s.point_command(None))
  name = os.path.basename(os.path.normpath(s.workdir)) or 'sweep'
  # SLURM writes its output files itself: locally, also for a remote sweep directory.
  output = (f'sweep-{name}-%A_%a.out' if workdir_lib.is_remote(s.workdir) else
            _join(s.workdir, 'slurm-%A_%a.out'))
  return '\n'.join([
      '#!/bin/bash',
      f'# {len(s.points)} points of {s.sweep_arg} on {s.config_arg}, one array task each.',
      '# Submit with the resources one point needs, e.g.:',
      '#   sbatch --gres=gpu:1 --cpus-per-task=8 --time=04:00:00 THIS_FILE',
      '# A finished point is skipped and an unfinished one resumes, so resubmitting completes',
      '# the sweep.',
      f'#SBATCH --job-name=sweep-{name}',
      f'#SBATCH --array=0-{len(s.points) - 1}',
      f'#SBATCH --output={output}',
      '#SBATCH --signal=B:TERM@120',
      'set -euo pipefail',
      f'cd {shlex.quote(os.getcwd())}',
      f'exec {command}', ''])


# ---- summaries ----

def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '/'))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[key] = v
  return out


def _point_metrics(directory: str) -> tuple[str, dict]:
  """(status, metrics) of one point's directory."""
  folder = workdir_lib.path(directory)
  for name in ('report.json', 'eval_metrics.json'):
    if (folder / name).exists():
      try:
        return 'finished', _flatten(workdir_lib.read_json(folder / name))
      except (OSError, ValueError) as e:
        return f'unreadable {name} ({e})', {}
  checkpoints = folder / 'checkpoints'
  steps = [int(d.name) for d in checkpoints.iterdir() if d.name.isdigit()] if (
      checkpoints.is_dir()) else []
  if steps:
    return f'checkpoint at step {max(steps)}', {}
  return 'not started', {}


def summarize(workdir: str, metric: Optional[str] = None, x: Optional[str] = None) -> dict:
  """Writes WORKDIR/summary.{md,csv,png}; returns {'rows', 'fields', 'metrics', 'metric', 'x'}."""
  path = _join(workdir, SWEEP_RECORD)
  if not workdir_lib.path(path).exists():
    raise SweepError(f'{workdir} is not a sweep directory (no {SWEEP_RECORD})')
  points = workdir_lib.read_json(path)['points']
  fields = list(dict.fromkeys(k for p in points.values() for k in p))
  rows = []
  for name, overrides in points.items():
    status, metrics = _point_metrics(_join(workdir, name))
    rows.append({'point': name, 'status': status, **{k: overrides.get(k) for k in fields},
                 **metrics})
  metric_names = sorted(dict.fromkeys(k for r in rows for k in r
                                      if k not in fields and k not in ('point', 'status')))
  numeric = [f for f in fields if all(isinstance(r[f], (int, float)) and not isinstance(
      r[f], bool) for r in rows)]
  if metric is not None and metric not in metric_names and any(
      r['status'] == 'finished' for r in rows):
    raise SweepError(f'--metric={metric}: no point reports it; metrics: {", ".join(metric_names)}')
  if x is not None and x not in fields:
    raise SweepError(f'--x={x} is not a swept field; swept: {", ".join(fields)}')
  metric = metric or (metric_names[0] if metric_names else None)
  x = x or (numeric[0] if numeric else None)

  columns = ['point', 'status', *fields, *metric_names]
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=columns)
  writer.writeheader()
  for r in rows:
    writer.writerow({c: _cell(r.get(c)) for c in columns})
  workdir_lib.atomic_write_text(_join(workdir, 'summary.csv'), text.getvalue())
  shown = ['point', 'status', *fields, *([metric] if metric else [])]
  table = ['| ' + ' | '.join(shown) + ' |', '|' + '---|' * len(shown)]
  table += ['| ' + ' | '.join(_cell(r.get(c)) for c in shown) + ' |' for r in rows]
  workdir_lib.atomic_write_text(
      _join(workdir, 'summary.md'),
      f'# Sweep {workdir.rstrip("/").rsplit("/", 1)[-1]}\n\n' + '\n'.join(table) +
      f'\n\nAll metrics: summary.csv ({len(metric_names)} columns).\n')
  plotted = bool(metric and x and _plot(rows, fields, metric, x, _join(workdir, 'summary.png')))
  return {'rows': rows, 'fields': fields, 'metrics': metric_names, 'metric': metric, 'x': x,
          'table': '\n'.join(table), 'plotted': plotted}


def _cell(value) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def _plot(rows, fields, metric, x, path) -> bool:
  """`metric` against `x`, one line per combination of the other swept fields."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  done = [r for r in rows if isinstance(r.get(metric), (int, float))]
  if not done:
    return False
  others = [f for f in fields if f != x]
  fig, ax = plt.subplots(figsize=(6, 4))
  key = lambda r: tuple(format_value(r[f]) for f in others)
  for group, members in itertools.groupby(sorted(done, key=key), key=key):
    members = sorted(members, key=lambda r: r[x])
    label = ', '.join(f'{f}={v}' for f, v in zip(others, group)) or None
    ax.plot([r[x] for r in members], [r[metric] for r in members], 'o-', label=label)
  xs = [r[x] for r in done]
  if min(xs) > 0 and max(xs) / min(xs) >= 100:
    ax.set_xscale('log')
  ax.set_xlabel(x)
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3)
  if others:
    ax.legend(fontsize=8)
  fig.tight_layout()
  with workdir_lib.path(path).open('wb') as f:
    fig.savefig(f, dpi=120, format='png')
  plt.close(fig)
  return True


# ---- the command ----

def define_flags():
  config_flags.DEFINE_config_file('config', None, 'Stage or job config, e.g. '
                                  'configs/decoder.py:tiny.', lock_config=True)
  flags.DEFINE_string('sweep', None, 'Sweep file, FILE.py or FILE.py:arg (its get_sweep()).')
  flags.DEFINE_string('workdir', None, 'Sweep directory: one run directory per point.')
  flags.DEFINE_string('point', None, 'Run only this point (its index or name), e.g. '
                      '$SLURM_ARRAY_TASK_ID.')
  flags.DEFINE_enum('emit', None, EMIT_FORMATS, 'Print the commands instead of running: one '
                    'per point, or a SLURM array-job script.')
  flags.DEFINE_bool('distributed', False, 'Pass --distributed to every point (multi-host).')
  flags.DEFINE_string('summarize', None, 'A sweep directory to summarise (no training).')
  flags.DEFINE_string('metric', None, 'Summary: the metric to tabulate and plot.')
  flags.DEFINE_string('x', None, 'Summary: the swept field on the plot\'s x axis.')
  cli.define_verbose_flag()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    if FLAGS.summarize:
      result = summarize(FLAGS.summarize, FLAGS.metric, FLAGS.x)
      print(result['table'])
      logging.info('Wrote %s/summary.md, summary.csv%s', FLAGS.summarize,
                   ', summary.png' if result['plotted'] else ' (nothing to plot yet)')
      return
    missing = [f for f in ('config', 'sweep', 'workdir') if FLAGS[f].value is None]
    if missing:
      raise SweepError(f'--{", --".join(missing)} required (or --summarize=DIR)')
    points = load_sweep(FLAGS.sweep)
    check_points(FLAGS.config, points)
    job = is_job_config(FLAGS.config)
    if job and FLAGS.distributed:
      raise SweepError('--distributed: a whole-system job (train_all) runs on one host')
    config_arg = next(a for a in _ARGV if a.startswith('--config='))[len('--config='):]
    base = [a for a in _ARGV if a.startswith('--config.')]
    s = Sweep(config_arg, base, FLAGS.sweep, points, FLAGS.workdir, job, FLAGS.distributed)
    if FLAGS.emit:
      sys.stdout.write(emit(s, FLAGS.emit))
      return
    only = s.select(FLAGS.point) if FLAGS.point is not None else None
    outcomes = run(s, only)
  except SweepError as e:
    sys.exit(f'Error: {e}')
  counts = {o: list(outcomes.values()).count(o) for o in dict.fromkeys(outcomes.values())}
  logging.info('Sweep %s: %s', FLAGS.workdir, ', '.join(f'{n} {o}' for o, n in counts.items()))
  if 'failed' in counts:
    sys.exit(f'{counts["failed"]} of {len(outcomes)} points failed; their run.log says why')


_ARGV: list[str] = []


def _parse_flags(argv):
  _ARGV[:] = cli.resolve_config_paths(list(argv))[1:]
  return cli.parse_flags(argv)


def run_cli():
  """Console entry point (`unclip-sweep`)."""
  cli.console_setup()
  define_flags()
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run_cli()
