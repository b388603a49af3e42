r"""Diffusion upsampler stage: a low-resolution image → `upsampler.scale` times larger.

Presets:
  tiny            32→64 on captioned_shapes at 64px (the step after the tiny decoder); trained
                  on 16×16 crops (a quarter of the target, as in the paper), sampled at 64×64;
                  blur conditioning augmentation; 27 DDIM steps. A few minutes on a 2-core CPU.
  karlo_64_256    the paper's / karlo's first upsampler: 64→256, 320 channels, mult 1,2,3,4,
                  3 res blocks (~730M), 64×64 crops, Gaussian-blur augmentation (kernel 3,
                  sigma 0.6), cosine schedule, 27 DDIM steps. Builds and compiles.
  paper_256_1024  the second upsampler: 256→1024, 192 channels, mult 1,1,2,2,4,4, 2 res blocks,
                  256×256 crops, BSR degradation, linear schedule, 15 DDIM steps. Builds and
                  compiles.

Run:
  python -m unclip_jax.main --config=configs/upsampler.py:tiny --workdir=runs/upsampler

Expected (tiny, ~3 min on 2 CPU cores, 500 steps): held-out 32px images upsampled to 64px keep
their background and shape colours (pixel checker ~1.0) at a PSNR of ~29.6 dB (bicubic: 32.3;
the samples carry some fine-grained noise at this length); see eval_metrics.json and the grids
in runs/upsampler/samples (bicubic row, the model's row, originals).
"""

import ml_collections

from unclip_jax import config_lib


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  c = config_lib.trainer_defaults()
  c.stage = 'upsampler'
  c.data = config_lib.data_defaults(64)   # the output (high) resolution

  c.upsampler = ml_collections.ConfigDict()
  c.upsampler.scale = 2               # low resolution = data.resolution / scale
  c.upsampler.crop_size = 16          # training crops of the target; 0 trains on whole images
  c.upsampler.degradation = 'blur'    # 'blur' (64→256 setting), 'bsr' (256→1024), 'none'

  c.model = ml_collections.ConfigDict()
  c.model.unet = ml_collections.ConfigDict(dict(
      model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
      num_head_channels=32, dropout=0.0, use_scale_shift_norm=True, resblock_updown=False,
      norm_groups=32, remat=False,
      remat_policy='full',   # with remat: 'save_projections' keeps conv/dense outputs
      patch_size=1))   # >1: space-to-depth, the finest level p times coarser

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = 'cosine'
  c.diffusion.num_steps = 1000
  c.diffusion.mean_type = 'eps'
  c.diffusion.var_type = 'learned_range'
  c.diffusion.min_snr_gamma = ml_collections.config_dict.placeholder(float)  # None: L_simple

  c.sampling = ml_collections.ConfigDict()
  c.sampling.steps = '27'
  c.sampling.sampler = 'ddim'
  # How a bare step count picks timesteps: 'guided_diffusion' (its running-sum spacing), or
  # 'unclip' (diffusers' UnCLIPScheduler; set for converted karlo stages).
  c.sampling.timesteps = 'guided_diffusion'
  c.sampling.eta = 0.0
  c.sampling.num_images = 8

  c.eval = ml_collections.ConfigDict()
  c.eval.num_examples = 128
  c.eval.batch_size = 64

  c.batch_size = 32
  c.num_train_steps = 500
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.ema.decay = 0.999
  c.log_every_steps = 100
  c.checkpoint.every_steps = 500

  if arg == 'tiny':
    # 8 channels per GroupNorm group: with 32 groups of 32 channels (instance norm) a model
    # trained on 16px crops got the absolute colours of whole 64px images wrong.
    c.model.unet.norm_groups = 4
    c.diffusion.mean_type = 'v'   # as the tiny decoder: colours are learnt much faster than eps
    # Min-SNR-5 weighting: after the job's 300 steps, upsampled held-out images keep their shape
    # in 91% of cases (bicubic 94%) and PSNR 29.1 dB, against 70% and 27.8 dB without.
    c.diffusion.min_snr_gamma = 5.0
  elif arg in ('karlo_64_256', 'paper_256_1024'):
    first = arg == 'karlo_64_256'
    c.data.resolution = 256 if first else 1024
    c.upsampler.scale = 4
    c.upsampler.crop_size = 64 if first else 256
    c.upsampler.degradation = 'blur' if first else 'bsr'
    c.dtype = 'bfloat16'
    c.model.unet.update(
        model_channels=320 if first else 192,
        channel_mult=(1, 2, 3, 4) if first else (1, 1, 2, 2, 4, 4),
        num_res_blocks=3 if first else 2, dropout=0.0, resblock_updown=True, remat=True)
    if not first:
      c.diffusion.schedule = 'linear'
      c.sampling.steps = '15'
    c.batch_size = 64 if first else 32
    c.num_train_steps = 1_000_000
    c.optim.lr = 1.2e-4
    c.optim.warmup_steps = 5000
    c.ema.decay = 0.9999
    c.checkpoint.every_steps = 5000
  else:
    raise ValueError(f"configs/upsampler.py: unknown preset {arg!r}; use 'tiny', "
                     "'karlo_64_256' or 'paper_256_1024'")
  return c
