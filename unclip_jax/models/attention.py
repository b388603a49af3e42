"""The one attention helper every model calls.

It wraps `jax.nn.dot_product_attention`. On GPU, in bfloat16/float16, it takes cuDNN's flash
kernel, masks included: a boolean mask becomes an additive bias (0 where attended, a large
negative number elsewhere), and queries and keys are padded to even lengths, which cuDNN needs for
a bias in training (the padded keys are masked out and the padded queries' outputs dropped, so the
result is the same function). Where cuDNN refuses the shapes (head size, sequence lengths), and on
other backends and dtypes, `xla_attention` runs: XLA ops whose backward pass recomputes the
probabilities instead of keeping them. `implementation('xla')` forces it.
"""

import contextlib
import functools
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
  return xla_attention(q, k, v, mask, is_causal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array],
                  is_causal: bool) -> jax.Array:
  """Softmax attention in XLA ops whose backward pass keeps only q, k, v, the output and each
  query's log-sum-exp, and recomputes the probabilities from them (as flash attention does).

  Autodiff of the plain formula keeps three float32 tensors of [B, H, T, S] per attention (the
  masked logits, their exponentials and the probabilities): 8.7 GB per layer for karlo's decoder
  at 32 px and batch 64. Shapes and mask as `dot_product_attention`'s.
  """
  return _xla_attention_fwd(q, k, v, mask, is_causal)[0]


def _masked_logits(q, k, mask, is_causal):
  """[B, H, T, S] float32 logits, q·k / sqrt(D), with masked entries at a large negative."""
  logits = jnp.einsum('bthd,bshd->bhts', q, k, preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
  allowed = None
  if mask is not None:
    allowed = jnp.asarray(mask, bool)
  if is_causal:
    t, s = logits.shape[-2:]
    causal = jnp.tril(jnp.ones((t, s), bool))
    allowed = causal if allowed is None else allowed & causal
  if allowed is not None:
    logits = jnp.where(allowed, logits, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
  return logits


def _xla_attention_fwd(q, k, v, mask, is_causal):
  logits = _masked_logits(q, k, mask, is_causal)
  peak = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
  unnormalised = jnp.exp(logits - peak)
  total = unnormalised.sum(-1, keepdims=True)
  probs = (unnormalised / total).astype(v.dtype)
  out = jnp.einsum('bhts,bshd->bthd', probs, v, preferred_element_type=jnp.float32)
  out = out.astype(q.dtype)
  lse = peak + jnp.log(total)                                   # [B, H, T, 1]
  return out, (q, k, v, mask, out, lse)


def _xla_attention_bwd(is_causal, residuals, g):
  q, k, v, mask, out, lse = residuals
  probs = jnp.exp(_masked_logits(q, k, mask, is_causal) - lse)  # [B, H, T, S] float32
  g32 = g.astype(jnp.float32)
  dv = jnp.einsum('bhts,bthd->bshd', probs.astype(g.dtype), g,
                  preferred_element_type=jnp.float32)
  dprobs = jnp.einsum('bthd,bshd->bhts', g, v, preferred_element_type=jnp.float32)
  delta = jnp.einsum('bthd,bthd->bht', g32, out.astype(jnp.float32))[..., None]
  dlogits = (probs * (dprobs - delta) / jnp.sqrt(jnp.float32(q.shape[-1]))).astype(q.dtype)
  dq = jnp.einsum('bhts,bshd->bthd', dlogits, k, preferred_element_type=jnp.float32)
  dk = jnp.einsum('bhts,bthd->bshd', dlogits, q, preferred_element_type=jnp.float32)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


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
