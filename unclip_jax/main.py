"""Command-line entry point: `python -m unclip_jax.main --config=configs/clip.py:tiny --workdir=DIR`.

Every config field can be overridden: `--config.optim.lr=3e-4`. Unknown fields and values of the
wrong type are rejected by the flag parser; inconsistent values by `config_lib.validate`, before
anything is compiled.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from unclip_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Stage config file, e.g. configs/clip.py:tiny.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, logs, samples. Resumes if it '
                    'already holds a checkpoint.')
flags.DEFINE_bool('distributed', False, 'Join a multi-process job first (TPU pods, SLURM: '
                    'unclip_jax.multihost).')
cli.define_verbose_flag()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.quiet_logging()
  import jax  # pylint: disable=g-import-not-at-top
  from unclip_jax import config_lib, multihost, train  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed:
    multihost.initialize()
  logging.info('JAX processes: %d/%d, devices: %s', jax.process_index() + 1, jax.process_count(),
               jax.devices())
  try:
    config_lib.validate(FLAGS.config, jax.device_count(), jax.process_count())
  except config_lib.ConfigError as e:
    sys.exit(f'Invalid config: {e}')
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.RUN_ERRORS as e:
    cli.exit_on(e)


def run():
  """Console entry point (`unclip-train`)."""
  cli.console_setup()
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
