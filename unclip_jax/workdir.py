"""A run directory's small files, written so that a kill never leaves a torn one, and the lock
that keeps two trainers out of one run directory.

Every JSON file a run writes (config.json, eval_metrics.json, report.json, an export's
config.json) goes to a temporary name beside its place and is renamed into place, so a reader
(a resumed job) sees the old file or the new one, never half of one.

The lock is `WORKDIR/lock.json`, created exclusively by process 0 of a run, holding the
holder's host, pid and start time; it is removed when the run ends. A second trainer on the
same directory is refused with a message naming the holder. A lock whose process is gone (same
host, pid no longer running: a run killed with SIGKILL or by a crash of the machine's kernel)
is stale: it is taken over with a warning. Multi-process runs take one lock per run (process 0
decides, every process gets its answer).
"""

import contextlib
import datetime
import json
import os
import re
import socket
from typing import Any, Optional

from absl import logging

LOCK_NAME = 'lock.json'


def atomic_write_text(path: str, text: str):
  """Writes `text` to `path` through a temporary file in the same directory and a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp-{os.getpid()}')
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_json(path: str, value: Any, indent: int = 2):
  atomic_write_text(path, json.dumps(value, indent=indent) + '\n')


class WriteError(RuntimeError):
  """A run's file or directory could not be written (a full disk, a quota, a lost mount)."""


def os_error(error: BaseException) -> str:
  """One line for the OS error behind `error` (orbax and tensorstore wrap it), else for
  `error` itself."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.strerror:
      return f'[Errno {seen.errno}] {seen.strerror}' + (f': {seen.filename}' if seen.filename
                                                        else '')
    seen = seen.__cause__ or seen.__context__
  text = str(error).strip()
  # tensorstore (orbax's array writer) gives the OS error inside its message:
  # '... Failed writing: "FILE": Failed to write N bytes to file 18: File too large
  # [os_error_code='27']'.
  found = re.search(r":\s*([^:\[]+?)\s*\[os_error_code='(\d+)'\]", text)
  if found:
    file = re.search(r'"(/[^"]+)"[^"]*$', text[:found.start()])
    return f'[Errno {found[2]}] {found[1]}' + (f': {file[1]}' if file else '')
  lines = text.splitlines()
  return f'{type(error).__name__}: {lines[0][:300]}' if lines else type(error).__name__


class WorkdirLockedError(RuntimeError):
  """Another trainer holds the run directory."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # someone else's process: alive
    return True
  return True


def _read_lock(path: str) -> Optional[dict]:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}   # unreadable (torn by a kill during its creation): stale


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
          f"{holder.get('started', '?')}")


def _try_acquire(workdir: str, what: str) -> Optional[str]:
  """Takes the lock; None on success, else the reason it is refused."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  me = {'host': socket.gethostname(), 'pid': os.getpid(), 'what': what,
        'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
  for _ in range(3):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      holder = _read_lock(path)
      if holder is None:
        continue    # removed meanwhile: try again
      if holder.get('host') == me['host'] and holder.get('pid') == me['pid']:
        return None  # this process already holds it (a job's stages)
      stale = not holder or (holder.get('host') == me['host'] and
                             not _alive(int(holder.get('pid', -1))))
      if not stale:
        return (f'{workdir} is in use by another trainer ({_describe(holder)}); wait for it '
                f'to finish, stop it, or use another --workdir (if that process is gone, '
                f'remove {path})')
      logging.warning('Taking over the stale lock of %s (%s: its process is gone)', workdir,
                      _describe(holder) if holder else 'unreadable')
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
      continue
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      json.dump(me, f)
    return None
  return f'could not take the lock {path} (it keeps changing: another trainer is starting)'


def _broadcast_refusal(reason: Optional[str]) -> Optional[str]:
  """Process 0's answer, for every process of a multi-process run."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return reason
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  refused = multihost_utils.broadcast_one_to_all(np.int32(reason is not None))
  if int(refused) and reason is None:
    reason = 'another trainer holds this run directory (see process 0\'s log)'
  return reason if int(refused) else None


@contextlib.contextmanager
def locked(workdir: str, what: str = 'train'):
  """Holds the run directory's lock while inside; raises WorkdirLockedError if another live
  trainer holds it. Re-entrant within one process (a job's stage inside the job's folder
  takes the stage folder's own lock)."""
  import jax  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  path = os.path.join(workdir, LOCK_NAME)
  owner = jax.process_index() == 0
  holder = (_read_lock(path) or {}) if owner else {}
  held_before = (holder.get('pid'), holder.get('host')) == (os.getpid(), socket.gethostname())
  reason = _try_acquire(workdir, what) if owner else None
  reason = _broadcast_refusal(reason)
  if reason:
    raise WorkdirLockedError(reason)
  try:
    yield
  finally:
    if owner and not held_before:
      with contextlib.suppress(FileNotFoundError):
        holder = _read_lock(path)
        if holder and holder.get('pid') == os.getpid():
          os.remove(path)

