"""The attention helper's kernels: cuDNN's operands (a boolean mask as a bias, lengths padded
to even), the Pallas TPU kernel, and XLA's attention with its recomputing backward pass.

cuDNN itself needs a GPU; here the same operands go through XLA's implementation, which must give
the masked attention (values and gradients) for every mask shape the models pass. The Pallas TPU
kernel runs in Pallas' TPU interpreter.
"""

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models import attention


def _reference(q, k, v, mask, is_causal):
  """Masked softmax attention in numpy, float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  allowed = np.ones(logits.shape, bool)
  if mask is not None:
    allowed &= np.broadcast_to(np.asarray(mask), logits.shape)
  if is_causal:
    allowed &= np.tril(np.ones(logits.shape[-2:], bool))
  logits = np.where(allowed, logits, -1e30)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('bhts,bshd->bthd', weights, v)


def _inputs(t, s, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(2, t, 3, 8)).astype(np.float32)
  k, v = (rng.normal(size=(2, s, 3, 8)).astype(np.float32) for _ in range(2))
  return q, k, v


# The models' masks: the decoder's encoder-key padding ([B, 1, 1, S], odd lengths), the prior's
# causal self-attention over padded caption tokens, a full [B, H, T, S] mask, one shared by the
# batch, and no mask: CLIP's text (causal, 77 tokens) and image tower (197 tokens), odd lengths
# that cuDNN takes only padded.
CASES = {
    'key_padding_odd': (7, 9, lambda: np.arange(9)[None, None, None, :] < np.array(
        [5, 9])[:, None, None, None], False),
    'causal_padded_tokens': (9, 9, lambda: np.array(
        [[1, 1, 1, 0, 0, 1, 1, 1, 1]] * 2, bool)[:, None, None, :], True),
    'full': (6, 5, lambda: np.random.default_rng(1).random((2, 3, 6, 5)) > 0.3, False),
    'shared': (5, 6, lambda: np.random.default_rng(2).random((6,)) > 0.4, False),
    'none': (5, 7, lambda: None, False),
    'none_causal_odd': (7, 7, lambda: None, True),
    'none_odd_queries': (7, 6, lambda: None, False),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_cudnn_operands_give_the_masked_attention(case):
  t, s, make_mask, is_causal = CASES[case]
  q, k, v = _inputs(t, s)
  mask = make_mask()
  pq, pk, pv, bias, key_lengths, length = attention.cudnn_operands(jnp.asarray(q), k, v, mask)
  assert length == t
  assert pq.shape[1] % 2 == 0 and pk.shape[1] % 2 == 0 and pk.shape == pv.shape
  if mask is not None:
    assert bias.shape[2:] == (pq.shape[1], pk.shape[1]) and bias.dtype == jnp.float32
    assert key_lengths is None
  else:   # no bias: a padded key is hidden by the lengths, cuDNN's padding mask
    assert bias is None
    if s % 2:
      np.testing.assert_array_equal(key_lengths, [s, s])
    else:
      assert key_lengths is None
  out = attention.cudnn_attention(q, k, v, mask=mask, is_causal=is_causal, implementation='xla')
  assert out.shape == q.shape
  np.testing.assert_allclose(out, _reference(q, k, v, mask, is_causal), atol=2e-5)


@pytest.mark.parametrize('case', ['key_padding_odd', 'none', 'none_causal_odd'])
def test_cudnn_operands_keep_the_gradients(case):
  t, s, make_mask, is_causal = CASES[case]
  q, k, v = _inputs(t, s)
  mask = make_mask()
  loss = lambda impl: lambda q, k, v: jnp.sum(impl(q, k, v) ** 2)
  padded = jax.grad(loss(lambda q, k, v: attention.cudnn_attention(
      q, k, v, mask=mask, is_causal=is_causal, implementation='xla')), argnums=(0, 1, 2))(q, k, v)
  plain = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=is_causal)), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(padded, plain):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-5)
  if mask is not None:   # masked keys get no gradient
    assert np.all(np.asarray(padded[1])[0, 5:] == 0)


def test_bfloat16_bias_masks_out_keys():
  q, k, v = _inputs(4, 5)
  v[:, 3:] = 100.0                      # masked keys with values that would show
  mask = np.array([True, True, True, False, False])
  out = attention.cudnn_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), mask=mask,
                                  implementation='xla')
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), _reference(q, k, v, mask, False),
                             atol=0.05)


def test_xla_context_and_cpu_fall_back_to_xla():
  q, k, v = _inputs(5, 7)
  mask = np.arange(7) < 4
  expected = _reference(q, k, v, mask, False)
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v, mask=mask), expected,
                             atol=2e-5)
  with attention.implementation('xla'):
    np.testing.assert_allclose(attention.dot_product_attention(q, k, v, mask=mask), expected,
                               atol=2e-5)
  with pytest.raises(ValueError, match="'auto' or 'xla'"):
    with attention.implementation('flash'):
      pass


def _check_xla_attention(q, k, v, mask, is_causal, w):
  """xla_attention's values against the float64 reference, and its gradients of sum(out * w)
  against autodiff of `jax.nn.dot_product_attention`."""
  out = attention.xla_attention(q, k, v, mask, is_causal)
  np.testing.assert_allclose(out, _reference(q, k, v, mask, is_causal), atol=2e-5)
  ours = jax.grad(lambda *a: jnp.sum(attention.xla_attention(*a, mask, is_causal) * w),
                  argnums=(0, 1, 2))(q, k, v)
  plain = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(
      *a, mask=mask, is_causal=is_causal) * w), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, plain):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('case', sorted(CASES))
def test_xla_attention_recomputes_the_gradients_autodiff_gives(case):
  """xla_attention (the path off cuDNN) keeps only q, k, v, the output and the log-sum-exp for
  its backward pass; its values and gradients are those of the masked softmax formula."""
  t, s, make_mask, is_causal = CASES[case]
  q, k, v = _inputs(t, s)
  mask = make_mask()
  w = np.random.default_rng(5).normal(size=q.shape).astype(np.float32)
  _check_xla_attention(q, k, v, mask, is_causal, w)
  # What the backward pass keeps: no float [B, H, T, S] tensor (a full mask is an input).
  vjp = jax.jit(lambda q, k, v: jax.vjp(
      lambda *a: attention.xla_attention(*a, mask, is_causal), q, k, v)[1])(q, k, v)
  kept = [x for x in jax.tree.leaves(vjp) if hasattr(x, 'dtype') and x.dtype != bool]
  assert kept and all(x.ndim < 4 or x.shape[-2:] != (t, s) for x in kept)


# The Pallas TPU kernel, run by Pallas' interpreter (no TPU here): every key mask the models pass,
# values and gradients; masks over queries are refused (XLA's attention runs instead).
TPU_CASES = ['key_padding_odd', 'causal_padded_tokens', 'shared', 'none', 'none_causal_odd']


@pytest.mark.parametrize('case', TPU_CASES)
def test_pallas_tpu_attention_gives_the_masked_attention(case):
  t, s, make_mask, is_causal = CASES[case]
  q, k, v = _inputs(t, s)
  mask = make_mask()
  w = np.random.default_rng(6).normal(size=q.shape).astype(np.float32)
  flash = lambda *a: attention.pallas_tpu_attention(*a, mask=mask, is_causal=is_causal)
  with pltpu.force_tpu_interpret_mode():
    out = flash(q, k, v)
    ours = jax.grad(lambda *a: jnp.sum(flash(*a) * w), argnums=(0, 1, 2))(q, k, v)
  assert out.shape == q.shape
  np.testing.assert_allclose(out, _reference(q, k, v, mask, is_causal), atol=2e-5)
  plain = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(
      *a, mask=mask, is_causal=is_causal) * w), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, plain):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_pallas_tpu_attention_refuses_masks_over_queries_and_the_helper_falls_back(monkeypatch):
  t, s, make_mask, _ = CASES['full']
  q, k, v = _inputs(t, s)
  with pytest.raises(NotImplementedError, match='over queries or heads'):
    attention.pallas_tpu_attention(q, k, v, mask=make_mask())
  with pytest.raises(NotImplementedError, match='causal mask over 5 queries and 7 keys'):
    attention.pallas_tpu_attention(*_inputs(5, 7), is_causal=True)
  # On a TPU the helper takes the kernel for a key mask and XLA's for the rest, counting both.
  monkeypatch.setattr(attention, '_on_tpu', lambda: True)
  key_mask = CASES['key_padding_odd'][2]()
  before = attention.routes()
  with pltpu.force_tpu_interpret_mode():
    out = attention.dot_product_attention(*_inputs(7, 9), mask=key_mask)
    full = attention.dot_product_attention(q, k, v, mask=make_mask())
  routes = attention.routes_since(before)
  assert routes['pallas_tpu'] == 1 and routes['xla'] == 1 and routes['cudnn'] == 0, routes
  (reason,) = routes['refused']
  assert reason.startswith('pallas_tpu: NotImplementedError: a mask of shape (2, 3, 6, 5)'), reason
  np.testing.assert_allclose(out, _reference(*_inputs(7, 9), key_mask, False), atol=2e-5)
  np.testing.assert_allclose(full, _reference(q, k, v, make_mask(), False), atol=2e-5)


def test_pallas_tpu_attention_runs_per_shard_over_the_mesh():
  """XLA cannot partition a Pallas kernel: on a mesh of several devices it runs under
  shard_map, batch over the 'batch' rule's axes and heads over the 'heads' rule's, and gives the
  same attention and gradients; a batch the axes do not divide is refused."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  q, k, v = (rng.normal(size=(4, 9, 2, 8)).astype(np.float32) for _ in range(3))
  mask = (np.arange(9)[None] < np.array([9, 3, 5, 7])[:, None])[:, None, None, :]
  # Four devices: batch over one axis, heads over another (Pallas' TPU interpreter runs each
  # device in a thread of its own; 8 of them on a 2-core machine have starved each other).
  mesh = jax.make_mesh((2, 1, 2), ('data', 'fsdp', 'tensor'), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)     # the trainer's mesh
  loss = lambda *a: jnp.sum(attention.pallas_tpu_attention(*a, mask=mask, is_causal=True) ** 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(config_lib.DEFAULT_RULES), \
       pltpu.force_tpu_interpret_mode():
    out = jax.jit(lambda *a: attention.pallas_tpu_attention(*a, mask=mask, is_causal=True))(
        q, k, v)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    with pytest.raises(NotImplementedError, match='a batch of 1 and 2 heads'):
      jax.jit(lambda *a: attention.pallas_tpu_attention(*a))(q[:1], k[:1], v[:1])
  np.testing.assert_allclose(out, _reference(q, k, v, mask, True), atol=2e-5)
  plain = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(
      *a, mask=mask, is_causal=True) ** 2), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(grads, plain):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


def test_pallas_tpu_attention_masks_out_keys_in_bfloat16():
  q, k, v = _inputs(4, 5)
  v[:, 3:] = 100.0                      # masked keys with values that would show
  mask = np.array([True, True, True, False, False])
  with pltpu.force_tpu_interpret_mode():
    out = attention.pallas_tpu_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)),
                                         mask=mask)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), _reference(q, k, v, mask, False),
                             atol=0.05)


def test_jit_falling_back_recompiles_with_xla_where_the_fused_kernel_does_not_compile(caplog):
  """Inference's jit (the pipeline's): a call whose trace took cuDNN's kernel and did not compile
  (the CPU stands in for such a GPU: the cuDNN path has no CPU kernels) is jitted again with
  XLA's attention, which later calls keep; a function without attention raises as jit does."""
  from tests import helpers  # pylint: disable=g-import-not-at-top
  as_on = helpers.load_benchmark('compile_preset').as_on
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _inputs(7, 9))
  mask = CASES['key_padding_odd'][2]()
  fn = attention.jit_falling_back(
      lambda q, k, v: attention.dot_product_attention(q, k, v, mask=mask))
  with as_on('cuda'):
    before = attention.routes()
    out = fn(q, k, v)
    again = fn(q * 2, k, v)
    routes = attention.routes_since(before)
    with pytest.raises(TypeError):
      attention.jit_falling_back(lambda x: x + 'a')(q)
  assert "cudnn attention did not compile" in caplog.text
  assert routes['cudnn'] == 1 and routes['xla'] == 1, routes   # one retrace, kept afterwards
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             _reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                        v.astype(jnp.float32), mask, False), atol=0.05)
  assert again.shape == out.shape


def test_a_kernel_failing_at_trace_time_falls_back_to_xla_with_its_error(monkeypatch):
  """Any error a fused kernel raises while tracing (a cuDNN the platform cannot load, an API
  change) sends that attention to XLA's, counted with the error's type and message."""
  def broken(*args, **kwargs):
    raise TypeError('an unexpected keyword argument')
  monkeypatch.setattr(attention, '_on_gpu', lambda: True)
  monkeypatch.setattr(attention, 'cudnn_attention', broken)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _inputs(5, 7))
  before = attention.routes()
  out = attention.dot_product_attention(q, k, v)
  routes = attention.routes_since(before)
  assert routes['xla'] == 1 and routes['cudnn'] == 0
  assert routes['refused'] == {'cudnn: TypeError: an unexpected keyword argument': 1}
  np.testing.assert_allclose(np.asarray(out, np.float32), _reference(q, k, v, None, False),
                             atol=0.05)


@pytest.mark.parametrize('t,s,is_causal,mask_kind', [
    (12, 9, False, 'keys'), (12, 12, True, 'keys'), (12, 5, False, 'full'), (12, 12, True, None)])
def test_xla_attention_over_query_chunks_is_the_same_function(monkeypatch, t, s, is_causal,
                                                               mask_kind):
  """Long query sequences go through xla_attention a chunk of queries at a time (karlo's
  decoder at 32px: 1024 queries, so a quarter of the [B, H, T, S] logits at once); values and
  gradients are those of the whole, for key masks, masks over queries and causal masks."""
  monkeypatch.setattr(attention, 'QUERY_CHUNK', 4)
  q, k, v = _inputs(t, s, seed=3)
  rng = np.random.default_rng(4)
  mask = {'keys': lambda: np.arange(s)[None, None, None, :] < np.array([s, 3])[:, None, None,
                                                                                 None],
          'full': lambda: rng.random((2, 3, t, s)) > 0.3, None: lambda: None}[mask_kind]()
  w = rng.normal(size=q.shape).astype(np.float32)
  _check_xla_attention(q, k, v, mask, is_causal, w)
  # The chunked program holds one chunk's logits: no [B, H, T, S] value in it.
  hlo = jax.jit(jax.grad(lambda *a: jnp.sum(attention.xla_attention(*a, mask, is_causal) * w),
                         argnums=(0, 1, 2))).lower(q, k, v).as_text()
  assert f'tensor<2x3x{t}x{s}xf32>' not in hlo and f'tensor<2x3x4x{s}xf32>' in hlo
