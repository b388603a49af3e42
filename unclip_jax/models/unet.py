"""The ADM U-Net (Dhariwal & Nichol 2021) with GLIDE's text conditioning (Nichol et al. 2021).

One module serves the unCLIP decoder and its upsamplers (Ramesh et al. 2022):

* the decoder (64×64) attends at some resolutions and, with `context_dim` set, lets each attention
  block also attend to projected caption token encodings (GLIDE: the encoder's keys/values are
  concatenated to the image's); the projected CLIP image embedding is added to the timestep
  embedding through `emb_extra`;
* the upsamplers use no attention and no text (`attention_resolutions=()`, `context_dim=None`);
  the caller concatenates the upsampled low-resolution image to the input channels. The network is
  fully convolutional, so it trains on crops and samples at full size.

With `patch_size` p > 1 the network runs on a grid p times coarser: each p×p patch of pixels is
folded into the channels on the way in and unfolded on the way out (space-to-depth, as "simple
diffusion", Hoogeboom et al. 2023, does for high resolutions), which divides the cost of the
finest level by p² for the same widths.

Layout: images are NHWC. Parameters are float32; activations are computed in `dtype`; group-norm
statistics, softmax and the final output are float32. Every parameter carries logical axis names:
conv kernels `(None, None, 'conv_in', 'conv_out')` and biases `('conv_out',)`, except that the
image-channel axes (the input conv's input, the output conv's output: 3 or 6 channels, too few to
shard) are `'channels'`, as in CLIP's patch embedding; the timestep MLP
`(None, 'mlp')` / `('mlp', 'embed')`, where `embed` is the timestep-embedding width E; each block's
embedding projection `('embed', [None,] 'conv_out')`; attention `('embed', None, 'heads', 'kv')`
for qkv, `('embed_in', None, 'heads', 'kv')` for the encoder's keys/values and
`('heads', 'kv', 'embed')` for the output; norms `('norm',)`.

Parameter names: `conv_in`, `time_fc1`, `time_fc2`, `down_{level}_res_{i}`,
`down_{level}_attn_{i}`, `down_{level}_downsample`, `mid_res_0`, `mid_attn`, `mid_res_1`,
`up_{level}_res_{i}`, `up_{level}_attn_{i}`, `up_{level}_upsample`, `norm_out`, `conv_out`.
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from unclip_jax.models.attention import dot_product_attention
from unclip_jax.models.prior import timestep_embedding
from unclip_jax.models.transformer import dense

# What a rematerialised block keeps for its backward pass (`UNet.remat_policy`); None: only the
# block's inputs. Convolutions are named 'conv' (`checkpoint_name`); projections are dots.
REMAT_POLICIES = {
    'full': None,
    'save_projections': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names('conv')),
}

Dtype = Any

CONV_AXES = (None, None, 'conv_in', 'conv_out')

__all__ = ['AttentionBlock', 'Downsample', 'GroupNorm', 'Projection', 'ResBlock', 'UNet',
           'Upsample', 'timestep_embedding']


def attention_resolutions_problem(attention_resolutions: Sequence[int], patch_size: int,
                                  levels: int) -> Optional[str]:
  """Why `attention_resolutions` (downsampling factors) name a level a U-Net of `levels` levels
  (len(channel_mult)) and `patch_size` does not have, or None. The model and
  `config_lib.validate` both refuse with it."""
  factors = [patch_size * 2 ** level for level in range(levels)]
  bad = [r for r in attention_resolutions if r not in factors]
  if not bad:
    return None
  return (f'{tuple(attention_resolutions)} are downsampling factors; {bad} is not one of '
          f'{factors} (patch_size {patch_size}, len(channel_mult) = {levels})')


def _fan_in_uniform(in_axis=-2, out_axis=-1):
  """U(±1/sqrt(fan_in)), PyTorch's default for convolutions and linear layers (as in ADM)."""
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform', in_axis=in_axis,
                                          out_axis=out_axis)


def _boxed(init, axes):
  return nn.with_logical_partitioning(init, axes)


def conv(features: int, kernel_size: int, *, dtype: Dtype, strides: int = 1,
         zero_init: bool = False, axes: tuple[Optional[str], ...] = CONV_AXES,
         name: Optional[str] = None) -> nn.Conv:
  """A k×k convolution with PyTorch-style symmetric padding (k - 1) // 2 on NHWC inputs.

  Explicit padding keeps stride-2 convolutions aligned like ADM's (`SAME` would pad only at the
  end). `zero_init` zeroes kernel and bias (ADM's `zero_module`). `axes` name the kernel's
  [k, k, in, out] axes; the bias takes the last.
  """
  pad = (kernel_size - 1) // 2
  kernel_init = nn.initializers.zeros if zero_init else _fan_in_uniform()
  return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=_boxed(kernel_init, axes),
                 bias_init=_boxed(nn.initializers.zeros, axes[-1:]), name=name)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] → [B, H/p, W/p, p·p·C]: each p×p patch's pixels become channels."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """The inverse of `space_to_depth`."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c // (p * p))


def upsample_nearest(x: jax.Array) -> jax.Array:
  """Nearest-neighbour ×2: [B, H, W, C] → [B, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool(x: jax.Array) -> jax.Array:
  """2×2 average pooling with stride 2: [B, H, W, C] → [B, H/2, W/2, C]."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _constrain(x: jax.Array) -> jax.Array:
  """Keeps [B, H, W, C] activations sharded over the batch when logical rules are active."""
  return nn.with_logical_constraint(x, ('batch', None, None, 'act_embed'))


def _group_mean(y: jax.Array, num_groups: int) -> jax.Array:
  """Each channel's mean of y [B, ..., C] over its group (spatial axes and the group's channels),
  [B, 1.., C].

  Sums over the spatial axes first (channels stay the contiguous minor axis), then over each
  group's channels: XLA:CPU reduces this layout 5-6x faster (forward and backward) than a
  reduction over [..., groups, channels per group], which it strides through.
  """
  b, c = y.shape[0], y.shape[-1]
  per_group = c // num_groups
  sums = y.sum(tuple(range(1, y.ndim - 1))).reshape(b, num_groups, per_group).sum(-1)
  count = per_group * int(np.prod(y.shape[1:-1]))
  return jnp.repeat(sums / count, per_group, axis=-1).reshape((b,) + (1,) * (y.ndim - 2) + (c,))


def _sum_to(y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums y over the axes where `shape` (same rank) has 1 — the gradient of a broadcast."""
  axes = tuple(i for i, (n, m) in enumerate(zip(y.shape, shape)) if m == 1 and n != 1)
  return y.sum(axes, keepdims=True).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x: jax.Array, a: jax.Array, b: jax.Array, num_groups: int, epsilon: float,
               silu: bool) -> jax.Array:
  """GroupNorm of x [B, ..., C] with a per-channel affine map, then optionally SiLU, float32:

    z = (x - mean) / std · a + b;   out = silu(z) if silu else z,

  statistics over each group's channels and the spatial axes. `a` and `b` broadcast against
  [B, 1.., C] (the affine parameters, or those modulated per sample: scale-shift conditioning).
  The backward pass keeps only x (in its own dtype) and the statistics and recomputes the rest,
  as PyTorch's fused GroupNorm does: without it, autodiff keeps the centred, normalised and
  activated tensors, three times the activation memory of every norm.
  """
  out, _ = _group_norm_fwd(x, a, b, num_groups, epsilon, silu)
  return out


def _group_norm_fwd(x, a, b, num_groups, epsilon, silu):
  xf = x.astype(jnp.float32)
  mean = _group_mean(xf, num_groups)
  rstd = jax.lax.rsqrt(_group_mean(jnp.square(xf - mean), num_groups) + epsilon)
  z = (xf - mean) * rstd * a + b
  return (z * jax.nn.sigmoid(z) if silu else z), (x, a, b, mean, rstd)


def _group_norm_bwd(num_groups, epsilon, silu, residuals, g):
  del epsilon
  x, a, b, mean, rstd = residuals
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dz = g.astype(jnp.float32)
  if silu:
    z = xhat * a + b
    sig = jax.nn.sigmoid(z)
    dz = dz * sig * (1 + z * (1 - sig))
  da = _sum_to(dz * xhat, a.shape).astype(a.dtype)
  db = _sum_to(dz, b.shape).astype(b.dtype)
  dxhat = dz * a
  dx = rstd * (dxhat - _group_mean(dxhat, num_groups) -
               xhat * _group_mean(dxhat * xhat, num_groups))
  return dx.astype(x.dtype), da, db


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """GroupNorm (32 groups in ADM) over the channels of [B, ..., C], float32 statistics.

  Channels are grouped contiguously (channel c in group c // (C / num_groups)), like PyTorch.
  `__call__(x, scale=None, shift=None)`: with them, the normalised x is modulated per sample,
  GN(x)·scale + shift (scale-shift conditioning; [B, 1.., C]); `silu` applies SiLU after. One
  fused `group_norm` computes it all. Output: same shape, in `dtype`.
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  silu: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, scale: Optional[jax.Array] = None,
               shift: Optional[jax.Array] = None) -> jax.Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'GroupNorm: {c} channels are not divisible by {self.num_groups} groups')
    gamma = self.param('scale', _boxed(nn.initializers.ones, ('norm',)), (c,), jnp.float32)
    beta = self.param('bias', _boxed(nn.initializers.zeros, ('norm',)), (c,), jnp.float32)
    shape = (1,) * (x.ndim - 1) + (c,)
    a, b = gamma.reshape(shape), beta.reshape(shape)
    if scale is not None:                     # (x̂·γ + β)·scale + shift
      scale = scale.astype(jnp.float32)
      a, b = a * scale, b * scale
    if shift is not None:
      b = b + shift.astype(jnp.float32)
    return group_norm(x, a, b, self.num_groups, self.epsilon, self.silu).astype(self.dtype)


class Projection(nn.Module):
  """A linear map contracting the last `contract` axes of x into `features` (several axes).

  x [..., *in_shape] → [..., *features], in_shape = x.shape[-contract:]; kernel
  [*in_shape, *features] and bias [*features] keep their full rank, so `axes` (one logical name
  per kernel axis; the bias takes the last len(features)) shard them as they are stored.
  (`nn.DenseGeneral` initialises a flattened 2-D kernel, which logical constraints reject.)
  """
  features: tuple[int, ...]
  axes: tuple[Optional[str], ...]
  contract: int = 1
  zero_init: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.contract:]
    rank = len(in_shape) + len(self.features)
    init = nn.initializers.zeros if self.zero_init else _fan_in_uniform(
        tuple(range(self.contract)), tuple(range(self.contract, rank)))
    kernel = self.param('kernel', _boxed(init, self.axes), in_shape + tuple(self.features),
                        jnp.float32)
    bias = self.param('bias', _boxed(nn.initializers.zeros, self.axes[self.contract:]),
                      tuple(self.features), jnp.float32)
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.contract)
    return y + bias.astype(self.dtype)


class ResBlock(nn.Module):
  """ADM residual block conditioned on the timestep embedding.

  h = conv3×3(SiLU(GN(x))), resampled in between when `up`/`down` (BigGAN-style, nearest ×2 or
  2×2 average pooling, applied to the skip path too); then with `use_scale_shift_norm`
  h = GN(h)·(1 + scale) + shift, (scale, shift) = Dense(SiLU(emb)), otherwise
  h = GN(h + Dense(SiLU(emb))); then SiLU → dropout → zero-initialised conv3×3, plus the skip
  (a 1×1 conv when the channel count changes). At initialisation the block is its skip path.

  Inputs: x [B, H, W, C_in], emb [B, E], train (dropout). Output: [B, H', W', out_channels] in
  `dtype`, H' = 2H if `up`, H/2 if `down`, else H.
  """
  out_channels: int
  use_scale_shift_norm: bool = True
  dropout: float = 0.0
  up: bool = False
  down: bool = False
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
    c = self.out_channels
    x = x.astype(self.dtype)
    h = GroupNorm(self.norm_groups, silu=True, dtype=self.dtype, name='norm_in')(x)
    if self.up:
      h, x = upsample_nearest(h), upsample_nearest(x)
    elif self.down:
      h, x = avg_pool(h), avg_pool(x)
    h = checkpoint_name(conv(c, 3, dtype=self.dtype, name='conv_in')(h), 'conv')

    emb = nn.silu(emb.astype(jnp.float32)).astype(self.dtype)
    norm_out = GroupNorm(self.norm_groups, silu=True, dtype=self.dtype, name='norm_out')
    if self.use_scale_shift_norm:
      scale_shift = Projection((2, c), ('embed', None, 'conv_out'), dtype=self.dtype,
                               name='emb_proj')(emb)
      scale, shift = scale_shift[:, None, None, 0], scale_shift[:, None, None, 1]
      h = norm_out(h, scale=1 + scale.astype(jnp.float32), shift=shift)
    else:
      shift = dense(c, ('embed', 'conv_out'), dtype=self.dtype, name='emb_proj',
                    kernel_init=_fan_in_uniform())(emb)
      h = norm_out(h + shift[:, None, None])
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = checkpoint_name(conv(c, 3, dtype=self.dtype, zero_init=True, name='conv_out')(h), 'conv')

    skip = x if x.shape[-1] == c else conv(c, 1, dtype=self.dtype, name='skip')(x)
    return skip + h


class Upsample(nn.Module):
  """Nearest-neighbour ×2 then conv3×3: [B, H, W, C] → [B, 2H, 2W, C] in `dtype`."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return checkpoint_name(conv(x.shape[-1], 3, dtype=self.dtype, name='conv')(
        upsample_nearest(x)), 'conv')


class Downsample(nn.Module):
  """Stride-2 conv3×3: [B, H, W, C] → [B, H/2, W/2, C] in `dtype`."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return checkpoint_name(conv(x.shape[-1], 3, strides=2, dtype=self.dtype, name='conv')(x),
                           'conv')


class AttentionBlock(nn.Module):
  """Multi-head self-attention over the H·W positions, with optional encoder keys/values.

  x + out(attn(qkv(GN(x)))), heads = C / num_head_channels. With `encoder_states` [B, S, C_ctx],
  each block projects them (`encoder_kv`) to S extra keys/values placed before the image's (GLIDE),
  so every image position attends jointly to the image and the encoder tokens; `encoder_mask`
  [B, S] (True = attend) hides encoder tokens (image positions are always attended). The output
  projection is zero-initialised, so the block starts as the identity.

  Kernels: qkv [C, 3, heads, num_head_channels], encoder_kv [C_ctx, 2, heads, num_head_channels],
  out [heads, num_head_channels, C]. Output: [B, H, W, C] in `dtype`.
  """
  num_head_channels: int = 64
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, encoder_states: Optional[jax.Array] = None,
               encoder_mask: Optional[jax.Array] = None) -> jax.Array:
    b, height, width, c = x.shape
    if c % self.num_head_channels:
      raise ValueError(f'AttentionBlock: {c} channels are not divisible by num_head_channels '
                       f'{self.num_head_channels}')
    heads, d = c // self.num_head_channels, self.num_head_channels
    x = x.astype(self.dtype)
    h = GroupNorm(self.norm_groups, dtype=self.dtype, name='norm')(x).reshape(b, height * width, c)
    qkv = Projection((3, heads, d), ('embed', None, 'heads', 'kv'), dtype=self.dtype,
                     name='qkv')(h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    mask = None
    if encoder_states is not None:
      ekv = Projection((2, heads, d), ('embed_in', None, 'heads', 'kv'), dtype=self.dtype,
                       name='encoder_kv')(encoder_states)
      k = jnp.concatenate([ekv[:, :, 0], k], axis=1)
      v = jnp.concatenate([ekv[:, :, 1], v], axis=1)
      if encoder_mask is not None:
        image_keys = jnp.ones((b, height * width), bool)
        mask = jnp.concatenate([encoder_mask.astype(bool), image_keys], axis=1)[:, None, None, :]
    out = dot_product_attention(q, k, v, mask=mask)
    out = Projection((c,), ('heads', 'kv', 'embed'), contract=2, zero_init=True,
                     dtype=self.dtype, name='out')(out)
    return x + out.reshape(b, height, width, c)


def coordinate_channels(batch: int, height: int, width: int, dtype=jnp.float32) -> jax.Array:
  """[batch, height, width, 2]: each pixel centre's x and y, from -1 (left, top) to 1."""
  y = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height * 2 - 1
  x = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width * 2 - 1
  grid = jnp.stack(jnp.meshgrid(x, y, indexing='xy'), axis=-1).astype(dtype)
  return jnp.broadcast_to(grid[None], (batch, height, width, 2))


class UNet(nn.Module):
  """ADM U-Net: (x_t [B, H, W, C_in], t [B]) → [B, H, W, out_channels] float32.

  Attributes:
    model_channels: base width; level l has `channel_mult[l] · model_channels` channels and the
      timestep embedding has E = 4 · model_channels.
    out_channels: e.g. 3 (ε or x₀), 6 (plus the learned-variance interpolation).
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attention_resolutions: DOWNSAMPLING FACTORS (not pixel sizes) at which attention follows each
      residual block: level l works at factor patch_size · 2**l. A 64px decoder that attends at
      32, 16 and 8 pixels uses (2, 4, 8). Factors keep the model size-agnostic. The middle block
      attends iff this is non-empty; () gives a purely convolutional network.
    channel_mult: per-level channel multipliers; len(channel_mult) - 1 downsamplings, so H and W
      must be divisible by `size_factor` = patch_size · 2**(len(channel_mult) - 1).
    num_head_channels: channels per attention head (heads = channels / num_head_channels).
    dropout: dropout rate inside the residual blocks (active when `train`).
    use_scale_shift_norm: condition by GN(h)·(1 + scale) + shift (else by adding to h).
    resblock_updown: resample with residual blocks (BigGAN) instead of Upsample/Downsample.
    context_dim: width of `encoder_states`; None for a model without them.
    norm_groups: GroupNorm groups (32 in ADM). With as many groups as channels GroupNorm becomes
      instance norm and erases each channel's spatial mean; a small model trained on crops then
      gets the absolute colours of larger images wrong. Use fewer groups for narrow models.
    remat: rematerialise residual and attention blocks in the backward pass.
    remat_policy: what a rematerialised block keeps from its forward pass (REMAT_POLICIES):
      'full' keeps only its input and recomputes everything; 'save_projections' keeps the
      outputs of its convolutions and dense projections and recomputes the normalisations,
      activations and attention, which are cheap to recompute and hold most of the memory.
    patch_size: p×p pixels per position of the finest level (space-to-depth); 1 is ADM's.
    coord_channels: append each pixel's x and y (in [-1, 1]) to the input as two channels
      (CoordConv, Liu et al. 2018): convolutions are translation-equivariant and the attention
      has no positions, so without them a global condition (a CLIP embedding that says "top
      left") reaches a place in the image only through the zero padding at the borders.
    dtype: compute dtype (parameters stay float32).
  """
  model_channels: int
  out_channels: int
  num_res_blocks: int
  attention_resolutions: Sequence[int] = ()
  channel_mult: Sequence[int] = (1, 2, 4, 8)
  num_head_channels: int = 64
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  resblock_updown: bool = True
  context_dim: Optional[int] = None
  norm_groups: int = 32
  remat: bool = False
  remat_policy: str = 'full'
  patch_size: int = 1
  coord_channels: bool = False
  dtype: Dtype = jnp.float32

  @property
  def emb_dim(self) -> int:
    """Width E of the timestep embedding (and of `emb_extra`)."""
    return 4 * self.model_channels

  @property
  def size_factor(self) -> int:
    """H and W must be multiples of this: patch_size · 2**(len(channel_mult) - 1)."""
    return self.patch_size * 2 ** (len(self.channel_mult) - 1)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, *, emb_extra: Optional[jax.Array] = None,
               encoder_states: Optional[jax.Array] = None,
               encoder_mask: Optional[jax.Array] = None, train: bool = False,
               cond_map: Optional[jax.Array] = None) -> jax.Array:
    """Predicts the diffusion output for noised images.

    Args:
      x: [B, H, W, C_in] noised images (upsamplers: with the low-res image concatenated).
      t: [B] (or scalar) timesteps, integer or real.
      emb_extra: optional [B, E] added to the timestep embedding (E = 4 · model_channels).
      encoder_states: [B, S, context_dim] token encodings; required iff `context_dim` is set.
      encoder_mask: optional [B, S] bool, True where an encoder token may be attended.
      train: enables dropout (needs a 'dropout' rng when dropout > 0).
      cond_map: optional [B, h, w, C_map] spatial condition: resized (bilinear) to the middle
        block's grid and added to its input through a 1×1 convolution (`cond_map_in`), so that
        a condition can say what goes where.

    Returns:
      [B, H, W, out_channels] float32.
    """
    self._check(x, emb_extra, encoder_states, encoder_mask)
    emb = self._embed_time(t, x.shape[0])
    if emb_extra is not None:
      emb = emb + emb_extra.astype(jnp.float32)

    # ResBlock.__call__(self, x, emb, train): `train` (argument 3, counting self) is static.
    policy = REMAT_POLICIES[self.remat_policy]
    res = nn.remat(ResBlock, static_argnums=(3,), policy=policy) if self.remat else ResBlock
    attn = nn.remat(AttentionBlock, policy=policy) if self.remat else AttentionBlock
    res_kw = dict(use_scale_shift_norm=self.use_scale_shift_norm, dropout=self.dropout,
                  norm_groups=self.norm_groups, dtype=self.dtype)
    attends = set(self.attention_resolutions)

    def attention(h, name):
      return _constrain(attn(self.num_head_channels, self.norm_groups, dtype=self.dtype,
                             name=name)(
          h, encoder_states, encoder_mask))

    def res_block(h, channels, name, **kw):
      return _constrain(res(channels, name=name, **res_kw, **kw)(h, emb, train))

    p = self.patch_size
    x = x.astype(self.dtype)
    if self.coord_channels:
      x = jnp.concatenate([x, coordinate_channels(x.shape[0], x.shape[1], x.shape[2], x.dtype)],
                          axis=-1)
    h = _constrain(conv(self.model_channels * self.channel_mult[0], 3, dtype=self.dtype,
                        axes=(None, None, 'channels', 'conv_out'),
                        name='conv_in')(space_to_depth(x, p)))
    skips = [h]
    last = len(self.channel_mult) - 1
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = res_block(h, mult * self.model_channels, f'down_{level}_res_{i}')
        if p * 2 ** level in attends:
          h = attention(h, f'down_{level}_attn_{i}')
        skips.append(h)
      if level < last:
        name = f'down_{level}_downsample'
        if self.resblock_updown:
          h = res_block(h, h.shape[-1], name, down=True)
        else:
          h = _constrain(Downsample(self.dtype, name=name)(h))
        skips.append(h)

    if cond_map is not None:
      grid = jax.image.resize(cond_map.astype(jnp.float32),
                              (*h.shape[:3], cond_map.shape[-1]), 'linear')
      h = h + conv(h.shape[-1], 1, dtype=self.dtype, axes=(None, None, 'channels', 'conv_out'),
                   name='cond_map_in')(grid.astype(self.dtype))
    h = res_block(h, h.shape[-1], 'mid_res_0')
    if attends:
      h = attention(h, 'mid_attn')
    h = res_block(h, h.shape[-1], 'mid_res_1')

    for level in reversed(range(len(self.channel_mult))):
      channels = self.channel_mult[level] * self.model_channels
      for i in range(self.num_res_blocks + 1):
        h = res_block(jnp.concatenate([h, skips.pop()], axis=-1), channels, f'up_{level}_res_{i}')
        if p * 2 ** level in attends:
          h = attention(h, f'up_{level}_attn_{i}')
      if level > 0:
        name = f'up_{level}_upsample'
        if self.resblock_updown:
          h = res_block(h, channels, name, up=True)
        else:
          h = _constrain(Upsample(self.dtype, name=name)(h))

    h = GroupNorm(self.norm_groups, silu=True, dtype=jnp.float32, name='norm_out')(h)
    return depth_to_space(conv(self.out_channels * p * p, 3, dtype=jnp.float32, zero_init=True,
                               axes=(None, None, 'conv_in', 'channels'), name='conv_out')(h), p)

  def _embed_time(self, t: jax.Array, batch: int) -> jax.Array:
    """t [B] → sinusoidal(model_channels) → Dense(E) → SiLU → Dense(E): [B, E] float32."""
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    e = timestep_embedding(t, self.model_channels)
    e = dense(self.emb_dim, (None, 'mlp'), dtype=jnp.float32, name='time_fc1',
              kernel_init=_fan_in_uniform())(e)
    return dense(self.emb_dim, ('mlp', 'embed'), dtype=jnp.float32, name='time_fc2',
                 kernel_init=_fan_in_uniform())(nn.silu(e))

  def _check(self, x, emb_extra, encoder_states, encoder_mask):
    """Raises ValueError for inputs or attributes this model cannot use."""
    levels = len(self.channel_mult)
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'remat_policy must be one of {sorted(REMAT_POLICIES)}, got '
                       f'{self.remat_policy!r}')
    if self.patch_size < 1:
      raise ValueError(f'patch_size must be >= 1, got {self.patch_size}')
    problem = attention_resolutions_problem(self.attention_resolutions, self.patch_size, levels)
    if problem:
      raise ValueError(f'attention_resolutions {problem}')
    if x.ndim != 4:
      raise ValueError(f'x must be [B, H, W, C], got shape {x.shape}')
    height, width = x.shape[1:3]
    if height % self.size_factor or width % self.size_factor:
      raise ValueError(f'image size {height}x{width} is not divisible by {self.size_factor} '
                       f'(patch_size · 2**(len(channel_mult) - 1) for patch_size '
                       f'{self.patch_size}, channel_mult {tuple(self.channel_mult)})')
    b = x.shape[0]
    if emb_extra is not None and emb_extra.shape != (b, self.emb_dim):
      raise ValueError(f'emb_extra must have shape [B, E] = {(b, self.emb_dim)} '
                       f'(E = 4 · model_channels), got {emb_extra.shape}')
    if self.context_dim is None:
      if encoder_states is not None or encoder_mask is not None:
        raise ValueError('encoder_states/encoder_mask given to a UNet with context_dim=None')
      return
    if not self.attention_resolutions:
      raise ValueError(f'context_dim={self.context_dim} needs attention blocks, but '
                       'attention_resolutions is empty')
    if encoder_states is None:
      raise ValueError(f'encoder_states [B, S, {self.context_dim}] are required when context_dim '
                       'is set (mask them out with encoder_mask for unconditional inputs)')
    if encoder_states.ndim != 3 or encoder_states.shape[0] != b or (
        encoder_states.shape[-1] != self.context_dim):
      raise ValueError(f'encoder_states must be [B, S, context_dim] = [{b}, S, '
                       f'{self.context_dim}], got {encoder_states.shape}')
    if encoder_mask is not None and encoder_mask.shape != encoder_states.shape[:2]:
      raise ValueError(f'encoder_mask must be [B, S] = {encoder_states.shape[:2]}, '
                       f'got {encoder_mask.shape}')
