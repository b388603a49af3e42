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


# The session's end-to-end training runs: subprocesses started as early as their inputs exist,
# so that they overlap with the in-process tests and with each other (one run keeps ~1.3 of the
# 2 CI cores busy). Their tests wait for the results.
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


def _wanted(request, fixture: str) -> bool:
  return any(fixture in item.fixturenames for item in request.session.items)


@pytest.fixture(scope='session')
def data_dir(request, tmp_path_factory):
  """A tfds data dir shared by the session; datasets are generated on first use. Starts the
  CLIP training run in the background when a collected test needs it."""
  path = str(tmp_path_factory.mktemp('datasets'))
  os.environ['UNCLIP_DATA_DIR'] = path
  if _wanted(request, 'trained_tiny_clip'):
    config, *overrides = CLIP_RUN
    started = helpers.start_main(config, tmp_path_factory.mktemp('clip_run'), path, *overrides)
    request.addfinalizer(started[0].kill)   # a no-op once it has finished
    request.config.stash[_CLIP_KEY] = started
  return path


_CLIP_KEY = pytest.StashKey()


@pytest.fixture(scope='session')
def make_tiny_clip_config(data_dir):
  return lambda **kw: tiny_clip_config(data_dir, **kw)


@pytest.fixture(scope='session')
def trained_tiny_clip(request, data_dir):
  """The README's CLIP job at a shorter length (32px, 300 steps): (workdir, eval metrics)."""
  del data_dir  # it started the run
  started = request.config.stash[_CLIP_KEY]
  return started[1], helpers.finish_main(started)


@pytest.fixture(scope='session')
def stage_runs(request, trained_tiny_clip, data_dir, tmp_path_factory):
  """The prior's and the decoder's learning runs on the trained CLIP (whichever collected tests
  need), started together in the background: {'prior': started, 'decoder': started}."""
  from configs import prior as prior_configs  # pylint: disable=g-import-not-at-top
  from unclip_jax.data import embeddings  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import clip as clip_stage  # pylint: disable=g-import-not-at-top
  clip_workdir, _ = trained_tiny_clip
  clip_flag = f'--config.clip.workdir={clip_workdir}'
  runs = {}
  if _wanted(request, 'prior_run'):
    data_config = prior_configs.get_config('tiny').data
    data_config.update(data_dir=data_dir, num_train=8000)
    emb = str(tmp_path_factory.mktemp('prior_embeddings'))
    embeddings.write(clip_stage.load_frozen(clip_workdir), data_config, emb)
    config, *overrides = PRIOR_RUN
    runs['prior'] = helpers.start_main(config, tmp_path_factory.mktemp('prior_run'), data_dir,
                                       clip_flag, f'--config.data.embeddings_dir={emb}',
                                       *overrides)
  if _wanted(request, 'decoder_run'):
    config, *overrides = DECODER_RUN
    runs['decoder'] = helpers.start_main(config, tmp_path_factory.mktemp('decoder_run'),
                                         data_dir, clip_flag, *overrides)
  for started in runs.values():
    request.addfinalizer(started[0].kill)
  return runs


@pytest.fixture(scope='session')
def prior_run(stage_runs):
  """The prior learning run: (workdir, eval metrics)."""
  return stage_runs['prior'][1], helpers.finish_main(stage_runs['prior'])


@pytest.fixture(scope='session')
def decoder_run(stage_runs):
  """The decoder learning run: (workdir, eval metrics)."""
  return stage_runs['decoder'][1], helpers.finish_main(stage_runs['decoder'])


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

