"""The one attention helper every model calls.

It wraps `jax.nn.dot_product_attention`. On GPU, in bfloat16/float16, it takes cuDNN's flash
kernel, masks included: a boolean mask becomes an additive bias (0 where attended, a large
negative number elsewhere), and queries and keys are padded to even lengths, which cuDNN needs for
a bias in training (the padded keys are masked out and the padded queries' outputs dropped, so the
result is the same function). Where cuDNN refuses the shapes (head size, sequence lengths), and on
other backends and dtypes, XLA's implementation runs. `implementation('xla')` forces XLA's.
"""

import contextlib
import threading
from typing import Iterator, Optional

from absl import logging
import jax
import jax.numpy as jnp

_local = threading.local()


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
  """Within this context, models traced use attention `name`: 'auto' (the default: cuDNN on GPU
  where it applies, else XLA) or 'xla'."""
  if name not in ('auto', 'xla'):
    raise ValueError(f"attention implementation must be 'auto' or 'xla', got {name!r}")
  previous = getattr(_local, 'name', 'auto')
  _local.name = name
  try:
    yield
  finally:
    _local.name = previous


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: Optional[jax.Array] = None,
                          is_causal: bool = False) -> jax.Array:
  """Multi-head scaled dot-product attention.

  Args:
    q: queries [B, T, H, D].
    k, v: keys and values [B, S, H, D].
    mask: optional boolean mask broadcastable to [B, H, T, S]; True means "may attend".
    is_causal: apply a causal (lower-triangular) mask.

  Returns:
    [B, T, H, D] in the dtype of `q`. Logits and softmax are computed in float32.
  """
  if (getattr(_local, 'name', 'auto') == 'auto' and q.dtype in (jnp.bfloat16, jnp.float16)
      and jax.default_backend() == 'gpu'):
    try:
      return cudnn_attention(q, k, v, mask=mask, is_causal=is_causal)
    except (NotImplementedError, ValueError, RuntimeError) as e:  # cuDNN refused: XLA's below
      _log_fallback(str(e))
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                      implementation='xla')


def cudnn_attention(q, k, v, *, mask=None, is_causal=False, implementation='cudnn'):
  """`jax.nn.dot_product_attention` through cuDNN (`implementation`; 'xla' computes the same
  operands with XLA, to test them): the mask as a bias, lengths padded to even."""
  q, k, v, bias, t = cudnn_operands(q, k, v, mask)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=is_causal,
                                     implementation=implementation)
  return out[:, :t]


def cudnn_operands(q, k, v, mask):
  """(q, k, v, bias, T): a boolean `mask` (broadcastable to [B, H, T, S]) as an additive bias
  [B|1, H|1, T', S'] in q's dtype, with q padded to an even T' and k, v to an even S' (padded keys
  masked, padded queries attending to the first key); bias None and nothing padded without a mask.
  T is the queries' length before padding."""
  t = q.shape[1]
  if mask is None:
    return q, k, v, None, t
  s = k.shape[1]
  pad_t, pad_s = t % 2, s % 2
  mask = jnp.asarray(mask, bool)
  mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  mask = jnp.broadcast_to(mask, mask.shape[:2] + (t, s))
  if pad_t or pad_s:
    q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)))
    if pad_t:   # a padded query attends to the first key (its output is dropped)
      mask = mask.at[:, :, t:, 0].set(True)
  bias = jnp.where(mask, jnp.asarray(0, q.dtype), _large_negative(q.dtype))
  return q, k, v, bias, t


def _large_negative(dtype) -> jax.Array:
  # Finite, so that fully masked rows stay finite, and far below any logit (cuDNN mis-handles the
  # difference of two -inf-like numbers, so not the dtype's minimum either).
  if dtype == jnp.float16:
    return jnp.asarray(-2**15, dtype)
  return jnp.asarray(-2**40, dtype)


_fallbacks: set = set()


def _log_fallback(reason: str) -> None:
  if reason not in _fallbacks:
    _fallbacks.add(reason)
    logging.info('cuDNN attention does not apply here (%s): XLA attention instead', reason)
