r"""Attention at our models' shapes: cuDNN's flash kernel against XLA's, checked and timed.

  python benchmarks/attention.py                 # one GPU: karlo's decoder and prior, CLIP
  python benchmarks/attention.py --cpu_smoke     # small shapes, XLA only (no cuDNN on a CPU)

For each case, forward + backward of sum(out²) in bfloat16 through `unclip_jax.models.attention`
with XLA's kernel and with cuDNN's, which takes lengths padded to even and the mask as a bias
(without a GPU, those same operands go through XLA's kernel: `cudnn_path` says which). JSON per
case: milliseconds per call, the cuDNN/XLA speedup on GPU, and the largest difference of outputs
and gradients between the two (relative to the largest XLA value); a case cuDNN refuses records
why. The decoder's cases also time cuDNN with the caption's keys moved after the image's and
cuDNN's padding mask (a length per row) instead of the bias (`cudnn_lengths_*`), to measure what
the bias costs.
"""

import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from unclip_jax import cli  # pylint: disable=wrong-import-position
from unclip_jax.models import attention  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS

# (batch, queries, keys, heads, head size, causal, masked key positions): karlo's decoder at
# batch 64 (64 px; attention at 32, 16, 8 px over the image and 77 caption + 4 CLIP tokens, 64
# channels per head) and prior at batch 256 (77 caption tokens + 4, width 2048 in 32 heads);
# CLIP ViT-B/16 at batch 512 (196 patches + 1 class token; 77 text tokens, causal), unmasked.
KARLO = {
    'decoder_32px': (64, 1024, 1024 + 81, 10, 64, False, 'caption'),
    'decoder_16px': (64, 256, 256 + 81, 15, 64, False, 'caption'),
    'decoder_8px': (64, 64, 64 + 81, 20, 64, False, 'caption'),
    'prior': (256, 81, 81, 32, 64, True, 'caption'),
    'clip_vit_b16_image': (512, 197, 197, 12, 64, False, None),
    'clip_vit_b16_text': (512, 77, 77, 8, 64, True, None),
}
SMOKE = {
    'decoder_8px': (2, 16, 16 + 9, 2, 16, False, 'caption'),
    'prior': (2, 9, 9, 2, 16, True, 'caption'),
    'clip_image': (2, 17, 17, 2, 16, False, None),
    'clip_text': (2, 9, 9, 2, 16, True, None),
}


def define_flags():
  flags.DEFINE_bool('cpu_smoke', False, 'Small shapes (XLA only on a CPU).')
  flags.DEFINE_integer('repeats', 10, 'Timed calls after the first.')


def case_inputs(b, t, s, h, d, masked, seed=0):
  """q [b, t, h, d], k, v [b, s, h, d] in bfloat16 and, where `masked` is 'caption', a key mask
  [b, 1, 1, s] hiding the padded part of a 77-token caption (its first 77 keys; a different
  length per row)."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.bfloat16) for _ in range(2))
  mask = None
  if masked == 'caption':   # the decoder's extra keys (caption and CLIP tokens), or the prior's
    caption = min(77, s - t if s > t else s)
    lengths = rng.integers(2, caption + 1, size=b)
    keys = np.arange(s)
    mask = jnp.asarray((keys[None] >= caption) | (keys[None] < lengths[:, None]))[:, None, None]
  return q, k, v, mask


def loss_and_grads(impl: str, causal: bool):
  """jit of (q, k, v, mask) → (out, (dq, dk, dv)) of sum(out²): impl 'xla' is XLA's masked
  attention; 'cudnn' (and 'cudnn_operands_on_xla') take the mask as cuDNN does, as a bias over
  even-padded lengths, into cuDNN's kernel (XLA's, to check the operands without a GPU);
  'cudnn_lengths' (and 'cudnn_lengths_on_xla') are `by_key_lengths`."""
  def loss(q, k, v, mask):
    if impl == 'xla':
      with attention.implementation('xla'):
        out = attention.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    elif impl.startswith('cudnn_lengths'):
      out = by_key_lengths(q, k, v, mask, 'cudnn' if impl == 'cudnn_lengths' else 'xla')
    else:
      out = attention.cudnn_attention(q, k, v, mask=mask, is_causal=causal,
                                      implementation='cudnn' if impl == 'cudnn' else 'xla')
    return jnp.sum(jnp.square(out.astype(jnp.float32))), out
  grads = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  return jax.jit(lambda q, k, v, mask: grads(q, k, v, mask)[::-1])


def by_key_lengths(q, k, v, mask, implementation: str):
  """The decoder's attention with the caption's keys moved after the image's, so that the keys
  attended are a prefix of each row and cuDNN's padding mask (a length per row) replaces the
  bias: the alternative to measure against the bias. Same function (attention does not depend
  on the keys' order); `mask` is `case_inputs`' caption mask, lengths padded to even."""
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  caption = min(77, s - t if s > t else s)
  attended = (s - caption) + jnp.sum(mask[:, 0, 0, :caption], axis=-1, dtype=jnp.int32)
  k, v = (jnp.concatenate([x[:, caption:], x[:, :caption]], axis=1) for x in (k, v))
  q = jnp.pad(q, ((0, 0), (0, t % 2), (0, 0), (0, 0)))
  k, v = (jnp.pad(x, ((0, 0), (0, s % 2), (0, 0), (0, 0))) for x in (k, v))
  out = jax.nn.dot_product_attention(
      q, k, v, query_seq_lengths=jnp.full((b,), t, jnp.int32), key_value_seq_lengths=attended,
      implementation=implementation)
  return out[:, :t]


def time_call(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(repeats):
    result = fn(*args)
  jax.block_until_ready(result)
  return (time.perf_counter() - t0) / repeats * 1e3


def max_relative_difference(a, b) -> float:
  a, b = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (a, b))
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def run_case(shape, repeats: int, on_gpu: bool) -> dict:
  """One case: XLA's attention, then cuDNN's with the mask as a bias (`cudnn_*`) and, for the
  decoder's shapes (a caption mask, not causal), with key lengths instead (`cudnn_lengths_*`)."""
  b, t, s, h, d, causal, masked = shape
  args = case_inputs(b, t, s, h, d, masked)
  result = {'batch': b, 'queries': t, 'keys': s, 'heads': h, 'head_size': d, 'causal': causal}
  xla = loss_and_grads('xla', causal)
  result['xla_ms'] = time_call(xla, args, repeats)
  path = 'cudnn' if on_gpu else 'cudnn_operands_on_xla'
  result['cudnn_path'] = path
  _against_xla(result, 'cudnn', loss_and_grads(path, causal), xla, args, repeats, on_gpu)
  if masked == 'caption' and not causal:
    path = 'cudnn_lengths' if on_gpu else 'cudnn_lengths_on_xla'
    _against_xla(result, 'cudnn_lengths', loss_and_grads(path, causal), xla, args, repeats,
                 on_gpu)
  return result


def _against_xla(result: dict, name: str, fn, xla, args, repeats: int, on_gpu: bool) -> None:
  """Adds `name`_ms, speedup_`name`_vs_xla (on GPU) and the largest differences from XLA's
  outputs and gradients (`max_rel_diff`, or `max_rel_diff_lengths`) to `result`, or why the
  kernel refused the case (`name`_refused)."""
  try:
    result[f'{name}_ms'] = time_call(fn, args, repeats)
  except Exception as e:  # pylint: disable=broad-except
    result[f'{name}_refused'] = f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'
    return
  if on_gpu:
    result[f'speedup_{name}_vs_xla'] = result['xla_ms'] / result[f'{name}_ms']
  (out_x, grads_x), (out_c, grads_c) = xla(*args), fn(*args)
  key = 'max_rel_diff' if name == 'cudnn' else 'max_rel_diff_lengths'
  result[key] = {
      part: max_relative_difference(c, x)
      for part, c, x in zip(('out', 'dq', 'dk', 'dv'), (out_c,) + tuple(grads_c),
                            (out_x,) + tuple(grads_x))}


def main(argv):
  del argv
  on_gpu = jax.default_backend() == 'gpu'
  cases = SMOKE if FLAGS.cpu_smoke else KARLO
  report = {'device_kind': jax.devices()[0].device_kind, 'jax_version': jax.__version__,
            'dtype': 'bfloat16', 'cases': {}}
  for name, shape in cases.items():
    report['cases'][name] = run_case(shape, FLAGS.repeats, on_gpu)
  print(json.dumps(report, indent=2))


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
