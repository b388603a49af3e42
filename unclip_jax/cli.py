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


def resolve_config_paths(argv: list[str]) -> list[str]:
  """`--config=configs/<stage>.py[:preset]` names a file of the source tree; where there is no
  such file (an installed package run from another directory) it names the installed one
  (`unclip_jax.presets`), so the documented commands work from anywhere."""
  out = []
  for arg in argv:
    if arg.startswith('--config=') and not arg.startswith('--config=-'):
      path, sep, rest = arg[len('--config='):].partition(':')
      if not os.path.exists(path) and os.path.dirname(path).rstrip('/').endswith('configs'):
        from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
        stage = os.path.splitext(os.path.basename(path))[0]
        try:
          installed = config_lib.preset_module(stage).__file__
        except FileNotFoundError:
          installed = None
        if installed:
          arg = f'--config={installed}{sep}{rest}'
    out.append(arg)
  return out


def parse_flags(argv):
  """absl's parser, with bad flags and config overrides reported in one line, not a traceback."""
  argv = resolve_config_paths(list(argv))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'Invalid command line: {e}')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).replace('\\n', ' ').replace("\\'", '').strip('\'"')
    sys.exit(f'Invalid config override: unknown field or bad value: {message}')


def console_setup():
  """For console scripts (`unclip-train`, ...): the working directory joins the import path as
  it does for `python -m` (a user's config file may import modules beside it)."""
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
