"""The one attention helper every model calls.

It wraps `jax.nn.dot_product_attention` and two fused kernels, each with a backward pass that
recomputes the probabilities instead of keeping them:

- on GPU, in bfloat16/float16, cuDNN's flash kernel, masks included. Queries and keys are padded
  to even lengths, which cuDNN needs in training (JAX checks it for every call, masked or not:
  CLIP's 77 and 197 tokens would otherwise fall back); a boolean mask becomes an additive bias
  (0 where attended, a large negative number elsewhere); padded keys are masked out (by the bias,
  or by cuDNN's padding mask where there is no bias) and the padded queries' outputs dropped, so
  the result is the same function;
- on TPU, the Pallas flash kernel (`pallas_tpu_attention`), for key masks with or without a
  causal one.

Where a kernel refuses the shapes or the mask, and on other backends and dtypes, `xla_attention`
runs: XLA ops whose backward pass also recomputes the probabilities. `implementation('xla')`
forces it; `routes()` counts which one each traced attention took."""

import collections
import contextlib
import functools
import threading
from typing import Iterator, Optional

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

_local = threading.local()


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
  """Within this context, models traced use attention `name`: 'auto' (the default: cuDNN on GPU
  and the Pallas kernel on TPU where they apply, else XLA's) or 'xla'."""
  if name not in ('auto', 'xla'):
    raise ValueError(f"attention implementation must be 'auto' or 'xla', got {name!r}")
  previous = getattr(_local, 'name', 'auto')
  _local.name = name
  try:
    yield
  finally:
    _local.name = previous


def current() -> str:
  """The implementation models traced now in this thread take: 'auto' or 'xla'."""
  return getattr(_local, 'name', 'auto')


def fall_back_to_xla() -> None:
  """From now on, until the innermost `implementation` context around this call exits (for
  good, outside any), models traced in this thread use XLA's attention: for a run whose fused
  attention kernel failed to compile."""
  _local.name = 'xla'


def traced_with(name: str, fn):
  """`fn`, whose models trace with attention implementation `name` ('auto' or 'xla')."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with implementation(name):
      return fn(*args, **kwargs)
  return wrapped


def jit_falling_back(fn):
  """`jax.jit(fn)`, except that a call whose trace took a fused attention kernel (cuDNN's, the
  Pallas TPU one) and then failed to compile is jitted again with XLA's attention, with a
  warning, and XLA's serves every later call: for inference, where no train step's fallback
  applies. Errors that remain with XLA's attention are raised."""
  state = {'jitted': jax.jit(fn), 'xla': False}

  @functools.wraps(fn)
  def call(*args, **kwargs):
    if state['xla']:
      return state['jitted'](*args, **kwargs)
    before = routes()
    try:
      return state['jitted'](*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      if not warn_if_a_kernel_failed(before, e):
        raise
    state.update(jitted=jax.jit(traced_with('xla', fn)), xla=True)
    return state['jitted'](*args, **kwargs)
  return call


def warn_if_a_kernel_failed(before: dict, error: BaseException) -> bool:
  """Whether attentions traced since `before` (a `routes()`) took a fused kernel, and so could
  be why `error` was raised; if so, warns that XLA's attention takes over, naming the kernels
  and the error's first line."""
  traced = routes_since(before)
  kernels = [name for name in KERNELS if traced[name]]
  if kernels:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    logging.warning("%s attention did not compile (%s): using XLA's attention instead "
                    "(config.attention='xla' or attention.implementation('xla') skips trying it)",
                    ' and '.join(kernels), reason)
  return bool(kernels)


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
  kernels = (('cudnn', q.dtype in (jnp.bfloat16, jnp.float16) and _on_gpu(), cudnn_attention),
             ('pallas_tpu', _on_tpu(), pallas_tpu_attention))
  for name, applies, kernel in kernels:
    if current() != 'auto' or not applies:
      continue
    try:
      out = kernel(q, k, v, mask=mask, is_causal=is_causal)
      _routes[name] += 1
      return out
    except Exception as e:  # pylint: disable=broad-except  # refused, or failed: XLA's below
      _log_fallback(name, f'{type(e).__name__}: {e}')
  _routes['xla'] += 1
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


QUERY_CHUNK = 256   # xla_attention's queries per step where there are more (and it divides them)


def _query_chunks(t: int) -> int:
  return t // QUERY_CHUNK if t > QUERY_CHUNK and t % QUERY_CHUNK == 0 else 1


def _masked_logits(q, k, mask, is_causal, first_query=0):
  """[B, H, T, S] float32 logits, q·k / sqrt(D), with masked entries at a large negative; `q`
  holds the queries from `first_query` on (for the causal mask) and `mask` their rows."""
  logits = jnp.einsum('bthd,bshd->bhts', q, k, preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
  allowed = None
  if mask is not None:
    allowed = jnp.asarray(mask, bool)
  if is_causal:
    t, s = logits.shape[-2:]
    causal = (first_query + jnp.arange(t))[:, None] >= jnp.arange(s)[None, :]
    allowed = causal if allowed is None else allowed & causal
  if allowed is not None:
    logits = jnp.where(allowed, logits, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
  return logits


def _rows(x, start, size, axis):
  """x[start:start + size] along `axis` (a traced start), or x itself where that axis is 1."""
  if x is None or x.shape[axis] == 1:
    return x
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _full_rank_mask(mask):
  """A boolean mask as [B|1, H|1, T|1, S] (None stays None)."""
  if mask is None:
    return None
  mask = jnp.asarray(mask, bool)
  return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def _xla_attention_fwd(q, k, v, mask, is_causal):
  """Forward pass over chunks of `QUERY_CHUNK` queries (one [B, H, chunk, S] block of logits at a
  time, where there are more queries than that)."""
  mask = _full_rank_mask(mask)
  n = _query_chunks(q.shape[1])
  c = q.shape[1] // n

  def chunk(i):
    start = i * c
    logits = _masked_logits(_rows(q, start, c, 1), k, _rows(mask, start, c, 2), is_causal,
                            start)
    peak = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    unnormalised = jnp.exp(logits - peak)
    total = unnormalised.sum(-1, keepdims=True)
    probs = (unnormalised / total).astype(v.dtype)
    out = jnp.einsum('bhts,bshd->bthd', probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype), peak + jnp.log(total)          # [B, c, H, D], [B, H, c, 1]

  if n == 1:
    out, lse = chunk(0)
  else:
    out, lse = jax.lax.map(chunk, jnp.arange(n))
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape[:2] + out.shape[3:])
    lse = jnp.moveaxis(lse, 0, 2).reshape(lse.shape[1:3] + (-1, 1))
  return out, (q, k, v, mask, out, lse)


def _xla_attention_bwd(is_causal, residuals, g):
  """Backward pass, chunk by chunk of queries as the forward: each recomputes its probabilities
  from the log-sum-exp, gives its queries' gradient and adds to the keys' and values'."""
  q, k, v, mask, out, lse = residuals
  n = _query_chunks(q.shape[1])
  c = q.shape[1] // n
  scale = 1 / jnp.sqrt(jnp.float32(q.shape[-1]))

  def chunk(dk_dv, i):
    start = i * c
    qi, gi, oi = (_rows(x, start, c, 1) for x in (q, g, out))
    probs = jnp.exp(_masked_logits(qi, k, _rows(mask, start, c, 2), is_causal, start) -
                    _rows(lse, start, c, 2))                    # [B, H, c, S] float32
    dv = jnp.einsum('bhts,bthd->bshd', probs.astype(g.dtype), gi,
                    preferred_element_type=jnp.float32)
    dprobs = jnp.einsum('bthd,bshd->bhts', gi, v, preferred_element_type=jnp.float32)
    delta = jnp.einsum('bthd,bthd->bht', gi.astype(jnp.float32),
                       oi.astype(jnp.float32))[..., None]
    dlogits = (probs * (dprobs - delta) * scale).astype(q.dtype)
    dq = jnp.einsum('bhts,bshd->bthd', dlogits, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum('bhts,bthd->bshd', dlogits, qi, preferred_element_type=jnp.float32)
    return (dk_dv[0] + dk, dk_dv[1] + dv), dq.astype(q.dtype)

  zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  if n == 1:
    (dk, dv), dq = chunk(zeros, 0)
  else:
    (dk, dv), dq = jax.lax.scan(chunk, zeros, jnp.arange(n))
    dq = jnp.moveaxis(dq, 0, 1).reshape(q.shape)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def cudnn_attention(q, k, v, *, mask=None, is_causal=False, implementation='cudnn'):
  """`jax.nn.dot_product_attention` through cuDNN (`implementation`; 'xla' computes the same
  operands with XLA, to test them): lengths padded to even, the mask as a bias."""
  q, k, v, bias, key_lengths, t = cudnn_operands(q, k, v, mask)
  lengths = {}
  if key_lengths is not None:
    lengths = dict(query_seq_lengths=jnp.full(q.shape[:1], q.shape[1], jnp.int32),
                   key_value_seq_lengths=key_lengths)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=is_causal,
                                     implementation=implementation, **lengths)
  return out[:, :t]


def cudnn_operands(q, k, v, mask):
  """(q, k, v, bias, key_lengths, T) for cuDNN's kernel, which in training takes only even
  sequence lengths: q padded to an even T', k and v to an even S'.

  With a boolean `mask` (broadcastable to [B, H, T, S]) the bias is that mask as an additive
  [B|1, H|1, T', S'] bias in q's dtype, padded keys masked and padded queries attending to the
  first key. Without one, bias is None and a padded key is hidden by `key_lengths` ([B] int32,
  the real S: cuDNN's padding mask, which needs no bias tensor), None where S was even. T is the
  queries' length before padding; the padded queries' outputs are to be dropped.
  """
  t, s = q.shape[1], k.shape[1]
  pad_t, pad_s = t % 2, s % 2
  if pad_t:
    q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
  if pad_s:
    k = jnp.pad(k, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
  if mask is None:
    key_lengths = jnp.full(q.shape[:1], s, jnp.int32) if pad_s else None
    return q, k, v, None, key_lengths, t
  mask = _full_rank_mask(mask)
  mask = jnp.broadcast_to(mask, mask.shape[:2] + (t, s))
  if pad_t or pad_s:
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)))
    if pad_t:   # a padded query attends to the first key (its output is dropped)
      mask = mask.at[:, :, t:, 0].set(True)
  bias = jnp.where(mask, jnp.asarray(0, q.dtype), _large_negative(q.dtype))
  return q, k, v, bias, None, t


TPU_BLOCK = 128   # the Pallas kernel's block over queries and keys (a lane's width)


def pallas_tpu_attention(q, k, v, *, mask=None, is_causal=False):
  """Flash attention on TPU: JAX's Pallas kernel (`jax.experimental.pallas.ops.tpu`), whose
  backward pass recomputes the probabilities block by block, as cuDNN's does.

  The kernel takes masks as segment ids, so it applies to key masks (broadcastable to
  [B, 1, 1, S]: the decoder's caption keys, the prior's padded tokens) with or without a causal
  mask; a mask that varies over queries or heads raises NotImplementedError (XLA's then runs).
  Queries and keys are padded to multiples of `TPU_BLOCK`, the padded keys masked and the padded
  queries' outputs dropped. Within `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` the
  kernel runs in Pallas' interpreter, on any backend.
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas  # pylint: disable=g-import-not-at-top
  b, t, _, d = q.shape
  s = k.shape[1]
  if is_causal and t != s:
    raise NotImplementedError(f'a causal mask over {t} queries and {s} keys')
  keys = None
  if mask is not None:
    mask = _full_rank_mask(mask)
    if mask.shape[1] != 1 or mask.shape[2] != 1:
      raise NotImplementedError(f'a mask of shape {mask.shape}, over queries or heads, not keys '
                                'only')
    keys = jnp.broadcast_to(mask[:, 0, 0, :], (b, s))
  pad_t, pad_s = -t % TPU_BLOCK, -s % TPU_BLOCK
  if pad_s and keys is None:
    keys = jnp.ones((b, s), bool)
  if keys is not None:
    keys = jnp.pad(keys, ((0, 0), (0, pad_s)))
  q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
  k, v = (jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, 0))) for x in (k, v))
  segments = None
  if keys is not None:   # a query (segment 1) attends to keys of its segment: the unmasked ones
    segments = pallas.SegmentIds(q=jnp.ones(q.shape[:2], jnp.int32),
                                 kv=keys.astype(jnp.int32))
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)

  def kernel(q, k, v, segments):
    return pallas.flash_attention(q, k, v, segment_ids=segments, causal=is_causal,
                                  sm_scale=1.0 / d ** 0.5, block_sizes=_tpu_blocks(pallas))
  out = _per_shard(kernel, b, q.shape[2], segments is not None)(
      heads_first(q), heads_first(k), heads_first(v), segments)
  return heads_first(out)[:, :t]


def _per_shard(kernel, batch: int, heads: int, segments: bool):
  """`kernel` (q, k, v [B, H, T, D], segment ids) under `jax.shard_map` over the mesh in
  context, split as the models' activations are (batch over the logical rules' 'batch' axes,
  heads over 'heads'), since XLA cannot partition a Pallas kernel itself; `kernel` alone without
  a mesh of several devices. Raises NotImplementedError where those axes do not divide the batch
  or the heads."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel
  batch_axes, _, head_axes, _ = nn.logical_to_mesh_axes(('batch', 'length', 'heads', 'kv'))
  size = lambda axes: int(np.prod([mesh.shape[a] for a in
                                   ((axes,) if isinstance(axes, str) else axes or ())]))
  if batch % size(batch_axes) or heads % size(head_axes):
    raise NotImplementedError(f'a batch of {batch} and {heads} heads over mesh axes '
                              f'{batch_axes} and {head_axes} of {dict(mesh.shape)}')
  spec = P(batch_axes, head_axes, None, None)
  segment_spec = pallas.SegmentIds(q=P(batch_axes, None), kv=P(batch_axes, None)) \
      if segments else None
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, segment_spec),
                       out_specs=spec, check_vma=False)


def _tpu_blocks(pallas):
  n = TPU_BLOCK
  return pallas.BlockSizes(block_q=n, block_k_major=n, block_k=n, block_b=1,
                           block_q_major_dkv=n, block_k_major_dkv=n, block_k_dkv=n,
                           block_q_dkv=n, block_k_major_dq=n, block_k_dq=n, block_q_dq=n)


def _large_negative(dtype) -> jax.Array:
  # Finite, so that fully masked rows stay finite, and far below any logit (cuDNN mis-handles the
  # difference of two -inf-like numbers, so not the dtype's minimum either).
  if dtype == jnp.float16:
    return jnp.asarray(-2**15, dtype)
  return jnp.asarray(-2**40, dtype)


def _on_gpu() -> bool:
  return jax.default_backend() == 'gpu'


def _on_tpu() -> bool:
  return jax.default_backend() == 'tpu'


KERNELS = ('cudnn', 'pallas_tpu')   # the fused kernels `dot_product_attention` may take
_routes: collections.Counter = collections.Counter()
_fallbacks: collections.Counter = collections.Counter()


def routes() -> dict:
  """The attentions traced in this process so far: how many took cuDNN's kernel ('cudnn'), the
  Pallas TPU kernel ('pallas_tpu') and XLA's ('xla'), and why a kernel refused those it did
  ('refused': 'kernel: reason' → attentions), so a benchmark can report where a step's attentions
  go. These count traces: a scanned stack of layers counts once, a model traced several times
  (initialisation, two passes) each time."""
  return {name: _routes[name] for name in KERNELS + ('xla',)} | {'refused': dict(_fallbacks)}


def routes_since(before: dict) -> dict:
  """`routes()` less an earlier `routes()`: the attentions traced in between."""
  now = routes()
  refused = {k: n - before['refused'].get(k, 0) for k, n in now['refused'].items()}
  return ({name: now[name] - before[name] for name in KERNELS + ('xla',)} |
          {'refused': {k: n for k, n in refused.items() if n}})


def _log_fallback(kernel: str, reason: str) -> None:
  key = f'{kernel}: {reason}'
  if key not in _fallbacks:
    logging.info('%s attention does not apply here (%s): XLA attention instead', kernel, reason)
  _fallbacks[key] += 1
