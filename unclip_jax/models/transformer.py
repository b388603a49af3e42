"""Pre-LayerNorm transformer blocks shared by the CLIP towers and the diffusion prior.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`) that the config's rules map
onto the device mesh. Activations are computed in `dtype`; parameters are kept in float32;
layer-norm statistics and softmax run in float32.
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.attention import dot_product_attention

Dtype = Any


def keep_input_only(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
  """`fn` (elementwise) whose backward pass keeps only its input and recomputes the rest.

  Autodiff of an erf GELU keeps four tensors of the MLP's hidden size (erfc, exp and two
  products) for the backward pass; recomputing them from the input costs a few elementwise ops.
  """
  @jax.custom_vjp
  def f(x):
    return fn(x)

  def f_bwd(x, g):
    return jax.vjp(fn, x)[1](g)

  f.defvjp(lambda x: (fn(x), x), f_bwd)
  return f


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'quick_gelu': keep_input_only(quick_gelu),
    'gelu': keep_input_only(lambda x: nn.gelu(x, approximate=False)),
    'gelu_tanh': keep_input_only(lambda x: nn.gelu(x, approximate=True)),
    'silu': keep_input_only(nn.silu),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) · scale + bias over the last axis, float32 (statistics
  included). The backward pass keeps only x (in its own dtype), the mean and 1/std."""
  return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + epsilon)
  return (xf - mean) * rstd * scale + bias, (x, scale, mean, rstd)


def _layer_norm_bwd(epsilon, residuals, g):
  del epsilon
  x, scale, mean, rstd = residuals
  xhat = (x.astype(jnp.float32) - mean) * rstd
  g = g.astype(jnp.float32)
  batch_axes = tuple(range(g.ndim - 1))
  dxhat = g * scale
  dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) -
               xhat * (dxhat * xhat).mean(-1, keepdims=True))
  return dx.astype(x.dtype), (g * xhat).sum(batch_axes), g.sum(batch_axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def dense(features: int, axes: tuple[Optional[str], Optional[str]], *, dtype: Dtype,
          use_bias: bool = True, name: Optional[str] = None,
          kernel_init=nn.initializers.xavier_uniform()) -> nn.Dense:
  """A Dense layer whose kernel [in, out] carries the logical axis names `axes`."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


class _NormParams(nn.Module):
  """A norm's scale and bias [width] (the parameters' place: `<norm>/ln/{scale,bias}`)."""

  @nn.compact
  def __call__(self, width: int) -> tuple[jax.Array, jax.Array]:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (width,), jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)),
                      (width,), jnp.float32)
    return scale, bias


class LayerNorm(nn.Module):
  """LayerNorm with float32 statistics (`layer_norm`); the output is cast back to `dtype`."""
  dtype: Dtype = jnp.float32
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale, bias = _NormParams(name='ln')(x.shape[-1])
    return layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Self-attention over [B, T, width] with `num_heads` heads and a fused qkv projection.

  Kernels: qkv [width, 3, heads, head_dim], out [heads, head_dim, width].
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, is_causal: bool = False,
               mask: Optional[jax.Array] = None) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    head_dim = width // self.num_heads
    w_qkv = self.param('qkv_kernel', nn.with_logical_partitioning(
        _qkv_init(width), ('embed', None, 'heads', 'kv')),
        (width, 3, self.num_heads, head_dim), jnp.float32)
    b_qkv = self.param('qkv_bias', nn.with_logical_partitioning(
        nn.initializers.zeros, (None, 'heads', 'kv')), (3, self.num_heads, head_dim), jnp.float32)
    qkv = jnp.einsum('btd,dkhc->btkhc', x.astype(self.dtype), w_qkv.astype(self.dtype))
    qkv = qkv + b_qkv.astype(self.dtype)
    out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=mask,
                                is_causal=is_causal)
    w_out = self.param('out_kernel', nn.with_logical_partitioning(
        _out_init(width), ('heads', 'kv', 'embed')), (self.num_heads, head_dim, width),
        jnp.float32)
    b_out = self.param('out_bias', nn.with_logical_partitioning(
        nn.initializers.zeros, ('embed',)), (width,), jnp.float32)
    return jnp.einsum('bthc,hcd->btd', out, w_out.astype(self.dtype)) + b_out.astype(self.dtype)


def _qkv_init(width: int):
  """Normal(0, width**-0.5) for the fused [width, 3, heads, head_dim] qkv kernel."""
  return nn.initializers.normal(stddev=width ** -0.5)


def _out_init(width: int):
  """Normal(0, width**-0.5) for the [heads, head_dim, width] output kernel."""
  return nn.initializers.normal(stddev=width ** -0.5)


class MLP(nn.Module):
  """Two-layer feed-forward block: width → mlp_ratio·width → width."""
  mlp_ratio: float = 4.0
  activation: str = 'gelu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = dense(int(width * self.mlp_ratio), ('embed', 'mlp'), dtype=self.dtype, name='fc')(x)
    h = ACTIVATIONS[self.activation](h)
    return dense(width, ('mlp', 'embed'), dtype=self.dtype, name='proj')(h)


class ResidualBlock(nn.Module):
  """x + attn(ln(x)), then x + mlp(ln(x))."""
  num_heads: int
  mlp_ratio: float = 4.0
  activation: str = 'gelu'
  causal: bool = False
  dtype: Dtype = jnp.float32
  layer_norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    x = x + MultiHeadAttention(self.num_heads, dtype=self.dtype, name='attn')(
        LayerNorm(self.dtype, self.layer_norm_eps, name='ln_1')(x), is_causal=self.causal,
        mask=mask)
    x = x + MLP(self.mlp_ratio, self.activation, dtype=self.dtype, name='mlp')(
        LayerNorm(self.dtype, self.layer_norm_eps, name='ln_2')(x))
    return x


class _ScannedBlock(ResidualBlock):
  """ResidualBlock with the (carry, output) signature `nn.scan` needs."""

  def __call__(self, x, mask=None):  # pylint: disable=arguments-renamed
    return super().__call__(x, mask), None


# What a rematerialised block keeps for its backward pass (`Transformer.remat_policy`); None:
# only its input.
REMAT_POLICIES = {
    'full': None,
    'save_projections': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
  """A stack of `depth` residual blocks.

  `remat` rematerialises each block in the backward pass (less memory): with `remat_policy`
  'full' everything but the block's input is recomputed, with 'save_projections' the outputs of
  its dense projections (qkv, attention output, MLP) are kept and only the norms, activations and
  attention recomputed. `scan` runs the blocks
  with `nn.scan` over parameters stacked on a leading `layers` axis, so compile time does not grow
  with depth (parameters are then `block/...` of shape [depth, ...] instead of `block_i/...`).
  """
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  activation: str = 'gelu'
  causal: bool = False
  remat: bool = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  layer_norm_eps: float = 1e-5
  remat_policy: str = 'full'

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """[B, T, width] → [B, T, width]; `mask` (optional, bool, broadcastable to [B, H, T, T])."""
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'remat_policy must be one of {sorted(REMAT_POLICIES)}, got '
                       f'{self.remat_policy!r}')
    policy = REMAT_POLICIES[self.remat_policy]
    args = (self.num_heads, self.mlp_ratio, self.activation, self.causal)
    if self.scan:
      block = (nn.remat(_ScannedBlock, prevent_cse=False, policy=policy) if self.remat
               else _ScannedBlock)
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=(nn.broadcast,), length=self.depth,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(*args, dtype=self.dtype, layer_norm_eps=self.layer_norm_eps,
                   name='block')(x, mask)
      return x
    block = nn.remat(ResidualBlock, policy=policy) if self.remat else ResidualBlock
    for i in range(self.depth):
      x = block(*args, dtype=self.dtype, layer_norm_eps=self.layer_norm_eps,
                name=f'block_{i}')(x, mask)
    return x
