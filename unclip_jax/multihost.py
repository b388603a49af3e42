"""Small helpers for code that also runs as one process of a multi-process (`jax.distributed`)
job."""

import jax


def barrier(name: str):
  """Waits until every process reaches the barrier `name`; nothing in a single process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
