"""benchmarks/train_step.py runs and reports sane quantities (no timing assertions)."""

import functools
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _load_benchmark(name: str = 'train_step'):
  return helpers.load_benchmark(name)


def test_train_step_benchmark_reports_flops_and_matches_peer_size(make_tiny_clip_config):
  bench = _load_benchmark()
  config = make_tiny_clip_config()
  ours = bench.measure_jax(config, steps=2, warmup=1, profile_steps=1)
  assert ours['num_devices'] == 8
  # The traced step's ops, by kind: a transformer's time is in its matmuls and elementwise ops.
  profile = ours['profile']
  assert profile['traced_steps'] == 1 and profile['op_ms_per_step'] > 0
  assert {'matmul', 'elementwise'} <= set(profile['by_kind'])
  assert sum(k['share'] for k in profile['by_kind'].values()) == pytest.approx(1, abs=0.01)
  assert profile['top_ops'] and all(op['kind'] != 'other' for op in profile['top_ops'])
  assert ours['flops_per_step'] > 0 and ours['tflops_per_s'] > 0
  assert ours['samples_per_s'] == pytest.approx(config.batch_size / ours['step_time_s'])
  # XLA's memory estimate holds at least the parameters and AdamW's two moments (float32).
  assert ours['xla_memory_estimate_gb'] * 1e9 > 3 * 4 * ours['params']
  # Where the step's attentions went: XLA's on a CPU, every layer's (both towers').
  layers = config.model.text.depth + config.model.vision.depth
  assert ours['attention']['cudnn'] == 0 and ours['attention']['refused'] == {}
  assert ours['attention']['fell_back_to_xla'] is False
  assert ours['attention']['xla'] >= layers, ours['attention']
  pytest.importorskip('transformers')
  peer = bench.measure_transformers_clip(config, steps=1, warmup=1, compile_model=False)
  # The peer is the same architecture at the same sizes: identical parameter counts.
  assert peer['params'] == ours['params']


def test_profile_summary_reads_each_op_kind_from_a_trace(tmp_path):
  """A convolution, then a matmul and a transpose, traced with jax.profiler: each op's time lands
  under its kind, read from the optimised HLO."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import profile_summary  # pylint: disable=g-import-not-at-top

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  def matmul_and_transpose(a, b):
    return a @ b, jnp.transpose(a, (1, 0))
  cases = [(conv, (jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))), 'convolution',
            'f32[2,16,16,32]'),
           (matmul_and_transpose, (jnp.ones((256, 128)), jnp.ones((128, 64))), 'matmul',
            'f32[256,64]')]
  for i, (fn, args, kind, shape) in enumerate(cases):
    compiled = jax.jit(fn).lower(*args).compile()
    assert kind in profile_summary.op_kinds(compiled.as_text()).values()
    jax.block_until_ready(compiled(*args))
    trace_dir = str(tmp_path / str(i))
    with jax.profiler.trace(trace_dir):
      for _ in range(2):
        jax.block_until_ready(compiled(*args))
    summary = profile_summary.summarise(trace_dir, compiled.as_text(), steps=2)
    assert summary['clock'] == 'host'
    assert summary['by_kind'][kind]['ms'] > 0, summary
    assert shape in {op['shape'] for op in summary['top_ops'] if op['kind'] == kind}, summary
    if kind == 'matmul':
      assert 'layout' in summary['by_kind'], summary     # the transpose
  with pytest.raises(FileNotFoundError, match='no \\*.xplane.pb'):
    profile_summary.summarise(str(tmp_path / 'empty'), compiled.as_text(), steps=1)


def test_attention_benchmark_checks_the_cudnn_operands():
  """benchmarks/attention.py --cpu_smoke: cuDNN's operands (mask as bias, even lengths) through
  XLA's kernel give XLA's masked attention, outputs and gradients."""
  module = _load_benchmark('attention')
  for name, shape in module.SMOKE.items():
    result = module.run_case(shape, repeats=1, on_gpu=False)
    assert result['cudnn_path'] == 'cudnn_operands_on_xla', name
    assert result['keys'] % 2 or result['queries'] % 2, name     # padding is exercised
    assert set(result['max_rel_diff']) == {'out', 'dq', 'dk', 'dv'}
    assert max(result['max_rel_diff'].values()) < 1e-2, (name, result['max_rel_diff'])
    if name.startswith('decoder'):   # the same attention by key lengths instead of a bias
      assert max(result['max_rel_diff_lengths'].values()) < 1e-2, (name, result)
    else:
      assert 'cudnn_lengths_ms' not in result


def test_compile_preset_reports_a_sharded_step_without_allocating(data_dir):
  """benchmarks/compile_preset.py on the tiny upsampler over a 2x4 (data, fsdp) mesh."""
  module = _load_benchmark('compile_preset')
  config = helpers.tiny_upsampler_config(data_dir)
  config.model.unet.update(channel_mult=(1,), model_channels=16, norm_groups=8)  # compiles fast
  config.mesh.shape = (2, 4, 1)
  result = module.compile_preset(config)
  assert result['mesh_shape'] == [2, 4, 1] and result['num_devices'] == 8
  assert result['params'] > 10_000 and result['flops_per_step'] > 0
  assert result['compile_s'] > 0


@pytest.mark.parametrize('platform,kernel', [('cuda', 'cudnn'), ('tpu', 'pallas_tpu')])
def test_every_attention_reaches_the_fused_kernel_in_steps_lowered_for_accelerators(platform,
                                                                                     kernel):
  """compile_preset.py --platform=cuda|tpu, from this CPU (JAX's cuDNN checks answering as an
  H100): every attention of each stage's bfloat16 step goes to cuDNN's kernel, or the Pallas TPU
  one: CLIP's (odd token counts: 17 image tokens, causal text), the prior's (causal over padded
  caption tokens) and the decoder's (masked caption keys), and the frozen CLIP's in both. A head
  size cuDNN refuses is reported with cuDNN's reason."""
  module = _load_benchmark('compile_preset')
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  clip = config_lib.preset('clip', 'tiny')
  clip.batch_size = 8
  assert (clip.model.vision.image_size // clip.model.vision.patch_size) ** 2 % 2 == 0  # +1: odd
  routes = module.lower_for(platform, clip)['attention']
  # Each of the 7 layers' attention, traced as often as the step traces the towers.
  assert routes[kernel] >= 7 and routes[kernel] % 7 == 0, routes
  assert routes['xla'] == 0 and routes['refused'] == {}, routes
  for stage in ('prior', 'decoder'):
    result = module.lower_for(platform, _smoke_config(stage))
    assert result['dtype'] == 'bfloat16'
    routes = result['attention']
    assert routes[kernel] >= 3 and routes['xla'] == 0 and routes['refused'] == {}, result
  if platform == 'tpu':
    return

  clip.attention = 'xla'                                  # the config's switch: XLA's only
  routes = module.lower_for('cuda', clip)['attention']
  assert routes['cudnn'] == 0 and routes['xla'] >= 7, routes
  clip.attention = 'auto'
  clip.model.text.update(width=48, num_heads=4)           # head size 12: not a multiple of 8
  routes = module.lower_for('cuda', clip)['attention']
  text, vision = clip.model.text.depth, clip.model.vision.depth
  assert routes['cudnn'] * text == routes['xla'] * vision > 0, routes   # the text tower's: XLA
  (reason, count), = routes['refused'].items()
  assert 'head dim' in reason and count == routes['xla'], routes


# The smallest karlo-shaped stages (the sizes benchmarks/gpu_suite.sh --cpu-smoke uses).
_SMALL_CLIP = ('model.embed_dim=32,model.text.width=32,model.text.depth=1,model.vision.depth=1,'
               'model.text.context_length=16,model.vision.width=32')


def _smoke_config(stage: str):
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  if stage == 'prior':
    c = config_lib.preset('prior', 'karlo')
    c.model.update(width=64, depth=1, num_heads=2, scan=False)
    c.data.resolution = 32
  elif stage == 'decoder':
    c = config_lib.preset('decoder', 'karlo')
    c.data.resolution = 16
    c.model.unet.update(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(2,), num_head_channels=16, norm_groups=8)
    c.model.context_width = 32
  else:
    c = config_lib.preset('upsampler', 'karlo_64_256')
    c.data.resolution = 32
    c.upsampler.crop_size = 16
    c.model.unet.update(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
  c.batch_size = 8   # one example per simulated device
  c.dtype = 'float32'
  if stage != 'upsampler':
    c.clip.preset = 'tiny'
  return c


_ALIGNED = {'prior': {'model.null_caption'}, 'upsampler': set(),
            'decoder': {'model.text_emb_to_time', 'model.caption_norm', 'model.null_caption',
                        'model.clip_emb_scale', 'model.unet.dropout'}}


@pytest.mark.parametrize('stage', ['prior', 'decoder', 'upsampler'])
def test_diffusers_peers_are_our_architecture(stage):
  """Each diffusion stage's diffusers peer: its config maps back to ours through the converters
  and the parameter counts are equal (but for the prior's null caption, unused with karlo's
  empty prompt); options diffusers lacks are refused naming the field, or aligned and
  reported."""
  pytest.importorskip('diffusers')
  bench = _load_benchmark()
  from benchmarks import diffusers_peers  # pylint: disable=g-import-not-at-top
  config = _smoke_config(stage)
  if stage != 'upsampler':
    with pytest.raises(diffusers_peers.NoPeer, match=r'config\.model\.'):
      bench.prepare_peer(config, _SMALL_CLIP, align=False)
  aligned, clip_config, _ = bench.prepare_peer(config, _SMALL_CLIP, align=True)
  assert set(aligned) == _ALIGNED[stage]
  counts = bench.parameter_counts(config, clip_config)
  total, unused = bench.check_parameter_counts(config, clip_config, counts)
  assert total > 10_000 and (unused > 0) == (stage == 'prior')
  counts[next(iter(counts))] += 1       # one parameter more: refused
  with pytest.raises(AssertionError, match='against the peer'):
    bench.check_parameter_counts(config, clip_config, counts)


def test_the_decoder_and_its_peer_train_side_by_side():
  """The whole comparison on the decoder (the stage with the most to map: text_proj, cross-
  attention, the frozen CLIP in the step): both steps run and report their throughput."""
  pytest.importorskip('diffusers')
  bench = _load_benchmark()
  result = bench.compare_diffusers(_smoke_config('decoder'), _SMALL_CLIP, 1, 1,
                                   compile_model=False, align=True)
  ours, peer = result['ours'], result['peer']
  assert ours['params'] == peer['params'] > 10_000
  assert peer['modules'] == {'text_proj': 'UnCLIPTextProjModel', 'unet': 'UNet2DConditionModel'}
  assert result['speedup_vs_peer'] == pytest.approx(ours['samples_per_s'] / peer['samples_per_s'])
  assert np.isfinite(ours['final_loss']) and np.isfinite(peer['final_loss'])
  assert set(result['aligned']) == _ALIGNED['decoder']


def test_sampling_benchmark_converts_and_times_both_chains(tmp_path):
  """benchmarks/sampling.py on the smallest karlo-shaped UnCLIPPipeline: converted by our
  command, both chains draw images of the same shape for the same prompts."""
  pytest.importorskip('diffusers')
  module = _load_benchmark('sampling')
  report = module.run('smoke', [2], ['float32'], repeats=1, peer=True, workdir=str(tmp_path))
  ours, peer = report['ours']['2']['float32'], report['peer']['2']
  assert ours['image_shape'] == peer['image_shape'] == [2, 32, 32, 3]
  assert set(ours['stage_seconds']) == {'prior', 'decoder', 'upsampler_0'}
  # The chain's attentions (CLIP, prior, decoder) went to XLA's on a CPU.
  assert ours['attention']['xla'] > 0 and ours['attention']['cudnn'] == 0, ours['attention']
  assert report['speedup_vs_peer']['2'] == pytest.approx(peer['seconds'] / ours['seconds'])
  assert os.path.isfile(tmp_path / 'converted' / 'decoder' / 'export' / 'config.json')


def test_gpu_suite_passes_shellcheck():
  shellcheck = os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  result = subprocess.run([shellcheck, os.path.join(REPO, 'benchmarks', 'gpu_suite.sh')],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout


_LACKS = ('grain', 'tensorflow', 'tensorflow_datasets', 'open_clip', 'array_record')
_WITHOUT = '''
import importlib.abc, importlib.util, sys
LACKS = set(sys.argv[1].split(','))
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split('.')[0] in LACKS else _find_spec(name, package))
class Lacking(importlib.abc.MetaPathFinder):
  def find_spec(self, fullname, path, target=None):
    if fullname.split('.')[0] in LACKS:
      raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
sys.meta_path.insert(0, Lacking())
'''


def test_the_benchmarks_need_nothing_the_gpu_machine_lacks():
  """The GPU machine has no grain, tensorflow(-datasets), array_record or open_clip (GPU.md):
  the benchmark scripts import, and every stage of the suite builds (the CLIP's tokenizer and
  the frozen CLIPs included), without them."""
  script = _WITHOUT + '''
from benchmarks import attention, compile_preset, diffusers_peers, sampling, train_step
from unclip_jax import config_lib, stages
for stage, preset in (('clip', 'tiny'), ('clip', 'vit_b16'), ('prior', 'tiny'),
                      ('prior', 'karlo'), ('decoder', 'tiny'), ('upsampler', 'karlo_64_256')):
  config = config_lib.preset(stage, preset)
  if stage in ('prior', 'decoder'):
    config.clip.preset = 'tiny'
    config.data.resolution = 32     # the tiny CLIP's
  stages.get_stage(config)
print(sorted(m for m in sys.modules if m.split('.')[0] in LACKS))
'''
  result = subprocess.run([sys.executable, '-c', script, ','.join(_LACKS)], cwd=REPO,
                          capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == '[]', result.stdout
