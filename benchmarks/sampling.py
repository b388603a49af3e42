r"""Text → image latency of the whole chain, ours beside diffusers' UnCLIPPipeline; JSON.

  python benchmarks/sampling.py --size=karlo --batch_sizes=1,8            # one GPU
  python benchmarks/sampling.py --size=reduced --batch_sizes=1,8 --dtypes=float32   # CPU

A random karlo-shaped UnCLIPPipeline (benchmarks/diffusers_peers.py: karlo's sizes, or reduced
ones that keep every block type) is saved and converted by our command
(`python -m unclip_jax.convert karlo`), so both run the same function. Both then draw images for
the same prompts at karlo's default settings: prior 25 steps at guidance 4, decoder 25 steps at
guidance 8, super-resolution 7 steps. Ours runs in each of `--dtypes` (compute dtype; parameters
float32), the peer in float16 on a GPU (float32 on CPU). The first call of each (compilation
for ours, cuDNN autotuning and allocation for the peer) is reported apart as `first_call_s`;
`seconds` is the median of `--repeats` calls after it. `speedup_vs_peer` = peer seconds / our
fastest dtype's seconds.
"""

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
from unclip_jax import cli  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined on use: the module can be imported beside others)."""
  flags.DEFINE_enum('size', 'reduced', ['karlo', 'reduced', 'smoke'],
                    'Sizes of the karlo-shaped pipeline (benchmarks/diffusers_peers.KARLO_SIZES).')
  flags.DEFINE_list('batch_sizes', ['1', '8'], 'Prompts per call.')
  flags.DEFINE_list('dtypes', ['bfloat16', 'float32'], 'Our compute dtypes.')
  flags.DEFINE_integer('repeats', 3, 'Timed calls after the first.')
  flags.DEFINE_bool('peer', True, 'Also time diffusers\' UnCLIPPipeline.')
  flags.DEFINE_string('workdir', None, 'Where the pipeline is saved and converted (default: a '
                      'temporary folder, removed at the end).')

PROMPTS = ['a red cat on a blue sofa', 'the photo of a dog', 'a cat of the night',
           'a small house by the sea', 'the painting of a tree', 'a dog and a cat',
           'a blue car', 'the sun over the hills']


def _prompts(batch: int) -> list[str]:
  return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def _timed(call, repeats: int) -> dict:
  t0 = time.perf_counter()
  call()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return {'first_call_s': round(first, 3), 'seconds': statistics.median(times),
          'all_seconds': [round(t, 4) for t in times]}


def convert(size: str, root: str) -> tuple[object, str]:
  """(the diffusers pipeline, our converted run folder) of a karlo-shaped pipeline."""
  from benchmarks import diffusers_peers  # pylint: disable=g-import-not-at-top
  from unclip_jax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
  reference = diffusers_peers.karlo_pipeline(size)
  src, dst = os.path.join(root, 'diffusers'), os.path.join(root, 'converted')
  reference.save_pretrained(src)
  with contextlib.redirect_stdout(sys.stderr):   # stdout is the report's
    converted = convert_cli.main(['karlo', src, dst, '--overwrite'])
  if converted != 0:
    raise RuntimeError(f'converting {src} failed')
  return reference, dst


def measure_ours(run: str, batch_sizes, dtypes, repeats: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unclip_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from unclip_jax.models import attention  # pylint: disable=g-import-not-at-top
  out = {}
  for dtype in dtypes:
    pipe = pipeline_lib.UnclipPipeline.from_run(run, dtype=dtype)
    for b in batch_sizes:
      prompts = _prompts(b)
      routes = attention.routes()

      def call():
        generation = pipe.text_to_image(prompts, seed=0, truncate=True)
        return np.asarray(jax.block_until_ready(generation.images))
      result = _timed(call, repeats)
      result['attention'] = attention.routes_since(routes)   # where the chain's attentions went
      generation = pipe.text_to_image(prompts, seed=0, truncate=True)
      result['stage_seconds'] = {k: round(v, 4) for k, v in generation.seconds.items()}
      result['image_shape'] = list(np.asarray(generation.images).shape)
      out.setdefault(str(b), {})[dtype] = result
  return out


def measure_peer(reference, batch_sizes, repeats: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  dtype = torch.float16 if device == 'cuda' else torch.float32
  pipe = reference.to(device, dtype)
  pipe.set_progress_bar_config(disable=True)
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  out = {}
  for b in batch_sizes:
    prompts = _prompts(b)
    generator = torch.Generator(device=device)

    def call():
      with torch.inference_mode():
        images = pipe(prompts, generator=generator.manual_seed(0), output_type='np').images
      sync()
      return images
    result = _timed(call, repeats)
    result.update(device=device, dtype=str(dtype).replace('torch.', ''),
                  image_shape=list(call().shape))
    out[str(b)] = result
  return out


def run(size: str, batch_sizes, dtypes, repeats: int, peer: bool, workdir=None) -> dict:
  """Converts, times ours (and the peer); returns the report."""
  import jax  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    root = workdir or tmp
    t0 = time.perf_counter()
    reference, converted = convert(size, root)
    convert_s = time.perf_counter() - t0
    report = {'size': size, 'device_kind': jax.devices()[0].device_kind,
              'convert_s': round(convert_s, 2),
              'settings': {'prior': '25 steps, guidance 4', 'decoder': '25 steps, guidance 8',
                           'super_res': '7 steps'},
              'ours': measure_ours(converted, batch_sizes, dtypes, repeats)}
    if peer:
      report['peer'] = measure_peer(reference, batch_sizes, repeats)
      report['speedup_vs_peer'] = {
          b: report['peer'][b]['seconds'] / min(r['seconds'] for r in report['ours'][b].values())
          for b in report['peer']}
  return report


def main(argv):
  del argv
  batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  print(json.dumps(run(FLAGS.size, batch_sizes, FLAGS.dtypes, FLAGS.repeats, FLAGS.peer,
                       FLAGS.workdir), indent=2))


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
