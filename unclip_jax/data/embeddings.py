r"""Precomputed CLIP embeddings of a dataset, so that the prior and decoder skip the image tower.

The paper trains its prior and decoder on CLIP embeddings computed once; at scale the frozen
image tower (ViT-L/14 at 224px) costs more per step than the tiny part of the prior it feeds.

  python -m unclip_jax.data.embeddings --config=configs/decoder.py:tiny \
      --config.clip.workdir=runs/clip --out=runs/clip_embeddings

writes into `--out`, for each split, `{split}_ids.npy` (int64 [N], the records' ids, sorted),
`{split}_image_emb.npy` and `{split}_text_emb.npy` (float32 [N, D], unit CLIP embeddings of the
record's image and caption), and `info.json`: the CLIP's fingerprint and embedding size and the
dataset's settings. Train with `--config.data.embeddings_dir=runs/clip_embeddings`: the input
pipeline attaches each record's `clip_image_emb` by id and the stage uses it instead of running
the image tower (captions are still encoded in the step: their token states condition the
models). Embeddings from another CLIP, another dataset configuration or with records missing are
refused with an error that says which.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import grain
import jax
import ml_collections
import numpy as np

INFO = 'info.json'
DATASET_KEYS = ('name', 'resolution', 'num_train', 'num_test', 'seed')


def clip_fingerprint(params) -> str:
  """A short hash of a CLIP's parameter values (which CLIP computed a set of embeddings)."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda x: str(x[0])):
    x = np.asarray(leaf, np.float64)
    h.update(f'{jax.tree_util.keystr(path)}:{x.shape}:{x.sum():.6e}:{np.abs(x).sum():.6e};'
             .encode())
  return h.hexdigest()[:16]


def dataset_settings(data_config: ml_collections.ConfigDict) -> dict:
  return {k: data_config.get(k) for k in DATASET_KEYS}


def write(clip, data_config: ml_collections.ConfigDict, out_dir: str,
          splits=('train', 'test'), batch_size: int = 256) -> dict:
  """Embeds every record of `splits` with the frozen `clip`; returns the info written.

  Args:
    clip: a `stages.clip.FrozenClip`.
    data_config: the dataset config (as in a stage config's `data`).
    out_dir: created if needed; existing files of the same splits are replaced.
  """
  from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  encode = jax.jit(lambda p, images, tokens: (clip.encode_image(images, p),
                                              clip.encode_text(tokens, p)[0]))
  counts = {}
  for split in splits:
    source = input_pipeline.get_source(data_config, split)
    decode = input_pipeline.DecodeExample(data_config.resolution)
    ids, image_emb, text_emb = [], [], []
    for start in range(0, len(source), batch_size):
      examples = [decode.map(source[i])
                  for i in range(start, min(start + batch_size, len(source)))]
      examples = [ex for ex in examples if ex is not None]   # corrupt images: skipped, counted
      if not examples:
        continue
      n = len(examples)
      images = np.stack([ex['image'] for ex in examples])
      tokens = np.asarray(clip.tokenizer([ex['caption'] for ex in examples]), np.int32)
      pad = batch_size - n          # one compiled shape for every batch
      images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
      tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, 0)])
      img, txt = jax.device_get(encode(clip.params, images, tokens))
      ids.extend(int(ex['id']) for ex in examples)
      image_emb.append(img[:n])
      text_emb.append(txt[:n])
    ids = np.asarray(ids, np.int64)
    order = np.argsort(ids, kind='stable')
    if len(np.unique(ids)) != len(ids):
      raise ValueError(f'{split}: record ids are not unique; embeddings cannot be looked up by id')
    np.save(os.path.join(out_dir, f'{split}_ids.npy'), ids[order])
    np.save(os.path.join(out_dir, f'{split}_image_emb.npy'),
            np.concatenate(image_emb).astype(np.float32)[order])
    np.save(os.path.join(out_dir, f'{split}_text_emb.npy'),
            np.concatenate(text_emb).astype(np.float32)[order])
    counts[split] = len(ids)
  info = {'clip_fingerprint': clip_fingerprint(clip.params),
          'embed_dim': int(clip.config.model.embed_dim),
          'dataset': dataset_settings(data_config), 'counts': counts}
  with open(os.path.join(out_dir, INFO), 'w') as f:
    json.dump(info, f, indent=2)
  return info


def check(embeddings_dir: str, data_config: ml_collections.ConfigDict, clip=None) -> dict:
  """The info of `embeddings_dir`; raises ValueError/FileNotFoundError if it does not belong to
  this dataset configuration (or, given `clip`, to this CLIP)."""
  path = os.path.join(embeddings_dir, INFO)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'config.data.embeddings_dir: {embeddings_dir!r} has no {INFO}; write the embeddings '
        'with `python -m unclip_jax.data.embeddings --config=... --out=...`')
  with open(path) as f:
    info = json.load(f)
  ours = dataset_settings(data_config)
  if info['dataset'] != ours:
    raise ValueError(f'config.data.embeddings_dir: {embeddings_dir!r} was computed for the dataset '
                     f'{info["dataset"]}, but config.data is {ours}')
  if clip is not None:
    if info['embed_dim'] != clip.config.model.embed_dim:
      raise ValueError(f'config.data.embeddings_dir: {embeddings_dir!r} holds {info["embed_dim"]}-d '
                       f'embeddings; the CLIP embeds in {clip.config.model.embed_dim} dimensions')
    fingerprint = clip_fingerprint(clip.params)
    if info['clip_fingerprint'] != fingerprint:
      raise ValueError(f'config.data.embeddings_dir: {embeddings_dir!r} was computed by another '
                       f'CLIP (fingerprint {info["clip_fingerprint"]}, this CLIP {fingerprint}); '
                       'recompute them with this CLIP')
  return info


class EmbeddingTable:
  """Read-only (memory-mapped) embeddings of one split, looked up by record id."""

  def __init__(self, embeddings_dir: str, split: str):
    self.embeddings_dir = embeddings_dir
    self.split = split
    self._arrays = None

  def _load(self):
    if self._arrays is None:   # lazily, so that the table pickles small into grain workers
      load = lambda name: np.load(os.path.join(self.embeddings_dir, f'{self.split}_{name}.npy'),
                                  mmap_mode='r')
      self._arrays = load('ids'), load('image_emb'), load('text_emb')
    return self._arrays

  def __getstate__(self):
    return {'embeddings_dir': self.embeddings_dir, 'split': self.split, '_arrays': None}

  def __len__(self) -> int:
    return len(self._load()[0])

  def lookup(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    """{'clip_image_emb', 'clip_text_emb'} float32 [N, D] for record ids [N]."""
    table_ids, image_emb, text_emb = self._load()
    ids = np.asarray(ids, np.int64)
    rows = np.minimum(np.searchsorted(table_ids, ids), len(table_ids) - 1)
    missing = ids[table_ids[rows] != ids]
    if missing.size:
      raise KeyError(f'{self.embeddings_dir}: no {self.split} embedding for record id(s) '
                     f'{missing[:5].tolist()}; recompute the embeddings for this dataset')
    return {'clip_image_emb': np.asarray(image_emb[rows], np.float32),
            'clip_text_emb': np.asarray(text_emb[rows], np.float32)}

  def mean_std(self, max_examples: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the image embeddings (the first `max_examples`)."""
    emb = np.asarray(self._load()[1][:max_examples], np.float64)
    return emb.mean(0).astype(np.float32), emb.std(0).astype(np.float32)


class AttachEmbeddings(grain.transforms.Map):
  """Adds `clip_image_emb` and `clip_text_emb` [B, D] to a batch, by its records' ids."""

  def __init__(self, table: EmbeddingTable):
    self.table = table

  def map(self, batch: dict) -> dict:
    batch.update(self.table.lookup(batch['id']))
    return batch


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import prior as prior_stage  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  if not config.clip.get('workdir'):
    raise SystemExit('embeddings: set --config.clip.workdir to the trained CLIP run')
  info = write(prior_stage.load_clip(config), config.data, flags.FLAGS.out,
               batch_size=flags.FLAGS.batch_size)
  print(json.dumps(info, indent=2))


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'A prior or decoder config (its clip and '
                                  'data blocks).', lock_config=False)
  flags.DEFINE_string('out', None, 'Output folder.')
  flags.DEFINE_integer('batch_size', 256, 'Images per CLIP call.')
  flags.mark_flags_as_required(['config', 'out'])
  app.run(main)
