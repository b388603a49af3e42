"""The shared transformer stack: scanned and rematerialised variants compute the same function."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
