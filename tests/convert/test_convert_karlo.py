"""A karlo-shaped diffusers UnCLIPPipeline, converted by `python -m unclip_jax.convert karlo`,
generates the same images as diffusers from the same noise.

The reference is small and random (nothing is downloaded) but has karlo's architecture: a
CLIPTextModelWithProjection, a PriorTransformer, UnCLIPTextProjModel + UNet2DConditionModel with
karlo's block types, two UNet2DModel super-resolution models and karlo's three UnCLIPSchedulers.
Both pipelines start from the same prior, decoder and super-resolution latents, and diffusers'
schedulers are fed the per-step noise our samplers draw (`samplers.step_noise`). Each stage is
compared on the reference's own inputs, and the whole chain end to end; the tolerances (and the
measured errors) are in each test.
"""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
diffusers = pytest.importorskip('diffusers')

from tests import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.helpers import tiny_clip_vocab  # pylint: disable=g-import-not-at-top,wrong-import-position
from unclip_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from unclip_jax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from unclip_jax.convert.torch_io import ConversionError  # pylint: disable=g-import-not-at-top,wrong-import-position
from unclip_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top,wrong-import-position
from unclip_jax.diffusion import schedules  # pylint: disable=g-import-not-at-top,wrong-import-position
from unclip_jax.stages import upsampler as upsampler_stage  # pylint: disable=g-import-not-at-top,wrong-import-position

CONTEXT, CLIP_DIM, TEXT_WIDTH = 16, 32, 32   # karlo projects caption states of CLIP_DIM
DECODER_RES, SUPER_RES = 16, 32
PROMPTS = ['the cat', 'a photo of the dog']


def _perturb(model, seed):
  return helpers.perturb_torch(model, seed, 0.05)


def _karlo_pipeline():
  vocab, merges = tiny_clip_vocab()
  sot, eot = vocab['<|startoftext|>'], vocab['<|endoftext|>']
  torch.manual_seed(0)
  text_encoder = _perturb(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=CONTEXT, projection_dim=CLIP_DIM,
      bos_token_id=sot, eos_token_id=eot, pad_token_id=eot)), 1)
  tokenizer = transformers.CLIPTokenizer(vocab=dict(vocab), merges=list(merges),
                                         model_max_length=CONTEXT)
  prior = _perturb(diffusers.PriorTransformer(
      num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=CLIP_DIM,
      num_embeddings=CONTEXT, additional_embeddings=4), 2)
  with torch.no_grad():   # non-trivial normalisation statistics
    prior.clip_mean.copy_(0.1 * torch.randn(1, CLIP_DIM))
    prior.clip_std.copy_(0.5 + torch.rand(1, CLIP_DIM))
  text_proj = _perturb(diffusers.pipelines.deprecated.unclip.UnCLIPTextProjModel(
      clip_extra_context_tokens=4, clip_embeddings_dim=CLIP_DIM, time_embed_dim=128,
      cross_attention_dim=32), 3)
  decoder = _perturb(diffusers.UNet2DConditionModel(
      sample_size=DECODER_RES, in_channels=3, out_channels=6, block_out_channels=(32, 64),
      layers_per_block=1, norm_num_groups=8,
      down_block_types=('ResnetDownsampleBlock2D', 'SimpleCrossAttnDownBlock2D'),
      mid_block_type='UNetMidBlock2DSimpleCrossAttn',
      up_block_types=('SimpleCrossAttnUpBlock2D', 'ResnetUpsampleBlock2D'),
      attention_head_dim=16, cross_attention_dim=32, class_embed_type='identity',
      resnet_time_scale_shift='scale_shift'), 4)
  super_res = [_perturb(diffusers.UNet2DModel(
      sample_size=SUPER_RES, in_channels=6, out_channels=3, block_out_channels=(32, 64),
      layers_per_block=1, norm_num_groups=8,
      down_block_types=('ResnetDownsampleBlock2D', 'ResnetDownsampleBlock2D'),
      up_block_types=('ResnetUpsampleBlock2D', 'ResnetUpsampleBlock2D'),
      resnet_time_scale_shift='scale_shift', add_attention=False), seed) for seed in (5, 6)]
  return diffusers.UnCLIPPipeline(
      prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tokenizer,
      text_proj=text_proj, super_res_first=super_res[0], super_res_last=super_res[1],
      prior_scheduler=diffusers.UnCLIPScheduler(variance_type='fixed_small_log',
                                                prediction_type='sample', clip_sample_range=5.0),
      decoder_scheduler=diffusers.UnCLIPScheduler(variance_type='learned_range',
                                                  prediction_type='epsilon'),
      super_res_scheduler=diffusers.UnCLIPScheduler(variance_type='fixed_small_log',
                                                    prediction_type='epsilon'))


@pytest.fixture(scope='module')
def karlo(tmp_path_factory):
  """(diffusers pipeline, its folder, our converted run folder)."""
  root = tmp_path_factory.mktemp('karlo')
  reference = _karlo_pipeline()
  src, dst = str(root / 'diffusers'), str(root / 'converted')
  reference.save_pretrained(src)
  assert convert_cli.main(['karlo', src, dst]) == 0
  return reference, src, dst


STEPS = {'prior': 5, 'decoder': 6, 'super_res': 4}
SEEDS = {'prior': 11, 'decoder': 12, 'super_res': 13}


def _feed_our_step_noise(monkeypatch, batch):
  """Makes diffusers' UnCLIPScheduler add, at each step, the noise our sampler adds there."""
  shapes = {(batch, CLIP_DIM): 'prior', (batch, 3, DECODER_RES, DECODER_RES): 'decoder',
            (batch, 3, SUPER_RES, SUPER_RES): 'super_res'}
  calls = {name: 0 for name in STEPS}

  def randn_tensor(shape, generator=None, device=None, dtype=None, **kwargs):
    del generator, device, kwargs
    name = shapes[tuple(shape)]
    # diffusers' i-th step (t > 0) is our respaced index n - 1 - i.
    index = STEPS[name] - 1 - calls[name]
    calls[name] += 1
    ours_shape = (shape[0],) + tuple(shape[2:]) + (shape[1],) if len(shape) == 4 else shape
    noise = np.asarray(samplers.step_noise(jax.random.PRNGKey(SEEDS[name]), index, ours_shape))
    if len(shape) == 4:
      noise = noise.transpose(0, 3, 1, 2)
    return torch.tensor(noise, dtype=dtype)

  from diffusers.schedulers import scheduling_unclip  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(scheduling_unclip, 'randn_tensor', randn_tensor)
  return calls


def _use_our_float64_schedule(reference):
  """diffusers builds its cosine schedule in float32, which moves 1 - alphas_cumprod near t = 0
  by ~1e-3 relative; to compare the pipelines rather than that rounding, its schedulers get our
  float64 schedule (as in tests/diffusion/test_diffusers_parity.py)."""
  betas = torch.tensor(schedules.cosine_betas(1000), dtype=torch.float64)
  for scheduler in (reference.prior_scheduler, reference.decoder_scheduler,
                    reference.super_res_scheduler):
    scheduler.betas, scheduler.alphas = betas, 1.0 - betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)


@pytest.fixture(scope='module')
def both(karlo):
  """Both pipelines from the same latents and step noise: (reference outputs, ours, latents)."""
  reference, _, dst = karlo
  _use_our_float64_schedule(reference)
  b = len(PROMPTS)
  rng = np.random.RandomState(0)
  latents = {'prior': rng.randn(b, CLIP_DIM).astype(np.float32),
             'decoder': rng.randn(b, DECODER_RES, DECODER_RES, 3).astype(np.float32),
             'super_res': rng.randn(b, SUPER_RES, SUPER_RES, 3).astype(np.float32)}
  nchw = lambda x: torch.tensor(x.transpose(0, 3, 1, 2))
  seen = {}
  text_proj, decoder_step = reference.text_proj.forward, reference.decoder_scheduler.step

  def see_embeddings(*args, **kwargs):
    seen['image_embeddings'] = kwargs['image_embeddings'].numpy().copy()
    return text_proj(*args, **kwargs)

  def see_decoder(*args, **kwargs):
    out = decoder_step(*args, **kwargs)
    seen['decoder'] = np.clip(out.prev_sample.numpy().transpose(0, 2, 3, 1), -1, 1)
    return out

  with pytest.MonkeyPatch.context() as patch:
    calls = _feed_our_step_noise(patch, b)
    patch.setattr(reference.text_proj, 'forward', see_embeddings)
    patch.setattr(reference.decoder_scheduler, 'step', see_decoder)
    with torch.no_grad():
      seen['images'] = reference(
          PROMPTS, prior_num_inference_steps=STEPS['prior'],
          decoder_num_inference_steps=STEPS['decoder'],
          super_res_num_inference_steps=STEPS['super_res'],
          prior_latents=torch.tensor(latents['prior']), decoder_latents=nchw(latents['decoder']),
          super_res_latents=nchw(latents['super_res']), prior_guidance_scale=4.0,
          decoder_guidance_scale=8.0, output_type='np').images
  assert calls == {name: n - 1 for name, n in STEPS.items()}   # every noisy step was fed

  pipe = pipeline_lib.UnclipPipeline.from_run(dst)
  ours = pipe.text_to_image(
      PROMPTS, prior=_options('prior'), decoder=_options('decoder'),
      upsamplers=_options('super_res'),
      noise={'prior': latents['prior'], 'decoder': latents['decoder'],
             'upsamplers': [latents['super_res']]})
  return seen, ours, latents, pipe


def _options(stage):
  return pipeline_lib.StageOptions(steps=str(STEPS[stage]), seed=SEEDS[stage])


def _rel(ours, ref):
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_prior_draws_the_same_image_embeddings(both):
  seen, ours, _, _ = both
  assert _rel(ours.image_embeddings, seen['image_embeddings']) <= 1e-4   # measured 1.6e-6


def test_decoder_draws_the_same_images_from_the_same_embeddings(both):
  """Our decoder given diffusers' image embeddings. Guidance 8 and the eps -> x0 conversion at
  t = 999 (x 1/sqrt(alpha_bar) ~ 3e4, then clipped) amplify float32 round-off: max 2e-4."""
  seen, _, latents, pipe = both
  decoded = pipe.decode(seen['image_embeddings'], prompts=PROMPTS, decoder=_options('decoder'),
                        noise={'decoder': latents['decoder']}, upsamplers=_options('super_res'))
  assert np.std(seen['decoder']) > 0.1                               # not a constant image
  np.testing.assert_allclose(decoded.stage_images[0], seen['decoder'], atol=2e-3, rtol=0)


def test_super_resolution_upsamples_the_same_from_the_same_image(both):
  """Our two super-resolution models given diffusers' decoder output: mean |diff| 1.5e-5, max
  1.8e-3 (a few elements amplified at t = 999, as above). Without the switch to super_res_last
  at the last step the mean difference is 1.7e-3."""
  seen, _, latents, pipe = both
  stage, params = pipe.upsamplers[0]
  config = ml_collections.ConfigDict(stage.config.to_dict())
  config.sampling.steps = str(STEPS['super_res'])
  stage = upsampler_stage.Stage(config)
  images = stage.upsample_images(params, seen['decoder'], jax.random.PRNGKey(SEEDS['super_res']),
                                 latents['super_res'])
  diff = np.abs(np.clip(np.asarray(images) * 0.5 + 0.5, 0, 1) - seen['images'])
  assert diff.mean() <= 1e-4 and diff.max() <= 1e-2, (diff.mean(), diff.max())


def test_whole_pipeline_generates_the_same_images(both):
  """Text to 32px images through all three stages: mean |diff| 1.9e-4, max 1.5e-2 on [0, 1]
  (the decoder's amplified round-off, amplified again by super-resolution)."""
  seen, ours, _, _ = both
  images = np.clip(ours.images * 0.5 + 0.5, 0.0, 1.0)
  assert images.shape == seen['images'].shape == (len(PROMPTS), SUPER_RES, SUPER_RES, 3)
  assert np.std(seen['images']) > 0.05                           # not a constant image
  diff = np.abs(images - seen['images'])
  assert diff.mean() <= 1e-3 and diff.max() <= 5e-2, (diff.mean(), diff.max())


def test_scales_at_most_1_turn_guidance_off_as_in_diffusers(karlo, both):
  """diffusers guides only when a scale is above 1: at prior 0.5 / decoder 1 it draws from the
  conditional prior alone, and so does our converted pipeline (the same image embeddings from
  the same noise; guided at 0.5 they would move away from the prompt). With the decoder's scale
  above 1 both pipelines guide the prior at 0.5."""
  reference, _, _ = karlo
  _, _, latents, pipe = both
  seen, text_proj = {}, reference.text_proj.forward

  def see_embeddings(*args, **kwargs):
    seen['image_embeddings'] = kwargs['image_embeddings'].numpy().copy()
    return text_proj(*args, **kwargs)
  with pytest.MonkeyPatch.context() as patch:
    _feed_our_step_noise(patch, len(PROMPTS))
    patch.setattr(reference.text_proj, 'forward', see_embeddings)
    with torch.no_grad():
      reference(PROMPTS, prior_num_inference_steps=STEPS['prior'],
                decoder_num_inference_steps=STEPS['decoder'],
                super_res_num_inference_steps=STEPS['super_res'],
                prior_latents=torch.tensor(latents['prior']),
                decoder_latents=torch.tensor(latents['decoder'].transpose(0, 3, 1, 2)),
                super_res_latents=torch.tensor(latents['super_res'].transpose(0, 3, 1, 2)),
                prior_guidance_scale=0.5, decoder_guidance_scale=1.0, output_type='np')
  low = lambda stage, scale: pipeline_lib.StageOptions(steps=str(STEPS[stage]),
                                                       seed=SEEDS[stage], guidance_scale=scale)
  ours = pipe.text_to_image(PROMPTS, prior=low('prior', 0.5), decoder=low('decoder', 1.0),
                            upsamplers=_options('super_res'),
                            noise={'prior': latents['prior'], 'decoder': latents['decoder'],
                                   'upsamplers': [latents['super_res']]})
  assert _rel(ours.image_embeddings, seen['image_embeddings']) <= 1e-4
  options = pipe._diffusers_guidance(prior=low('prior', 0.5),   # pylint: disable=protected-access
                                     decoder=low('decoder', 2.0))
  assert [o.guidance_scale for o in options] == [0.5, 2.0]


def test_converted_folder_layout_and_settings(karlo):
  _, src, dst = karlo
  assert sorted(os.listdir(dst)) == ['clip', 'converted_from.json', 'decoder', 'prior',
                                     'upsampler']
  pipe = pipeline_lib.UnclipPipeline.from_run(dst)
  prior, decoder = pipe._require('prior')[0], pipe._require('decoder')[0]  # pylint: disable=protected-access
  upsampler = pipe.upsamplers[0][0]
  assert (prior.config.sampling.steps, prior.config.sampling.guidance_scale) == ('25', 4.0)
  assert (decoder.config.sampling.steps, decoder.config.sampling.guidance_scale) == ('25', 8.0)
  assert upsampler.config.sampling.steps == '7' and upsampler.last_step_model
  assert (upsampler.low_res, upsampler.high_res) == (DECODER_RES, SUPER_RES)
  # The tokenizer built from the converted folder gives the folder's own tokenizer's ids.
  hf = transformers.CLIPTokenizer.from_pretrained(os.path.join(src, 'tokenizer'))
  for text in PROMPTS + ['', 'The DOG, the cat!']:
    ids = hf(text, padding='max_length', max_length=CONTEXT, truncation=True)['input_ids']
    ours = pipe.clip.tokenizer([text])[0]
    n = len(hf(text)['input_ids'])
    np.testing.assert_array_equal(ours[:n], ids[:n])


def test_command_line_errors(karlo, tmp_path):
  _, src, dst = karlo
  run = lambda *args: subprocess.run([sys.executable, '-m', 'unclip_jax.convert', *args],
                                     capture_output=True, text=True, check=False)
  wrong_kind = run('dalle', src, str(tmp_path / 'out'))
  assert wrong_kind.returncode == 2 and "unknown kind 'dalle'" in wrong_kind.stderr
  with pytest.raises(ConversionError, match='missing text_proj'):
    broken = tmp_path / 'broken'
    os.makedirs(broken)
    for part in os.listdir(src):
      if part != 'text_proj':
        os.symlink(os.path.join(src, part), broken / part)
    convert_cli.convert('karlo', str(broken), str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out') and not os.path.exists(tmp_path / 'out.partial')
  with pytest.raises(ConversionError, match='exists and is not empty'):
    convert_cli.convert('karlo', src, dst)
  with pytest.raises(ConversionError, match='does not exist'):
    convert_cli.convert('karlo', str(tmp_path / 'nothing'), str(tmp_path / 'out'))
  with open(os.path.join(dst, 'converted_from.json')) as f:
    assert json.load(f)['kind'] == 'karlo'


def test_fine_tuning_the_converted_decoder_on_shards(karlo, data_dir, tmp_path):
  """`config.init_from` starts the decoder from karlo's converted parameters: the state holds
  them exactly at step 0, a shape mismatch is refused naming the tensor, and fine-tuning on
  webdataset shards lowers the loss on them (the trainer's own use of `init_from` is tested in
  tests/test_train.py). karlo's CLIP has no image tower, so a random one of its width joins the
  converted text tower to embed the images."""
  from unclip_jax import train  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import clip as clip_stage  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import decoder as decoder_stage  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import export  # pylint: disable=g-import-not-at-top
  from tests.data import fixtures  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  _, _, dst = karlo
  text_clip = clip_stage.load_frozen(os.path.join(dst, 'clip'))
  clip_config = ml_collections.ConfigDict(text_clip.config.to_dict())
  clip_config.model.vision = ml_collections.ConfigDict(dict(
      image_size=DECODER_RES, patch_size=8, width=32, depth=1, num_heads=2, mlp_ratio=2.0,
      activation='quick_gelu', remat=False, layer_norm_eps=1e-5, pixel_mean=None,
      pixel_std=None))
  clip_stage.resolve_tokenizer_path(clip_config, os.path.join(dst, 'clip', 'export'))
  both = clip_stage.random_clip(clip_config, seed=3)
  clip = clip_stage.FrozenClip(both.stage, dict(both.params,
                                                text_tower=text_clip.params['text_tower']))

  shapes = helpers.tiny_clip_config(data_dir).data
  train_pattern = fixtures.write_shapes_shards(
      fixtures.shapes_examples(shapes, 'train', 32), str(tmp_path), 'train-', 16)
  config, converted = export.load_export(os.path.join(dst, 'decoder'))
  config.update({'init_from': os.path.join(dst, 'decoder'), 'batch_size': 8, 'seed': 0,
                 'num_train_steps': 16})
  config.data.update(source='webdataset', paths=train_pattern, shuffle_buffer=8,
                     embeddings_dir=None)
  config.optim.update(lr=2e-3, warmup_steps=3)
  stage = decoder_stage.Stage(config, clip=clip)
  batches = helpers.take_batches(stage, config, 16)

  mesh = helpers.mesh((1, 1, 1), 1)
  tx = train.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(train.logical_rules(config)):
    fresh, shardings = train.create_train_state(stage, config, mesh, tx)
    loaded = train.init_from_export(config, jax.eval_shape(lambda: fresh.params))
    state = train.start_from(fresh, loaded, shardings)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(converted)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))     # step 0: karlo's, exactly
    bad = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct((x.shape[0] + 1,) + x.shape[1:], x.dtype)
        if 'conv_out' in jax.tree_util.keystr(p) and x.ndim == 1 else x,
        jax.eval_shape(lambda: fresh.params))
    with pytest.raises(ValueError, match=r"config.init_from: .*conv_out.* has shape \(6,\) in "
                                         r".* but \(7,\) in this model"):
      train.init_from_export(config, bad)
    step = train.compile_train_step(stage, config, mesh, tx, shardings)
    constants = train.stage_constants(stage, mesh)
    losses = []
    for batch in batches:
      state, metrics = step(state, train.make_global_batch(batch, mesh), constants)
      losses.append(float(metrics['loss']))
  # The first steps' loss (karlo's random-shaped weights on these images) against the last's,
  # 4 batches each, 16 steps. Measured: 1.31 → 0.75.
  assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
