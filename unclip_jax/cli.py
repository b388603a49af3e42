"""What the command-line entry points share: flag parsing with one-line errors, quiet logs."""

import os
import sys

from absl import flags


def define_verbose_flag():
  if 'verbose' not in flags.FLAGS:
    flags.DEFINE_bool('verbose', False, 'Show the full traceback of an error that ends the '
                      'command (by default one line) and the libraries\' tracebacks in the log.')


def verbose() -> bool:
  return 'verbose' in flags.FLAGS and bool(flags.FLAGS['verbose'].value)


def exit_on(error: BaseException, prefix: str = 'Error'):
  """Ends the command with `error` in one line (exit status 1), or, with `--verbose`, re-raises
  it with its traceback."""
  if verbose():
    raise error
  sys.exit(f'{prefix}: {error}')


def quiet_logging():
  """The log filter every command installs (none of its effects with `--verbose`)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(QuietLibraries(keep_tracebacks=verbose()))


class QuietLibraries:
  """A logging filter that drops INFO-level chatter from orbax/tfds/grain/jax; warnings and
  errors still pass, an error without its traceback: the libraries log one for every thread
  an error passes through (orbax: five for one failed write) before it reaches our code, which
  reports it once."""
  NOISY = ('/orbax/', '/tensorflow_datasets/', '/grain/', '/jax/_src/')

  def __init__(self, keep_tracebacks: bool = False):
    self.keep_tracebacks = keep_tracebacks

  def filter(self, record) -> bool:
    if not any(n in record.pathname for n in self.NOISY):
      return True
    if record.levelno <= 20:
      return False
    if record.exc_info and record.exc_info[1] is not None and not self.keep_tracebacks:
      error = record.exc_info[1]
      first = (str(error).strip().splitlines() or [''])[0][:300]
      record.msg, record.args = f'{record.getMessage()} ({type(error).__name__}: {first})', None
      record.exc_info, record.exc_text = None, None
    return True


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


HELP_FLAGS = ('--help', '-help', '-h', '-?', '--helpshort')


def command_help(argv0: str) -> str:
  """The command's own flags with their help text, grouped by the module defining them (absl's
  `--help` shows only the flags of the `__main__` module, which for a console script is a
  wrapper defining none)."""
  by_module = flags.FLAGS.flags_by_module_dict()
  # The command's module: `unclip_jax.…` for a console script, its file's path under `-m`
  # (libraries' own flags, e.g. grain's or orbax's, stay in --helpfull).
  ours = [m for m in by_module if m.startswith('unclip_jax') or m.endswith('.py')]
  # The command's own module first (its doc is the help's), the shared flags (this module's:
  # --verbose) last.
  ours.sort(key=lambda m: m == __name__)
  doc = ''
  for name in ours:
    # A module run with `python -m` is registered under its file's path.
    module = sys.modules.get('__main__' if name.endswith('.py') else name)
    if module is not None and module.__doc__:
      doc = module.__doc__.strip()
      break
  lines = [f'usage: {os.path.basename(argv0)} [flags]', '']
  if doc:
    lines += [doc, '']
  lines += ['flags:']
  for name in ours:
    lines.append(flags.FLAGS.module_help(name))
  lines += ['', 'Config fields are overridden as --config.FIELD=VALUE (e.g. --config.optim.lr=3e-4); '
            '--helpfull lists absl\'s own flags too.']
  return '\n'.join(lines)


def parse_flags(argv):
  """absl's parser, with bad flags and config overrides reported in one line, not a traceback.
  `--help` lists the command's own flags."""
  argv = resolve_config_paths(list(argv))
  if any(a in HELP_FLAGS for a in argv[1:]):
    try:
      print(command_help(argv[0]))
    except BrokenPipeError:   # `--help | head`
      pass
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if 'Traceback (most recent call last)' in text:   # a config file's own error, in one line
      lines = [line.strip() for line in text.splitlines() if line.strip()]
      text = f'{lines[0]} {lines[-1]}'
    sys.exit(f'Invalid command line: {text}')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).replace('\\n', ' ').replace("\\'", '').strip('\'"')
    sys.exit(f'Invalid config override: unknown field or bad value: {message}')


def console_setup():
  """For console scripts (`unclip-train`, ...): the working directory joins the import path as
  it does for `python -m` (a user's config file may import modules beside it)."""
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
