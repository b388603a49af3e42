"""The shared transformer stack: scanned and rematerialised variants compute the same function."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tests import helpers
from unclip_jax.models.transformer import Transformer


def _unrolled_params(scanned, depth):
  """Stacked `block/...` [depth, ...] params → `block_i/...` params."""
  return {f'block_{i}': jax.tree.map(lambda x: x[i], scanned['block']) for i in range(depth)}


def test_scan_and_remat_match_the_loop():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
  mask = jnp.array([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :]
  scanned = Transformer(depth=3, num_heads=4, causal=True, scan=True)
  params = nn.unbox(scanned.init(jax.random.PRNGKey(1), x, mask))['params']
  assert params['block']['mlp']['fc']['kernel'].shape == (3, 16, 64)
  loop = Transformer(depth=3, num_heads=4, causal=True)
  loop_params = _unrolled_params(params, 3)
  expected = jax.jit(loop.apply)({'params': loop_params}, x, mask)
  np.testing.assert_allclose(jax.jit(scanned.apply)({'params': params}, x, mask), expected,
                             atol=1e-5)
  remat = Transformer(depth=3, num_heads=4, causal=True, scan=True, remat=True)
  loss = lambda m, p: jnp.sum(m.apply({'params': p}, x, mask) ** 2)
  g_remat = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
  g_loop = jax.jit(jax.grad(lambda p: loss(loop, p)))(loop_params)
  for a, b in zip(jax.tree.leaves(_unrolled_params(g_remat, 3)), jax.tree.leaves(g_loop)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_scanned_params_carry_a_layers_axis():
  x = jnp.zeros((1, 4, 16))
  boxed = Transformer(depth=2, num_heads=4, scan=True).init(jax.random.PRNGKey(0), x)
  spec = nn.get_partition_spec(boxed)['params']['block']['mlp']['fc']['kernel']
  assert tuple(spec) == ('layers', 'embed', 'mlp')


def test_layer_norm_and_activations_backward_passes_match_autodiff():
  """layer_norm's hand-written backward pass and the activations that keep only their input give
  the gradients autodiff gives for the plain formulas."""
  from unclip_jax.models import transformer  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 16)) * 2 + 0.5, jnp.float32)
  scale = jnp.asarray(1 + 0.3 * rng.normal(size=16), jnp.float32)
  bias = jnp.asarray(0.2 * rng.normal(size=16), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)

  def reference(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * scale + bias

  fused = lambda x, s, b: transformer.layer_norm(x, s, b, 1e-5)
  np.testing.assert_allclose(fused(x, scale, bias), reference(x, scale, bias), atol=2e-5)
  grads = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(x, scale, bias)
  for got, want in zip(grads(fused), grads(reference)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)

  plain = {'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
           'gelu': lambda x: jax.nn.gelu(x, approximate=False),
           'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True), 'silu': jax.nn.silu}
  assert set(plain) == set(transformer.ACTIVATIONS)
  for name, fn in plain.items():
    act = transformer.ACTIVATIONS[name]
    np.testing.assert_allclose(act(x), fn(x), atol=1e-6, err_msg=name)
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(act(x) * w))(x),
                               jax.grad(lambda x: jnp.sum(fn(x) * w))(x), atol=1e-5,
                               err_msg=name)


def test_remat_policies_compute_the_same_and_keep_less():
  """Both remat policies give the plain stack's gradients; 'full' keeps least for the backward
  pass, 'save_projections' (the dense outputs) more, no remat the most."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 32))
  mask = jnp.array([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]
  plain = Transformer(depth=2, num_heads=4, causal=True)
  params = nn.unbox(plain.init(jax.random.PRNGKey(1), x, mask))['params']
  loss = lambda m: lambda p: jnp.sum(m.apply({'params': p}, x, mask) ** 2)

  kept = lambda model: helpers.backward_residual_bytes(loss(model), params)

  expected = jax.jit(jax.grad(loss(plain)))(params)
  sizes = {'none': kept(plain)}
  for policy in ('full', 'save_projections'):
    model = Transformer(depth=2, num_heads=4, causal=True, remat=True, remat_policy=policy)
    for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(loss(model)))(params)),
                    jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    sizes[policy] = kept(model)
  assert sizes['full'] < sizes['save_projections'] < sizes['none'], sizes
