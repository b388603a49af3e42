"""One module per unCLIP stage; each defines `Stage(config)`, the trainer's only view of it.

A stage object provides:
  tokenizer                      the tokenizer its data pipeline uses (or None)
  batch_spec(batch_size)         {key: jax.ShapeDtypeStruct} of the arrays one train step consumes
  init(rng, batch)               variables with logical partitioning metadata (boxed)
  constants()                    fixed arrays the loss needs (e.g. a frozen CLIP's params)
  loss(params, batch, rng, constants)
                                 (scalar loss, {name: scalar metric}) — pure, jit-able
  make_iterator(split, batch_size, seed, shuffle, process_index, process_count)
                                 per-process iterator of numpy batches with get_state/set_state
  evaluate(params, workdir)      {name: float} — host-driven evaluation with compiled pieces
  sample(params, workdir, step)  {name: images [N, H, W, 3]} for TensorBoard and PNG grids, or None
  export(params, workdir)        saves what later stages load (e.g. frozen CLIP)
"""

import importlib

STAGES = ('clip', 'prior', 'decoder', 'upsampler')


def get_stage(config, **kwargs):
  """Builds the stage named by `config.stage` (`kwargs` go to its constructor, e.g. `clip=`)."""
  if config.stage not in STAGES:
    raise ValueError(f'config.stage: unknown stage {config.stage!r}; known: {STAGES}')
  module = importlib.import_module(f'unclip_jax.stages.{config.stage}')
  return module.Stage(config, **kwargs)


def init_params(stage, rng, batch_size: int = 1):
  """The stage's freshly initialised params (unboxed), from a zero batch of its batch_spec.

  Works under `jax.eval_shape` too (shapes only, nothing allocated).
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def init(rng):   # one compiled program, not one per operation
    batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in stage.batch_spec(batch_size).items()}
    return nn.unbox(stage.init(rng, batch))['params']
  return jax.jit(init)(rng)
