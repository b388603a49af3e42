"""The CLIP score of generated images against their prompts: 100 × cosine of the CLIP image and
text embeddings, clipped at 0 (Hessel et al. 2021's CLIPScore without its 2.5 weight, as
text-to-image papers report it), under any frozen CLIP: the job's own or a converted one
(`unclip_jax.stages.clip.load_frozen`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from unclip_jax.stages import clip as clip_stage

pairwise = clip_stage.clip_score   # [N] scores of embedding pairs


def clip_scores(clip, images: np.ndarray, prompts: Sequence[str],
                batch_size: int = 64) -> np.ndarray:
  """Scores [N] of images [N, H, W, 3] in [-1, 1] (resized to the CLIP's resolution) against
  their N prompts, embedded `batch_size` at a time."""
  if len(images) != len(prompts):
    raise ValueError(f'{len(images)} images for {len(prompts)} prompts')
  return pairwise(np.asarray(clip.embed_images(images, batch_size)),
                  np.asarray(clip.embed_texts(list(prompts))))
