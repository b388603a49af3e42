"""The CLIP stage: loss over the global batch, metrics, zero-shot prompts, training end to end."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax import config_lib
from unclip_jax.stages import clip

def _reference_loss(img, txt, scale):
  logits = scale * img @ txt.T
  def ce(l):
    l = l - l.max(1, keepdims=True)
    return np.mean(np.log(np.exp(l).sum(1)) - np.diag(l))
  return (ce(logits) + ce(logits.T)) / 2


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_contrastive_loss_over_the_global_batch():
  rng = np.random.default_rng(0)
  img, txt = _unit(rng.normal(size=(16, 8))), _unit(rng.normal(size=(16, 8)))
  img, txt = img.astype(np.float32), txt.astype(np.float32)
  expected = _reference_loss(img, txt, 10.0)
  mesh = jax.make_mesh((8, 1, 1), config_lib.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  shard = NamedSharding(mesh, P(('data', 'fsdp')))
  loss, metrics = jax.jit(clip.contrastive_loss)(jax.device_put(img, shard),
                                                 jax.device_put(txt, shard), 10.0)
  # Every example is contrasted with all 16, not only the 2 on its own device.
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  per_shard = np.mean([_reference_loss(img[i:i + 2], txt[i:i + 2], 10.0)
                       for i in range(0, 16, 2)])
  assert abs(per_shard - expected) > 1e-2
  matched, _ = clip.contrastive_loss(img, img, 100.0)
  assert float(matched) < 1e-3
  assert float(metrics['i2t_accuracy']) == np.mean(np.argmax(img @ txt.T, 1) == np.arange(16))


def test_recall_at_k():
  sim = np.eye(4) + 0.1 * np.arange(4)[None, :]
  assert clip.recall_at_k(sim, 1) == 1.0
  assert clip.recall_at_k(-sim, 1) == 0.0
  assert clip.recall_at_k(-sim, 4) == 1.0


def test_zero_shot_prompts():
  prompts = clip.zero_shot_prompts('color', 'orange')
  assert len(prompts) == 5 * 7 and all('an orange ' in p for p in prompts)
  assert not any('orange background' in p for p in prompts)
  assert all(p.startswith('a large ') for p in clip.zero_shot_prompts('size', 'large'))


def test_tokenizer_must_match_the_model(make_tiny_clip_config, monkeypatch):
  config = make_tiny_clip_config(**{'model.text.eot_id': 7, 'tokenizer.kind': 'words'})
  with pytest.raises(ValueError, match='config.model.text.eot_id'):
    _ = clip.Stage(config).tokenizer
  config = make_tiny_clip_config(**{'model.text.vocab_size': 10, 'tokenizer.kind': 'words'})
  with pytest.raises(ValueError, match='config.model.text.vocab_size'):
    _ = clip.Stage(config).tokenizer
  from unclip_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tokenizers, 'default_bpe_path', lambda: None)
  config = make_tiny_clip_config(**{'tokenizer.kind': 'clip_bpe'})
  with pytest.raises(ValueError, match='config.tokenizer.path: the CLIP BPE tokenizer needs'):
    _ = clip.Stage(config).tokenizer


def test_auto_tokenizer_follows_the_data(make_tiny_clip_config):
  """'auto': the built-in data keeps its word tokenizer and the tower's 128 ids; any other
  source gets CLIP's BPE (open_clip's vocabulary here) and the tower grows to fit it; the word
  tokenizer refuses other data and words it does not know."""
  stage = clip.Stage(make_tiny_clip_config())
  assert type(stage.tokenizer).__name__ == 'WordTokenizer'
  assert stage.config.model.text.vocab_size == 128 and stage.config.model.text.eot_id == 2
  config = make_tiny_clip_config(**{'data.source': 'webdataset'})
  stage = clip.Stage(config)
  assert type(stage.tokenizer).__name__ == 'ClipTokenizer'
  assert config.model.text.vocab_size == 49408 and config.model.text.eot_id == 49407
  assert stage.tokenizer(['a photo of a cat'])[0, :3].tolist()[0] == 49406
  config = make_tiny_clip_config(**{'data.source': 'webdataset', 'tokenizer.kind': 'words'})
  with pytest.raises(ValueError, match="the 'words' tokenizer knows only the built-in data"):
    clip.Stage(config)
  words = clip.Stage(make_tiny_clip_config()).tokenizer
  with pytest.raises(ValueError, match="has 'elephant'"):
    words(['a red elephant'])


def test_load_frozen_reports_missing_export(tmp_path):
  with pytest.raises(FileNotFoundError, match='no exported CLIP'):
    clip.load_frozen(str(tmp_path))


@pytest.mark.slow
def test_tiny_clip_learns_zero_shot_attributes(trained_tiny_clip):
  """The README's main job at a shorter length: trains from the command line on one device."""
  workdir, metrics = trained_tiny_clip
  print(metrics)
  # Chance: colour and background 1/8, shape 1/5, size 1/3.
  assert metrics['zero_shot_color_accuracy'] > 0.8
  assert metrics['zero_shot_background_accuracy'] > 0.8
  assert metrics['zero_shot_shape_accuracy'] > 0.6
  assert metrics['image_to_text_recall@5'] > 0.5
  frozen = clip.load_frozen(workdir)
  tokens = frozen.tokenizer(['a red circle on a blue background'])
  emb, hidden = frozen.encode_text(tokens)
  assert emb.shape == (1, frozen.config.model.embed_dim) and hidden.shape[:2] == tokens.shape
