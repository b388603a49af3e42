"""Shared fixtures. The whole session runs with 8 simulated CPU devices for sharding tests."""

import os

from tests import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
# The in-process tests run tiny models: compile time dominates, so compile with less
# optimisation. (Subprocess runs set their own XLA_FLAGS, with `xla_flags.fast_compile()`.)
if '--xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] += xla_flags.fast_compile()
# Under `pytest -n N` the workers share the cores (with the background job): each runs its ops
# on one thread rather than all of them spinning a pool of their own.
if os.environ.get('PYTEST_XDIST_WORKER') and 'multi_thread_eigen' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_cpu_multi_thread_eigen=false'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# gs:// paths through gcsfs rather than TensorFlow's filesystem, so that the tests' local Cloud
# Storage server (tests/cloud_storage.py) serves them; local paths are unaffected.
os.environ['EPATH_USE_TF'] = 'false'

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_num_cpu_devices', 8)
# Many tests compile the same tiny programs (the same configs on the same meshes): a
# compilation cache shared by the session's tests, and by the workers of `pytest -n N`, compiles
# each once. With a size limit JAX locks the cache around each read and write, so that one
# worker never reads an entry another is writing.
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position
_shared_cache = lambda run_id: os.path.join(tempfile.gettempdir(), f'unclip_jax_xla_cache_{run_id}')
_RUN_ID = os.environ.get('PYTEST_XDIST_TESTRUNUID')   # the same in every worker of one run
_XLA_CACHE = _shared_cache(_RUN_ID) if _RUN_ID else tempfile.mkdtemp(prefix='unclip_jax_xla_cache_')
jax.config.update('jax_compilation_cache_dir', _XLA_CACHE)
jax.config.update('jax_compilation_cache_max_size', 16 << 30)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

import sys  # pylint: disable=g-import-not-at-top,wrong-import-position
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))  # for `configs`

from tests import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.data import fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.helpers import tiny_clip_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: end-to-end training runs (run once in CI)')
  if config.getoption('numprocesses', None) and not hasattr(config, 'workerinput'):
    # The controller of `pytest -n N` names the run, so that it knows the workers' shared
    # compilation cache and removes it at the end.
    if config.getoption('testrunuid', None) is None:
      import uuid  # pylint: disable=g-import-not-at-top
      config.option.testrunuid = uuid.uuid4().hex


def pytest_unconfigure(config):
  import shutil  # pylint: disable=g-import-not-at-top
  if hasattr(config, 'workerinput'):
    return                                  # the controller removes the shared cache
  shutil.rmtree(_XLA_CACHE, ignore_errors=True)
  if config.getoption('numprocesses', None) and config.getoption('testrunuid', None):
    shutil.rmtree(_shared_cache(config.getoption('testrunuid')), ignore_errors=True)


# The session's end-to-end run: the README's main job (`python -m unclip_jax.train_all
# --config=configs/unclip.py:tiny`), shortened, on the user's-data path: the built-in images
# written as webdataset tars (32px PNG, caption, JSON attributes) are its data, so it reads
# shards, tokenizes with CLIP's BPE, evaluates with the dataset-agnostic metrics (zero-shot by
# the JSON's shape label) and reports the CLIP score and the pixel checker's reading (by the
# JSON's attributes). It runs as a subprocess on one device,
# starting when the data directory is made and training while the in-process tests run; the
# tests that read it go last. Its stages are the learning checks: CLIP, the prior on the CLIP's
# precomputed 32px embeddings, the decoder at 16px on the same embeddings (the shards' images
# resized; at this size without the tiny preset's 2x2 patches), and a
# one-level 16→32px upsampler trained only briefly (its learning is not checked here).
JOB_RUN = (
    '--config.clip.num_train_steps=250', '--config.clip.optim.warmup_steps=50',
    # The shards are another source: no counterfactual scenes (the built-in renderer's); the
    # CLIP preset's learning rate, which learns the shards' captions fastest without them.
    '--config.clip.data.counterfactual_negatives=False', '--config.clip.optim.lr=2e-3',
    '--config.clip.model.vision.posemb=learn',
    '--config.prior.num_train_steps=200', '--config.prior.batch_size=64',
    '--config.prior.eval.num_examples=128', '--config.prior.eval.batch_size=128',
    '--config.decoder.num_train_steps=160', '--config.decoder.batch_size=16',
    '--config.decoder.optim.warmup_steps=80',
    '--config.decoder.data.resolution=16', '--config.decoder.model.unet.patch_size=1',
    '--config.decoder.eval.num_examples=32',
    '--config.upsampler.num_train_steps=20', '--config.upsampler.data.resolution=32',
    '--config.upsampler.model.unet.channel_mult=(1,)',
    '--config.upsampler.eval.num_examples=8', '--config.upsampler.eval.batch_size=8',
    '--config.upsampler.sampling.num_images=4',
    '--config.sample.num_prompts=12', '--config.sample.batch_size=12',
    '--config.sample.grid_columns=4',
    *(f'--config.{stage}.checkpoint.every_steps=0'
      for stage in ('clip', 'prior', 'decoder', 'upsampler')))
JOB_SHARDS = dict(resolution=32, num_train=8000, num_test=1000, per_shard=1000)


def job_data_overrides(folder: str) -> tuple:
  """The job's data: the shards `tests.data.fixtures` writes into `folder`."""
  from unclip_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
  n = JOB_SHARDS
  paths = fixtures.job_shard_paths(folder, n['num_train'], n['num_test'], n['per_shard'])
  return ('--config.data.source=webdataset', f'--config.data.paths={paths["paths"]}',
          f'--config.data.eval_paths={paths["eval_paths"]}', '--config.data.label_key=shape',
          '--config.data.attribute_labels=True',
          f'--config.data.class_names={",".join(captioned_shapes.SHAPES)}')

_JOB_KEY = pytest.StashKey()
_READERS = ('job_run', 'trained_tiny_clip', 'prior_run', 'decoder_run')


def pytest_collection_modifyitems(items):
  """The tests that read the background job go last, so that the other tests run while it
  trains (it keeps ~1.3 of the 2 CI cores busy)."""
  readers = [item for item in items if set(_READERS) & set(getattr(item, 'fixturenames', ()))]
  items[:] = [item for item in items if item not in readers] + readers


def _run_folder(tmp_path_factory):
  """A folder shared by every process of the test run: the workers' common parent under
  `pytest -n N`, else the session's own base folder."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


@pytest.fixture(scope='session')
def data_dir(request, tmp_path_factory):
  """A tfds data dir shared by the run's tests (every worker's); datasets are generated on first
  use (two processes preparing the same one at once both succeed: `captioned_shapes.prepare`).
  Starts the background job if a collected test reads it and no other worker of the run has."""
  path = _run_folder(tmp_path_factory) / 'datasets'
  path.mkdir(exist_ok=True)
  path = str(path)
  os.environ['UNCLIP_DATA_DIR'] = path
  if any(set(_READERS) & set(item.fixturenames) for item in request.session.items):
    import filelock  # pylint: disable=g-import-not-at-top
    root = _run_folder(tmp_path_factory) / 'job'
    with filelock.FileLock(str(root) + '.lock'):
      started = None if root.exists() else root
      root.mkdir(exist_ok=True)
    shards = str(root / 'shards')
    overrides = JOB_RUN + job_data_overrides(shards)
    if started:
      n = JOB_SHARDS
      write = [sys.executable, '-m', 'tests.data.fixtures', shards, path, str(n['resolution']),
               str(n['num_train']), str(n['num_test']), str(n['per_shard'])]
      process, _ = helpers.start_job(root / 'unclip', path, *overrides, before=write)
      # Other workers may still read it: at the end it is given the time to finish, unless
      # this is the only process.
      request.addfinalizer(lambda: helpers.stop_job(
          process, wait=900 if os.environ.get('PYTEST_XDIST_WORKER') else 0))
    request.config.stash[_JOB_KEY] = (str(root / 'unclip'), overrides)
  return path


@pytest.fixture(scope='session')
def gcs_bucket():
  """`gs://BUCKET` on a local Cloud Storage server, for the session (tests/cloud_storage.py)."""
  from tests import cloud_storage  # pylint: disable=g-import-not-at-top
  server, _ = cloud_storage.start()
  yield f'gs://{cloud_storage.BUCKET}'
  server.kill()
  server.wait()


@pytest.fixture(scope='session')
def make_tiny_clip_config(data_dir):
  return lambda **kw: tiny_clip_config(data_dir, **kw)


@pytest.fixture(scope='session')
def job_run(request, data_dir):
  """The shortened main job (`JOB_RUN` on the shards), finished: (workdir, report, its command
  line overrides)."""
  del data_dir  # it started the job
  workdir, overrides = request.config.stash[_JOB_KEY]
  return workdir, helpers.finish(workdir), overrides


def _stage_run(job_run, name):
  workdir, report, _ = job_run
  return os.path.join(workdir, name), report['stages'][name]['eval']


@pytest.fixture(scope='session')
def trained_tiny_clip(job_run):
  """The job's CLIP (32px, 300 steps): (workdir, eval metrics)."""
  return _stage_run(job_run, 'clip')


@pytest.fixture(scope='session')
def prior_run(job_run):
  """The job's prior, trained on its CLIP's precomputed embeddings: (workdir, eval metrics)."""
  return _stage_run(job_run, 'prior')


@pytest.fixture(scope='session')
def decoder_run(job_run):
  """The job's decoder (16px, 160 steps) on its CLIP: (workdir, eval metrics)."""
  return _stage_run(job_run, 'decoder')


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
    params = helpers.perturbed(stages.init_params(stage, jax.random.PRNGKey(1)), 2)
    config.clip.workdir = os.path.join(root, 'clip')
    export.save_export(os.path.join(root, name, 'export'), params, config)
  config = helpers.tiny_upsampler_config(data_dir, **{'data.resolution': 32, 'sampling.steps': '3'})
  stage = upsampler_stage.Stage(config)
  params = helpers.perturbed(stages.init_params(stage, jax.random.PRNGKey(3)), 4)
  export.save_export(os.path.join(root, 'upsampler', 'export'), params, config)
  return root

