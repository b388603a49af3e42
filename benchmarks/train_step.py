r"""Throughput of one stage's compiled train step, printed as JSON (with a PyTorch peer).

  python benchmarks/train_step.py --config=configs/clip.py:tiny
  python benchmarks/train_step.py --config=configs/clip.py:vit_b16 --config.batch_size=512 \
      --peer=transformers

Compiles the sharded train step ahead of time on synthetic batches (no dataset, no TensorFlow),
reads the FLOPs per step from XLA's cost analysis, times `--steps` steps after `--warmup`, and
prints step time, samples/s, TFLOP/s (total and per device) and, where the device's bf16 peak is
known, MFU. With `--peer`, the same model sizes, batch and optimizer (AdamW) run in PyTorch
(`transformers`' CLIPModel, bf16 autocast on GPU; `--peer_compile` adds torch.compile) and the
JSON carries both and their ratio.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
from unclip_jax import cli  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Stage config, e.g. configs/clip.py:tiny.',
                                lock_config=True)
flags.DEFINE_integer('steps', 10, 'Timed steps.')
flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
flags.DEFINE_enum('peer', 'none', ['none', 'transformers'], 'PyTorch peer to time alongside.')
flags.DEFINE_bool('peer_compile', False, 'torch.compile the peer.')
flags.mark_flags_as_required(['config'])

# Dense bf16 peak FLOP/s per device, for MFU (H100 SXM: measured matmul ceiling on our machine).
PEAK_FLOPS = {'NVIDIA H100 80GB HBM3': 790e12, 'NVIDIA H200': 790e12}


def measure_jax(config, steps: int, warmup: int) -> dict:
  """Builds, compiles and times the train step; returns the measurements."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unclip_jax import config_lib, stages, train  # pylint: disable=g-import-not-at-top

  config_lib.validate(config, jax.device_count(), jax.process_count())
  stage = stages.get_stage(config)
  mesh = train.make_mesh(config)
  tx = train.make_optimizer(config)
  spec = stage.batch_spec(config.batch_size)
  rng = np.random.default_rng(0)
  def synthetic(s):
    if jnp.issubdtype(s.dtype, jnp.integer):
      return rng.integers(0, 8, size=s.shape).astype(s.dtype)
    return rng.uniform(-1, 1, size=s.shape).astype(s.dtype)
  host_batch = {k: synthetic(s) for k, s in spec.items()}
  if 'tokens' in host_batch:   # an end token in every row, so text pooling is well defined
    clip_config = stage.clip.config if hasattr(stage, 'clip') else config
    host_batch['tokens'][:, -1] = clip_config.model.text.eot_id

  with jax.set_mesh(mesh), nn.logical_axis_rules(train.logical_rules(config)):
    state, shardings = train.create_train_state(stage, config, mesh, tx)
    batch = train.make_global_batch(host_batch, mesh, list(spec))
    step_fn = train.compile_train_step(stage, config, mesh, tx, shardings)
    t0 = time.perf_counter()
    constants = train.stage_constants(stage, mesh)
    compiled = step_fn.lower(state, batch, constants).compile()
    compile_s = time.perf_counter() - t0
    total_flops = train.compiled_flops(compiled)
    if config.model.get('scan'):
      # XLA counts a scanned loop's body once: count the unscanned step instead.
      total_flops = unscanned_flops(stage, config, mesh)
    for _ in range(warmup):
      state, metrics = compiled(state, batch, constants)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch, constants)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  devices = jax.devices()
  result = {
      'framework': 'jax', 'jax_version': jax.__version__,
      'device_kind': devices[0].device_kind, 'num_devices': len(devices),
      'params': n_params, 'compile_s': round(compile_s, 3),
      'step_time_s': step_s, 'samples_per_s': config.batch_size / step_s,
      'flops_per_step': total_flops, 'tflops_per_s': total_flops / step_s / 1e12,
      'tflops_per_s_per_device': total_flops / step_s / 1e12 / len(devices),
      'final_loss': float(metrics['loss']),
  }
  peak = PEAK_FLOPS.get(devices[0].device_kind)
  if peak:
    result['mfu'] = total_flops / step_s / (peak * len(devices))
  return result


def unscanned_flops(stage, config, mesh) -> float:
  """FLOPs of the same step with `model.scan=False`, from its (global) lowered HLO."""
  from unclip_jax import train  # pylint: disable=g-import-not-at-top
  unscanned = config.copy_and_resolve_references()
  with unscanned.unlocked():
    unscanned.model.scan = False
  extra = {'clip': stage.clip} if hasattr(stage, 'clip') else {}
  lowered = train.lower_train_step(type(stage)(unscanned, **extra), unscanned, mesh)
  return float((lowered.cost_analysis() or {}).get('flops', 0.0))


def measure_transformers_clip(config, steps: int, warmup: int, compile_model: bool) -> dict:
  """The same CLIP sizes, batch and AdamW in PyTorch (transformers' CLIPModel)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import CLIPConfig, CLIPModel  # pylint: disable=g-import-not-at-top
  m, o = config.model, config.optim
  cfg = CLIPConfig(
      text_config=dict(vocab_size=m.text.vocab_size, hidden_size=m.text.width,
                       intermediate_size=int(m.text.width * m.text.mlp_ratio),
                       num_hidden_layers=m.text.depth, num_attention_heads=m.text.num_heads,
                       max_position_embeddings=m.text.context_length, hidden_act=m.text.activation,
                       bos_token_id=min(1, m.text.vocab_size - 1), pad_token_id=0,
                       eos_token_id=m.text.eot_id),
      vision_config=dict(hidden_size=m.vision.width,
                         intermediate_size=int(m.vision.width * m.vision.mlp_ratio),
                         num_hidden_layers=m.vision.depth, num_attention_heads=m.vision.num_heads,
                         image_size=m.vision.image_size, patch_size=m.vision.patch_size,
                         hidden_act=m.vision.activation),
      projection_dim=m.embed_dim)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = CLIPModel(cfg).to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                          weight_decay=o.weight_decay)
  b, res = config.batch_size, m.vision.image_size
  pixels = torch.rand(b, 3, res, res, device=device) * 2 - 1
  ids = torch.randint(0, 8, (b, m.text.context_length), device=device)
  ids[:, -1] = m.text.eot_id
  forward = torch.compile(model) if compile_model else model
  use_bf16 = config.dtype == 'bfloat16' and device == 'cuda'

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16):
      loss = forward(input_ids=ids, pixel_values=pixels, return_loss=True).loss
    loss.backward()
    if o.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  for _ in range(max(warmup, 1)):
    step()
  sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step()
  sync()
  step_s = (time.perf_counter() - t0) / steps
  return {'framework': 'torch', 'torch_version': torch.__version__, 'device': device,
          'compiled': compile_model, 'step_time_s': step_s, 'samples_per_s': b / step_s,
          'params': sum(p.numel() for p in model.parameters()), 'final_loss': float(loss.detach())}


def main(argv):
  del argv
  config = FLAGS.config
  result = {'stage': config.stage, 'batch_size': config.batch_size, 'dtype': config.dtype,
            'mesh_shape': list(config.mesh.shape),
            'ours': measure_jax(config, FLAGS.steps, FLAGS.warmup)}
  if FLAGS.peer == 'transformers':
    if config.stage != 'clip':
      raise app.UsageError('--peer=transformers times a CLIP model: use a clip config')
    peer = measure_transformers_clip(config, FLAGS.steps, FLAGS.warmup, FLAGS.peer_compile)
    result['peer'] = peer
    result['speedup_vs_peer'] = result['ours']['samples_per_s'] / peer['samples_per_s']
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
