r"""The whole system: CLIP, then the prior and decoder on the frozen CLIP, then an upsampler,
then text→image samples for held-out prompts, scored from pixels.

Presets:
  tiny  the README's main job on a 2-core CPU: 32px CLIP, prior and decoder on precomputed CLIP
        embeddings, a 32→64 upsampler; 64 held-out prompts sampled at 64px.
  gpu   the same job larger for one GPU, sized for about 10 minutes on an H100 (not yet measured
        on one): 64px decoder with 96 channels, 64→128 upsampler, longer runs, 256 prompts.

Run:
  python -m unclip_jax.train_all --config=configs/unclip.py:tiny --workdir=runs/unclip
  # any stage's field: --config.decoder.num_train_steps=1000 --config.prior.sampling.steps=16

Writes runs/unclip/{clip,prior,decoder,upsampler}/ (each a normal stage run: checkpoints,
TensorBoard logs, eval_metrics.json, export/), embeddings/ (the CLIP's, shared by the prior and
decoder), sample/: grid.png (each prompt above its image), images/, readings.tsv (each image's
prompt and what the checker reads in it) and TensorBoard logs, and report.json: the fraction of
generated images whose shape colour, background colour and shape a pixel checker
(unclip_jax.data.shape_checker) reads as the prompt says, next to the same reading of the
dataset's own images, how each shape asked for was read, and each stage's time and evaluation.
Running it again resumes; finished stages are skipped. Each stage records what it was trained
on (its training fields and, for the prior and decoder, the CLIP's fingerprint) in
STAGE/inputs.json; a stage whose inputs changed since (a retrained CLIP, another data path or
learning rate) is retrained, its old run moved to stale/ (config.stale_stages: 'retrain',
'refuse' to stop with a message instead, 'keep' to use it anyway).

Expected (tiny, about 14 min on 2 CPU cores including the dataset; machines differ by up to a
fifth): of 128 generated images, background colour and shape colour 1.00 as prompted, shape
0.88–0.92 (chance 0.2; the thinnest margin, it moves between runs), size 0.94–1.00 and position
0.85–0.93 where the prompt asks for them (chance 0.33, 0.11); prompts with unseen combinations
were within 0.03 of the others in one run and 0.09 lower on shape in another (dataset images:
1.00 on all); see the README. The upsampler (1500 steps, trained alongside the decoder)
keeps the decoder's shapes (32 of 32).
"""

import ml_collections

from unclip_jax import config_lib

# The stage configs beside this file (also where the package installs them).
clip_configs = config_lib.sibling_config(__file__, 'clip')
decoder_configs = config_lib.sibling_config(__file__, 'decoder')
prior_configs = config_lib.sibling_config(__file__, 'prior')
upsampler_configs = config_lib.sibling_config(__file__, 'upsampler')

STAGES = ('clip', 'prior', 'decoder', 'upsampler')


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.clip = clip_configs.get_config('tiny')
  c.prior = prior_configs.get_config('tiny')
  c.decoder = decoder_configs.get_config('tiny')
  c.upsampler = upsampler_configs.get_config('tiny')
  # The job's data, for every stage (each keeps its resolution): fields left None keep the
  # stages' own (the built-in data); e.g. --config.data.source=webdataset
  # --config.data.paths='DIR/{00000..00009}.tar' --config.data.eval_paths='DIR/eval-00000.tar'.
  c.data = config_lib.job_data()
  c.precompute_embeddings = True     # the prior and decoder read the CLIP's embeddings from disk
  # The upsampler (it needs only the dataset) trains in a second thread alongside the decoder.
  c.overlap_upsampler = False
  # A finished or partly trained stage whose inputs changed: 'retrain' | 'refuse' | 'keep'.
  c.stale_stages = 'retrain'

  c.sample = ml_collections.ConfigDict()
  c.sample.num_prompts = 128         # held-out captions sampled and scored (half of them
  c.sample.batch_size = 64           # asking for unseen combinations)
  c.sample.seed = 0
  c.sample.grid_columns = 8

  if arg == 'tiny':
    # Lengths chosen to fit 15 minutes on 2 CPU cores, most of it for the decoder.
    # A CLIP whose embedding holds the shape's position (the decoder, which sees the embedding
    # as a map, then places shapes where it says): half of each batch are counterfactuals (the
    # same scene at another position or size), fixed sine-cosine patch positions, and half the
    # preset's learning rate, which is too high with them. 800 steps at batch 128: zero-shot
    # position 0.87 (0.96 with the other attributes given; 0.11 without the switches).
    c.clip.num_train_steps = 800
    c.clip.optim.lr = 1e-3
    c.clip.data.counterfactual_negatives = True
    c.clip.model.vision.posemb = 'sincos2d'
    c.prior.num_train_steps = 300
    c.prior.batch_size = 64               # half the time of 128 (76 s vs 121 s), as good here
    c.decoder.num_train_steps = 6000      # batch 16: 96k images; generated shapes 0.88-0.92
                                          # right at 5200 steps (0.80 at 3900)
    # On 2 cores neither the decoder's step nor the upsampler's uses both fully (the decoder's is
    # 1.35x faster on 2 cores than on one): side by side the decoder's step takes 0.17 s instead
    # of 0.12 and the upsampler's 0.127 s instead of 0.094, so the two together do ~1.45x the
    # work, and the upsampler gets 1500 steps for less of the job's time than 600 took alone.
    c.overlap_upsampler = True
    # Batch 16 for twice the steps (a step's cost is proportional to its batch on CPU): PSNR
    # 30.6 dB against 29.3 dB at 300 x 32.
    c.upsampler.batch_size = 16
    # 1500 steps: held-out images (256) downsampled and upsampled keep their shape in all cases
    # (PSNR 33.5 dB), against 0.96 (30.5 dB) after 600 steps and 0.93 (32.2 dB) for bicubic;
    # through the whole chain (the decoder's 32px images of 256 prompts x 2 seeds, 0.81 of them
    # with the prompted shape) 0.80 of the shapes at 64px against 0.79 after 600 steps and 0.77
    # for bicubic.
    c.upsampler.num_train_steps = 1500
    c.upsampler.data.num_train = 3000     # 16 crops a step; the 64px data renders slowly
    c.upsampler.sampling.steps = '10'   # reads as well as 27 steps here, at 2.7x less time
    for name in ('prior', 'decoder', 'upsampler'):
      c[name].eval.num_examples = 64
      c[name].eval.batch_size = 32
    c.upsampler.eval.num_examples = 32    # its PSNR and shape check; 64 cost 10 s more
    c.decoder.sampling.num_images = 8     # the stages' own sample grids
    c.upsampler.sampling.num_images = 8
  elif arg == 'gpu':
    c.clip.num_train_steps = 3000
    c.clip.batch_size = 512
    c.prior.num_train_steps = 3000
    c.decoder.data.resolution = 64
    c.decoder.model.unet.update(model_channels=96, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                                attention_resolutions=(4, 8), num_head_channels=32,
                                patch_size=1)   # full resolution: the GPU affords it
    c.decoder.model.context_width = 256
    c.decoder.batch_size = 128
    c.decoder.num_train_steps = 6000
    c.decoder.dtype = 'bfloat16'
    c.upsampler.data.resolution = 128
    c.upsampler.upsampler.crop_size = 32
    c.upsampler.model.unet.update(model_channels=64, channel_mult=(1, 2, 4))
    c.upsampler.batch_size = 64
    c.upsampler.num_train_steps = 4000
    c.upsampler.dtype = 'bfloat16'
    c.sample.num_prompts = 256
    c.sample.batch_size = 128
    c.sample.grid_columns = 16
  else:
    raise ValueError(f"unknown preset {arg!r}; use 'tiny' or 'gpu'")
  return c
