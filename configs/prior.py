r"""Diffusion prior stage: CLIP text embedding (+ caption tokens) → CLIP image embedding.

Presets:
  tiny   on the tiny CLIP's 64-d embeddings; width 128, 4 layers, 25 sampling steps; 2-core CPU in a few minutes.
  karlo  kakaobrain's karlo prior sizes: width 2048, 20 layers, 32 heads, 77 tokens, 768-d
         CLIP ViT-L/14 embeddings (~1B parameters). Builds and compiles; train on accelerators.

Run (after the CLIP stage):
  python -m unclip_jax.main --config=configs/clip.py:tiny --workdir=runs/clip
  python -m unclip_jax.main --config=configs/prior.py:tiny --workdir=runs/prior \
      --config.clip.workdir=runs/clip

Expected (tiny): on held-out captions the sampled image embeddings are closer to the true image
embeddings (cosine ~0.85) than the caption's text embedding is (~0.3), and classify the held-out
images' colour/background/shape with the CLIP zero-shot classifier nearly as well as the true
image embeddings do; see eval_metrics.json.
"""

import ml_collections

from unclip_jax import config_lib


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  c = config_lib.trainer_defaults()
  c.stage = 'prior'

  c.clip = config_lib.frozen_clip()
  c.data = config_lib.data_defaults(32)   # must match the CLIP's image size

  c.model = ml_collections.ConfigDict(dict(
      width=128, depth=4, num_heads=4, mlp_ratio=4.0, activation='gelu', remat=False,
      remat_policy='full',   # with remat: 'save_projections' keeps the dense outputs
      scan=False))
  # Unconditional caption for guidance: 'learned' (null embedding + tokens, ours) or
  # 'empty_prompt' (the empty prompt's CLIP encodings and mask: karlo; converted priors).
  c.model.null_caption = 'learned'

  c.prior = ml_collections.ConfigDict()
  c.prior.text_drop_prob = 0.1       # classifier-free guidance: caption dropped 10% (paper)
  c.prior.normalization = 'stats'    # 'stats': per-dim mean/std of training image embeddings
  c.prior.embedding_scale = ml_collections.config_dict.placeholder(float)  # for 'scale'
  c.prior.stats_examples = 4096

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = 'cosine'
  c.diffusion.num_steps = 1000
  c.diffusion.mean_type = 'x0'       # the paper's prior predicts the clean embedding
  c.diffusion.var_type = 'fixed_small'

  c.sampling = ml_collections.ConfigDict()
  c.sampling.steps = '64'            # respaced steps (paper 64, karlo 25)
  c.sampling.sampler = 'ddpm'        # or 'ddim'
  # How a bare step count picks timesteps: 'guided_diffusion' (its running-sum spacing), or
  # 'unclip' (diffusers' UnCLIPScheduler; set for converted karlo stages).
  c.sampling.timesteps = 'guided_diffusion'
  c.sampling.eta = 0.0
  c.sampling.guidance_scale = 2.0
  # True (converted karlo stages): as diffusers' pipelines, no guidance when the prior's and
  # decoder's scales are at most 1 (variations: the decoder's); False: any scale guides.
  c.sampling.diffusers_guidance = False
  c.sampling.num_candidates = 2      # draw 2, keep the one with the larger dot with the text
  c.sampling.clip_range = 10.0       # clip predicted x0 (normalised space); None: no clipping

  c.eval = ml_collections.ConfigDict()
  c.eval.num_examples = 500
  c.eval.batch_size = 250

  c.batch_size = 128
  c.num_train_steps = 1000
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.01
  c.optim.b2 = 0.99
  c.ema.decay = 0.999
  c.log_every_steps = 100
  c.checkpoint.every_steps = 500

  if arg == 'tiny':
    c.sampling.steps = '25'
  elif arg == 'karlo':
    c.clip.preset = 'vit_l14'
    c.data.resolution = 224
    c.dtype = 'bfloat16'
    c.model.update(width=2048, depth=20, num_heads=32, remat=True, scan=True)
    c.sampling.steps = '25'
    c.sampling.guidance_scale = 4.0
    c.sampling.clip_range = 5.0      # karlo's prior scheduler: clip_sample_range 5
    c.batch_size = 256
    c.num_train_steps = 500_000
    c.optim.lr = 1.1e-4
    c.optim.weight_decay = 6.0e-2
    c.optim.warmup_steps = 2000
    c.ema.decay = 0.9999
    c.checkpoint.every_steps = 5000
  else:
    raise ValueError(f"configs/prior.py: unknown preset {arg!r}; use 'tiny' or 'karlo'")
  return c
