"""Multi-process (`jax.distributed`) jobs: starting them, and small helpers for code that also runs
as one process of one.

`initialize()` is what `--distributed` calls. It hands `jax.distributed.initialize` the arguments
`distributed_args(os.environ)` derives:

- explicit ones from the environment, as a launcher sets them: `JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, `JAX_LOCAL_DEVICE_IDS` (comma-separated);
- under SLURM (`srun`), the process count and id from `SLURM_NTASKS` / `SLURM_PROCID`, and the
  GPUs each process drives. JAX's own SLURM detection gives every process the one GPU whose index
  is its `SLURM_LOCALID`; that is right for one process per GPU, but with one process per node it
  would leave all GPUs but the first idle, and with `--gpus-per-task=1` (each task sees one GPU,
  numbered 0) it names a GPU the process cannot see. Here one process per node drives all the
  node's GPUs, and a task that sees a single GPU drives that one;
- on TPU VMs and elsewhere, nothing: JAX detects the pod's workers itself.

`python -m unclip_jax.multihost` prints the arguments this process would use (launchers'
`--dry_run`s show them for every process; JAX is imported only where it is used, so that this
takes a moment, not a second, per process).
"""

import json
import os
import sys
from typing import Mapping, Optional


_SLURM = ('SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')


def _int(environ: Mapping[str, str], name: str) -> int:
  try:
    return int(environ[name])
  except ValueError:
    raise ValueError(f'{name}={environ[name]!r} is not an integer') from None


def _gpus_visible(environ: Mapping[str, str]) -> Optional[int]:
  """How many GPUs this process can see, where the environment says; else None."""
  visible = environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None and visible.strip() not in ('', 'NoDevFiles'):
    return len([d for d in visible.split(',') if d.strip()])
  if environ.get('SLURM_GPUS_ON_NODE', '').isdigit():
    return int(environ['SLURM_GPUS_ON_NODE'])
  return None


def _tasks_per_node(environ: Mapping[str, str]) -> Optional[int]:
  nodes = environ.get('SLURM_STEP_NUM_NODES') or environ.get('SLURM_JOB_NUM_NODES') or environ.get(
      'SLURM_NNODES')
  if nodes and nodes.isdigit() and int(nodes):
    return max(1, _int(environ, 'SLURM_NTASKS') // int(nodes))
  return None


def distributed_args(environ: Mapping[str, str]) -> dict:
  """Keyword arguments for `jax.distributed.initialize` in the environment `environ` (those JAX
  would get wrong or cannot know); {} where JAX detects everything itself."""
  args = {}
  if environ.get('JAX_COORDINATOR_ADDRESS'):
    args['coordinator_address'] = environ['JAX_COORDINATOR_ADDRESS']
  if environ.get('JAX_NUM_PROCESSES'):
    args['num_processes'] = _int(environ, 'JAX_NUM_PROCESSES')
  if environ.get('JAX_PROCESS_ID'):
    args['process_id'] = _int(environ, 'JAX_PROCESS_ID')
  if environ.get('JAX_LOCAL_DEVICE_IDS'):
    try:
      args['local_device_ids'] = [int(d) for d in environ['JAX_LOCAL_DEVICE_IDS'].split(',')]
    except ValueError:
      raise ValueError(f'JAX_LOCAL_DEVICE_IDS={environ["JAX_LOCAL_DEVICE_IDS"]!r} is not a '
                       'comma-separated list of integers') from None
  if all(k in environ for k in _SLURM):
    args.setdefault('num_processes', _int(environ, 'SLURM_NTASKS'))
    args.setdefault('process_id', _int(environ, 'SLURM_PROCID'))
    if 'local_device_ids' not in args:
      gpus, per_node = _gpus_visible(environ), _tasks_per_node(environ)
      if per_node == 1 and gpus:
        args['local_device_ids'] = list(range(gpus))      # one process drives the whole node
      elif gpus == 1:
        args['local_device_ids'] = [0]                     # --gpus-per-task=1: its only GPU
      else:
        args['local_device_ids'] = [_int(environ, 'SLURM_LOCALID')]
  if 'process_id' in args and 'num_processes' in args and not (
      0 <= args['process_id'] < args['num_processes']):
    raise ValueError(f'process id {args["process_id"]} is not below the process count '
                     f'{args["num_processes"]}')
  return args


def initialize(environ: Optional[Mapping[str, str]] = None):
  """`jax.distributed.initialize` with `distributed_args` of the environment."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(**distributed_args(os.environ if environ is None else environ))


def barrier(name: str):
  """Waits until every process reaches the barrier `name`; nothing in a single process."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


if __name__ == '__main__':
  try:
    print(json.dumps(distributed_args(os.environ), sort_keys=True))
  except ValueError as e:
    sys.exit(f'Error: {e}')
