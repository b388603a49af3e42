r"""Throughput of one stage's compiled train step, printed as JSON (with a PyTorch peer).

  python benchmarks/train_step.py --config=configs/clip.py:tiny
  python benchmarks/train_step.py --config=configs/clip.py:vit_b16 --config.batch_size=512 \
      --peer=transformers
  python benchmarks/train_step.py --config=configs/decoder.py:karlo --peer=diffusers \
      --align_to_peer --config.model.unet.remat=False

Compiles the sharded train step ahead of time on synthetic batches (no dataset, no TensorFlow),
reads the FLOPs per step from XLA's cost analysis, times `--steps` steps after `--warmup`, and
prints step time, samples/s, TFLOP/s (total and per device), where the device's bf16 peak is
known MFU, and memory: XLA's estimate for the compiled step and, on GPU, the peak in use (the
peer's: torch.cuda.max_memory_allocated). With `--peer`, the same model sizes, batch and
optimizer (AdamW) run in PyTorch (bf16 autocast on GPU; `--peer_compile` adds torch.compile) and
the JSON carries both and their ratio: `transformers`' CLIPModel for the CLIP, and for the prior,
decoder and upsampler the diffusers modules karlo is made of, built from our config
(benchmarks/diffusers_peers.py: the mapping is checked by mapping back through unclip_jax.convert,
and the parameter counts must be equal). Options diffusers' modules do not have are refused, or
with `--align_to_peer` set on our side to what they compute (reported under 'aligned'). The peers
of CLIP-conditioned stages run the frozen CLIP (transformers' CLIPModel at the same sizes) in
their step, as ours do; `--clip_overrides=model.embed_dim=64,model.text.width=64` changes the CLIP
preset's sizes. `--profile_steps=N` adds where N traced steps' time goes, by kind of op.
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
flags.DEFINE_enum('peer', 'none', ['none', 'transformers', 'diffusers'],
                  'PyTorch peer to time alongside (transformers: CLIP; diffusers: prior, decoder, '
                  'upsampler).')
flags.DEFINE_bool('peer_compile', False, 'Also time the torch.compile\'d peer (reported as '
                  'peer_compiled, beside the eager one).')
flags.DEFINE_bool('align_to_peer', False, 'Set our options that the diffusers peer has no '
                  'counterpart for to what it computes, instead of refusing.')
flags.DEFINE_string('clip_overrides', '', 'CLIP-conditioned stages: comma-separated '
                    'field=value overrides of the CLIP preset (e.g. model.embed_dim=64).')
flags.DEFINE_integer('profile_steps', 0, 'Trace this many more steps with jax.profiler and '
                     'add where their time goes, by kind of op, to the JSON (ours.profile).')
flags.mark_flags_as_required(['config'])

# Dense bf16 peak FLOP/s per device, for MFU (H100 SXM: measured matmul ceiling on our machine).
PEAK_FLOPS = {'NVIDIA H100 80GB HBM3': 790e12, 'NVIDIA H200': 790e12}


def measure_jax(config, steps: int, warmup: int, clip=None, profile_steps: int = 0) -> dict:
  """Builds, compiles and times the train step (of a CLIP-conditioned stage on `clip`, default
  its config's); returns the measurements, with `profile_steps` more steps' trace summarised
  under 'profile' (benchmarks/profile_summary.py)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unclip_jax import config_lib, stages, train  # pylint: disable=g-import-not-at-top
  from unclip_jax.models import attention  # pylint: disable=g-import-not-at-top

  config_lib.validate(config, jax.device_count(), jax.process_count())
  stage = stages.get_stage(config, **({'clip': clip} if clip is not None else {}))
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
    routes = attention.routes()
    t0 = time.perf_counter()
    constants = train.stage_constants(stage, mesh)
    with attention.implementation(config.get('attention', 'auto')):
      compiled = train.compile_train_step_for(stage, config, mesh, tx, shardings,
                                              (state, batch, constants))
      fell_back = attention.current() != config.get('attention', 'auto')
    compile_s = time.perf_counter() - t0
    routes = dict(attention.routes_since(routes), fell_back_to_xla=fell_back)
    total_flops = train.compiled_flops(compiled)
    memory = compiled_memory_gb(compiled)
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
    profile, state = trace_steps(compiled, (state, batch, constants), profile_steps)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  by_name = {'/'.join(str(getattr(k, 'key', k)) for k in path): int(np.prod(x.shape))
             for path, x in jax.tree_util.tree_leaves_with_path(state.params)}
  devices = jax.devices()
  result = {
      'framework': 'jax', 'jax_version': jax.__version__,
      'device_kind': devices[0].device_kind, 'num_devices': len(devices),
      'params': n_params, 'param_counts': by_name, 'compile_s': round(compile_s, 3),
      'step_time_s': step_s, 'samples_per_s': config.batch_size / step_s,
      'flops_per_step': total_flops, 'tflops_per_s': total_flops / step_s / 1e12,
      'tflops_per_s_per_device': total_flops / step_s / 1e12 / len(devices),
      'final_loss': float(metrics['loss']),
      'attention': routes,
  }
  peak = PEAK_FLOPS.get(devices[0].device_kind)
  if peak:
    result['mfu'] = total_flops / step_s / (peak * len(devices))
  if memory:
    result['xla_memory_estimate_gb'] = memory
  stats = devices[0].memory_stats()   # None on CPU
  if stats and 'peak_bytes_in_use' in stats:
    result['peak_memory_gb'] = round(stats['peak_bytes_in_use'] / 1e9, 3)
  if profile:
    result['profile'] = profile
  return result


def compiled_memory_gb(compiled) -> float:
  """XLA's estimate of one device's memory for a call of `compiled`: arguments, outputs not
  aliased to them, and temporaries, in GB (0 where the backend gives no analysis)."""
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
             m.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return 0.0
  return round(total / 1e9, 3)


def trace_steps(compiled, args, steps: int) -> dict:
  """Runs `compiled(*args)` `steps` times (feeding the returned state back) under
  `jax.profiler.trace`; returns the trace summarised by kind of op ({} when steps is 0) and the
  last state."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import profile_summary  # pylint: disable=g-import-not-at-top
  state, rest = args[0], args[1:]
  if steps <= 0:
    return {}, state
  with tempfile.TemporaryDirectory() as trace_dir:
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        state, metrics = compiled(state, *rest)
      jax.block_until_ready((state, metrics))
    wall_s = (time.perf_counter() - t0) / steps
    summary = profile_summary.summarise(trace_dir, compiled.as_text(), steps)
  summary['traced_steps'] = steps
  summary['wall_ms_per_step_traced'] = round(wall_s * 1e3, 3)
  return summary, state


def unscanned_flops(stage, config, mesh) -> float:
  """FLOPs of the same step with `model.scan=False`, from its (global) lowered HLO."""
  from unclip_jax import train  # pylint: disable=g-import-not-at-top
  unscanned = config.copy_and_resolve_references()
  with unscanned.unlocked():
    unscanned.model.scan = False
  extra = {'clip': stage.clip} if hasattr(stage, 'clip') else {}
  lowered = train.lower_train_step(type(stage)(unscanned, **extra), unscanned, mesh)
  return float((lowered.cost_analysis() or {}).get('flops', 0.0))


def hf_clip_config(config):
  """transformers' CLIPConfig at a CLIP stage config's sizes."""
  from transformers import CLIPConfig  # pylint: disable=g-import-not-at-top
  m = config.model
  return CLIPConfig(
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


def measure_transformers_clip(config, steps: int, warmup: int, compile_model: bool) -> dict:
  """The same CLIP sizes, batch and AdamW in PyTorch (transformers' CLIPModel)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import CLIPModel  # pylint: disable=g-import-not-at-top
  m, o = config.model, config.optim
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = CLIPModel(hf_clip_config(config)).to(device).train()
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

  timing = time_torch_steps(step, device, steps, warmup)
  return {'framework': 'torch', 'torch_version': torch.__version__, 'device': device,
          'compiled': compile_model, **timing, 'samples_per_s': b / timing['step_time_s'],
          'params': sum(p.numel() for p in model.parameters())}


def time_torch_steps(step, device: str, steps: int, warmup: int) -> dict:
  """Runs `step` (returning the loss) `warmup` times (at least once), then times `steps` calls:
  {'warmup_s', 'step_time_s', 'final_loss'}."""
  import torch  # pylint: disable=g-import-not-at-top
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  for _ in range(max(warmup, 1)):
    step()
  sync()
  warmup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step()
  sync()
  result = {'warmup_s': round(warmup_s, 3), 'step_time_s': (time.perf_counter() - t0) / steps,
            'final_loss': float(loss.detach())}
  if device == 'cuda':
    result['peak_memory_gb'] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
  return result


def clip_config_for(config, overrides: str = ''):
  """The CLIP stage config a CLIP-conditioned stage runs on: its `clip.preset` with
  `overrides` ('field=value,...', values parsed as Python literals)."""
  import ast  # pylint: disable=g-import-not-at-top
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  clip_config = config_lib.preset('clip', config.clip.preset)
  clip_config.dtype = config.dtype
  for item in filter(None, overrides.split(',')):
    field, value = item.split('=', 1)
    *path, name = field.strip().split('.')
    node = clip_config
    for part in path:
      node = node[part]
    try:
      node[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[name] = value
  return clip_config


def measure_diffusers(stage: str, config, clip_config, steps: int, warmup: int,
                      compile_model: bool) -> dict:
  """The stage's step in PyTorch: the diffusers modules of benchmarks/diffusers_peers.py at our
  config's sizes, the frozen CLIP (transformers' CLIPModel, no gradients) where ours runs one,
  the same batch, noise-prediction MSE and AdamW."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from benchmarks import diffusers_peers  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  modules = {k: m.to(device).train() for k, m in
             diffusers_peers.build(stage, config, clip_config).items()}
  params = [p for m in modules.values() for p in m.parameters()]
  o = config.optim
  opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                          weight_decay=o.weight_decay)
  b = config.batch_size
  use_bf16 = config.dtype == 'bfloat16' and device == 'cuda'
  rand = lambda *shape: torch.randn(*shape, device=device)
  t = torch.randint(0, 1000, (b,), device=device)
  clip = None
  if clip_config is not None:
    from transformers import CLIPModel  # pylint: disable=g-import-not-at-top
    clip = CLIPModel(hf_clip_config(clip_config)).to(device).eval().requires_grad_(False)
    text = clip_config.model.text
    ids = torch.randint(0, 8, (b, text.context_length), device=device)
    ids[:, -1] = text.eot_id
    clip_size = clip_config.model.vision.image_size
  forward = {k: torch.compile(m) if compile_model else m for k, m in modules.items()}

  def clip_features(images):
    with torch.no_grad():
      out = clip.text_model(input_ids=ids)
      text_emb = clip.text_projection(out.pooler_output)
      pixels = F.interpolate(images, size=(clip_size, clip_size), mode='bilinear')
      image_emb = clip.get_image_features(pixel_values=pixels)
      image_emb = getattr(image_emb, 'pooler_output', image_emb)   # transformers 4 and 5
    return text_emb, out.last_hidden_state, image_emb

  if stage == 'prior':
    images = rand(b, 3, config.data.resolution, config.data.resolution)
    mask = torch.ones(b, clip_config.model.text.context_length, dtype=torch.bool, device=device)

    def loss_fn():
      text_emb, hidden, x0 = clip_features(images)
      x_t = 0.7 * x0 + 0.7 * torch.randn_like(x0)
      pred = forward['prior'](hidden_states=x_t, timestep=t, proj_embedding=text_emb,
                              encoder_hidden_states=hidden, attention_mask=mask)
      return F.mse_loss(pred.predicted_image_embedding, x0)
  elif stage == 'decoder':
    r = config.data.resolution
    x0 = rand(b, 3, r, r)
    mask = torch.ones(b, clip_config.model.text.context_length + config.model.num_clip_tokens,
                      dtype=torch.bool, device=device)

    def loss_fn():
      text_emb, hidden, image_emb = clip_features(x0)
      context, time_extra = forward['text_proj'](
          image_embeddings=image_emb, prompt_embeds=text_emb,
          text_encoder_hidden_states=hidden, do_classifier_free_guidance=False)
      noise = torch.randn_like(x0)
      out = forward['unet'](0.7 * x0 + 0.7 * noise, t, encoder_hidden_states=context,
                            class_labels=time_extra, attention_mask=mask).sample
      loss = F.mse_loss(out[:, :3], noise)
      # The learned variance's channels: a stand-in for our hybrid loss's VLB term (elementwise).
      return loss + 1e-3 * out[:, 3:].pow(2).mean() if out.shape[1] > 3 else loss
  else:
    crop = config.upsampler.crop_size or config.data.resolution
    x0 = rand(b, 3, crop, crop)
    low = F.interpolate(F.interpolate(x0, scale_factor=1 / config.upsampler.scale,
                                      mode='bicubic'), size=(crop, crop), mode='bicubic')

    def loss_fn():
      noise = torch.randn_like(x0)
      out = forward['unet'](torch.cat([0.7 * x0 + 0.7 * noise, low], 1), t).sample
      return F.mse_loss(out[:, :3], noise)

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16):
      loss = loss_fn()
    loss.backward()
    if o.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  timing = time_torch_steps(step, device, steps, warmup)
  return {'framework': 'torch', 'torch_version': torch.__version__, 'device': device,
          'modules': {k: type(m).__name__ for k, m in modules.items()},
          'compiled': compile_model, **timing, 'samples_per_s': b / timing['step_time_s'],
          'params': diffusers_peers.count(modules)}


def prepare_peer(config, clip_overrides: str, align: bool):
  """(aligned fields, the CLIP config or None, the peer's diffusers config) for our stage config,
  the peer's config checked to map back to ours. Raises diffusers_peers.NoPeer (naming the
  field) where there is no peer."""
  from benchmarks import diffusers_peers  # pylint: disable=g-import-not-at-top
  stage = config.stage
  options = {'prior': diffusers_peers.KARLO_PRIOR_OPTIONS,
             'decoder': diffusers_peers.KARLO_DECODER_OPTIONS,
             'upsampler': diffusers_peers.UPSAMPLER_OPTIONS}.get(stage)
  if options is None:
    raise diffusers_peers.NoPeer(f'stage {stage!r} has no diffusers peer (use '
                                 '--peer=transformers for the CLIP)')
  aligned = diffusers_peers.align(config, options) if align else {}
  clip_config = clip_config_for(config, clip_overrides) if stage != 'upsampler' else None
  peer_config = diffusers_peers.peer_configs(stage, config, clip_config)
  diffusers_peers.check_round_trip(stage, config, peer_config, clip_config)
  return aligned, clip_config, peer_config


def parameter_counts(config, clip_config) -> dict[str, int]:
  """{parameter path: size} of our stage's model, from shapes alone (nothing is computed)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unclip_jax import stages  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import clip as clip_stage  # pylint: disable=g-import-not-at-top
  extra = {'clip': clip_stage.abstract_clip(clip_config)} if clip_config is not None else {}
  stage = stages.get_stage(config, **extra)
  shapes = jax.eval_shape(lambda: stages.init_params(stage, jax.random.PRNGKey(0)))
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): int(np.prod(x.shape))
          for path, x in jax.tree_util.tree_leaves_with_path(shapes)}


def check_parameter_counts(config, clip_config, counts: dict[str, int]) -> tuple[int, int]:
  """(our parameters, of which unused here); raises AssertionError unless the rest equals the
  diffusers peer's count."""
  from benchmarks import diffusers_peers  # pylint: disable=g-import-not-at-top
  stage = config.stage
  total, unused = sum(counts.values()), unused_params(stage, config, counts)
  theirs = diffusers_peers.count(diffusers_peers.build(stage, config, clip_config))
  if total - unused != theirs:
    raise AssertionError(f'{stage}: {total} parameters ({unused} unused in this '
                         f'configuration) against the peer\'s {theirs}')
  return total, unused


def compare_diffusers(config, clip_overrides: str, steps: int, warmup: int,
                      compile_model: bool, align: bool, profile_steps: int = 0) -> dict:
  """Our stage's step beside its diffusers peer: {'aligned', 'peer_config', 'ours', 'peer',
  'unused_params_ours', 'speedup_vs_peer'}. Raises diffusers_peers.NoPeer (naming the field)
  where there is none, AssertionError if the parameter counts differ."""
  from unclip_jax.stages import clip as clip_stage  # pylint: disable=g-import-not-at-top
  aligned, clip_config, peer_config = prepare_peer(config, clip_overrides, align)
  clip = clip_stage.random_clip(clip_config) if clip_config is not None else None
  ours = measure_jax(config, steps, warmup, clip=clip, profile_steps=profile_steps)
  _, unused = check_parameter_counts(config, clip_config, ours.pop('param_counts'))
  peer = measure_diffusers(config.stage, config, clip_config, steps, warmup, False)
  result = {'aligned': {k: list(v) for k, v in aligned.items()}, 'peer_config': peer_config,
            'ours': ours, 'peer': peer, 'unused_params_ours': unused,
            'speedup_vs_peer': ours['samples_per_s'] / peer['samples_per_s']}
  if compile_model:   # the torch.compile'd peer too, beside the eager one
    compiled = measure_diffusers(config.stage, config, clip_config, steps, warmup, True)
    result.update(peer_compiled=compiled,
                  speedup_vs_peer_compiled=ours['samples_per_s'] / compiled['samples_per_s'])
  return result


def unused_params(stage: str, config, counts: dict[str, int]) -> int:
  """Parameters our model holds but does not use in this configuration: the prior's learned null
  caption when the empty prompt is the unconditional caption (kept so that exports keep one
  layout; the converter fills them with zeros). `counts`: {parameter path: size}."""
  if stage == 'prior' and config.model.get('null_caption') == 'empty_prompt':
    return sum(n for path, n in counts.items()
               if path.split('/')[-1] in ('null_text_emb', 'null_token_encodings'))
  return 0


def main(argv):
  del argv
  config = FLAGS.config
  result = {'stage': config.stage, 'batch_size': config.batch_size, 'dtype': config.dtype,
            'mesh_shape': list(config.mesh.shape)}
  if FLAGS.peer == 'diffusers':
    from benchmarks import diffusers_peers  # pylint: disable=g-import-not-at-top
    try:
      result.update(compare_diffusers(config, FLAGS.clip_overrides, FLAGS.steps, FLAGS.warmup,
                                      FLAGS.peer_compile, FLAGS.align_to_peer,
                                      FLAGS.profile_steps))
    except diffusers_peers.NoPeer as e:
      raise app.UsageError(f'no diffusers peer: {e}') from None
    print(json.dumps(result, indent=2))
    return
  result['ours'] = measure_jax(config, FLAGS.steps, FLAGS.warmup,
                               profile_steps=FLAGS.profile_steps)
  result['ours'].pop('param_counts')
  if FLAGS.peer == 'transformers':
    if config.stage != 'clip':
      raise app.UsageError('--peer=transformers times a CLIP model: use a clip config')
    peer = measure_transformers_clip(config, FLAGS.steps, FLAGS.warmup, False)
    result['peer'] = peer
    result['speedup_vs_peer'] = result['ours']['samples_per_s'] / peer['samples_per_s']
    if FLAGS.peer_compile:
      compiled = measure_transformers_clip(config, FLAGS.steps, FLAGS.warmup, True)
      result['peer_compiled'] = compiled
      result['speedup_vs_peer_compiled'] = (result['ours']['samples_per_s'] /
                                            compiled['samples_per_s'])
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
