"""Fields every stage's config shares (the trainer's), and config validation.

`configs/<stage>.py` starts from `trainer_defaults()` and adds its `model`, `data` and stage fields.
`validate(config)` runs before anything is compiled and raises `ConfigError` naming the field.
"""

import importlib
import importlib.util
import os
import sys

import ml_collections

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis → mesh axes. Parameters: `embed` is sharded over fsdp, the wide axes over tensor.
# Activations: the batch over (data, fsdp); `act_embed` stays whole.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('embed_in', None),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('kv', None),
    ('proj', None),
    ('length', None),
    ('channels', None),
    ('conv_in', None),
    ('conv_out', 'fsdp'),
    ('norm', None),
    ('act_embed', None),
    ('layers', None),
)

DTYPES = ('float32', 'bfloat16', 'float16')


class ConfigError(ValueError):
  """An invalid config; the message names the field."""


# The config files (`configs/<stage>.py` in the source tree) are installed with the package as
# `unclip_jax.presets` (setup.py maps the folder), so library code and config files find them
# without the source tree on the import path.
PRESETS_PACKAGE = 'unclip_jax.presets'


def load_config_file(path: str):
  """The module of a config file, loaded by path (its siblings can be loaded the same way)."""
  name = 'unclip_jax_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} does not exist')
  module = importlib.util.module_from_spec(spec)
  sys.modules.setdefault(name, module)
  spec.loader.exec_module(module)
  return module


def sibling_config(this_file: str, stage: str):
  """`<stage>.py` beside the config file `this_file` (for configs built from others)."""
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(this_file)),
                                       f'{stage}.py'))


def preset_module(stage: str):
  """The config module of `stage` ('clip', 'prior', ...): the installed `unclip_jax.presets`,
  else the source tree's configs/ folder."""
  try:
    return importlib.import_module(f'{PRESETS_PACKAGE}.{stage}')
  except ImportError:
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(os.path.dirname(here), 'configs', f'{stage}.py')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'no config file for stage {stage!r}: neither {PRESETS_PACKAGE} '
                              f'nor {path} exists') from None
    return load_config_file(path)


def preset(stage: str, arg: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of `stage`'s config file, e.g. preset('clip', 'vit_l14')."""
  return preset_module(stage).get_config(arg)


def trainer_defaults() -> ml_collections.ConfigDict:
  """The trainer's fields with their defaults; stages override what they need."""
  c = ml_collections.ConfigDict()
  c.stage = ''
  c.seed = 0
  c.dtype = 'float32'            # compute dtype; params are always float32
  c.attention = 'auto'           # 'auto': cuDNN's flash attention on GPUs (bf16/fp16) where it
                                 # applies, else XLA's; 'xla': XLA's everywhere
  c.batch_size = 128             # global batch, over all processes and devices
  c.num_train_steps = 1000

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = 'cosine'    # 'cosine' (to end_lr_ratio·lr) or 'constant' after warmup
  c.optim.end_lr_ratio = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.1     # not applied to biases, norms, embeddings' 1-D params
  c.optim.grad_clip = 1.0        # global-norm clipping; 0 disables
  c.optim.accum_steps = 1        # gradient accumulation: microbatches per step

  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.999            # 0 disables (EMA params == params)
  c.ema.warmup = True            # decay_t = min(decay, (1 + t) / (10 + t))

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)      # (data, fsdp, tensor); one -1 takes the remaining devices
  c.mesh.rules = DEFAULT_RULES

  c.log_every_steps = 50
  c.progress_bar = False         # a tqdm bar of the steps (notebooks, terminals)
  c.eval_every_steps = 0         # 0: only at the end
  # Stop with an error (and never export) once this many updates in a row were skipped for a
  # non-finite loss or gradient; 0: never stop. Checked at each log step.
  c.max_nonfinite_steps = 10
  c.sample_every_steps = 0       # 0: only at the end (stages that sample)
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  # Fine-tuning: start from the parameters of an export (a stage's `export/`, e.g. karlo's
  # converted decoder) instead of random ones; the optimizer starts fresh at step 0. Every tensor
  # must match; `init_from_partial` keeps fresh values for tensors the export lacks (a new head).
  c.init_from = ml_collections.config_dict.placeholder(str)
  c.init_from_partial = False
  return c


def data_defaults(resolution=32) -> ml_collections.ConfigDict:
  """`config.data`: which data, and how it is read (`resolution` may be a FieldReference).

  The default is the built-in dataset; `source` and `paths` switch to the user's data, e.g.
  `--config.data.source=webdataset --config.data.paths='/data/cc3m/{00000..00331}.tar'`.
  """
  d = ml_collections.ConfigDict()
  # 'shapes' (built-in), 'webdataset' (tar shards), 'folder' (images + manifest or .txt files),
  # 'parquet' (image bytes in a column), 'tfds' (a prepared tfds dataset), 'array_record'
  # (shards of `python -m unclip_jax.data.prepare`), 'clip_embeddings' (an embedding-reader
  # folder: the prior trains from embeddings alone).
  d.source = 'shapes'
  # The training and held-out data: comma-separated paths, globs or brace patterns
  # ('/data/{00000..00009}.tar'), local or remote (gs://, s3://: whatever fsspec opens).
  d.paths = ml_collections.config_dict.placeholder(str)
  d.eval_paths = ml_collections.config_dict.placeholder(str)
  d.name = 'captioned_shapes'     # tfds: the dataset's name (e.g. 'coco_captions')
  d.data_dir = ml_collections.config_dict.placeholder(str)   # tfds / shapes: data directory
  d.train_split = 'train'         # tfds: the split names (tfds slicing allowed)
  d.eval_split = 'test'
  # Where the image, caption(s), key and label are in a sample: a webdataset extension or JSON
  # field, a manifest / parquet column, a tfds feature ('a/b' for nested). None: the source's
  # default (webdataset 'jpg;jpeg;png;webp' and 'txt'; others 'image' and 'caption').
  d.image_key = ml_collections.config_dict.placeholder(str)
  d.caption_key = ml_collections.config_dict.placeholder(str)
  d.key_key = ml_collections.config_dict.placeholder(str)
  # Zero-shot evaluation: the field holding each sample's class, and the class names (comma-
  # separated, 'cat,dog,bird', or a JSON file holding a list or a {name: index} map).
  d.label_key = ml_collections.config_dict.placeholder(str)
  d.class_names = ml_collections.config_dict.placeholder(str)
  d.resolution = resolution
  d.crop = 'center'               # 'center', or 'random' (e.g. upsampler training crops)
  d.min_size = 0                  # images whose shorter side is below this are skipped
  d.shuffle_buffer = 1000         # streaming sources: examples shuffled within this window
  # The built-in dataset's settings.
  d.num_train = 20000
  d.num_test = 1000
  d.seed = 0
  # The train split never shows captioned_shapes.HELD_OUT_COMBINATIONS (e.g. a red circle); the
  # job samples prompts with and without them.
  d.held_out_combinations = True
  # Another source's samples label the built-in dataset's attributes by name (JSON fields shape,
  # color, background, size, position: e.g. shards written from it): batches carry them, as the
  # built-in data's do, and the job reads its samples with the pixel checker.
  d.attribute_labels = False
  d.worker_count = 0            # grain worker processes; 0 decodes in the main process
  # Threads reading records ahead of the decoding (grain's ReadOptions): they pay off when reads
  # wait on storage. The built-in dataset is local and small, and on a few cores grain's default
  # pool (16 threads polling their futures) costs the train step CPU: 18 ms of CPU per decoder
  # batch of 16 against 6.6 ms with 0 (reads in the consuming thread).
  d.read_threads = 0
  d.read_buffer = 64            # records read ahead when read_threads > 0
  # Precomputed CLIP embeddings (`python -m unclip_jax.data.embeddings`) for the prior and
  # decoder: the step then skips the CLIP image tower.
  d.embeddings_dir = ml_collections.config_dict.placeholder(str)
  return d


def job_data() -> ml_collections.ConfigDict:
  """The whole job's `config.data` (`configs/unclip.py`): every field left None keeps each
  stage's own value; a field set here (`--config.data.source=webdataset`) applies to all
  stages. Resolution is per stage."""
  d = ml_collections.ConfigDict()
  ph = ml_collections.config_dict.placeholder
  for name in ('source', 'paths', 'eval_paths', 'name', 'data_dir', 'train_split', 'eval_split',
               'image_key', 'caption_key', 'key_key', 'label_key', 'class_names', 'crop'):
    d[name] = ph(str)
  for name in ('min_size', 'shuffle_buffer', 'worker_count', 'read_threads', 'read_buffer',
               'num_train', 'num_test', 'seed'):
    d[name] = ph(int)
  d.held_out_combinations = ph(bool)
  d.attribute_labels = ph(bool)
  return d


def frozen_clip(preset: str = 'tiny') -> ml_collections.ConfigDict:
  """`config.clip` of a stage that conditions on a frozen CLIP: a CLIP run directory (or its
  export/) in `workdir`; without one, an untrained CLIP of `preset` (compiling and benchmarking
  only)."""
  c = ml_collections.ConfigDict()
  c.workdir = ml_collections.config_dict.placeholder(str)
  c.preset = preset
  # True: the stage sees unit-norm CLIP embeddings (ours). False: the CLIP's raw projections,
  # as karlo's prior and decoder were trained on.
  c.normalize = True
  return c


def _fail(field: str, message: str):
  raise ConfigError(f'config.{field}: {message}')


def resolve_mesh_shape(shape, num_devices: int) -> tuple[int, int, int]:
  """Replaces a single -1 in the (data, fsdp, tensor) shape so its product is `num_devices`."""
  try:
    shape = tuple(int(s) for s in shape)
  except (TypeError, ValueError):
    _fail('mesh.shape', f'{shape!r} is not a tuple of {len(MESH_AXES)} integers {MESH_AXES}, '
          'e.g. (-1, 1, 1)')
  if len(shape) != len(MESH_AXES):
    _fail('mesh.shape', f'{shape} must have {len(MESH_AXES)} entries {MESH_AXES}')
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    _fail('mesh.shape', f'{shape}: entries must be positive, with at most one -1')
  known = 1
  for s in shape:
    known *= s if s > 0 else 1
  if -1 in shape:
    if num_devices % known:
      _fail('mesh.shape', f'{shape} does not divide the {num_devices} devices')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  total = shape[0] * shape[1] * shape[2]
  if total != num_devices:
    _fail('mesh.shape', f'{shape} has {total} devices but {num_devices} are available')
  return shape


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1):
  """Checks the trainer's fields against each other and the devices; raises ConfigError."""
  if config.dtype not in DTYPES:
    _fail('dtype', f'{config.dtype!r} is not one of {DTYPES}')
  if config.get('attention', 'auto') not in ('auto', 'xla'):
    _fail('attention', f"{config.attention!r} is not 'auto' or 'xla'")
  for field in ('batch_size', 'num_train_steps'):
    if int(config[field]) <= 0:
      _fail(field, f'must be positive, got {config[field]}')
  o = config.optim
  if not o.lr > 0:
    _fail('optim.lr', f'must be positive, got {o.lr}')
  if o.schedule not in ('cosine', 'constant'):
    _fail('optim.schedule', f"{o.schedule!r} is not 'cosine' or 'constant'")
  if o.accum_steps < 1:
    _fail('optim.accum_steps', f'must be >= 1, got {o.accum_steps}')
  gamma = config.get('diffusion', {}).get('min_snr_gamma')
  if gamma is not None and not gamma > 0:
    _fail('diffusion.min_snr_gamma', f'must be positive (or None), got {gamma}')
  if not 0 <= config.ema.decay < 1:
    _fail('ema.decay', f'must be in [0, 1), got {config.ema.decay}')
  data, fsdp, _ = resolve_mesh_shape(config.mesh.shape, num_devices)
  known_axes = set(MESH_AXES) | {None}
  for rule in config.mesh.rules:
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    if len(rule) != 2 or any(a not in known_axes for a in axes):
      _fail('mesh.rules', f'{rule} must be (logical_name, mesh axis or axes from {MESH_AXES})')
  parallel = data * fsdp
  if config.batch_size % parallel:
    _fail('batch_size', f'{config.batch_size} is not divisible by the data-parallel size '
          f'{parallel} (mesh data={data} x fsdp={fsdp})')
  if config.batch_size % num_processes:
    _fail('batch_size', f'{config.batch_size} is not divisible by the {num_processes} processes')
  if config.batch_size % (o.accum_steps * parallel):
    _fail('optim.accum_steps', f'batch_size {config.batch_size} is not divisible into '
          f'{o.accum_steps} microbatches of a multiple of {parallel}')
  if config.checkpoint.every_steps < 0 or config.checkpoint.keep < 1:
    _fail('checkpoint', 'every_steps must be >= 0 and keep >= 1')
  unet = config.get('model', {}).get('unet')
  if unet is not None and 'attention_resolutions' in unet:
    from unclip_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
    problem = unet_lib.attention_resolutions_problem(
        unet.attention_resolutions, unet.get('patch_size', 1), len(unet.channel_mult))
    if problem:
      _fail('model.unet.attention_resolutions', problem)
