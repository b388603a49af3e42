"""Shared fixtures. The whole session runs with 8 simulated CPU devices for sharding tests."""

import os

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
# The in-process tests run tiny models: compile time dominates, so compile with less
# optimisation. (Subprocess end-to-end runs reset XLA_FLAGS and get the default.)
if '--xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_num_cpu_devices', 8)
# Many tests compile the same tiny programs (the same configs on the same meshes): a
# compilation cache shared by the session's tests compiles each once.
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position
jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='unclip_jax_xla_cache_'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

import sys  # pylint: disable=g-import-not-at-top,wrong-import-position
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))  # for `configs`

from tests import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.helpers import tiny_clip_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: end-to-end training runs (run once in CI)')


# The session's end-to-end training runs (`BackgroundRuns`): subprocesses started as early as
# their inputs exist, so that they overlap with the in-process tests and with each other.
CLIP_RUN = ('configs/clip.py:tiny', '--config.num_train_steps=300',
            '--config.optim.warmup_steps=50', '--config.data.num_train=8000',
            '--config.checkpoint.every_steps=0')
PRIOR_RUN = ('configs/prior.py:tiny', '--config.num_train_steps=300',
             '--config.data.num_train=8000', '--config.checkpoint.every_steps=0',
             '--config.eval.num_examples=128', '--config.eval.batch_size=128',
             '--config.batch_size=64')
# At 16px (the CLIP sees the images resized to its 32px).
DECODER_RUN = ('configs/decoder.py:tiny', '--config.num_train_steps=200',
               '--config.data.resolution=16', '--config.data.num_train=8000',
               '--config.checkpoint.every_steps=0', '--config.eval.num_examples=32',
               '--config.eval.batch_size=32', '--config.sampling.num_images=8')


class BackgroundRuns:
  """The session's learning runs, in the background: CLIP first, then the prior's and the
  decoder's on it, each started as soon as its inputs exist (`poll` runs between tests)."""

  def __init__(self, data_dir: str, tmp_path_factory, wanted: set):
    self.data_dir, self.tmp, self.wanted = data_dir, tmp_path_factory, wanted
    self.clip, self.clip_metrics, self.stages, self.processes = None, None, None, []

  def _start(self, name, config, *overrides):
    started = helpers.start_main(config, self.tmp.mktemp(f'{name}_run'), self.data_dir,
                                 *overrides)
    self.processes.append(started[0])
    return started

  def start_clip(self):
    if self.wanted:   # every learning run needs the CLIP
      self.clip = self._start('clip', *CLIP_RUN)

  def clip_result(self):
    """(workdir, eval metrics) of the CLIP run, once it has finished."""
    if self.clip_metrics is None:
      self.clip_metrics = helpers.finish_main(self.clip)
    return self.clip[1], self.clip_metrics

  def poll(self):
    if self.stages is None and self.clip is not None and self.clip[0].poll() == 0:
      self.start_stages()

  def start_stages(self):
    from configs import prior as prior_configs  # pylint: disable=g-import-not-at-top
    from unclip_jax.data import embeddings  # pylint: disable=g-import-not-at-top
    from unclip_jax.stages import clip as clip_stage  # pylint: disable=g-import-not-at-top
    clip_workdir, _ = self.clip_result()
    clip_flag = f'--config.clip.workdir={clip_workdir}'
    self.stages = {}
    if 'prior_run' in self.wanted:
      data_config = prior_configs.get_config('tiny').data
      data_config.update(data_dir=self.data_dir, num_train=8000)
      emb = str(self.tmp.mktemp('prior_embeddings'))
      embeddings.write(clip_stage.load_frozen(clip_workdir), data_config, emb)
      self.stages['prior'] = self._start('prior', PRIOR_RUN[0], clip_flag,
                                         f'--config.data.embeddings_dir={emb}', *PRIOR_RUN[1:])
    if 'decoder_run' in self.wanted:
      self.stages['decoder'] = self._start('decoder', DECODER_RUN[0], clip_flag, *DECODER_RUN[1:])

  def stage_result(self, name):
    """(workdir, eval metrics) of the prior's or the decoder's run, once it has finished."""
    if self.stages is None:
      self.start_stages()
    return self.stages[name][1], helpers.finish_main(self.stages[name])

  def kill(self):
    for process in self.processes:
      process.kill()    # a no-op once it has finished


_RUNS_KEY = pytest.StashKey()
_WAITS = ('trained_tiny_clip', 'prior_run', 'decoder_run')


def pytest_collection_modifyitems(items):
  """The tests that wait for the background learning runs go last, so that the other tests run
  while those train (a run alone keeps ~1.3 of the 2 CI cores busy)."""
  waits = [item for item in items if set(_WAITS) & set(getattr(item, 'fixturenames', ()))]
  items[:] = [item for item in items if item not in waits] + waits


def pytest_runtest_teardown(item):
  runs = item.config.stash.get(_RUNS_KEY, None)
  if runs is not None:
    runs.poll()


@pytest.fixture(scope='session')
def data_dir(request, tmp_path_factory):
  """A tfds data dir shared by the session; datasets are generated on first use. Starts the
  background learning runs that collected tests need."""
  path = str(tmp_path_factory.mktemp('datasets'))
  os.environ['UNCLIP_DATA_DIR'] = path
  wanted = {f for item in request.session.items for f in _WAITS if f in item.fixturenames}
  runs = BackgroundRuns(path, tmp_path_factory, wanted)
  request.addfinalizer(runs.kill)
  runs.start_clip()
  request.config.stash[_RUNS_KEY] = runs
  return path


@pytest.fixture(scope='session')
def make_tiny_clip_config(data_dir):
  return lambda **kw: tiny_clip_config(data_dir, **kw)


@pytest.fixture(scope='session')
def trained_tiny_clip(request, data_dir):
  """The README's CLIP job at a shorter length (32px, 300 steps): (workdir, eval metrics)."""
  del data_dir  # it started the run
  return request.config.stash[_RUNS_KEY].clip_result()


@pytest.fixture(scope='session')
def prior_run(request, data_dir):
  """The prior learning run on the trained CLIP's embeddings: (workdir, eval metrics)."""
  del data_dir
  return request.config.stash[_RUNS_KEY].stage_result('prior')


@pytest.fixture(scope='session')
def decoder_run(request, data_dir):
  """The decoder learning run on the trained CLIP: (workdir, eval metrics)."""
  del data_dir
  return request.config.stash[_RUNS_KEY].stage_result('decoder')


def perturbed(params, seed):
  """Random params away from the zero-initialised output layers (so outputs depend on them)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


@pytest.fixture(scope='session')
def untrained_run(data_dir, tmp_path_factory):
  """An untrained tiny system saved as a run: clip/, prior/, decoder/ (16px), upsampler/ (→32px)."""
  from unclip_jax import stages  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import clip as clip_stage, decoder as decoder_stage, export  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import prior as prior_stage, upsampler as upsampler_stage  # pylint: disable=g-import-not-at-top
  root = str(tmp_path_factory.mktemp('unclip_run'))
  clip = clip_stage.random_clip(helpers.tiny_clip_config(data_dir))
  clip_stage.save_frozen(os.path.join(root, 'clip', 'export'), clip.params, clip.config)
  for name, make, cls in (('prior', helpers.tiny_prior_config, prior_stage.Stage),
                          ('decoder', helpers.tiny_decoder_config, decoder_stage.Stage)):
    config = make(data_dir, None, **{'sampling.steps': '3'})
    stage = cls(config, clip=clip)
    params = perturbed(stages.init_params(stage, jax.random.PRNGKey(1)), 2)
    config.clip.workdir = os.path.join(root, 'clip')
    export.save_export(os.path.join(root, name, 'export'), params, config)
  config = helpers.tiny_upsampler_config(data_dir, **{'data.resolution': 32, 'sampling.steps': '3'})
  stage = upsampler_stage.Stage(config)
  params = perturbed(stages.init_params(stage, jax.random.PRNGKey(3)), 4)
  export.save_export(os.path.join(root, 'upsampler', 'export'), params, config)
  return root

