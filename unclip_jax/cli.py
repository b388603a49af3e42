"""What the command-line entry points share: flag parsing with one-line errors, quiet logs."""

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
