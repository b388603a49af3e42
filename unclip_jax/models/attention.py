"""The one attention helper every model calls.

It wraps `jax.nn.dot_product_attention`, so on GPU the cuDNN flash kernel is used where it applies
(bfloat16/float16, supported head sizes) and XLA's fused implementation elsewhere.
"""

from typing import Optional

import jax
import jax.numpy as jnp


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
  if q.dtype in (jnp.bfloat16, jnp.float16) and mask is None and jax.default_backend() == 'gpu':
    try:
      return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation='cudnn')
    except Exception:  # Shapes cuDNN does not support: fall back to XLA below.
      pass
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                      implementation='xla')
