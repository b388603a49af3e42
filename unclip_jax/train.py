"""The one training loop for every unCLIP stage.

`train_and_evaluate(config, workdir)`: builds the mesh and the stage, creates (or restores) the
sharded train state, and runs the compiled train step, with EMA, a non-finite-gradient guard,
periodic logging, evaluation, sampling and checkpoints. The stage supplies its model, loss, data,
evaluation and sampling (see `unclip_jax.stages`); nothing here knows which stage it trains.
"""

import contextlib
import logging
import time
from typing import Any, Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax import config_lib
from unclip_jax import multihost
from unclip_jax import preemption
from unclip_jax import stages
from unclip_jax import workdir as workdir_lib
from unclip_jax.images import image_grid
from unclip_jax.models import attention

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  ema_params: PyTree
  rng: jax.Array               # raw uint32 key, split every step
  nonfinite_steps: jax.Array   # updates skipped because the loss or gradients were not finite


# ---------------------------------------------------------------------------------------------
# Mesh and sharding


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) device mesh from `config.mesh.shape` (one -1 allowed)."""
  devices = jax.devices() if devices is None else devices
  shape = config_lib.resolve_mesh_shape(config.mesh.shape, len(devices))
  return jax.make_mesh(shape, config_lib.MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def logical_rules(config) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.mesh.rules)


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def make_global_batch(local_batch: dict[str, np.ndarray], mesh,
                      keys=None) -> dict[str, jax.Array]:
  """Assembles every process's local batch into global arrays sharded over the batch axes.

  Only `keys` (default: every numeric entry) are kept; captions never enter the compiled step.
  """
  sharding = batch_sharding(mesh)
  keys = [k for k, v in local_batch.items() if np.asarray(v).dtype.kind in 'fiub'] \
      if keys is None else keys
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[k]))
          for k in keys}


# ---------------------------------------------------------------------------------------------
# Optimizer


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup to `optim.lr`, then cosine decay to `end_lr_ratio·lr` (or constant)."""
  o = config.optim
  warmup = min(o.warmup_steps, max(config.num_train_steps - 1, 0))
  if o.schedule == 'constant':
    after = optax.constant_schedule(o.lr)
  else:
    after = optax.cosine_decay_schedule(o.lr, max(config.num_train_steps - warmup, 1),
                                        alpha=o.end_lr_ratio)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), after], [warmup])


def _decay_mask(params: PyTree) -> PyTree:
  """Weight decay on matrices and convolution kernels only (not biases, norms, scalars)."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with the warmup+cosine schedule, preceded by global-norm clipping."""
  o = config.optim
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# State creation


def _init_state_fn(stage, tx, batch_spec, seed):
  """Returns a function () → TrainState whose params are still boxed with logical axes."""
  def init():
    rng = jax.random.PRNGKey(seed)
    rng, init_rng = jax.random.split(rng)
    batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in batch_spec.items()}
    params = stage.init(init_rng, batch)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params, rng=rng,
                      nonfinite_steps=jnp.zeros((), jnp.int32))
  return init


def state_shardings(init_fn, mesh, rules) -> tuple[PyTree, PyTree]:
  """(abstract unboxed state, its NamedShardings) from the logical axes of the boxed params."""
  boxed = jax.eval_shape(init_fn)
  specs = nn.get_partition_spec(boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(init_fn()))
  return abstract, shardings


def create_train_state(stage, config, mesh, tx) -> tuple[TrainState, PyTree]:
  """Initialises the state under jit so each parameter is born sharded per the rules."""
  rules = logical_rules(config)
  spec = stage.batch_spec(config.batch_size)
  init_fn = _init_state_fn(stage, tx, spec, config.seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, shardings = state_shardings(init_fn, mesh, rules)
    state = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
  return state, shardings


def init_from_export(config, abstract_params: PyTree) -> PyTree:
  """The parameters of the export `config.init_from` names (an export folder or a run holding
  `export/`), checked against the stage's own: every tensor must exist with the same shape.
  With `config.init_from_partial`, tensors the stage has and the export lacks keep their fresh
  initialisation (new heads) and extra ones are ignored; both are logged.

  Returns:
    a tree like `abstract_params` of numpy arrays, with None where a fresh value is kept.
  Raises:
    ValueError naming the first tensor whose shape differs, or that is missing / extra.
  """
  from unclip_jax.stages import export  # pylint: disable=g-import-not-at-top
  _, loaded = export.load_export(config.init_from, what='stage to start from')
  partial = bool(config.get('init_from_partial', False))
  ours = {jax.tree_util.keystr(p): a for p, a in
          jax.tree_util.tree_leaves_with_path(abstract_params)}
  theirs = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_leaves_with_path(loaded)}
  for name in sorted(set(ours) & set(theirs)):
    if tuple(ours[name].shape) != tuple(np.shape(theirs[name])):
      raise ValueError(f'config.init_from: {name} has shape {tuple(np.shape(theirs[name]))} in '
                       f'{config.init_from} but {tuple(ours[name].shape)} in this model')
  missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
  if (missing or extra) and not partial:
    what = f'lacks {missing[0]}' if missing else f'has {extra[0]}, which this model has not'
    raise ValueError(f'config.init_from: {config.init_from} {what} ({len(missing)} missing, '
                     f'{len(extra)} extra tensors); set config.init_from_partial=True to keep '
                     'fresh values for missing ones (e.g. a new head) and ignore extra ones')
  if missing or extra:
    logging.warning('config.init_from: %d tensors keep their initialisation (%s), %d extra ones '
                    'are ignored', len(missing), ', '.join(missing[:5]), len(extra))
  return jax.tree_util.tree_map_with_path(
      lambda p, _: (np.asarray(theirs[jax.tree_util.keystr(p)])
                    if jax.tree_util.keystr(p) in theirs else None), abstract_params)


def start_from(state: TrainState, loaded: PyTree, shardings) -> TrainState:
  """`state` with its params and EMA params replaced by `loaded` (None leaves: kept), each
  array built shard by shard with the state's sharding (so also across hosts); optimizer state
  and step stay fresh."""
  def place(new, old, sharding):
    if new is None:
      return old
    host = np.asarray(new, old.dtype)
    return jax.make_array_from_callback(old.shape, sharding, lambda index: host[index])
  is_none = lambda x: x is None
  params = jax.tree.map(place, loaded, state.params, shardings.params, is_leaf=is_none)
  ema = jax.tree.map(place, loaded, state.ema_params, shardings.ema_params, is_leaf=is_none)
  return state.replace(params=params, ema_params=ema)


# ---------------------------------------------------------------------------------------------
# The train step


def _ema_decay(config, step):
  d = config.ema.decay
  if config.ema.warmup:
    return jnp.minimum(d, (1.0 + step) / (10.0 + step))
  return jnp.asarray(d, jnp.float32)


def make_train_step(stage, config, tx) -> Callable:
  """(state, batch, constants) → (state, metrics). Pure; the caller jits it with shardings.

  `constants` are the stage's fixed inputs (e.g. a frozen CLIP's params), passed to its loss.
  Its models trace with `config.attention`'s attention implementation.
  """
  accum = config.optim.accum_steps
  schedule = learning_rate_schedule(config)

  def train_step(state: TrainState, batch, constants):
    def grads_of(params, batch, rng):
      return jax.value_and_grad(stage.loss, has_aux=True)(params, batch, rng, constants)
    return _apply_step(state, batch, grads_of, constants)

  def accumulated(params, batch, rng, grads_of):
    micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)
    def body(carry, xs):
      mb, i = xs
      (loss, metrics), grads = grads_of(params, mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None
    # Shapes of the carry from one (traced, not executed) microbatch.
    shapes = jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], micro), rng)
    (loss, metrics), grads = shapes
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss, metrics, grads))
    total, _ = jax.lax.scan(body, zero, (micro, jnp.arange(accum)))
    return jax.tree.map(lambda x: x / accum, total)

  def _apply_step(state: TrainState, batch, grads_of, constants):
    rng, step_rng = jax.random.split(state.rng)
    if accum == 1:
      (loss, metrics), grads = grads_of(state.params, batch, step_rng)
    elif hasattr(stage, 'accumulated_loss_and_grads'):
      # A loss over the whole batch that microbatches cannot average (CLIP's contrastive one).
      (loss, metrics), grads = stage.accumulated_loss_and_grads(state.params, batch, step_rng,
                                                                 constants, accum)
    else:
      loss, metrics, grads = accumulated(state.params, batch, step_rng, grads_of)
    grad_norm = optax.tree.norm(grads)
    # Any NaN/Inf gradient makes the norm non-finite. (Testing every leaf separately costs
    # XLA:CPU several times the compile time of the whole step.)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if hasattr(stage, 'constrain_params'):   # e.g. CLIP's logit scale clamped after each update
      params = stage.constrain_params(params)
    decay = _ema_decay(config, state.step)
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        ema_params=keep(ema, state.ema_params),
        rng=rng,
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                   nonfinite_steps=new_state.nonfinite_steps)
    return new_state, metrics

  return attention.traced_with(config.get('attention', 'auto'), train_step)


def compile_train_step(stage, config, mesh, tx, state_sharding):
  """jax.jit of the train step with in/out shardings and the state donated."""
  step = make_train_step(stage, config, tx)
  replicated = NamedSharding(mesh, P())
  data = batch_sharding(mesh)
  spec = stage.batch_spec(config.batch_size)
  return jax.jit(step, in_shardings=(state_sharding, {k: data for k in spec}, replicated),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))


def compile_train_step_for(stage, config, mesh, tx, state_sharding, args):
  """The train step compiled ahead of time for `args` (state, batch, constants).

  Where the step traced attentions into a fused kernel (cuDNN's, the Pallas TPU one) and fails
  to compile (a cuDNN without engines for these shapes, a platform without the kernel), it is
  compiled again with XLA's attention, with a warning saying why; `attention.fall_back_to_xla()`
  makes the rest of the run's traces (eval, sampling) use XLA's too. An error that remains with
  XLA's attention is raised.
  """
  before = attention.routes()
  step = compile_train_step(stage, config, mesh, tx, state_sharding)
  try:
    return step.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    if not attention.warn_if_a_kernel_failed(before, e):
      raise
  attention.fall_back_to_xla()
  xla = config.copy_and_resolve_references()
  with xla.unlocked():
    xla.attention = 'xla'
  return compile_train_step(stage, xla, mesh, tx, state_sharding).lower(*args).compile()


def lower_train_step(stage, config, mesh, platforms: Optional[Sequence[str]] = None):
  """Lowers the train step on abstract inputs only (no parameter is allocated).

  For checking that a (large) preset builds and compiles: `lower_train_step(...).compile()`.
  `platforms` (e.g. ('cuda',)) lowers for other backends than this host's, to inspect, not run.
  """
  rules = logical_rules(config)
  tx = make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), \
       attention.implementation(config.get('attention', 'auto')):
    init_fn = _init_state_fn(stage, tx, stage.batch_spec(config.batch_size), config.seed)
    abstract, shardings = state_shardings(init_fn, mesh, rules)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, shardings)
    data = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=data)
             for k, s in stage.batch_spec(config.batch_size).items()}
    replicated = NamedSharding(mesh, P())
    constants = jax.tree.map(lambda c: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=replicated),
                             stage.constants() if hasattr(stage, 'constants') else {})
    step = compile_train_step(stage, config, mesh, tx, shardings)
    if platforms:
      return step.trace(state, batch, constants).lower(lowering_platforms=tuple(platforms))
    return step.lower(state, batch, constants)


def stage_constants(stage, mesh):
  """The stage's fixed inputs (frozen params, statistics), replicated on the mesh once."""
  constants = stage.constants() if hasattr(stage, 'constants') else {}
  return jax.device_put(constants, NamedSharding(mesh, P()))


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled SPMD program, over all devices (XLA's cost analysis)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Some backends do not implement it.
    return 0.0
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', 0.0)) * jax.device_count()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_manager(workdir: str, config):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # cleanup_tmp_directories: a save that a kill or a full disk interrupted leaves a
  # `STEP.orbax-checkpoint-tmp-*` directory; it is removed when the run starts again.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.checkpoint.keep, create=True, cleanup_tmp_directories=True,
      enable_async_checkpointing=config.checkpoint.async_save)
  return ocp.CheckpointManager(workdir_lib.path(workdir) / 'checkpoints', options=options)


def is_finished(workdir: str, config) -> bool:
  """Whether `workdir` holds the export and evaluation of a run that reached its last step."""
  root = workdir_lib.path(workdir)
  if not all((root / f).exists() for f in ('eval_metrics.json', 'export/config.json')):
    return False
  return checkpoint_manager(workdir, config).latest_step() == config.num_train_steps


def save_checkpoint(manager, state: TrainState, data_iter, config):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import grain  # pylint: disable=g-import-not-at-top
  step = int(jax.device_get(state.step))
  args = dict(state=ocp.args.StandardSave(state),
              config=ocp.args.JsonSave(config.to_dict()))
  if data_iter is not None and hasattr(data_iter, 'get_state'):
    args['data'] = grain.checkpoint.CheckpointSave(data_iter)
  manager.save(step, args=ocp.args.Composite(**args), force=True)


class CheckpointSaveError(workdir_lib.WriteError):
  """A checkpoint could not be written (a full disk, a quota, a lost mount)."""


class _Saver:
  """Writes checkpoints through `manager` and stops the run at the first one that fails.

  An asynchronous save fails in a background thread; orbax reports it only when the next save
  waits for it, a whole checkpoint interval later. `poll` (called every step, and costing
  nothing while a save runs) checks as soon as the save is over, so a run whose disk is full
  stops at once. A failed save raises CheckpointSaveError naming the step, the directory and
  the OS's error; its partial directory is removed (so it does not keep the disk full), and
  the checkpoints already written are untouched: the same command resumes from the newest once
  the cause is fixed."""

  def __init__(self, manager):
    self.manager = manager
    self.pending = None   # the step being written in the background

  def save(self, state: TrainState, data_iter, config):
    self.wait()
    step = int(jax.device_get(state.step))
    try:
      save_checkpoint(self.manager, state, data_iter, config)
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(step, e) from e
    self.pending = step

  def poll(self):
    in_progress = getattr(self.manager, 'is_saving_in_progress', None)
    if self.pending is not None and in_progress is not None and not in_progress():
      self.wait()

  def wait(self):
    if self.pending is None:
      return
    step, self.pending = self.pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(step, e) from e

  def _failed(self, step: int, error: Exception) -> CheckpointSaveError:
    directory = workdir_lib.path(self.manager.directory)
    if jax.process_index() == 0:
      with contextlib.suppress(OSError):
        for partial in directory.glob(f'{step}.orbax-checkpoint-tmp*'):
          workdir_lib.remove_partial(partial)
    kept = [s for s in self.manager.all_steps() if s != step]
    intact = (f'the checkpoints already there (steps {sorted(kept)}) are untouched and the same '
              'command resumes from the newest' if kept else
              'no earlier checkpoint exists, so the same command starts again from step 0')
    return CheckpointSaveError(
        f'could not write checkpoint step {step} in {directory}: '
        f'{workdir_lib.os_error(error)}. The partial write was removed; {intact} once the cause '
        'is fixed.')


def restore_checkpoint(manager, abstract_state, shardings, data_iter, step=None):
  """Restores the latest (or given) step into sharded arrays and the data iterator in place."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import grain  # pylint: disable=g-import-not-at-top
  step = manager.latest_step() if step is None else step
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)
  args = dict(state=ocp.args.StandardRestore(target))
  try:
    if data_iter is not None and 'data' in manager.item_metadata(step):
      args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # orbax raises several types for unreadable/mismatched checkpoints
    raise RuntimeError(
        f'could not restore checkpoint step {step} from {manager.directory}: {e}. The checkpoint '
        'is left untouched; point --workdir elsewhere or fix the config to match it.') from e
  return restored['state']


def restore_newest_intact(manager, abstract_state, shardings, data_iter):
  """Restores the newest checkpoint that can be read. Newer ones that cannot, while an older
  one can (so the config is not the problem), are damaged: each gets one warning naming its step
  and the error, and is moved aside to `checkpoints_damaged/` beside `checkpoints/` (never
  deleted). If none can be read, one error names the directory and the latest step's problem,
  and nothing is moved."""
  steps = sorted(manager.all_steps(), reverse=True)
  failures = []
  for step in steps:
    try:
      state = restore_checkpoint(manager, abstract_state, shardings, data_iter, step)
    except RuntimeError as e:
      failures.append((step, e))
      continue
    for bad, error in failures:
      _move_aside(manager, bad, error)
    if failures:
      manager.reload()
    return state
  step, error = failures[0]
  raise RuntimeError(
      f'no checkpoint in {manager.directory} can be restored (steps {steps}); the latest, step '
      f'{step}: {error.__cause__ or error}. Nothing was moved or deleted; if the config changed, '
      'restore it or point --workdir elsewhere.') from error


def _move_aside(manager, step: int, error: Exception):
  directory = workdir_lib.path(manager.directory)
  source = directory / str(step)
  target = workdir_lib.free_name(directory.parent / 'checkpoints_damaged' / str(step))
  if jax.process_index() == 0 and source.exists():
    workdir_lib.move(source, target)
  multihost.barrier(f'move_aside_{step}')
  logging.warning('Checkpoint step %d in %s is damaged (%s); moved it to %s and restored the '
                  'newest intact one', step, manager.directory,
                  str(error.__cause__ or error).splitlines()[0][:300], target)


# ---------------------------------------------------------------------------------------------
# Metrics


class _LoggingWriter:
  """Fallback writer when clu/TensorFlow are unavailable (e.g. a bare GPU image)."""

  def write_scalars(self, step, scalars):
    logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in scalars.items()))

  def write_images(self, step, images):
    del step, images

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str):
  """clu's default writer (TensorBoard + logging) on process 0; logging elsewhere."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning('clu is not installed: metrics go to the log only')
    return _LoggingWriter()
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)


class _ProgressBar:
  """A tqdm bar of the training steps (`config.progress_bar`; process 0): a widget in a
  notebook, a line on a terminal."""

  def __init__(self, config, start: int):
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    self.bar = tqdm.tqdm(total=config.num_train_steps, initial=start, unit='step',
                         desc=config.get('stage') or 'train', dynamic_ncols=True)

  def __call__(self, step: int):
    self.bar.update(step - self.bar.n)
    if step >= self.bar.total:
      self.bar.close()


def _progress_hooks(config, writer, start: int = 0) -> list:
  hooks = []
  if config.get('progress_bar') and jax.process_index() == 0:
    hooks.append(_ProgressBar(config, start))
  try:
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  except ImportError:
    return hooks
  hooks.append(periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                               writer=writer,
                                               every_steps=config.log_every_steps))
  return hooks


def write_samples(writer, workdir: str, step: int, samples: Optional[dict]):
  """Writes a stage's {name: images [N, H, W, 3]} to TensorBoard and as PNG grids under
  `workdir/samples/` (process 0 only)."""
  if not samples or jax.process_index() != 0:
    return
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = workdir_lib.path(workdir) / 'samples'
  folder.mkdir(parents=True, exist_ok=True)
  grids = {name: image_grid(images) for name, images in samples.items()}
  for name, grid in grids.items():
    with (folder / f'{name}_{step:07d}.png').open('wb') as f:
      Image.fromarray(grid).save(f, format='PNG')
  writer.write_images(step, {f'samples/{name}': grid[None] for name, grid in grids.items()})


def _data_skip_counts() -> dict[str, int]:
  from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return {f'data/skipped/{k}': v for k, v in input_pipeline.skip_counts().items()}


def _mean_metrics(history: list[dict]) -> dict[str, float]:
  """The mean of each metric over the logged steps; counts (`nonfinite_steps`, the run's total
  of skipped updates) are the latest value, not a mean."""
  return {k: float(history[-1][k] if k == 'nonfinite_steps' else np.mean([h[k] for h in history]))
          for k in history[0]}


class DivergedError(RuntimeError):
  """Too many updates in a row had a non-finite loss or gradient."""


# The errors that end a run with a one-line message (the commands print it, without a traceback).
RUN_ERRORS = (DivergedError, workdir_lib.WorkdirLockedError, workdir_lib.WriteError)


class _Divergence:
  """Counts updates skipped in a row (from the state's running total, read at each log step,
  so that it costs no extra host sync) and raises DivergedError past `config.max_nonfinite_steps`.
  """

  def __init__(self, config, total: int):
    self.limit = config.get('max_nonfinite_steps', 10)
    self.total, self.in_a_row = total, 0

  def update(self, history: list[dict], step: int):
    for h in history:
      total = int(h['nonfinite_steps'])
      self.in_a_row = self.in_a_row + 1 if total > self.total else 0
      self.total = total
      if self.limit and self.in_a_row >= self.limit:
        raise DivergedError(
            f'training diverged: {self.in_a_row} updates in a row up to step {step} had a '
            f'non-finite loss or gradient ({self.total} in all; config.max_nonfinite_steps='
            f'{self.limit}). Nothing was exported; the last checkpoint is kept. Lower '
            f'config.optim.lr, or raise optim.grad_clip / the limit.')


# ---------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stage=None,
                       stop_at_step: Optional[int] = None) -> dict[str, float]:
  """Trains `config.stage` in `workdir`, resuming from its latest checkpoint if there is one.

  Args:
    config: a stage config (see configs/).
    workdir: the run directory.
    stage: a stage object to train instead of the one `config.stage` names.
    stop_at_step: save a checkpoint and return after this step, as a preempted job would; the
      schedule is still that of `config.num_train_steps`, and a later call resumes.
  Returns:
    The final evaluation metrics ({} when stopped early).
  """
  config_lib.validate(config, jax.device_count(), jax.process_count())
  stage = stages.get_stage(config) if stage is None else stage
  mesh = make_mesh(config)
  rules = logical_rules(config)
  tx = make_optimizer(config)
  workdir_lib.path(workdir).mkdir(parents=True, exist_ok=True)
  with workdir_lib.locked(workdir), preemption.handle_signals(), \
       attention.implementation(config.get('attention', 'auto')):
    return _train_and_evaluate(config, workdir, stage, stop_at_step, mesh, rules, tx)


def _train_and_evaluate(config, workdir, stage, stop_at_step, mesh, rules, tx):
  """`train_and_evaluate` inside the run directory's lock and the signal handlers."""
  if jax.process_index() == 0:
    workdir_lib.atomic_write_text(workdir_lib.path(workdir) / 'config.json',
                                  config.to_json_best_effort(indent=2))

  local_batch = config.batch_size // jax.process_count()
  data_iter = stage.make_iterator('train', local_batch, seed=config.seed, shuffle=True,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    init_fn = _init_state_fn(stage, tx, stage.batch_spec(config.batch_size), config.seed)
    abstract, shardings = state_shardings(init_fn, mesh, rules)
    manager = checkpoint_manager(workdir, config)
    saver = _Saver(manager)
    if manager.latest_step() is not None:
      state = restore_newest_intact(manager, abstract, shardings, data_iter)
      logging.info('Resumed from %s at step %d', manager.directory, int(state.step))
    else:
      state = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
      if config.get('init_from'):
        state = start_from(state, init_from_export(config, abstract.params), shardings)
        logging.info('Starting from the parameters of %s', config.init_from)
    constants = stage_constants(stage, mesh)
    batch_keys = list(stage.batch_spec(config.batch_size))

    writer = create_writer(workdir)
    start = int(jax.device_get(state.step))
    hooks = _progress_hooks(config, writer, start)
    history = []
    eval_metrics = {}
    divergence = _Divergence(config, int(jax.device_get(state.nonfinite_steps)))
    compiled, flops_per_step = None, 0.0
    for step in range(start + 1, config.num_train_steps + 1):
      # Between logs the host never waits for the device: an implicit device→host transfer
      # (`float(x)`, `np.asarray(x)`, `if x:`) here raises instead of silently syncing.
      with jax.profiler.StepTraceAnnotation('train', step_num=step), \
          jax.transfer_guard_device_to_host('disallow'):
        batch = make_global_batch(next(data_iter), mesh, batch_keys)
        if compiled is None:  # compiled ahead of time once, for its FLOP count
          compiled = compile_train_step_for(stage, config, mesh, tx, shardings,
                                            (state, batch, constants))
          # XLA counts a scanned loop body once, so FLOP/s are only logged for unscanned models.
          flops_per_step = 0.0 if config.model.get('scan') else compiled_flops(compiled)
          timer = (time.perf_counter(), step - 1)
        state, metrics = compiled(state, batch, constants)
        history.append(metrics)
        saver.poll()
        for hook in hooks:
          hook(step)
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        history = jax.device_get(history)
        divergence.update(history, step)
        scalars = {f'train/{k}': v for k, v in _mean_metrics(history).items()}
        elapsed, timer = time.perf_counter() - timer[0], (time.perf_counter(), step)
        step_time = elapsed / max(len(history), 1)
        scalars['perf/step_time_s'] = step_time
        if flops_per_step:
          scalars['perf/tflops_per_s_per_device'] = (
              flops_per_step / step_time / 1e12 / jax.device_count())
        scalars.update(_data_skip_counts())
        writer.write_scalars(step, scalars)
        history = []
      last = step == config.num_train_steps
      if not last and config.eval_every_steps and step % config.eval_every_steps == 0:
        eval_metrics = _evaluate(stage, state, workdir, writer, step)
      if not last and config.sample_every_steps and step % config.sample_every_steps == 0:
        _sample(stage, state, workdir, writer, step)
      stopping = step == stop_at_step or preemption.stop_requested(step, manager)
      if stopping and not last:
        # Diverged updates since the last log must not reach a checkpoint unchecked.
        history = jax.device_get(history)
        divergence.update(history, step)
      if last or stopping or (config.checkpoint.every_steps and
                              step % config.checkpoint.every_steps == 0):
        saver.save(state, data_iter, config)
      if stopping:
        saver.wait()
        writer.flush()
        signal_name = preemption.received()
        logging.warning('Stopped after step %d%s: checkpoint saved in %s; the same command '
                        'resumes from it', step, f' ({signal_name})' if signal_name else '',
                        manager.directory)
        return {}
    # The final checkpoint and the export are written before the final evaluation, so that an
    # evaluation that fails costs the run neither.
    saver.wait()
    stage.export(state.ema_params, workdir)
    step = int(jax.device_get(state.step))
    if preemption.received():   # told to stop during the last step: evaluate on the next run
      logging.warning('Stopped (%s) after the last step: checkpoint and export saved; the '
                      'same command evaluates', preemption.received())
      writer.flush()
      return {}
    eval_metrics = _evaluate(stage, state, workdir, writer, step)
    _sample(stage, state, workdir, writer, step)
    writer.flush()
  if 'error' in eval_metrics:
    return eval_metrics   # no eval_metrics.json: a later run on this workdir evaluates again
  if jax.process_index() == 0 and eval_metrics:
    workdir_lib.atomic_write_json(workdir_lib.path(workdir) / 'eval_metrics.json', eval_metrics)
  return eval_metrics


def _evaluate(stage, state, workdir, writer, step) -> dict:
  """The stage's evaluation, written to the metrics; {'error': message} (logged with its
  traceback) when it fails, so that a broken evaluation never stops a run."""
  try:
    metrics = stage.evaluate(state.ema_params, workdir)
  except Exception as e:  # pylint: disable=broad-except
    logging.exception('Evaluation at step %d failed; training goes on', step)
    return {'error': f'{type(e).__name__}: {e}'}
  writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
  return metrics


def _sample(stage, state, workdir, writer, step):
  try:
    write_samples(writer, workdir, step, stage.sample(state.ema_params, workdir, step))
  except Exception:  # pylint: disable=broad-except
    logging.exception('Sampling at step %d failed; training goes on', step)


if __name__ == '__main__':
  # The library, not a command: say which one to run rather than exit silently.
  raise SystemExit('unclip_jax.train is the trainer library; train a stage with '
                   '`python -m unclip_jax.main --config=configs/clip.py:tiny --workdir=DIR` '
                   '(or `unclip-train`)')
