"""A run directory: its path (local, or remote such as `gs://bucket/run`), its small files
written so that a kill never leaves a torn one, and the lock that keeps two trainers out of it.

Every path of a run directory goes through `etils.epath` (`path(workdir)`), never through `os`
or `open()`, so that checkpoints (orbax: tensorstore writes gs:// itself), config.json,
eval_metrics.json, exports, sample grids and the lock work on Cloud Storage as on a local disk.
TensorBoard events go through TensorFlow's own filesystems, which write gs:// too.

Every JSON file a run writes goes into place whole: on a local disk to a temporary name beside
its place and renamed over it; on an object store (where a rename is a copy) straight to its
name, since an object appears only once its upload is complete. A reader (a resumed job) sees
the old file or the new one, never half of one.

The lock is `WORKDIR/lock.json`, created exclusively (O_EXCL on a local disk; elsewhere through
fsspec, on Cloud Storage as an upload that the server refuses if the object exists) by process
0 of a run. It holds the holder's host, pid, start time and a heartbeat that a thread of the
holder refreshes every `HEARTBEAT_SECONDS`; it is removed when the run ends. A second trainer on the same directory is
refused with a message naming the holder. A lock is stale, and taken over with a warning, when
it is torn, when its holder ran on this host and its pid is gone (a run killed with SIGKILL), or
when its heartbeat is older than `STALE_AFTER_SECONDS` (its holder, on any host, stopped: a
preempted VM never removes its lock). Multi-process runs take one lock per run (process 0
decides, every process gets its answer).
"""

import contextlib
import datetime
import json
import os
import re
import socket
import threading
from typing import Any, Optional, Union

from absl import logging
from etils import epath

LOCK_NAME = 'lock.json'
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 600.0

PathLike = Union[str, os.PathLike]


def is_remote(p: PathLike) -> bool:
  """Whether `p` names a remote filesystem (`gs://`, `s3://`, ...), where a rename is a copy."""
  return '://' in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """A run directory's (or any of its files') path: local paths made absolute, remote ones
  (gs://, s3://) as they are."""
  p = os.fspath(p)
  return epath.Path(p if is_remote(p) else os.path.abspath(p))


def atomic_write_bytes(file: PathLike, data: bytes):
  """Writes `data` to `file` so that readers see the old content or the new, never a part."""
  file = path(file)
  file.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(file):
    file.write_bytes(data)   # an object store publishes an object only once it is whole
    return
  # One temporary name per writer: a lock's heartbeat thread and the main thread of the same
  # process may replace the same file at once.
  tmp = file.parent / f'.{file.name}.tmp-{os.getpid()}-{threading.get_ident()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, file)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_text(file: PathLike, text: str):
  """Writes `text` (UTF-8) to `file` as `atomic_write_bytes` does."""
  atomic_write_bytes(file, text.encode('utf-8'))


def atomic_write_json(file: PathLike, value: Any, indent: int = 2):
  atomic_write_text(file, json.dumps(value, indent=indent) + '\n')


def read_json(file: PathLike) -> Any:
  return json.loads(path(file).read_text())


def remove_tree(p: PathLike):
  """Removes a directory (or file) and everything under it; nothing if it is not there."""
  p = path(p)
  with contextlib.suppress(FileNotFoundError):
    if p.is_dir():
      p.rmtree()
    elif p.exists():
      p.unlink()


def remove_partial(p: PathLike, timeout: float = 10.0) -> bool:
  """Removes a partly written directory whose writers may still be finishing (the other writer
  threads of a failed orbax save keep adding files for a moment, and a removal then finds a
  folder not yet empty): retried until it is gone or `timeout` s have passed. True if gone."""
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.monotonic() + timeout
  while True:
    try:
      remove_tree(p)
      return True
    except OSError as e:
      if time.monotonic() > deadline:
        logging.warning('Could not remove the partial write %s: %s', p, e)
        return False
      time.sleep(0.1)


def files_under(p: PathLike) -> list[epath.Path]:
  """Every file under the directory `p`, at any depth, sorted."""
  p = path(p)
  if not is_remote(p):
    return sorted(epath.Path(d) / f for d, _, names in os.walk(p) for f in names)
  import fsspec  # pylint: disable=g-import-not-at-top
  fs, name = fsspec.core.url_to_fs(os.fspath(p))
  fs.invalidate_cache()
  return sorted(p / f[len(name):].lstrip('/') for f in fs.find(name))


def free_name(p: PathLike) -> epath.Path:
  """`p`, or `p.1`, `p.2`, ... : the first that does not exist."""
  p = path(p)
  candidate, suffix = p, 0
  while candidate.exists():
    suffix += 1
    candidate = p.parent / f'{p.name}.{suffix}'
  return candidate


def move(source: PathLike, target: PathLike):
  """Moves a directory (or file) to `target`, which must not exist: a rename on a local disk;
  on an object store, where directories are name prefixes, a copy of every object and then
  their removal."""
  source, target = path(source), path(target)
  if not is_remote(source):
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(source, target)
    return
  import fsspec  # pylint: disable=g-import-not-at-top
  fs, name = fsspec.core.url_to_fs(os.fspath(source))
  _, target_name = fsspec.core.url_to_fs(os.fspath(target))
  fs.invalidate_cache()
  fs.copy(name, target_name, recursive=True)
  fs.rm(name, recursive=True)
  fs.invalidate_cache()


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


# ---------------------------------------------------------------------------------------------
# The lock


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


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec='milliseconds')


class _LockFile:
  """The lock file's reads and writes: through `os` on a local disk, through fsspec elsewhere
  (gs://, s3://, memory://), where creating it exclusively is an upload the server refuses if
  the object exists (Cloud Storage's ifGenerationMatch=0, fsspec's mode='create')."""

  def __init__(self, workdir: str):
    self.path = f'{workdir.rstrip("/")}/{LOCK_NAME}'
    self.remote = is_remote(workdir)
    if self.remote:
      import fsspec  # pylint: disable=g-import-not-at-top
      self.fs, self.name = fsspec.core.url_to_fs(self.path)
      self.fs.makedirs(self.fs._parent(self.name), exist_ok=True)  # pylint: disable=protected-access
    else:
      self.fs, self.name = None, self.path
      os.makedirs(workdir, exist_ok=True)

  def read(self) -> Optional[dict]:
    """The holder; None if there is no lock, {} if it cannot be read (torn by a kill during
    its creation: stale)."""
    try:
      if self.remote:
        self.fs.invalidate_cache()
        text = self.fs.cat_file(self.name).decode('utf-8')
      else:
        with open(self.name, encoding='utf-8') as f:
          text = f.read()
      holder = json.loads(text)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}
    return holder if isinstance(holder, dict) else {}

  def create(self, holder: dict) -> bool:
    """Creates the lock holding `holder` unless one exists; whether it was created."""
    text = json.dumps(holder)
    if not self.remote:
      try:
        fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, 'w', encoding='utf-8') as f:
        f.write(text)
      return True
    self.fs.invalidate_cache()
    if self.fs.exists(self.name):
      return False
    try:
      self.fs.pipe_file(self.name, text.encode('utf-8'), mode='create')
    except FileExistsError:
      return False
    return True

  def replace(self, holder: dict):
    if self.remote:
      self.fs.pipe_file(self.name, json.dumps(holder).encode('utf-8'))
    else:
      atomic_write_json(self.name, holder)

  def remove(self):
    with contextlib.suppress(FileNotFoundError):
      if self.remote:
        self.fs.rm_file(self.name)
        self.fs.invalidate_cache()
      else:
        os.remove(self.name)


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
          f"{holder.get('started', '?')}")


def _is_mine(holder: Optional[dict]) -> bool:
  return bool(holder) and (holder.get('host'), holder.get('pid')) == (socket.gethostname(),
                                                                      os.getpid())


def _silent_for(holder: dict) -> Optional[float]:
  """Seconds since the holder's last heartbeat (or its start, for a lock without one)."""
  stamp = holder.get('heartbeat') or holder.get('started')
  try:
    then = datetime.datetime.fromisoformat(stamp)
  except (TypeError, ValueError):
    return None
  if then.tzinfo is None:
    then = then.astimezone()
  return (datetime.datetime.now().astimezone() - then).total_seconds()


def _stale_because(holder: dict) -> Optional[str]:
  """Why a lock is stale, or None if its holder may be running."""
  if not holder:
    return 'unreadable'
  if holder.get('host') == socket.gethostname() and not _alive(int(holder.get('pid', -1))):
    return f'{_describe(holder)}: its process is gone'
  silent = _silent_for(holder)
  if silent is not None and silent > STALE_AFTER_SECONDS:
    return f'{_describe(holder)}: no heartbeat for {silent:.0f} s'
  return None


def _try_acquire(workdir: str, what: str) -> Optional[str]:
  """Takes the lock; None on success, else the reason it is refused."""
  lock = _LockFile(workdir)
  me = {'host': socket.gethostname(), 'pid': os.getpid(), 'what': what, 'started': _now()}
  me['heartbeat'] = me['started']
  for _ in range(3):
    if lock.create(me):
      # Where a store ignored the exclusive create (its last writer wins), read back.
      if _is_mine(lock.read()):
        return None
      continue
    holder = lock.read()
    if holder is None:
      continue    # removed meanwhile: try again
    if _is_mine(holder):
      return None  # this process already holds it (a job's stages)
    reason = _stale_because(holder)
    if reason is None:
      return (f'{workdir} is in use by another trainer ({_describe(holder)}); wait for it '
              f'to finish, stop it, or use another --workdir (if that process is gone, '
              f'remove {lock.path})')
    logging.warning('Taking over the stale lock of %s (%s)', workdir, reason)
    lock.remove()
  return f'could not take the lock {lock.path} (it keeps changing: another trainer is starting)'


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


class _Heartbeat:
  """Refreshes the lock's heartbeat every HEARTBEAT_SECONDS in a daemon thread, so that a
  trainer on another host can tell a running holder from one that is gone."""

  def __init__(self, lock: _LockFile):
    self.lock = lock
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._run, name='workdir-lock-heartbeat', daemon=True)
    self.thread.start()

  def _run(self):
    while not self.stop.wait(HEARTBEAT_SECONDS):
      try:
        holder = self.lock.read()
        if not _is_mine(holder):
          logging.error('The lock %s is no longer this trainer\'s (%s): another trainer may be '
                        'writing this run directory', self.lock.path,
                        _describe(holder) if holder else 'removed')
          return
        holder['heartbeat'] = _now()
        self.lock.replace(holder)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Could not refresh the heartbeat of %s: %s', self.lock.path, os_error(e))

  def close(self):
    self.stop.set()
    self.thread.join()


@contextlib.contextmanager
def locked(workdir: PathLike, what: str = 'train'):
  """Holds the run directory's lock while inside; raises WorkdirLockedError if another live
  trainer holds it. Re-entrant within one process (a job's stage inside the job's folder
  takes the stage folder's own lock)."""
  import jax  # pylint: disable=g-import-not-at-top
  workdir = os.fspath(workdir)
  workdir = workdir if is_remote(workdir) else os.path.abspath(workdir)
  lock = _LockFile(workdir)
  owner = jax.process_index() == 0
  held_before = owner and _is_mine(lock.read())
  reason = _try_acquire(workdir, what) if owner else None
  reason = _broadcast_refusal(reason)
  if reason:
    raise WorkdirLockedError(reason)
  heartbeat = _Heartbeat(lock) if owner and not held_before else None
  try:
    yield
  finally:
    if heartbeat is not None:
      heartbeat.close()
      if _is_mine(lock.read()):
        lock.remove()
