"""CLIP's two towers (Radford et al. 2021): a causal text transformer and a ViT image encoder.

Both map their input to an `embed_dim` vector (`CLIP.encode_*` unit-normalise it unless asked
not to). The text tower also returns its final per-token hidden states (after the final LayerNorm),
which the prior and the decoder use as the caption's token encodings.

The options that are not in the paper's description exist to load published weights exactly:
`pool` (how the text tower finds the end token), `layer_norm_eps`, and the image tower's
`pixel_mean` / `pixel_std` (OpenAI's input normalisation). Their defaults keep our own CLIP's
behaviour.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models.transformer import LayerNorm, Transformer, dense

Dtype = Any
MISSING_TOWER = 'this CLIP has no {tower} tower; convert one with --{flag}'


def _param(init, axes):
  return nn.with_logical_partitioning(init, axes)


class TextTransformer(nn.Module):
  """Tokens [B, L] → (pooled embedding [B, embed_dim], token encodings [B, L, width]).

  Pools the final-layer-normed hidden state at the end of the text: with `pool='eot'` at the
  first `eot_id` token, with `pool='argmax'` at the largest token id (OpenAI CLIP and open_clip,
  whose end token is the last id of the vocabulary).
  """
  vocab_size: int
  context_length: int
  width: int
  depth: int
  num_heads: int
  embed_dim: int
  eot_id: int
  mlp_ratio: float = 4.0
  activation: str = 'quick_gelu'
  remat: bool = False
  pool: str = 'eot'
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    if tokens.shape[-1] > self.context_length:
      raise ValueError(f'tokens have length {tokens.shape[-1]} > context_length '
                       f'{self.context_length}')
    length = tokens.shape[-1]
    x = nn.Embed(self.vocab_size, self.width, param_dtype=jnp.float32, name='token_embedding',
                 embedding_init=_param(nn.initializers.normal(0.02), ('vocab', 'embed')))(tokens)
    pos = self.param('positional_embedding', _param(nn.initializers.normal(0.01),
                                                     ('length', 'embed')),
                     (self.context_length, self.width), jnp.float32)
    x = (x + pos[:length]).astype(self.dtype)
    x = Transformer(self.depth, self.num_heads, self.mlp_ratio, self.activation, causal=True,
                    remat=self.remat, dtype=self.dtype, layer_norm_eps=self.layer_norm_eps,
                    name='transformer')(x)
    x = LayerNorm(jnp.float32, self.layer_norm_eps, name='ln_final')(x)
    eot_index = self.end_index(tokens)
    pooled = jnp.take_along_axis(x, eot_index[:, None, None], axis=1)[:, 0]
    embedding = dense(self.embed_dim, ('embed', 'proj'), dtype=jnp.float32, use_bias=False,
                      name='projection',
                      kernel_init=nn.initializers.normal(self.width ** -0.5))(pooled)
    return embedding, x

  def end_index(self, tokens: jax.Array) -> jax.Array:
    """[B, L] tokens → [B] position of the end-of-text token that the tower pools at."""
    if self.pool == 'eot':
      return jnp.argmax(tokens == self.eot_id, axis=-1)
    if self.pool == 'argmax':
      return jnp.argmax(tokens, axis=-1)
    raise ValueError(f"pool: {self.pool!r} is not 'eot' or 'argmax'")


def posemb_sincos_2d(grid: int, width: int, temperature: float = 10_000.) -> jax.Array:
  """Fixed position features of a grid x grid of patches, row-major: [grid**2, width], a
  quarter each sin(y w), cos(y w), sin(x w), cos(x w) over `width // 4` geometric frequencies
  w (the MAE / big_vision 2-D form)."""
  if width % 4:
    raise ValueError(f'posemb sincos2d: the width ({width}) must be a multiple of 4')
  y, x = jnp.mgrid[:grid, :grid]
  omega = 1. / temperature ** (jnp.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  return jnp.concatenate([jnp.sin(y), jnp.cos(y), jnp.sin(x), jnp.cos(x)], axis=1)


class VisionTransformer(nn.Module):
  """Images [B, H, W, 3] in [-1, 1] (NHWC) → (embedding [B, embed_dim], tokens [B, 1+N, width]).

  With `pixel_mean` and `pixel_std` (3 values each) the images are first mapped to [0, 1] and
  normalised per channel, ((x + 1) / 2 - mean) / std, as OpenAI's CLIP preprocessing does;
  without them the [-1, 1] pixels go in unchanged.
  """
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  embed_dim: int
  mlp_ratio: float = 4.0
  activation: str = 'quick_gelu'
  remat: bool = False
  layer_norm_eps: float = 1e-5
  pixel_mean: Optional[Sequence[float]] = None
  pixel_std: Optional[Sequence[float]] = None
  # 'learn': a learned embedding per token (OpenAI CLIP; what converted CLIPs have); 'sincos2d':
  # fixed 2-D sine-cosine features of each patch's row and column (the class token gets none),
  # as big_vision's ViTs may use: the patches' places are plain from the first step.
  posemb: str = 'learn'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, h, w, _ = images.shape
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f'image size {h}x{w} is not divisible by patch_size {self.patch_size}')
    images = self.normalize_pixels(images)
    x = nn.Conv(self.width, (self.patch_size, self.patch_size), strides=self.patch_size,
                use_bias=False, padding='VALID', dtype=self.dtype, param_dtype=jnp.float32,
                name='patch_embedding',
                kernel_init=_param(nn.initializers.lecun_normal(),
                                   (None, None, 'channels', 'embed')))(images.astype(self.dtype))
    x = x.reshape(b, -1, self.width)
    cls = self.param('class_embedding', _param(nn.initializers.normal(self.width ** -0.5),
                                               ('embed',)), (self.width,), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x], axis=1)
    grid = self.image_size // self.patch_size
    num_tokens = grid ** 2 + 1
    if self.posemb == 'learn':
      pos = self.param('positional_embedding', _param(
          nn.initializers.normal(self.width ** -0.5), ('length', 'embed')),
                       (num_tokens, self.width), jnp.float32)
    elif self.posemb == 'sincos2d':
      pos = jnp.concatenate([jnp.zeros((1, self.width)), posemb_sincos_2d(grid, self.width)])
    else:
      raise ValueError(f"posemb: {self.posemb!r} is not 'learn' or 'sincos2d'")
    if x.shape[1] != num_tokens:
      raise ValueError(f'images of {h}x{w} give {x.shape[1]} tokens; the model was built for '
                       f'image_size={self.image_size} ({num_tokens} tokens)')
    eps = self.layer_norm_eps
    x = LayerNorm(self.dtype, eps, name='ln_pre')(x + pos.astype(x.dtype))
    x = Transformer(self.depth, self.num_heads, self.mlp_ratio, self.activation,
                    remat=self.remat, dtype=self.dtype, layer_norm_eps=eps, name='transformer')(x)
    pooled = LayerNorm(jnp.float32, eps, name='ln_post')(x[:, 0])
    embedding = dense(self.embed_dim, ('embed', 'proj'), dtype=jnp.float32, use_bias=False,
                      name='projection',
                      kernel_init=nn.initializers.normal(self.width ** -0.5))(pooled)
    return embedding, x

  def normalize_pixels(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] in [-1, 1] → the tower's input pixels (see the class docstring)."""
    if self.pixel_mean is None and self.pixel_std is None:
      return images
    if self.pixel_mean is None or self.pixel_std is None:
      raise ValueError('pixel_mean and pixel_std must be given together')
    mean = jnp.asarray(self.pixel_mean, jnp.float32)
    std = jnp.asarray(self.pixel_std, jnp.float32)
    return ((images.astype(jnp.float32) + 1) / 2 - mean) / std


class CLIP(nn.Module):
  """The two towers plus a learned temperature.

  `__call__(images, tokens)` returns unit-normalised image and text embeddings [B, embed_dim] and
  the logit scale exp(t) (training keeps t within [0, log(max_logit_scale)], 100 in CLIP, by
  clamping the parameter after each update, as OpenAI's does). `text` or `vision` may be
  None for a CLIP with one tower (e.g. a converted text encoder); using the missing one raises.
  """
  text: Optional[dict]
  vision: Optional[dict]
  embed_dim: int
  init_logit_scale: float = float(np.log(1 / 0.07))
  max_logit_scale: float = 100.0
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.text is not None:
      self.text_tower = TextTransformer(embed_dim=self.embed_dim, dtype=self.dtype, **self.text)
    if self.vision is not None:
      self.vision_tower = VisionTransformer(embed_dim=self.embed_dim, dtype=self.dtype,
                                            **self.vision)
    self.logit_scale = self.param('logit_scale', _param(nn.initializers.constant(
        self.init_logit_scale), ()), (), jnp.float32)

  def encode_text(self, tokens: jax.Array, normalize: bool = True):
    """Tokens [B, L] → (embedding [B, D], token encodings [B, L, width])."""
    if self.text is None:
      raise ValueError(MISSING_TOWER.format(tower='text', flag='text'))
    emb, hidden = self.text_tower(tokens)
    return (_l2_normalize(emb) if normalize else emb), hidden

  def encode_image(self, images: jax.Array, normalize: bool = True) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] → embedding [B, D]."""
    if self.vision is None:
      raise ValueError(MISSING_TOWER.format(tower='image', flag='vision'))
    emb, _ = self.vision_tower(images)
    return _l2_normalize(emb) if normalize else emb

  def __call__(self, images: jax.Array, tokens: jax.Array):
    image_emb = self.encode_image(images)
    text_emb, _ = self.encode_text(tokens)
    # The trainer keeps the parameter within [0, log(max_logit_scale)] after each update
    # (`Stage.constrain_params`); clamping the scale here instead would zero its gradient.
    return image_emb, text_emb, jnp.exp(self.logit_scale)


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
