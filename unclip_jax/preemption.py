"""Stopping cleanly when a job is told to stop: SIGTERM (spot and preemptible VMs, SLURM's
`scancel` and time limit, `docker stop`) and SIGINT (Ctrl-C).

The training loop asks `stop_requested(step)` after every step. On a signal it finishes the
step it is in, writes a checkpoint at that step, waits for it, and returns; the command exits 0
and the same command resumes exactly where it stopped.

One process: a Python handler sets a flag. Several processes (`jax.distributed`): JAX's
coordination service watches SIGTERM in every process and agrees on one step at which every
process stops (`multihost_utils.reached_preemption_sync_point`), so no process waits forever for
another in a collective; a SIGINT is handed to that machinery as a SIGTERM. A second signal
while stopping restores the default behaviour and re-raises it (stops at once; checkpoints are
written atomically, so the latest complete one stays intact).
"""

import signal
import threading
from typing import Optional

from absl import logging

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_lock = threading.Lock()
_state = {'signal': None, 'installed': 0, 'previous': {}}


def _handler(signum, frame):
  del frame
  name = signal.Signals(signum).name
  if _state['signal'] is not None:      # the second one: stop now
    logging.warning('%s again: stopping at once', name)
    signal.signal(signum, _state['previous'].get(signum, signal.SIG_DFL))
    signal.raise_signal(signum)
    return
  _state['signal'] = name
  logging.warning('%s received: stopping after the current step, with a checkpoint', name)


def _distributed_handler(signum, frame):
  """SIGINT in a multi-process job: JAX's preemption notifier listens to SIGTERM only."""
  del frame
  import os  # pylint: disable=g-import-not-at-top
  _state['signal'] = signal.Signals(signum).name
  logging.warning('%s received: asking every process to stop at the same step', _state['signal'])
  os.kill(os.getpid(), signal.SIGTERM)


class handle_signals:  # pylint: disable=invalid-name
  """Context manager: while inside, SIGTERM and SIGINT request a clean stop instead of killing
  the process. Nests (a job's stages, the upsampler's thread); only the main thread installs
  handlers, and they are restored on leaving the outermost one."""

  def __enter__(self):
    import jax  # pylint: disable=g-import-not-at-top
    if threading.current_thread() is not threading.main_thread():
      return self
    with _lock:
      if _state['installed'] == 0:
        _state['signal'] = None
        distributed = jax.process_count() > 1
        for s in _SIGNALS:
          if distributed and s == signal.SIGTERM:
            continue   # JAX's coordination service handles it
          _state['previous'][s] = signal.signal(
              s, _distributed_handler if distributed else _handler)
      _state['installed'] += 1
    return self

  def __exit__(self, *exc):
    if threading.current_thread() is not threading.main_thread():
      return False
    with _lock:
      _state['installed'] -= 1
      if _state['installed'] == 0:
        for s, previous in _state['previous'].items():
          signal.signal(s, previous)
        _state['previous'] = {}
    return False


def received() -> Optional[str]:
  """The name of the signal that asked this process to stop, or None."""
  return _state['signal']


def stop_requested(step: int, manager=None) -> bool:
  """Whether the loop should checkpoint and stop after `step`. Every process of a multi-process
  job gets the same answer at the same step (through `manager.reached_preemption`, i.e. JAX's
  preemption sync point)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    if manager is not None and manager.reached_preemption(step):
      _state['signal'] = _state['signal'] or 'SIGTERM'
      return True
    return False
  return _state['signal'] is not None


def clear():
  """Forgets a received signal (tests, and a driver that handled it)."""
  _state['signal'] = None
