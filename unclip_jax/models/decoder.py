"""The unCLIP decoder: a GLIDE/ADM U-Net conditioned on a CLIP image embedding and a caption.

Conditioning (Ramesh et al. 2022, §2.1): the CLIP image embedding is projected and added to the
timestep embedding, and projected into `num_clip_tokens` (4) extra context tokens that join the
caption's token sequence, which every attention layer attends to (GLIDE's encoder_kv). The caption
is either the frozen CLIP text tower's hidden states projected (karlo) or the decoder's own text
transformer over the tokens (GLIDE). For classifier-free guidance, `drop_clip` replaces the CLIP
embedding with a learned null embedding and `drop_text` removes the caption tokens from attention.

Karlo's variant (kakaobrain, diffusers' UnCLIPTextProjModel) also adds a projection of the
caption's CLIP text embedding to the timestep embedding (`text_emb_to_time`), layer-normalises the
projected caption states (`caption_norm`) and does not scale the CLIP embedding
(`clip_emb_scale=1.0`); its unconditional input is the null CLIP embedding with the EMPTY PROMPT's
caption (drop_clip on, drop_text off).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.transformer import LayerNorm, Transformer, dense
from unclip_jax.models.unet import UNet

Dtype = Any


class CaptionTransformer(nn.Module):
  """GLIDE's caption encoder: token embedding + transformer → states [B, L, width]."""
  vocab_size: int
  context_length: int
  width: int
  depth: int
  num_heads: int
  remat: bool = False
  scan: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab_size, self.width, param_dtype=jnp.float32,
                 embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                             ('vocab', 'embed')))(tokens)
    pos = self.param('positional_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(0.01), ('length', 'embed')), (self.context_length, self.width),
        jnp.float32)
    x = (x + pos[:tokens.shape[1]]).astype(self.dtype)
    x = Transformer(self.depth, self.num_heads, remat=self.remat, scan=self.scan,
                    dtype=self.dtype)(x, mask[:, None, None, :])
    return LayerNorm(self.dtype)(x)


class UnclipDecoder(nn.Module):
  """Predicts eps (and the variance interpolation) of a noised image.

  Attributes:
    unet: UNet attributes (`unclip_jax.models.unet.UNet`), without `context_dim`.
    clip_dim: CLIP embedding size D.
    context_width: width of the attention context tokens.
    num_clip_tokens: context tokens made from the CLIP embedding (4 in the paper).
    caption_encoder: 'clip' (caption = frozen CLIP hidden states [B, L, W]) or 'transformer'
      (caption = token ids [B, L]; `caption_transformer` holds its vocab_size, context_length,
      width, depth, num_heads).
    clip_emb_scale: multiplies the CLIP embedding before its projections. None means sqrt(D):
      a unit-norm embedding then has components of unit variance, on the scale of the timestep
      embedding it is added to (with 1.0 a unit embedding's signal starts ~sqrt(D) times weaker
      and the decoder is slow to learn to use it). Use 1.0 for embeddings that are not unit-norm.
      The text embedding of `text_emb_to_time` is scaled alike.
    text_emb_to_time: also add Dense(text_emb) to the timestep embedding (karlo); `text_emb`
      [B, D] is then required.
    caption_norm: LayerNorm on the projected caption states (karlo).
    clip_map_size: s > 0 adds a map of the CLIP embedding, Dense → [s, s, clip_map_channels], to
      the U-Net's middle block (`UNet(cond_map=)`); 0: none (karlo, the paper). The timestep and
      context-token paths are global, and the U-Net's convolutions and attention have no notion
      of place, so without the map nothing lets the embedding say *where* a thing goes (on the
      built-in data, the decoder drew shapes at random places even from embeddings that held
      their position).
    clip_map_channels: channels of that map.
  """
  unet: dict
  clip_dim: int
  context_width: int
  num_clip_tokens: int = 4
  caption_encoder: str = 'clip'
  caption_transformer: Optional[dict] = None
  clip_emb_scale: Optional[float] = None
  text_emb_to_time: bool = False
  caption_norm: bool = False
  clip_map_size: int = 0
  clip_map_channels: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_t: jax.Array, t: jax.Array, clip_emb: jax.Array, caption: jax.Array,
               caption_mask: jax.Array, drop_clip: Optional[jax.Array] = None,
               drop_text: Optional[jax.Array] = None, train: bool = False,
               text_emb: Optional[jax.Array] = None) -> jax.Array:
    """
    Args:
      x_t: noised images [B, H, W, C].
      t: timesteps [B].
      clip_emb: CLIP image embeddings [B, D].
      caption: [B, L, W] CLIP hidden states ('clip') or [B, L] token ids ('transformer').
      caption_mask: [B, L] bool, True for real caption tokens.
      drop_clip, drop_text: [B] bool, classifier-free-guidance drops (`drop_text` also zeroes
        `text_emb`).
      train: enables dropout (needs a 'dropout' rng).
      text_emb: [B, D] CLIP text embeddings of the captions; required iff `text_emb_to_time`.
    Returns:
      [B, H, W, out_channels] float32.
    """
    b = x_t.shape[0]
    null_clip = self.param('null_clip_emb', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ('proj',)), (self.clip_dim,), jnp.float32)
    if drop_clip is not None:
      clip_emb = jnp.where(drop_clip[:, None], null_clip[None], clip_emb)
    scale = self.clip_dim ** 0.5 if self.clip_emb_scale is None else self.clip_emb_scale
    clip_emb = clip_emb.astype(jnp.float32) * scale
    time_width = self.unet['model_channels'] * 4
    emb_extra = dense(time_width, ('proj', 'mlp'), dtype=self.dtype, name='clip_to_time')(clip_emb)
    text_emb = self._text_emb(text_emb, drop_text, b)
    if text_emb is not None:
      emb_extra = emb_extra + dense(time_width, ('proj', 'mlp'), dtype=self.dtype,
                                    name='text_to_time')(text_emb * scale)
    clip_tokens = dense(self.num_clip_tokens * self.context_width, ('proj', 'mlp'),
                        dtype=self.dtype, name='clip_to_tokens')(clip_emb)
    clip_tokens = clip_tokens.reshape(b, self.num_clip_tokens, self.context_width)

    states = self._caption_states(caption, caption_mask)
    mask = caption_mask if drop_text is None else caption_mask & ~drop_text[:, None]
    context = jnp.concatenate([clip_tokens.astype(self.dtype), states.astype(self.dtype)], 1)
    context_mask = jnp.concatenate([jnp.ones((b, self.num_clip_tokens), bool), mask], 1)
    cond_map = None
    if self.clip_map_size:
      s, c = self.clip_map_size, self.clip_map_channels
      cond_map = dense(s * s * c, ('proj', 'mlp'), dtype=self.dtype,
                       name='clip_to_map')(clip_emb).reshape(b, s, s, c)
    return UNet(context_dim=self.context_width, dtype=self.dtype, name='unet', **self.unet)(
        x_t, t, emb_extra=emb_extra, encoder_states=context, encoder_mask=context_mask,
        train=train, cond_map=cond_map)

  def _text_emb(self, text_emb, drop_text, batch):
    """The float32 text embedding [B, D] for `text_emb_to_time` (zero where dropped), or None."""
    if not self.text_emb_to_time:
      if text_emb is not None:
        raise ValueError('text_emb given to an UnclipDecoder with text_emb_to_time=False')
      return None
    if text_emb is None or text_emb.shape != (batch, self.clip_dim):
      got = 'none' if text_emb is None else text_emb.shape
      raise ValueError(f'UnclipDecoder(text_emb_to_time=True) needs text_emb [B, D] = '
                       f'{(batch, self.clip_dim)} (the captions\' CLIP text embeddings), got {got}')
    text_emb = text_emb.astype(jnp.float32)
    if drop_text is not None:
      text_emb = jnp.where(drop_text[:, None], 0.0, text_emb)
    return text_emb

  def _caption_states(self, caption, caption_mask):
    """Caption → context tokens [B, L, context_width] (projected, optionally layer-normed)."""
    if self.caption_encoder == 'clip':
      states = dense(self.context_width, ('embed_in', 'embed'), dtype=self.dtype,
                     name='caption_proj')(caption.astype(self.dtype))
    elif self.caption_encoder == 'transformer':
      states = CaptionTransformer(dtype=self.dtype, name='caption_transformer',
                                  **self.caption_transformer)(caption, caption_mask)
      states = dense(self.context_width, ('embed', 'mlp'), dtype=self.dtype,
                     name='caption_proj')(states)
    else:
      raise ValueError(f"caption_encoder {self.caption_encoder!r} is not 'clip' or "
                       "'transformer'")
    if self.caption_norm:
      states = LayerNorm(self.dtype, name='caption_norm')(states)
    return states
