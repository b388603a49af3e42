"""The unCLIP diffusion prior: a decoder-only causal transformer over CLIP embeddings.

Sequence (Ramesh et al. 2022, §2.2): [caption token encodings (projected), CLIP text embedding,
timestep embedding, noised CLIP image embedding, learned final query]. A causal mask runs over it
(padded caption tokens are masked out as keys), and the output at the final query predicts the
clean (normalised) image embedding.

The module also owns the embedding normalisation (`normalize` / `denormalize`): the diffusion runs
on `(emb - clip_mean) / clip_std`, with the statistics held as non-trainable parameters so that a
checkpoint carries them (karlo's convention), or on `emb * scale` when `normalization='scale'`.

Classifier-free guidance needs an unconditional caption. With `null_caption='learned'` (ours) the
model owns a learned null text embedding and null token encodings that `drop_text` swaps in. With
`null_caption='empty_prompt'` (kakaobrain's karlo / diffusers' PriorTransformer) the unconditional
caption is the EMPTY PROMPT's CLIP encodings with the empty prompt's token mask, which only the
caller (who holds the CLIP) can compute: it passes them as an ordinary caption, and `drop_text`
is refused. The null parameters still exist in that mode (so that every prior has one parameter
tree); they are unused, and converted checkpoints hold zeros there.
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.transformer import LayerNorm, Transformer, dense

Dtype = Any
NULL_CAPTIONS = ('learned', 'empty_prompt')


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (integer or real) timesteps t [B] → [B, dim] float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class DiffusionPrior(nn.Module):
  """Predicts the clean CLIP image embedding from its noised version and the caption.

  Attributes:
    embed_dim: CLIP embedding size D.
    text_width: width of the CLIP text tower's token encodings.
    num_tokens: caption length L the model was built for.
    width, depth, num_heads, mlp_ratio: the transformer.
    normalization: 'stats' (per-dimension mean/std parameters) or 'scale' (multiply by
      `embedding_scale`, default sqrt(D)).
    null_caption: 'learned' (learned null caption for `drop_text`) or 'empty_prompt' (the caller
      passes the empty prompt's encodings as the unconditional caption; see the module doc).
    remat, remat_policy, scan: the transformer's (`Transformer`).
  """
  embed_dim: int
  text_width: int
  num_tokens: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  activation: str = 'gelu'
  normalization: str = 'stats'
  embedding_scale: Optional[float] = None
  null_caption: str = 'learned'
  remat: bool = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  remat_policy: str = 'full'

  def setup(self):
    if self.null_caption not in NULL_CAPTIONS:
      raise ValueError(f'DiffusionPrior.null_caption: {self.null_caption!r} is not one of '
                       f'{NULL_CAPTIONS}')
    d = self.embed_dim
    self.clip_mean = self.param('clip_mean', nn.with_logical_partitioning(
        nn.initializers.zeros, ('norm',)), (d,), jnp.float32)
    self.clip_std = self.param('clip_std', nn.with_logical_partitioning(
        nn.initializers.ones, ('norm',)), (d,), jnp.float32)
    kw = dict(dtype=self.dtype)
    self.token_proj = dense(self.width, ('embed_in', 'embed'), **kw)
    self.text_emb_proj = dense(self.width, ('proj', 'embed'), **kw)
    self.x_proj = dense(self.width, ('proj', 'embed'), **kw)
    self.time_fc1 = dense(self.width, (None, 'mlp'), **kw)
    self.time_fc2 = dense(self.width, ('mlp', 'embed'), **kw)
    self.null_text_emb = self.param('null_text_emb', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ('proj',)), (d,), jnp.float32)
    self.null_tokens = self.param('null_token_encodings', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ('length', 'embed_in')),
        (self.num_tokens, self.text_width), jnp.float32)
    self.final_query = self.param('final_query', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ('embed',)), (self.width,), jnp.float32)
    self.positional_embedding = self.param('positional_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(0.01), ('length', 'embed')), (self.num_tokens + 4, self.width),
        jnp.float32)
    self.transformer = Transformer(self.depth, self.num_heads, self.mlp_ratio, self.activation,
                                   causal=True, remat=self.remat, scan=self.scan,
                                   dtype=self.dtype, remat_policy=self.remat_policy)
    self.ln_out = LayerNorm(jnp.float32)
    self.out_proj = dense(d, ('embed', 'proj'), dtype=jnp.float32)

  # --- normalisation ----------------------------------------------------------------------------

  def _scale(self) -> float:
    return self.embedding_scale or math.sqrt(self.embed_dim)

  def normalize(self, emb: jax.Array) -> jax.Array:
    """CLIP image embedding [B, D] → the space the diffusion runs in."""
    if self.normalization == 'scale':
      return emb * self._scale()
    mean, std = jax.lax.stop_gradient((self.clip_mean, self.clip_std))
    return (emb - mean) / std

  def denormalize(self, x: jax.Array) -> jax.Array:
    """Inverse of `normalize`."""
    if self.normalization == 'scale':
      return x / self._scale()
    mean, std = jax.lax.stop_gradient((self.clip_mean, self.clip_std))
    return x * std + mean

  # --- forward ----------------------------------------------------------------------------------

  def __call__(self, x_t: jax.Array, t: jax.Array, text_emb: jax.Array,
               token_encodings: jax.Array, token_mask: jax.Array,
               drop_text: Optional[jax.Array] = None) -> jax.Array:
    """Predicts the clean normalised image embedding.

    Args:
      x_t: noised normalised image embedding [B, D].
      t: timesteps [B] (training timesteps, 0..T-1).
      text_emb: CLIP text embedding [B, D].
      token_encodings: CLIP text tower's final hidden states [B, L, text_width].
      token_mask: [B, L] bool, True for real (non-padding) caption tokens.
      drop_text: [B] bool; True replaces the caption (embedding and tokens) by learned null
        values, for classifier-free guidance. Only with null_caption='learned'.
    Returns:
      predicted x0 [B, D] (float32).
    """
    b, length, _ = token_encodings.shape
    if length != self.num_tokens:
      raise ValueError(f'token encodings have length {length}; the prior was built for '
                       f'num_tokens={self.num_tokens}')
    if drop_text is not None:
      if self.null_caption != 'learned':
        raise ValueError(f"drop_text needs null_caption='learned'; with "
                         f"null_caption={self.null_caption!r} pass the empty prompt's CLIP "
                         'encodings and token mask as the unconditional caption instead')
      drop = drop_text[:, None]
      text_emb = jnp.where(drop, self.null_text_emb[None], text_emb)
      token_encodings = jnp.where(drop[:, :, None], self.null_tokens[None], token_encodings)
      token_mask = jnp.where(drop, True, token_mask)
    time = self.time_fc2(nn.silu(self.time_fc1(timestep_embedding(t, self.width))))
    seq = jnp.concatenate([
        self.token_proj(token_encodings.astype(self.dtype)),
        self.text_emb_proj(text_emb.astype(self.dtype))[:, None],
        time[:, None].astype(self.dtype),
        self.x_proj(x_t.astype(self.dtype))[:, None],
        jnp.broadcast_to(self.final_query.astype(self.dtype), (b, 1, self.width)),
    ], axis=1)
    seq = seq + self.positional_embedding.astype(self.dtype)
    key_mask = jnp.concatenate([token_mask, jnp.ones((b, 4), bool)], axis=1)
    h = self.transformer(seq, key_mask[:, None, None, :])
    return self.out_proj(self.ln_out(h[:, -1]))
