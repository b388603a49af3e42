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
  config = helpers.tiny_decoder_config(data_dir, **{'data.embeddings_dir': out,
                                                    'data.held_out_combinations': False})
  with pytest.raises(ValueError, match='data.held_out_combinations True there, False here'):
    decoder_stage.Stage(config, clip=clip)
  # Another resolution is the same images: a 32px decoder takes the embeddings made at 16px.
  config = helpers.tiny_decoder_config(data_dir, **{'data.embeddings_dir': out,
                                                    'data.resolution': 32})
  assert embeddings.check(out, config.data, clip)['dataset']['resolution'] == 16
  assert decoder_stage.Stage(config, clip=clip).precomputed
  config = helpers.tiny_decoder_config(data_dir, **{'data.embeddings_dir': str(tmp_path)})
  with pytest.raises(FileNotFoundError, match='python -m unclip_jax.data.embeddings'):
    decoder_stage.Stage(config, clip=clip)


def test_writing_resumes_after_a_kill_and_splits_across_processes(clip, data_dir, written,
                                                                  tmp_path):
  """Stopped after one finished part, the writer continues from that part's reader state: the
  result equals an uninterrupted run's. Two processes write disjoint parts that together hold
  every sample."""
  out, _ = written
  data = helpers.tiny_decoder_config(data_dir).data
  resumed = str(tmp_path / 'resumed')
  embed._prepare_dir(clip, data, resumed, overwrite=False)   # pylint: disable=protected-access
  stopped = embed.write_split(clip, data, resumed, 'train', batch_size=48, chunk_size=100,
                              progress=False, max_chunks=1)
  assert stopped['count'] == 100 and len(embeddings.finished_parts(resumed, 'train')) == 1
  info = embed.write(clip, data, resumed, batch_size=48, chunk_size=100, progress=False)
  assert info['splits']['train']['count'] == 256
  for split in ('train', 'test'):
    a, b = embeddings.EmbeddingTable(out, split), embeddings.EmbeddingTable(resumed, split)
    keys = [str(k) for k in np.load(f'{embeddings.finished_parts(out, split)[0]}/keys.npy')]
    np.testing.assert_array_equal(a.lookup(keys)['clip_image_emb'],
                                  b.lookup(keys)['clip_image_emb'])
    assert len(a) == len(b)

  shared = str(tmp_path / 'two_processes')
  embed._prepare_dir(clip, data, shared, overwrite=False)   # pylint: disable=protected-access
  counts = [embed.write_split(clip, data, shared, 'test', batch_size=16, chunk_size=20,
                              process_index=p, process_count=2, progress=False)['count']
            for p in range(2)]
  assert counts == [32, 32]
  per_process = [{str(k) for part in embeddings.finished_parts(shared, 'test', p)
                  for k in np.load(f'{part}/keys.npy')} for p in range(2)]
  assert not per_process[0] & per_process[1] and len(per_process[0] | per_process[1]) == 64
  assert len(embeddings.EmbeddingTable(shared, 'test')) == 64
  with pytest.raises(ValueError, match='holds other embeddings'):
    embed.write(clip_stage.random_clip(helpers.tiny_clip_config(data_dir), seed=3), data,
                resumed, progress=False)


def test_prior_trains_from_an_embedding_reader_folder_without_images(data_dir, tmp_path):
  """The clip-retrieval layout holding a (BPE-tokenizer) CLIP's embeddings of the built-in
  images: the prior's batches carry them (no image is read) and its loss falls."""
  clip = clip_stage.random_clip(helpers.tiny_clip_config(data_dir, **{
      'data.source': 'webdataset'}))
  assert clip.config.model.text.vocab_size == 49408
  from tests.data import test_sources  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  data = helpers.tiny_decoder_config(data_dir).data
  folders, unit = {}, {}
  for split in ('train', 'test'):
    examples = input_pipeline.load_split(data, split, tokenizer=clip.tokenizer, max_examples=64)
    folder = str(tmp_path / split)
    test_sources.write_embedding_folder(folder, [32, 32], dim=clip.config.model.embed_dim)
    emb = np.asarray(clip.encode_image(examples['image']), np.float16)
    for n in range(2):       # the real embeddings and captions in the layout's files
      np.save(f'{folder}/img_emb/img_emb_{n}.npy', emb[32 * n:32 * (n + 1)])
      pq.write_table(pa.table({'caption': [str(c) for c in examples['caption'][32 * n:32 * (n + 1)]],
                               'key': [str(k) for k in examples['key'][32 * n:32 * (n + 1)]]}),
                     f'{folder}/metadata/metadata_{n}.parquet')
    folders[split] = folder
    unit[split] = emb.astype(np.float32) / np.linalg.norm(emb.astype(np.float32), axis=-1,
                                                          keepdims=True)
  config = helpers.tiny_prior_config(data_dir, **{
      'data.source': 'clip_embeddings', 'data.paths': folders['train'],
      'data.eval_paths': folders['test'], 'data.resolution': 64, 'optim.lr': 3e-3,
      'optim.warmup_steps': 4})
  prior = prior_stage.Stage(config, clip=clip)
  assert set(prior.batch_spec(2)) == {'tokens', 'clip_image_emb'}
  batches = helpers.take_batches(prior, config, 15)
  for row in batches[0]['clip_image_emb']:      # the folder's rows, made unit-norm
    assert np.abs(unit['train'] - row).max(axis=1).min() < 1e-6
  state, losses = helpers.run_train_steps(prior, config, helpers.mesh((1, 1, 1), 1), batches)
  # Measured: 0.81 over the first 4 steps, 0.15 over the last 4.
  assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
  mean, std = prior.embedding_stats()
  assert mean.shape == (clip.config.model.embed_dim,) and (std > 0).all()
  metrics = prior.evaluate(jax.device_get(state.params))
  assert 'cosine_pred_image' in metrics and 'zero_shot_shape_accuracy_pred' not in metrics
  wrong = helpers.tiny_prior_config(data_dir, **{'data.source': 'clip_embeddings',
                                                 'data.paths': folders['train']})
  wrong_clip = clip_stage.random_clip(helpers.tiny_clip_config(data_dir, **{
      'model.embed_dim': 16, 'data.source': 'webdataset'}))
  with pytest.raises(ValueError, match='holds 32-d embeddings; the CLIP .* embeds in 16'):
    prior_stage.Stage(wrong, clip=wrong_clip).make_iterator('train', 4, seed=0, shuffle=True,
                                                            process_index=0, process_count=1)


def test_embeddings_of_another_number_of_samples_are_refused_before_any_batch(data_dir,
                                                                              written):
  out, _ = written
  config = helpers.tiny_decoder_config(data_dir, **{'data.embeddings_dir': out})
  source = input_pipeline.get_source(config.data, 'train')

  class Fewer(type(source)):
    def __len__(self):
      return 200
  fewer = Fewer.__new__(Fewer)
  fewer.__dict__.update(source.__dict__)
  with pytest.raises(ValueError, match='holds 256 train embeddings .* but the data has 200'):
    input_pipeline.make_iterator(config.data, split='train', batch_size=4, tokenizer=None,
                                 seed=0, process_index=0, process_count=1, data_source=fewer)
