"""The text→image pipeline on tiny untrained checkpoints saved as exports: loading, shapes,
determinism by seed, supplied noise, per-stage options, variations, interpolation, text diffs,
bad prompts and inputs."""

import os

import numpy as np
import pytest
from PIL import Image

from unclip_jax import pipeline as pipeline_lib

B = 2


@pytest.fixture(scope='module')
def pipe(untrained_run):
  return pipeline_lib.UnclipPipeline.from_run(untrained_run)


PROMPTS = ['a red circle on a blue background', 'a small green star at the top left']


def test_text_to_image_shapes_and_stages(pipe):
  progress = []
  out = pipe.text_to_image(PROMPTS, seed=0, on_stage=lambda name, s: progress.append(name))
  assert progress == ['prior', 'decoder', 'upsampler_0']
  assert out.images.shape == (B, 32, 32, 3) and pipe.resolution == 32
  assert [x.shape for x in out.stage_images] == [(B, 16, 16, 3), (B, 32, 32, 3)]
  assert np.all(np.abs(out.images) <= 1.0) and np.isfinite(out.images).all()
  assert out.image_embeddings.shape == (B, 32)
  np.testing.assert_allclose(np.linalg.norm(out.image_embeddings, axis=-1), 1.0, atol=1e-4)
  assert out.prior_scores.shape == (B, 2)
  # The prior kept the candidate with the larger dot product with the text embedding.
  chosen = np.sum(out.image_embeddings * out.text_embeddings, -1)
  np.testing.assert_allclose(chosen, out.prior_scores.max(1), atol=1e-4)
  assert set(out.seconds) == {'prior', 'decoder', 'upsampler_0'}


def test_same_seed_same_images_other_seed_other_images(pipe):
  a = pipe.text_to_image(PROMPTS, seed=5)
  b = pipe.text_to_image(PROMPTS, seed=5)
  c = pipe.text_to_image(PROMPTS, seed=6)
  np.testing.assert_array_equal(a.images, b.images)
  assert np.abs(a.images - c.images).max() > 1e-2
  # A stage's own seed overrides the call's: the prior's draw is then the same across calls.
  opts = pipeline_lib.StageOptions(seed=11)
  d = pipe.text_to_image(PROMPTS, seed=5, prior=opts)
  e = pipe.text_to_image(PROMPTS, seed=6, prior=opts)
  np.testing.assert_array_equal(d.image_embeddings, e.image_embeddings)


def test_supplied_noise_gives_identical_outputs_whatever_the_seed(pipe):
  rng = np.random.default_rng(0)
  noise = {'prior': rng.standard_normal((B * 2, 32)), 'decoder': rng.standard_normal((B, 16, 16, 3)),
           'upsamplers': [rng.standard_normal((B, 32, 32, 3))]}
  ddim = pipeline_lib.StageOptions(sampler='ddim', eta=0.0)   # no noise besides the initial
  kw = dict(prior=ddim, decoder=ddim, upsamplers=ddim, noise=noise)
  a = pipe.text_to_image(PROMPTS, seed=1, **kw)
  b = pipe.text_to_image(PROMPTS, seed=2, **kw)
  np.testing.assert_array_equal(a.images, b.images)
  other = dict(noise, decoder=rng.standard_normal((B, 16, 16, 3)))
  c = pipe.text_to_image(PROMPTS, seed=1, **dict(kw, noise=other))
  np.testing.assert_array_equal(a.image_embeddings, c.image_embeddings)
  assert np.abs(a.images - c.images).max() > 1e-2
  with pytest.raises(ValueError, match=r"noise\['decoder'\]: expected shape \(2, 16, 16, 3\)"):
    pipe.text_to_image(PROMPTS, noise={'decoder': np.zeros((B, 8, 8, 3))})
  with pytest.raises(ValueError, match='unknown stages'):
    pipe.text_to_image(PROMPTS, noise={'decoderr': 0})


def test_per_stage_steps_change_the_sampler(pipe):
  base = pipe.text_to_image(PROMPTS[:1], seed=0)
  fewer = pipe.text_to_image(PROMPTS[:1], seed=0, decoder=pipeline_lib.StageOptions(steps='2'),
                             upsamplers=pipeline_lib.StageOptions(steps='2'))
  np.testing.assert_array_equal(base.image_embeddings, fewer.image_embeddings)
  assert np.abs(base.images - fewer.images).max() > 1e-3
  with pytest.raises(ValueError, match="sampler: 'euler'"):
    pipe.text_to_image(PROMPTS[:1], decoder=pipeline_lib.StageOptions(sampler='euler'))


def test_bad_prompts_get_clear_errors(pipe):
  with pytest.raises(pipeline_lib.PromptError, match='prompt 1 is empty'):
    pipe.text_to_image(['a red circle', '   '])
  with pytest.raises(pipeline_lib.PromptError, match='non-empty list'):
    pipe.text_to_image([])
  with pytest.raises(pipeline_lib.PromptError, match='not a str'):
    pipe.text_to_image([b'a red circle'])
  long = ' '.join(['red'] * 200)
  with pytest.raises(pipeline_lib.PromptError, match=r'prompt 0 has 200 tokens; .* at most'):
    pipe.encode_prompts([long])
  tokens = pipe.encode_prompts([long], truncate=True)
  assert tokens.shape == (1, pipe.clip.tokenizer.context_length)


def test_variations_interpolation_and_text_diff(pipe, tmp_path):
  image = np.zeros((40, 30, 3), np.uint8)
  image[..., 0] = 200
  path = str(tmp_path / 'red.png')
  Image.fromarray(image).save(path)
  var = pipe.variations(path, 3, seed=0)
  assert var.images.shape == (3, 32, 32, 3)
  np.testing.assert_allclose(var.image_embeddings, var.image_embeddings[:1].repeat(3, 0))
  assert np.abs(var.images[0] - var.images[1]).max() > 1e-2      # different noise

  other = np.full((16, 16, 3), 0.5, np.float32)
  interp = pipe.interpolate(path, other, 4, seed=0)
  emb = interp.image_embeddings
  assert emb.shape == (4, 32)
  ends = pipe.image_embeddings(np.stack([pipeline_lib.load_image(path, 16), other]))
  np.testing.assert_allclose(emb[[0, -1]], ends, atol=1e-4)
  # slerp: equal angles between consecutive frames.
  angles = np.arccos(np.clip(np.sum(emb[1:] * emb[:-1], -1), -1, 1))
  np.testing.assert_allclose(angles, angles[0], rtol=1e-3)
  # Same initial noise and deterministic DDIM: identical embeddings give identical images.
  same = pipe.interpolate(path, path, 3, seed=0)
  np.testing.assert_allclose(same.images[0], same.images[2], atol=1e-5)

  diff = pipe.text_diff(path, 'a red circle', 'a blue circle', num_frames=3)
  assert diff.images.shape == (3, 32, 32, 3)
  np.testing.assert_allclose(diff.image_embeddings[0], ends[0], atol=1e-4)
  with pytest.raises(ValueError, match='same CLIP embedding'):
    pipe.text_diff(path, 'a red circle', 'a red circle')


def test_bad_inputs(pipe, untrained_run, tmp_path):
  with pytest.raises(FileNotFoundError, match='image file not found'):
    pipe.variations(str(tmp_path / 'missing.png'), 2)
  junk = tmp_path / 'junk.png'
  junk.write_bytes(b'not an image')
  with pytest.raises(ValueError, match='cannot read image'):
    pipe.variations(str(junk), 2)
  with pytest.raises(ValueError, match=r'expected \[B, 32\]'):
    pipe.decode(np.zeros((2, 7)))
  with pytest.raises(FileNotFoundError, match='no run directory at'):
    pipeline_lib.UnclipPipeline.from_run(str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='no exported prior'):
    pipeline_lib.UnclipPipeline.from_workdirs(clip=os.path.join(untrained_run, 'clip'),
                                              prior=str(tmp_path))
  # The wrong kind of export, and a prior trained on another CLIP (as its export records).
  clip_dir = os.path.join(untrained_run, 'clip')
  with pytest.raises(ValueError, match='decoder holds a decoder export where a prior is '
                                       'expected'):
    pipeline_lib.UnclipPipeline.from_workdirs(clip=clip_dir,
                                              prior=os.path.join(untrained_run, 'decoder'))
  from unclip_jax.stages import clip as clip_stage, export  # pylint: disable=g-import-not-at-top
  config, params = export.load_export(os.path.join(untrained_run, 'prior'))
  recorded = clip_stage.with_clip_fingerprint(config, clip_stage.load_frozen(clip_dir))
  export.save_export(str(tmp_path / 'same' / 'export'), params, recorded)
  assert pipeline_lib.UnclipPipeline.from_workdirs(clip=clip_dir, prior=str(tmp_path / 'same'))
  recorded.clip.fingerprint = '0123456789abcdef'
  export.save_export(str(tmp_path / 'other' / 'export'), params, recorded)
  with pytest.raises(ValueError, match=r'was trained on another CLIP \(fingerprint '
                                       r'0123456789abcdef\) than the one at'):
    pipeline_lib.UnclipPipeline.from_workdirs(clip=clip_dir, prior=str(tmp_path / 'other'))
  # An upsampler whose input size is not the decoder's output size.
  up, up_params = pipe.upsamplers[0]
  with pytest.raises(ValueError, match='upsampler 1 takes 16px images, but the stage before it '
                     'produces 32px'):
    pipeline_lib.UnclipPipeline(pipe.clip, pipe._stages['prior'], pipe._stages['decoder'],
                                [(up, up_params), (up, up_params)])


def test_variations_need_no_prior(pipe, tmp_path):
  """Without a prior (a decoder and an upsampler only), the pipeline draws variations of an
  image as the whole one does from the same seed; text needs the prior, and says so."""
  path = str(tmp_path / 'red.png')
  Image.fromarray(np.full((20, 20, 3), (200, 0, 0), np.uint8)).save(path)
  no_prior = pipeline_lib.UnclipPipeline(pipe.clip, None, pipe._stages['decoder'],  # pylint: disable=protected-access
                                         pipe.upsamplers)
  np.testing.assert_allclose(no_prior.variations(path, 3, seed=3).images,
                             pipe.variations(path, 3, seed=3).images, atol=1e-5)
  with pytest.raises(ValueError, match='this pipeline has no prior'):
    no_prior.text_to_image(PROMPTS)


def test_slerp_endpoints_and_norm():
  a = np.array([1.0, 0.0, 0.0])
  b = np.array([0.0, 1.0, 0.0])
  frames = np.asarray(pipeline_lib.slerp(a, b, np.linspace(0, 1, 5)))
  np.testing.assert_allclose(frames[0], a, atol=1e-6)
  np.testing.assert_allclose(frames[-1], b, atol=1e-6)
  np.testing.assert_allclose(frames[2], [np.sqrt(0.5), np.sqrt(0.5), 0], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(frames, axis=-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(pipeline_lib.slerp(a, a, 0.3)), a, atol=1e-6)


def test_interpolation_and_text_diff_keep_raw_embedding_norms(pipe, monkeypatch):
  """Stages trained on raw CLIP embeddings (karlo's, `clip.normalize=False`) get frames of
  their scale: the interpolation's norm goes linearly from one image's to the other's (its ends
  are the two embeddings exactly), and a text diff keeps the image embedding's norm."""
  from unclip_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a, b = 3.0 * rng.normal(size=8), 7.0 * rng.normal(size=8)
  monkeypatch.setattr(pipeline_lib.UnclipPipeline, '_normalize', property(lambda self: False))
  monkeypatch.setattr(pipe, '_image_input', lambda image: image)
  monkeypatch.setattr(pipe, 'image_embeddings', lambda image: np.asarray(image)[None])
  monkeypatch.setattr(pipe, 'text_embeddings', lambda texts: np.stack([a, b]))
  monkeypatch.setattr(pipe, 'decode', lambda frames, **kwargs: np.asarray(frames))
  frames = pipe.interpolate(a, b, 5)
  norms = np.linalg.norm(frames, axis=1)
  np.testing.assert_allclose(norms, np.linspace(np.linalg.norm(a), np.linalg.norm(b), 5),
                             rtol=1e-5)
  np.testing.assert_allclose(frames[0], a, rtol=1e-5)
  np.testing.assert_allclose(frames[-1], b, rtol=1e-5)
  edited = pipe.text_diff(a, 'x', 'y', num_frames=3)
  np.testing.assert_allclose(np.linalg.norm(edited, axis=1), np.linalg.norm(a), rtol=1e-5)
  np.testing.assert_allclose(edited[0], a, rtol=1e-5)


def test_sharded_over_devices_the_images_are_those_of_one_device(untrained_run):
  import jax  # pylint: disable=g-import-not-at-top
  prompts = PROMPTS * 4
  one = pipeline_lib.UnclipPipeline.from_run(untrained_run)
  expected = one.text_to_image(prompts, seed=3)
  devices = jax.local_devices()[:4]
  sharded = pipeline_lib.UnclipPipeline.from_run(untrained_run).shard_over(devices)
  out = sharded.text_to_image(prompts, seed=3)
  np.testing.assert_allclose(out.images, expected.images, atol=2e-3)
  np.testing.assert_allclose(out.image_embeddings, expected.image_embeddings, atol=1e-4)
  # The prompts are split over the four devices.
  tokens = sharded._place(sharded.encode_prompts(prompts))
  assert {s.device for s in tokens.addressable_shards} == set(devices)
  with pytest.raises(ValueError, match="a batch of 6 does not split over the pipeline's 4 "
                                       'devices: use a multiple of 4'):
    sharded.text_to_image(PROMPTS * 3)
