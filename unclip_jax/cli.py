"""What the command-line entry points share: flag parsing with one-line errors, quiet logs."""

import os
import sys

from absl import flags


class QuietLibraries:
  """A logging filter that drops INFO-level chatter from orbax/tfds/grain/jax; warnings and
  errors still pass."""
  NOISY = ('/orbax/', '/tensorflow_datasets/', '/grain/', '/jax/_src/')

  def filter(self, record) -> bool:
    return record.levelno > 20 or not any(n in record.pathname for n in self.NOISY)


def parse_flags(argv):
  """absl's parser, with bad flags and config overrides reported in one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'Invalid command line: {e}')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).replace('\\n', ' ').replace("\\'", '').strip('\'"')
    sys.exit(f'Invalid config override: unknown field or bad value: {message}')


def console_setup():
  """For console scripts (`unclip-train`, ...): config files import `configs.*`, which lives
  beside the package in the repository, so the working directory joins the import path as it
  does for `python -m`."""
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
