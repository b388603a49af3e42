"""Precomputed CLIP embeddings: written once, attached by id, used by the prior and decoder in
place of the image tower, and refused when they belong to another CLIP or dataset."""

import jax
import numpy as np
import pytest

from unclip_jax import embed
from unclip_jax.data import embeddings
from unclip_jax.data import input_pipeline
from unclip_jax.stages import clip as clip_stage
from unclip_jax.stages import decoder as decoder_stage
from unclip_jax.stages import prior as prior_stage

from tests import helpers


@pytest.fixture(scope='module')
def clip(data_dir):
  return clip_stage.random_clip(helpers.tiny_clip_config(data_dir))


@pytest.fixture(scope='module')
def written(clip, data_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('embeddings'))
  data = helpers.tiny_decoder_config(data_dir).data
  # 256 and 64 records in parts of 100 and batches of 48: ragged parts and batches
  info = embed.write(clip, data, out, batch_size=48, chunk_size=100, progress=False)
  return out, info


def test_written_embeddings_are_the_clips(clip, data_dir, written):
  out, info = written
  assert {k: v['count'] for k, v in info['splits'].items()} == {'train': 256, 'test': 64}
  assert info['embed_dim'] == clip.config.model.embed_dim
  assert len(embeddings.finished_parts(out, 'train')) == 3
  data_config = helpers.tiny_decoder_config(data_dir).data
  test = input_pipeline.load_split(data_config, 'test', tokenizer=clip.tokenizer)
  table = embeddings.EmbeddingTable(out, 'test')
  got = table.lookup(test['key'][::-1])          # any order
  order = np.arange(len(test['key']))[::-1]
  want_image = clip.encode_image(test['image'][order])
  want_text = clip.encode_text(test['tokens'][order])[0]
  np.testing.assert_allclose(got['clip_image_emb'], want_image, atol=2e-5)
  np.testing.assert_allclose(got['clip_text_emb'], want_text, atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(got['clip_image_emb'], axis=-1), 1.0, atol=1e-5)
  with pytest.raises(KeyError, match=r"no test embedding for sample key\(s\) \['nope'\]"):
    table.lookup(['nope'])


def test_stages_use_precomputed_embeddings_in_place_of_the_image_tower(clip, data_dir, written):
  """Same batch, same rng: the losses with precomputed embeddings equal the on-the-fly ones."""
  out, _ = written
  plain = decoder_stage.Stage(helpers.tiny_decoder_config(data_dir), clip=clip)
  pre = decoder_stage.Stage(helpers.tiny_decoder_config(data_dir, **{'data.embeddings_dir': out}),
                            clip=clip)
  assert 'clip_image_emb' in pre.batch_spec(2) and 'clip_image_emb' not in plain.batch_spec(2)
  (batch,) = helpers.take_batches(pre, pre.config, 1)
  params = jax.jit(pre.init)(jax.random.PRNGKey(0), batch)['params']
  rng = jax.random.PRNGKey(1)
  loss_pre, _ = jax.jit(pre.loss)(params, batch, rng, pre.constants())
  without = {k: v for k, v in batch.items() if k != 'clip_image_emb'}
  loss_plain, _ = jax.jit(plain.loss)(params, without, rng, plain.constants())
  np.testing.assert_allclose(loss_pre, loss_plain, rtol=1e-4)

  prior_config = helpers.tiny_prior_config(data_dir, **{'data.embeddings_dir': out})
  prior = prior_stage.Stage(prior_config, clip=clip)
  assert set(prior.batch_spec(2)) == {'tokens', 'clip_image_emb'}   # no images needed
  (batch,) = helpers.take_batches(prior, prior_config, 1)
  f = prior.clip_features(clip.params, batch)
  np.testing.assert_array_equal(f['image_emb'], batch['clip_image_emb'])
  mean, std = prior.embedding_stats()
  assert mean.shape == std.shape == (clip.config.model.embed_dim,) and (std > 0).all()


def test_mismatched_embeddings_are_refused(clip, data_dir, written, tmp_path):
  out, _ = written
  other_clip = clip_stage.random_clip(helpers.tiny_clip_config(data_dir), seed=7)
  config = helpers.tiny_decoder_config(data_dir, **{'data.embeddings_dir': out})
  with pytest.raises(ValueError, match='computed by another CLIP'):
    decoder_stage.Stage(config, clip=other_clip)
  config = helpers.tiny_decoder_config(data_dir, **{'data.embeddings_dir': out,
                                                    'data.seed': 3})
  with pytest.raises(ValueError, match='computed for other data: data.seed 0 there, 3 here'):
    decoder_stage.Stage(config, clip=clip)
  config = helpers.tiny_decoder_config(data_dir, **{'data.embeddings_dir': str(tmp_path)})
  with pytest.raises(FileNotFoundError, match='python -m unclip_jax.data.embeddings'):
    decoder_stage.Stage(config, clip=clip)
