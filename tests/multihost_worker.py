"""One process of the two-process test (tests/test_multihost.py); 2 CPU devices each.

  multihost_worker.py WORKDIR DATA_DIR --distributed

started with the environment launch/slurm.sbatch's --dry_run gives the process: it joins the job
through `unclip_jax.multihost.initialize()`, as `--distributed` does."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from tests import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

# A tiny CLIP: XLA's backend optimisations would cost more compile time than they save.
os.environ['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=2 '
                           '--xla_backend_optimization_level=0' + xla_flags.fast_compile())

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(workdir: str, data_dir: str, distributed: str):
  assert distributed == '--distributed', distributed
  from unclip_jax import multihost  # pylint: disable=g-import-not-at-top
  multihost.initialize()
  process_id = str(jax.process_index())
  assert process_id == os.environ['SLURM_PROCID'] and jax.process_count() == 2
  from tests.helpers import tiny_clip_config  # pylint: disable=g-import-not-at-top
  from unclip_jax import stages, train  # pylint: disable=g-import-not-at-top
  config = tiny_clip_config(data_dir, num_train_steps=6)
  assert jax.device_count() == 4 and jax.local_device_count() == 2

  # The global batch is every process's local batch, in process order.
  stage = stages.get_stage(config)
  local = next(stage.make_iterator('train', config.batch_size // 2, seed=0, shuffle=True,
                                   process_index=jax.process_index(), process_count=2))
  mesh = train.make_mesh(config)
  batch = train.make_global_batch(local, mesh, ['image', 'tokens'])
  assert batch['image'].shape[0] == config.batch_size
  mine = sorted((s for s in batch['tokens'].addressable_shards), key=lambda s: s.index[0].start)
  np.testing.assert_array_equal(np.concatenate([s.data for s in mine]), local['tokens'])

  # SIGTERM to process 1 alone, during its step 3: JAX's preemption sync point stops both
  # processes after the same step, with the checkpoint at it; the same call resumes both.
  import signal  # pylint: disable=g-import-not-at-top
  from unclip_jax import preemption  # pylint: disable=g-import-not-at-top
  batches, make = [0], train.make_global_batch

  def make_and_signal(*args, **kwargs):
    batches[0] += 1
    if process_id == '1' and batches[0] == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return make(*args, **kwargs)
  train.make_global_batch = make_and_signal
  stopped = train.train_and_evaluate(config, workdir)
  stopped_at, received = batches[0], preemption.received()
  train.make_global_batch = make
  preemption.clear()
  metrics = train.train_and_evaluate(config, workdir)   # resumes where both stopped
  with open(os.path.join(workdir, f'result_{process_id}.json'), 'w') as f:
    json.dump({'stopped': stopped, 'stopped_at': stopped_at, 'received': received,
               'metrics': metrics}, f)


if __name__ == '__main__':
  main(*sys.argv[1:])
