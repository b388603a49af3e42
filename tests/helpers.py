"""Test helpers without side effects (importable from subprocesses)."""


def _shrink(c, data_dir: str, *, batch_size: int, steps: int, eval_examples: int):
  """The settings every unit-test config shares: 16px data (256/64 examples) in `data_dir`,
  a few steps, synchronous checkpoints."""
  c.data.update(data_dir=data_dir, resolution=16, num_train=256, num_test=64)
  c.batch_size = batch_size
  c.num_train_steps = steps
  c.optim.warmup_steps = max(1, steps // 4)
  c.log_every_steps = max(1, steps // 2)
  c.checkpoint.async_save = False
  c.eval.num_examples = eval_examples
  return c


def tiny_clip_config(data_dir: str, **overrides):
  """configs/clip.py:tiny shrunk further for unit tests (16px, 1-2 layers, 256 examples)."""
  from configs import clip  # pylint: disable=g-import-not-at-top
  c = _shrink(clip.get_config('tiny'), data_dir, batch_size=16, steps=8, eval_examples=64)
  c.model.embed_dim = 32
  c.model.text.update(width=32, depth=1, num_heads=2)
  c.model.vision.update(width=32, depth=2, num_heads=2)
  c.checkpoint.every_steps = 4
  c.eval.batch_size = 64
  return _override(c, overrides)


def _override(c, overrides):
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def tiny_prior_config(data_dir: str, clip_workdir=None, **overrides):
  """configs/prior.py:tiny shrunk for unit tests, on the 16px test CLIP."""
  from configs import prior  # pylint: disable=g-import-not-at-top
  c = _shrink(prior.get_config('tiny'), data_dir, batch_size=16, steps=8, eval_examples=32)
  c.clip.workdir = clip_workdir
  c.model.update(width=32, depth=2, num_heads=2)
  c.prior.stats_examples = 128
  c.sampling.steps = '8'
  c.checkpoint.every_steps = 4
  c.eval.batch_size = 16
  return _override(c, overrides)


def mesh(shape, n):
  """A (data, fsdp, tensor) mesh over the first n devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  return jax.make_mesh(shape, config_lib.MESH_AXES, devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def take_batches(stage, config, n):
  """n training batches (numpy) restricted to the keys the step consumes."""
  it = stage.make_iterator('train', config.batch_size, seed=0, shuffle=True, process_index=0,
                           process_count=1)
  keys = list(stage.batch_spec(config.batch_size))
  return [{k: b[k] for k in keys} for b in (next(it) for _ in range(n))]


def perturbed(params, seed: int, scale: float = 0.02):
  """params + scale·N(0, 1) (numpy noise: nothing to compile): away from the zero-initialised
  output layers, so that outputs depend on every input and parameter."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params)


def rbg_key(seed: int = 0):
  """A random key of the rbg generator, which compiles much faster than threefry on CPU (the
  tests only need some init)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.random.key(seed, impl='rbg')


def random_params(init, *args, scale: float = 0.1, seed: int = 0, **kwargs):
  """Random parameters of the shapes `init(key, *args, **kwargs)` (a module's `init`) gives,
  without compiling it: scale·N(0, 1), with norm scales near 1."""
  import functools  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  shapes = nn.unbox(jax.eval_shape(functools.partial(init, **kwargs), rbg_key(), *args))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes['params'])
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p + 1 if path[-1].key == 'scale' else p, perturbed(zeros, seed, scale))


def run_train_steps(stage, config, mesh_, batches):
  """Creates the sharded state on `mesh_` and runs the compiled step; (state, losses)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from unclip_jax import train  # pylint: disable=g-import-not-at-top
  tx = train.make_optimizer(config)
  with jax.set_mesh(mesh_), nn.logical_axis_rules(train.logical_rules(config)):
    state, shardings = train.create_train_state(stage, config, mesh_, tx)
    step = train.compile_train_step(stage, config, mesh_, tx, shardings)
    constants = train.stage_constants(stage, mesh_)
    losses = []
    for b in batches:
      state, metrics = step(state, train.make_global_batch(b, mesh_), constants)
      losses.append(float(metrics['loss']))
  return state, losses


# For training subprocesses: glibc's malloc backs large blocks with transparent huge pages and
# keeps them (no munmap, no re-zeroing of fresh 4 KiB pages). XLA:CPU allocates each step's
# buffers anew: the tiny CLIP's step here took 3.4M page faults per 40 steps without it, 0.19M
# with it, and 0.27 s instead of 0.34 s; the background job 280 s and 470 CPU-s instead of
# 320 s and 557 CPU-s, with identical results. (Read by glibc at process start, so it cannot
# help the pytest process itself, whose tests are compile-bound anyway.)
HUGE_PAGES_MALLOC = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold='
                                       '33554432:glibc.malloc.trim_threshold=1073741824'}


def start_job(workdir, data_dir: str, *overrides: str, before=None):
  """Starts `python -m unclip_jax.train_all --config=configs/unclip.py:tiny` (the whole system)
  with `overrides` on one CPU device in the background, after the command `before` (argv; e.g.
  one writing its data) if given: (process, workdir). Its output goes to `job.log` beside
  `workdir` and its exit status to `job.status` there, so that `finish` can wait for it from any
  process (the test workers of `pytest -n`)."""
  import os  # pylint: disable=g-import-not-at-top
  import shlex  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # One XLA thread: the job shares the machine's cores with the in-process tests, and two
  # processes' thread pools spinning on 2 cores cost more than the job's own parallelism gains
  # (measured: the suite in 744 s instead of 1098 s).
  # (Not the tests' compile flags: at XLA's default optimisation they compile slower, and
  # less optimisation doubles the job's step times.)
  env = dict(os.environ, UNCLIP_DATA_DIR=data_dir, TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS='--xla_cpu_multi_thread_eigen=false', **HUGE_PAGES_MALLOC)
  folder = os.path.dirname(str(workdir))
  job = [sys.executable, '-m', 'unclip_jax.train_all', '--config=configs/unclip.py:tiny',
         f'--workdir={workdir}', *overrides]
  command = shlex.join(job) if before is None else f'{shlex.join(before)} && {shlex.join(job)}'
  status = shlex.quote(os.path.join(folder, 'job.status'))
  # The status is written to a temporary name and renamed: a reader never sees half of it.
  command = f'{{ {command}; }} > {shlex.quote(os.path.join(folder, "job.log"))} 2>&1; ' \
            f'echo $? > {status}.tmp && mv {status}.tmp {status}'
  # Its own process group: `stop_job` ends the shell and the job together.
  process = subprocess.Popen(['bash', '-c', command], cwd=repo, env=env, start_new_session=True)
  return process, str(workdir)


def stop_job(process, wait: float = 0):
  """Ends a `start_job` process and its job, after waiting up to `wait` s for it to finish."""
  import os  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  try:
    process.wait(timeout=wait)
  except (subprocess.TimeoutExpired, KeyboardInterrupt):
    pass
  if process.poll() is None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def finish(workdir, timeout: int = 900) -> dict:
  """Waits for the `start_job` run in `workdir` (started by this process or another) and returns
  its report.json; asserts that it succeeded (the message is the end of its output)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  folder = os.path.dirname(str(workdir))
  status = os.path.join(folder, 'job.status')
  deadline = time.monotonic() + timeout
  while not os.path.exists(status):
    assert time.monotonic() < deadline, f'the background job did not finish in {timeout} s'
    time.sleep(0.5)
  with open(status) as f:
    returncode = int(f.read())
  with open(os.path.join(folder, 'job.log')) as f:
    output = f.read()
  assert returncode == 0, output[-4000:]
  with open(os.path.join(workdir, 'report.json')) as f:
    return json.load(f)


def apply_flag_overrides(config, overrides):
  """Applies `--config.a.b=value` command-line overrides to a ConfigDict, as the command line
  does (a string field keeps the text; others read it as a Python literal)."""
  import ast  # pylint: disable=g-import-not-at-top
  for flag in overrides:
    key, text = flag[len('--config.'):].split('=', 1)
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    if isinstance(node[leaf], str):
      node[leaf] = text
    else:
      try:
        node[leaf] = ast.literal_eval(text)
      except (ValueError, SyntaxError):   # a text value of a field that is still None
        node[leaf] = text
  return config


def tiny_decoder_config(data_dir: str, clip_workdir=None, **overrides):
  """configs/decoder.py:tiny shrunk for unit tests, on the 16px test CLIP."""
  from configs import decoder  # pylint: disable=g-import-not-at-top
  c = _shrink(decoder.get_config('tiny'), data_dir, batch_size=8, steps=4, eval_examples=8)
  c.clip.workdir = clip_workdir
  c.model.unet.update(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,))
  c.model.context_width = 32
  c.diffusion.var_type = 'learned_range'   # the paper's and karlo's (tiny's is fixed_small)
  c.sampling.steps = '4'
  c.sampling.num_images = 4
  c.checkpoint.every_steps = 0
  c.eval.batch_size = 8
  return _override(c, overrides)


def tiny_upsampler_config(data_dir: str, **overrides):
  """configs/upsampler.py:tiny shrunk for unit tests: 8px → 16px, 8px crops."""
  from configs import upsampler  # pylint: disable=g-import-not-at-top
  c = _shrink(upsampler.get_config('tiny'), data_dir, batch_size=8, steps=4, eval_examples=8)
  c.upsampler.crop_size = 8
  c.sampling.steps = '4'
  c.sampling.num_images = 4
  c.checkpoint.every_steps = 0
  c.eval.batch_size = 8
  return _override(c, overrides)


# A tiny CLIP BPE vocabulary for converter tests: byte tokens, a few merges, then sot and eot.
TINY_CLIP_MERGES = (('t', 'h'), ('th', 'e</w>'), ('c', 'a'), ('ca', 't</w>'), ('d', 'o'),
                    ('do', 'g</w>'), ('p', 'h'), ('o', 't'), ('ph', 'ot'), ('phot', 'o</w>'),
                    ('o', 'f</w>'))


def tiny_clip_vocab():
  """(vocab {token: id}, merges [(a, b)]) of a 535-token CLIP BPE tokenizer."""
  from unclip_jax.data.tokenizers import bytes_to_unicode  # pylint: disable=g-import-not-at-top
  chars = list(bytes_to_unicode().values())
  tokens = chars + [c + '</w>' for c in chars] + [a + b for a, b in TINY_CLIP_MERGES]
  tokens += ['<|startoftext|>', '<|endoftext|>']
  return {t: i for i, t in enumerate(tokens)}, list(TINY_CLIP_MERGES)


def import_open_clip():
  """open_clip, also where torchvision is not installed (PyPI's torchvision does not run beside
  every torch build): open_clip needs torchvision only for its image transforms, so a stand-in
  torchvision is used just while open_clip imports, then removed from sys.modules. Raises
  ImportError when open_clip itself is missing."""
  import importlib.abc  # pylint: disable=g-import-not-at-top
  import importlib.machinery  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  try:
    import open_clip  # pylint: disable=g-import-not-at-top
    return open_clip
  except ModuleNotFoundError as e:
    if e.name is None or not e.name.startswith('torchvision'):
      raise

  class PlaceholderMeta(type):
    def __getattr__(cls, name):   # enum-like members, e.g. InterpolationMode.BICUBIC
      if name.startswith('__'):
        raise AttributeError(name)
      return name

  class Placeholder(metaclass=PlaceholderMeta):
    def __init__(self, *args, **kwargs):
      pass

  class StubModule(types.ModuleType):
    __path__ = []

    def __getattr__(self, name):
      if name.startswith('__'):
        raise AttributeError(name)
      value = Placeholder if name[:1].islower() else type(name, (Placeholder,), {})
      setattr(self, name, value)
      return value

  class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
      del path, target
      if fullname.split('.')[0] == 'torchvision':
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
      return None

    def create_module(self, spec):
      return StubModule(spec.name)

    def exec_module(self, module):
      pass

  finder = Finder()
  sys.meta_path.insert(0, finder)
  for name in [m for m in sys.modules if m.split('.')[0] in ('open_clip', 'torchvision')]:
    del sys.modules[name]   # a partial import from the failed attempt
  try:
    import open_clip  # pylint: disable=g-import-not-at-top,redefined-outer-name
    return open_clip
  finally:
    sys.meta_path.remove(finder)
    for name in [m for m in sys.modules if m.split('.')[0] == 'torchvision']:
      del sys.modules[name]


def perturb_torch(model, seed: int, scale: float):
  """A PyTorch reference model with random values added to every parameter (libraries
  zero-initialise biases and output layers, which would let a wrong mapping pass), in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return model.eval()


def backward_residual_bytes(loss, params) -> int:
  """Bytes that the jitted forward pass of `loss(params)` keeps for its backward pass, the
  parameters themselves aside."""
  import jax  # pylint: disable=g-import-not-at-top
  vjp = jax.jit(lambda p: jax.vjp(loss, p)[1])(params)
  kept = {id(a) for a in jax.tree.leaves(params)}
  return sum(a.nbytes for a in jax.tree.leaves(vjp) if hasattr(a, 'nbytes') and id(a) not in kept)


def load_benchmark(name: str):
  """The module of `benchmarks/<name>.py` (the benchmarks are scripts, not a package)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks',
                      f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'{name}_benchmark', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
