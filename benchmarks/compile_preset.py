r"""Builds and compiles a (large) preset's sharded train step from shapes alone; prints JSON.

  python benchmarks/compile_preset.py --config=configs/decoder.py:karlo --devices=8
  python benchmarks/compile_preset.py --config=configs/decoder.py:paper --devices=8 \
      --config.mesh.shape='(1,-1,1)' --config.batch_size=8

Nothing is allocated: the train state, batch and stage constants (a frozen CLIP's params) are
abstract arrays with their shardings, so presets far larger than the host's memory compile on a
CPU. With `--devices=N` the CPU is split into N simulated devices (so that FSDP/tensor-parallel
meshes can be checked without accelerators). The frozen CLIP of stages that use one is built
from its preset's shapes with `--clip_depth` layers per tower (its depth does not change the
stage's own program, only the compile time).

Reports parameters, lowering and compile seconds, FLOPs per step (XLA's cost analysis) and
XLA's per-device memory estimate (arguments, outputs, temporaries).

  python benchmarks/compile_preset.py --config=configs/clip.py:vit_b16 --platform=cuda

lowers the step (in bfloat16) for NVIDIA GPUs instead, on any host, and reports where its
attentions go: how many the models traced into cuDNN's flash attention and how many into XLA's
(a scanned stack of layers counts once), and cuDNN's reasons for those it refused. Without a GPU, JAX's cuDNN checks answer as an H100 (compute capability 9.0) with
cuDNN 9.10 would; cuDNN's own checks at compile time need the GPU. Nothing is compiled.
"""

import contextlib
import json
import os
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
from unclip_jax import cli  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined only when run as a script, so that the module can be
  imported beside other absl programs)."""
  config_flags.DEFINE_config_file('config', None, 'Stage config, e.g. configs/decoder.py:karlo.',
                                  lock_config=False)
  flags.DEFINE_integer('devices', 0, 'Simulated CPU devices (0: the platform\'s own devices).')
  flags.DEFINE_integer('clip_depth', 1, 'Layers per frozen-CLIP tower (stages with a CLIP).')
  flags.DEFINE_enum('platform', None, ['cuda', 'tpu'], 'Lower (in bfloat16) for this platform '
                    'instead of compiling for the host, and report where the attentions go.')
  flags.mark_flags_as_required(['config'])


@contextlib.contextmanager
def as_on(platform: str, compute_capability: str = '9.0', cudnn_version: int = 91000):
  """Within this context, models traced take the attention helper's path for `platform` ('cuda':
  cuDNN's kernel, 'tpu': the Pallas one), and on a host without a GPU, JAX's cuDNN checks at
  trace time answer as on a GPU of `compute_capability` with cuDNN `cudnn_version` (a host of
  that platform answers for itself)."""
  import jax  # pylint: disable=g-import-not-at-top
  from unclip_jax.models import attention  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == {'cuda': 'gpu'}.get(platform, platform):
    yield
    return
  if platform == 'tpu':
    with mock.patch.object(attention, '_on_tpu', lambda: True):
      yield
    return
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top
  version = lambda v: tuple(int(x) for x in v.split('.'))
  with mock.patch.object(cudnn, 'check_cudnn_version', lambda: cudnn_version), \
       mock.patch.object(cudnn, 'check_compute_capability',
                         lambda c: version(compute_capability) >= version(c)), \
       mock.patch.object(cudnn, 'is_cuda_compute_capability_equal',
                         lambda c: version(compute_capability) == version(c)), \
       mock.patch.object(attention, '_on_gpu', lambda: True):
    yield


def lower_for(platform: str, config, clip_depth: int = 1) -> dict:
  """Lowers `config`'s train step (and its frozen CLIP) in bfloat16 for `platform` ('cuda', as on
  an H100 where the host has no GPU, or 'tpu'); returns the stage's sizes and where its attentions go (`attention.routes()`)."""
  import jax  # pylint: disable=g-import-not-at-top
  from unclip_jax import train  # pylint: disable=g-import-not-at-top
  from unclip_jax.models import attention  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.dtype = 'bfloat16'
  stage, mesh = _build(config, clip_depth, clip_dtype='bfloat16')
  before = attention.routes()
  t0 = time.perf_counter()
  with as_on(platform):
    train.lower_train_step(stage, config, mesh, platforms=(platform,))
  lower_s = time.perf_counter() - t0
  return {'stage': config.stage, 'platform': platform, 'batch_size': config.batch_size,
          'dtype': config.dtype, 'lower_s': round(lower_s, 2), 'host': jax.default_backend(),
          'attention': attention.routes_since(before)}


def _build(config, clip_depth: int, clip_dtype: str = ''):
  """(stage, mesh) of a config, a frozen CLIP from its preset's shapes with `clip_depth` layers
  per tower (in `clip_dtype`, default its preset's)."""
  import jax  # pylint: disable=g-import-not-at-top
  from unclip_jax import config_lib, stages, train  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import clip as clip_stage  # pylint: disable=g-import-not-at-top
  config_lib.validate(config, jax.device_count(), jax.process_count())
  kwargs = {}
  if 'clip' in config and config.stage != 'clip':
    clip_config = config_lib.preset('clip', config.clip.preset)
    clip_config.model.text.depth = clip_config.model.vision.depth = clip_depth
    clip_config.dtype = clip_dtype or clip_config.dtype
    kwargs['clip'] = clip_stage.abstract_clip(clip_config)
  return stages.get_stage(config, **kwargs), train.make_mesh(config)


def compile_preset(config, clip_depth: int = 1) -> dict:
  """Lowers and compiles `config`'s train step on abstract inputs; returns the measurements."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unclip_jax import stages, train  # pylint: disable=g-import-not-at-top

  stage, mesh = _build(config, clip_depth)
  t0 = time.perf_counter()
  lowered = train.lower_train_step(stage, config, mesh)
  lower_s = time.perf_counter() - t0
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0 - lower_s
  shapes = jax.eval_shape(lambda: stages.init_params(stage, jax.random.PRNGKey(0)))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  result = {'stage': config.stage, 'batch_size': config.batch_size, 'dtype': config.dtype,
            'mesh_shape': [int(n) for n in mesh.devices.shape], 'num_devices': jax.device_count(),
            'device_kind': jax.devices()[0].device_kind, 'params': n_params,
            'lower_s': round(lower_s, 2), 'compile_s': round(compile_s, 2),
            'flops_per_step': train.compiled_flops(compiled)}
  try:
    memory = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    memory = None
  if memory is not None:
    result['memory_per_device_gib'] = {
        k: round(getattr(memory, f'{k}_size_in_bytes') / 2**30, 3)
        for k in ('argument', 'output', 'temp', 'generated_code')}
  return result


def main(argv):
  del argv
  if FLAGS.devices:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_num_cpu_devices', FLAGS.devices)
    jax.config.update('jax_platforms', 'cpu')
  if FLAGS.platform:
    print(json.dumps(lower_for(FLAGS.platform, FLAGS.config, FLAGS.clip_depth), indent=2))
  else:
    print(json.dumps(compile_preset(FLAGS.config, FLAGS.clip_depth), indent=2))


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
