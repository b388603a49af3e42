r"""CLIP stage: contrastive text/image towers.

Presets (the argument after the colon):
  tiny     32x32 captioned_shapes, ViT 8x8 patches, word tokenizer; 2-core CPU in a few minutes.
  vit_b16  OpenAI CLIP ViT-B/16 sizes (image 224, width 768/12 layers; text 512/12, 77 tokens).
  vit_l14  OpenAI CLIP ViT-L/14 sizes (image 224, width 1024/24 layers; text 768/12, 768-d).

Run:
  python -m unclip_jax.main --config=configs/clip.py:tiny --workdir=runs/clip
  # any field: --config.optim.lr=3e-4 --config.mesh.shape='(1,2,4)'

Expected (tiny, 1 CPU process, ~4 min on 2 cores): held-out zero-shot accuracy on the built-in
data around 1.0 for colour and background and >0.9 for shape (chance: 1/8, 1/8, 1/4); see the
run's eval_metrics.json.
Position is what a CLIP learns last here: random batches seldom hold two captions that differ
only by it. Measured on 2 cores (zero-shot accuracy, prompts averaged over the other attributes;
in brackets with the image's other attributes given):
  tiny as it is, 1200 steps, 5 min: shape 0.985, size 0.64, position 0.11 (chance 0.11)
  --config.data.counterfactual_negatives=True --config.model.vision.posemb=sincos2d,
    1200 steps, 6 min: shape 0.79 (0.99), size 0.61 (0.97), position 0.33 (0.41)
    3000 steps (--config.num_train_steps=3000), 14 min: shape 0.91 (1.00), size 0.76 (1.00),
    position 0.94 (1.00); counterfactual negatives alone at 1200 steps: position 0.15 (0.23)
  the same two switches at --config.optim.lr=1e-3 (the preset's 2e-3 is too high for them;
    4e-3: position 0.12 at 1200 steps): 1200 steps, 4 min: shape 0.86, size 0.76 (0.99),
    position 0.98 (1.00); 800 steps, 3 min: shape 0.79, size 0.67 (0.97), position 0.87 (0.96)
    (the whole-system job's CLIP, configs/unclip.py)
On your own data (see the README), e.g. img2dataset's webdataset shards:
  python -m unclip_jax.main --config=configs/clip.py:tiny --workdir=runs/clip_cc3m \
      --config.data.source=webdataset --config.data.paths='/data/cc3m/{00000..00331}.tar' \
      --config.data.eval_paths='/data/cc3m_val/{00000..00003}.tar'
The tokenizer then is CLIP's BPE (the tiny text tower's vocabulary grows to its 49408 ids): its
vocabulary comes from --config.tokenizer.path (bpe_simple_vocab_16e6.txt.gz, merges.txt,
tokenizer.json or a Hugging Face tokenizer folder), else from an installed open_clip. The eval
reports retrieval recall on the held-out pairs, and zero-shot accuracy where the data has a class
(--config.data.label_key=... --config.data.class_names=classes.json).
"""

import ml_collections

from unclip_jax import config_lib


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  c = config_lib.trainer_defaults()
  c.stage = 'clip'
  # Shared by data and model, so that overriding one on the command line changes both.
  resolution = ml_collections.FieldReference(32)
  context_length = ml_collections.FieldReference(24)

  c.data = config_lib.data_defaults(resolution)
  # The built-in data only: half of each training batch are counterfactuals of the other half
  # (the same scene at another position or size, captioned to name it), so that the contrastive
  # loss must read position and size, which random batches seldom make matter.
  c.data.counterfactual_negatives = False

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = 'auto'     # 'words' for the built-in data, 'clip_bpe' for any other
  c.tokenizer.path = ml_collections.config_dict.placeholder(str)
  c.tokenizer.context_length = context_length

  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 64
  # pool: 'eot' pools at the first eot_id, 'argmax' at the largest id (OpenAI / open_clip).
  # pixel_mean / pixel_std: None feeds the [-1, 1] pixels as they are; 3 values each map them
  # to [0, 1] and normalise per channel (converted OpenAI CLIPs). Set by unclip_jax.convert.
  # model.text or model.vision may be None in a converted one-tower CLIP.
  c.model.text = ml_collections.ConfigDict(dict(
      vocab_size=128, context_length=context_length, width=128, depth=3, num_heads=4, eot_id=2,
      mlp_ratio=4.0, activation='quick_gelu', remat=False, pool='eot', layer_norm_eps=1e-5))
  c.model.vision = ml_collections.ConfigDict(dict(
      image_size=resolution, patch_size=8, width=128, depth=4, num_heads=4,
      mlp_ratio=4.0, activation='quick_gelu', remat=False, layer_norm_eps=1e-5,
      pixel_mean=None, pixel_std=None, posemb='learn'))

  c.eval = ml_collections.ConfigDict()
  c.eval.num_examples = 1000
  c.eval.batch_size = 250
  # Zero-shot prompts for data with classes (config.data.label_key): '{}' takes the class name;
  # the class embedding averages them. The built-in data is also read by its own caption
  # template, per attribute.
  c.eval.zero_shot_templates = ('a photo of a {}.', 'a picture of a {}.', 'an image of a {}.',
                                'a {}.')

  c.batch_size = 128
  c.num_train_steps = 1200
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.05
  c.log_every_steps = 100
  c.checkpoint.every_steps = 600

  if arg == 'tiny':
    pass
  elif arg in ('vit_b16', 'vit_l14'):
    big = arg == 'vit_l14'
    c.dtype = 'bfloat16'
    resolution.set(224)
    context_length.set(77)
    c.tokenizer.kind = 'clip_bpe'
    c.model.embed_dim = 768 if big else 512
    c.model.text.update(vocab_size=49408, width=768 if big else 512,
                        depth=12, num_heads=12 if big else 8, eot_id=49407)
    c.model.vision.update(patch_size=14 if big else 16,
                          width=1024 if big else 768, depth=24 if big else 12,
                          num_heads=16 if big else 12)
    c.batch_size = 512
    c.num_train_steps = 100_000
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.2
    c.checkpoint.every_steps = 2000
  else:
    raise ValueError(f"configs/clip.py: unknown preset {arg!r}; use 'tiny', 'vit_b16' or "
                     "'vit_l14'")
  return c
