"""The trainer: sharding, the compiled step, EMA, the non-finite guard, accumulation, resuming."""

import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from unclip_jax import stages
from unclip_jax import train

from tests import helpers


_mesh = helpers.mesh
_batches = helpers.take_batches
_run_steps = helpers.run_train_steps


def test_sharded_step_matches_single_device(make_tiny_clip_config):
  config = make_tiny_clip_config()
  stage = stages.get_stage(config)
  batches = _batches(stage, config, 3)
  single, single_losses = _run_steps(stage, config, _mesh((1, 1, 1), 1), batches)
  config.mesh.shape = (2, 2, 2)
  sharded, sharded_losses = _run_steps(stage, config, _mesh((2, 2, 2), 8), batches)
  # Same global batch, same math; only the reduction order differs across devices.
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
  assert single_losses[-1] < single_losses[0]

  # Parameters, optimizer moments and EMA are sharded per the logical rules.
  fc = sharded.params['text_tower']['transformer']['block_0']['mlp']['fc']['kernel']
  assert fc.sharding.spec == P('fsdp', 'tensor')
  assert fc.addressable_shards[0].data.shape == (fc.shape[0] // 2, fc.shape[1] // 2)
  qkv = sharded.params['vision_tower']['transformer']['block_1']['attn']['qkv_kernel']
  assert qkv.sharding.spec == P('fsdp', None, 'tensor', None)
  adam_mu = sharded.opt_state[1][0].mu
  assert adam_mu['text_tower']['transformer']['block_0']['mlp']['fc']['kernel'].sharding.spec \
      == P('fsdp', 'tensor')
  ema_fc = sharded.ema_params['text_tower']['transformer']['block_0']['mlp']['fc']['kernel']
  assert ema_fc.sharding.spec == P('fsdp', 'tensor')
  assert sharded.step.sharding.is_fully_replicated


def test_nonfinite_update_is_skipped_and_counted(make_tiny_clip_config):
  config = make_tiny_clip_config(**{'optim.warmup_steps': 0})
  stage = stages.get_stage(config)
  mesh = _mesh((1, 1, 1), 1)
  (batch,) = _batches(stage, config, 1)
  bad = dict(batch, image=np.full_like(batch['image'], np.nan))
  tx = train.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(train.logical_rules(config)):
    state, shardings = train.create_train_state(stage, config, mesh, tx)
    step = train.compile_train_step(stage, config, mesh, tx, shardings)
    before = jax.device_get(state)
    state, metrics = step(state, train.make_global_batch(bad, mesh), {})
    after = jax.device_get(state)
    assert not np.isfinite(metrics['loss'])
    assert int(after.step) == 1 and int(after.nonfinite_steps) == 1
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state, before.ema_params)),
                    jax.tree.leaves((after.params, after.opt_state, after.ema_params))):
      np.testing.assert_array_equal(a, b)
    state, metrics = step(state, train.make_global_batch(batch, mesh), {})
    assert np.isfinite(metrics['loss']) and int(metrics['nonfinite_steps']) == 1
    moved = jax.device_get(state.params)
    assert any(not np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(before.params)))


class _LinearStage:
  """A minimal stage (least squares) to test the trainer's stage-independent machinery."""

  def __init__(self):
    self.model = nn.Dense(1, kernel_init=nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ('embed', 'mlp')))

  def batch_spec(self, batch_size):
    return {'x': jax.ShapeDtypeStruct((batch_size, 4), jnp.float32),
            'y': jax.ShapeDtypeStruct((batch_size, 1), jnp.float32)}

  def init(self, rng, batch):
    return self.model.init(rng, batch['x'])

  def loss(self, params, batch, rng, constants):
    del rng, constants
    err = self.model.apply({'params': params}, batch['x']) - batch['y']
    return jnp.mean(err ** 2), {'mae': jnp.mean(jnp.abs(err))}


def test_gradient_accumulation_matches_full_batch(make_tiny_clip_config):
  stage = _LinearStage()
  rng = np.random.default_rng(0)
  batch = {'x': rng.normal(size=(16, 4)).astype(np.float32),
           'y': rng.normal(size=(16, 1)).astype(np.float32)}
  results = []
  for accum in (1, 4):
    config = make_tiny_clip_config(**{'optim.accum_steps': accum, 'optim.warmup_steps': 0})
    mesh = _mesh((2, 1, 1), 2)
    state, losses = _run_steps(stage, config, mesh, [batch, batch])
    results.append((jax.device_get(state.params), losses))
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ema_and_learning_rate_schedule(make_tiny_clip_config):
  config = make_tiny_clip_config(**{'optim.warmup_steps': 10, 'num_train_steps': 110,
                                    'optim.lr': 1.0, 'optim.end_lr_ratio': 0.1})
  schedule = train.learning_rate_schedule(config)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60),
                              schedule(110)], [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
  stage = _LinearStage()
  batch = {'x': np.ones((16, 4), np.float32), 'y': np.zeros((16, 1), np.float32)}
  tx = train.make_optimizer(config)
  mesh = _mesh((1, 1, 1), 1)
  with jax.set_mesh(mesh), nn.logical_axis_rules(train.logical_rules(config)):
    state, shardings = train.create_train_state(stage, config, mesh, tx)
    step = train.compile_train_step(stage, config, mesh, tx, shardings)
    p0 = jax.device_get(state.params)
    state, _ = step(state, train.make_global_batch(batch, mesh), {})   # lr(0) = 0: no move
    state, _ = step(state, train.make_global_batch(batch, mesh), {})
  p2, ema = jax.device_get(state.params), jax.device_get(state.ema_params)
  # decay_t = min(0.999, (1 + t) / (10 + t)): 0.1 at t=0, 2/11 at t=1.
  d1 = 2 / 11
  expected = jax.tree.map(lambda a, b: d1 * (0.1 * a + 0.9 * a) + (1 - d1) * b, p0, p2)
  for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def _restore_state(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step),
                                                         'state'))


def test_resume_matches_uninterrupted_run(make_tiny_clip_config, tmp_path):
  config = make_tiny_clip_config(**{'num_train_steps': 8, 'checkpoint.every_steps': 0})
  whole, resumed = str(tmp_path / 'whole'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config, whole)
  assert train.train_and_evaluate(config, resumed, stop_at_step=3) == {}
  assert sorted(os.listdir(os.path.join(resumed, 'checkpoints'))) == ['3']
  metrics = train.train_and_evaluate(config, resumed)
  assert 'zero_shot_color_accuracy' in metrics
  a, b = _restore_state(whole, 8), _restore_state(resumed, 8)
  assert int(b['step']) == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  data_a = sorted(glob.glob(os.path.join(whole, 'checkpoints', '8', 'data', '*.json')))
  data_b = sorted(glob.glob(os.path.join(resumed, 'checkpoints', '8', 'data', '*.json')))
  assert data_a and [open(f).read() for f in data_a] == [open(f).read() for f in data_b]
  # The run directory holds the resolved config, TensorBoard events and the frozen export.
  assert os.path.exists(os.path.join(resumed, 'config.json'))
  assert glob.glob(os.path.join(resumed, 'events.out.tfevents.*'))
  assert os.path.exists(os.path.join(resumed, 'export', 'config.json'))



def test_global_batch_assembly():
  mesh = _mesh((2, 2, 2), 8)
  local = {'x': np.arange(16, dtype=np.float32).reshape(8, 2), 'caption': np.array(['a'] * 8)}
  batch = train.make_global_batch(local, mesh)
  assert set(batch) == {'x'}
  assert batch['x'].sharding.spec == P(('data', 'fsdp'))
  assert batch['x'].addressable_shards[0].data.shape == (2, 2)
  np.testing.assert_array_equal(np.asarray(batch['x']), local['x'])


class _RunnableLinearStage(_LinearStage):
  """`_LinearStage` with data, an export, and an evaluation that fails."""

  def __init__(self, width=1):
    super().__init__()
    self.model = nn.Dense(width, kernel_init=nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ('embed', 'mlp')))
    self.width = width

  def batch_spec(self, batch_size):
    return dict(super().batch_spec(batch_size),
                y=jax.ShapeDtypeStruct((batch_size, self.width), jnp.float32))

  def make_iterator(self, split, batch_size, **kwargs):
    del split, kwargs
    import grain  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    batches = [{'x': rng.normal(size=(batch_size, 4)).astype(np.float32),
                'y': rng.normal(size=(batch_size, self.width)).astype(np.float32)}
               for _ in range(3)]
    return iter(grain.MapDataset.source(batches).repeat(None).to_iter_dataset())

  def evaluate(self, params, workdir):
    raise RuntimeError('broken evaluation')

  def sample(self, params, workdir, step):
    return None

  def export(self, params, workdir):
    from unclip_jax.stages import export  # pylint: disable=g-import-not-at-top
    export.save_export(os.path.join(workdir, 'export'), params, self.config)


def test_failing_evaluation_keeps_checkpoint_and_export_and_init_from_starts_there(
    make_tiny_clip_config, tmp_path):
  """An evaluation that raises costs the run neither its final checkpoint nor its export (and
  writes no eval_metrics.json, so a later run evaluates again). A run with `init_from` that
  export starts from its parameters exactly (lr(0) = 0: the first step moves nothing);
  mismatched shapes are refused naming the tensor."""
  config = make_tiny_clip_config(**{'num_train_steps': 4, 'checkpoint.every_steps': 0})
  stage = _RunnableLinearStage()
  stage.config = config
  first = str(tmp_path / 'first')
  metrics = train.train_and_evaluate(config, first, stage=stage)
  assert metrics == {'error': 'RuntimeError: broken evaluation'}
  assert os.path.exists(os.path.join(first, 'export', 'config.json'))
  assert sorted(os.listdir(os.path.join(first, 'checkpoints'))) == ['4']
  assert not os.path.exists(os.path.join(first, 'eval_metrics.json'))

  exported = ocp.StandardCheckpointer().restore(os.path.join(first, 'export', 'params'))
  tuned = make_tiny_clip_config(**{'num_train_steps': 4, 'init_from': first})
  second = str(tmp_path / 'second')
  assert train.train_and_evaluate(tuned, second, stage=stage, stop_at_step=1) == {}
  state = _restore_state(second, 1)
  for a, b in zip(jax.tree.leaves(state['params']), jax.tree.leaves(exported)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  wider = _RunnableLinearStage(width=2)
  wider.config = tuned
  with pytest.raises(ValueError, match=r"config.init_from: \['bias'\] has shape \(1,\) in "
                                       r".* but \(2,\) in this model"):
    train.train_and_evaluate(tuned, str(tmp_path / 'third'), stage=wider)


def test_a_step_whose_cudnn_attention_does_not_compile_falls_back_to_xla(make_tiny_clip_config,
                                                                         caplog):
  """Where cuDNN's attention does not compile (a cuDNN without engines for the shapes), the
  trainer compiles the step with XLA's attention, says so, and later traces use XLA's too. The
  CPU stands in for such a GPU: the attention helper takes its GPU path (JAX's cuDNN checks
  answering as an H100's), whose kernels this platform lacks."""
  from unclip_jax.models import attention  # pylint: disable=g-import-not-at-top
  compile_preset = helpers.load_benchmark('compile_preset')

  config = make_tiny_clip_config()
  config.dtype = 'bfloat16'
  stage = stages.get_stage(config)
  mesh = _mesh((1, 1, 1), 1)
  batch = _batches(stage, config, 1)[0]
  tx = train.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(train.logical_rules(config)):
    state, shardings = train.create_train_state(stage, config, mesh, tx)
    args = (state, train.make_global_batch(batch, mesh), train.stage_constants(stage, mesh))
    plain = train.compile_train_step(stage, config, mesh, tx, shardings)
    _, expected = plain(jax.tree.map(jnp.copy, state), *args[1:])
    with attention.implementation('auto'), compile_preset.as_on('cuda'):
      before = attention.routes()
      with pytest.raises(NotImplementedError, match='dot_product_attention'):
        train.compile_train_step(stage, config, mesh, tx, shardings).lower(*args).compile()
      compiled = train.compile_train_step_for(stage, config, mesh, tx, shardings, args)
      routes = attention.routes_since(before)
      before = attention.routes()
      q = jax.ShapeDtypeStruct((2, 8, 2, 16), jnp.bfloat16)
      jax.eval_shape(lambda q: attention.dot_product_attention(q, q, q), q)
      later = attention.routes_since(before)
    _, metrics = compiled(*args)
  assert "cudnn attention did not compile (MLIR translation rule" in caplog.text
  assert routes['cudnn'] > 0 and routes['xla'] > 0, routes     # cuDNN tried, then XLA's
  assert later == {'cudnn': 0, 'pallas_tpu': 0, 'xla': 1, 'refused': {}}   # later: XLA's
  np.testing.assert_allclose(float(metrics['loss']), float(expected['loss']), rtol=1e-6)
