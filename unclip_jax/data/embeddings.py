r"""Precomputed CLIP embeddings of a dataset, so that the prior and decoder skip the image tower.

The paper trains its prior and decoder on CLIP embeddings computed once; at scale the frozen
image tower (ViT-L/14 at 224px) costs more per step than the part of the prior it feeds.

  python -m unclip_jax.data.embeddings --config=configs/decoder.py:tiny \
      --config.clip.workdir=runs/clip --out=runs/clip_embeddings [--distributed]

(see `unclip_jax.embed`) embeds every sample of the config's data (any source) with the frozen
CLIP, data-parallel over every device of every process, and writes into `--out`:

  info.json                       the CLIP's fingerprint and width, the data's settings, and per
                                  split the number of embeddings and of samples skipped
  {split}/part-PPPPP-CCCCCC/      one finished chunk of process P: ids.npy (int64 [n], the
                                  samples' key ids, `sources.key_id`), keys.npy (str [n]),
                                  image_emb.npy and text_emb.npy (float32 [n, D], unit CLIP
                                  embeddings of the image and its first caption), state.json
                                  (where the data reader stood after it)

Chunks are written into a temporary folder and renamed when complete, so a killed job keeps what
it finished and continues from the last chunk's reader state. Train with
`--config.data.embeddings_dir=...`: the input pipeline attaches each sample's `clip_image_emb`
by key and the stage uses it instead of running the image tower. Embeddings of another CLIP,
another width, other data settings, or that lack a sample, are refused with an error that says
which. Only the resolution may differ: an embedding describes the image (as in the paper, where
the 64px decoder is conditioned on the embedding of the 224px image), so a decoder at 16px uses
the embeddings its CLIP computed at 32px, and one set serves every stage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Optional

import grain
import jax
import ml_collections
import numpy as np

from unclip_jax import workdir as workdir_lib
from unclip_jax.data import sources

INFO = 'info.json'
FORMAT = 2
# The settings that decide which samples there are and what their images look like. (Not
# `resolution`, which every source applies by resizing the same image: recorded, not compared.)
DATASET_KEYS = ('source', 'name', 'paths', 'eval_paths', 'train_split', 'eval_split',
                'image_key', 'caption_key', 'key_key', 'resolution', 'min_size', 'num_train',
                'num_test', 'seed', 'held_out_combinations')
PART_FILES = ('ids.npy', 'keys.npy', 'image_emb.npy', 'text_emb.npy', 'state.json')


def clip_fingerprint(params) -> str:
  """A short hash of a CLIP's parameter values (which CLIP computed a set of embeddings)."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda x: str(x[0])):
    x = np.asarray(leaf, np.float64)
    h.update(f'{jax.tree_util.keystr(path)}:{x.shape}:{x.sum():.6e}:{np.abs(x).sum():.6e};'
             .encode())
  return h.hexdigest()[:16]


def dataset_settings(data_config: ml_collections.ConfigDict) -> dict:
  settings = {k: data_config.get(k) for k in DATASET_KEYS}
  settings['source'] = sources.source_name(data_config)
  return settings


def compared_settings(settings: dict) -> dict:
  """The settings two embedding sets must share to serve the same data (all but `resolution`)."""
  return {k: v for k, v in settings.items() if k != 'resolution'}


def read_info(embeddings_dir: str) -> Optional[dict]:
  path = workdir_lib.path(embeddings_dir) / INFO
  return workdir_lib.read_json(path) if path.exists() else None


def write_info(embeddings_dir: str, info: dict):
  """Writes info.json atomically (a reader never sees half of it)."""
  workdir_lib.atomic_write_json(workdir_lib.path(embeddings_dir) / INFO, info)


def check(embeddings_dir: str, data_config: ml_collections.ConfigDict, clip=None,
          splits=('train', 'test')) -> dict:
  """The info of `embeddings_dir`; raises ValueError/FileNotFoundError if it is incomplete, or
  does not belong to this data configuration (or, given `clip`, to this CLIP)."""
  field = 'config.data.embeddings_dir'
  info = read_info(embeddings_dir)
  if info is None:
    raise FileNotFoundError(
        f'{field}: {embeddings_dir!r} has no {INFO}; write the embeddings with '
        '`python -m unclip_jax.data.embeddings --config=... --out=...`')
  if info.get('format') != FORMAT:
    raise ValueError(f'{field}: {embeddings_dir!r} is in an older format; recompute it with '
                     '`python -m unclip_jax.data.embeddings`')
  ours = compared_settings(dataset_settings(data_config))
  differ = {k: (info['dataset'].get(k), ours.get(k)) for k in ours
            if info['dataset'].get(k) != ours.get(k)}
  if differ:
    raise ValueError(f'{field}: {embeddings_dir!r} was computed for other data: '
                     + ', '.join(f'data.{k} {a!r} there, {b!r} here' for k, (a, b) in
                                 differ.items()))
  for split in splits:
    if not info.get('splits', {}).get(split, {}).get('complete'):
      raise ValueError(f'{field}: {embeddings_dir!r} has no complete {split!r} split (its '
                       'writing was interrupted?); run the embeddings command again to finish it')
  if clip is not None:
    width = clip.config.model.embed_dim
    if info['embed_dim'] != width:
      raise ValueError(f'{field}: {embeddings_dir!r} holds {info["embed_dim"]}-d embeddings; '
                       f'the CLIP embeds in {width} dimensions')
    fingerprint = clip_fingerprint(clip.params)
    if info['clip_fingerprint'] != fingerprint:
      raise ValueError(f'{field}: {embeddings_dir!r} was computed by another CLIP (fingerprint '
                       f'{info["clip_fingerprint"]}, this CLIP {fingerprint}); recompute them with '
                       'this CLIP')
  return info


# ---------------------------------------------------------------------------------------------
# Writing, part by part


def part_name(process_index: int, chunk: int) -> str:
  return f'part-{process_index:05d}-{chunk:06d}'


def finished_parts(embeddings_dir: str, split: str, process_index: Optional[int] = None):
  """The complete part folders of `split` (of one process, or all), sorted: those holding
  their state.json, which is written last (found with one listing, also on Cloud Storage)."""
  folder = workdir_lib.path(embeddings_dir) / split
  if not folder.is_dir():
    return []
  prefix = 'part-' if process_index is None else f'part-{process_index:05d}-'
  return sorted(os.fspath(f.parent) for f in folder.glob(f'{prefix}*/state.json')
                if not f.parent.name.endswith('.tmp'))


def _save_npy(path, array: np.ndarray):
  with workdir_lib.path(path).open('wb') as f:
    np.save(f, array)


def _load_npy(path) -> np.ndarray:
  """A part's array: memory-mapped on a local disk, read whole from a remote one."""
  path = workdir_lib.path(path)
  if workdir_lib.is_remote(path):
    return np.load(io.BytesIO(path.read_bytes()))
  return np.load(path, mmap_mode='r')


def write_part(embeddings_dir: str, split: str, process_index: int, chunk: int,
               keys: list[str], image_emb: np.ndarray, text_emb: np.ndarray, state: dict):
  """Writes one chunk, complete once its state.json is there (written last): on a local disk
  into a temporary folder renamed into place, on an object store in place."""
  final = workdir_lib.path(embeddings_dir) / split / part_name(process_index, chunk)
  remote = workdir_lib.is_remote(final)
  folder = final if remote else final.parent / (final.name + '.tmp')
  workdir_lib.remove_tree(folder)
  folder.mkdir(parents=True, exist_ok=True)
  _save_npy(folder / 'ids.npy', sources.key_ids(keys))
  _save_npy(folder / 'keys.npy', np.asarray(keys, dtype=str))
  _save_npy(folder / 'image_emb.npy', np.asarray(image_emb, np.float32))
  _save_npy(folder / 'text_emb.npy', np.asarray(text_emb, np.float32))
  (folder / 'state.json').write_text(json.dumps(state))
  if not remote:
    os.replace(folder, final)


def part_state(part: str) -> dict:
  return workdir_lib.read_json(workdir_lib.path(part) / 'state.json')


# ---------------------------------------------------------------------------------------------
# Reading


class EmbeddingTable:
  """Read-only (memory-mapped) embeddings of one split, looked up by sample key."""

  def __init__(self, embeddings_dir: str, split: str):
    self.embeddings_dir = embeddings_dir
    self.split = split
    self._index = None

  def _load(self):
    if self._index is None:   # lazily, so that the table pickles small into grain workers
      parts = finished_parts(self.embeddings_dir, self.split)
      if not parts:
        raise FileNotFoundError(f'config.data.embeddings_dir: {self.embeddings_dir!r} holds no '
                                f'{self.split!r} embeddings')
      ids, part_of, row_of, arrays = [], [], [], []
      for p, part in enumerate(parts):
        part_ids = np.asarray(_load_npy(os.path.join(part, 'ids.npy')))
        ids.append(part_ids)
        part_of.append(np.full(len(part_ids), p, np.int32))
        row_of.append(np.arange(len(part_ids), dtype=np.int64))
        arrays.append(tuple(_load_npy(os.path.join(part, f'{name}.npy'))
                            for name in ('image_emb', 'text_emb')))
      ids = np.concatenate(ids)
      order = np.argsort(ids, kind='stable')
      sorted_ids = ids[order]
      duplicated = sorted_ids[1:] == sorted_ids[:-1]
      if duplicated.any():
        raise ValueError(f'config.data.embeddings_dir: {self.embeddings_dir!r} holds the sample '
                         f'key id {int(sorted_ids[1:][duplicated][0])} twice in {self.split!r}; '
                         'sample keys must be unique within a split')
      self._index = (sorted_ids, np.concatenate(part_of)[order], np.concatenate(row_of)[order],
                     arrays)
    return self._index

  def __getstate__(self):
    return {'embeddings_dir': self.embeddings_dir, 'split': self.split, '_index': None}

  def __len__(self) -> int:
    return len(self._load()[0])

  def lookup(self, keys) -> dict[str, np.ndarray]:
    """{'clip_image_emb', 'clip_text_emb'} float32 [N, D] for sample keys [N] (str)."""
    table_ids, part_of, row_of, arrays = self._load()
    keys = [str(k) for k in keys]
    ids = sources.key_ids(keys)
    rows = np.minimum(np.searchsorted(table_ids, ids), len(table_ids) - 1)
    missing = [k for k, ok in zip(keys, table_ids[rows] == ids) if not ok]
    if missing:
      raise KeyError(f'{self.embeddings_dir}: no {self.split} embedding for sample key(s) '
                     f'{missing[:5]}; recompute the embeddings for this data')
    out = {'clip_image_emb': np.empty((len(keys), arrays[0][0].shape[1]), np.float32),
           'clip_text_emb': np.empty((len(keys), arrays[0][1].shape[1]), np.float32)}
    parts, part_rows = part_of[rows], row_of[rows]
    for p in np.unique(parts):
      sel = parts == p
      out['clip_image_emb'][sel] = arrays[p][0][part_rows[sel]]
      out['clip_text_emb'][sel] = arrays[p][1][part_rows[sel]]
    return out

  def mean_std(self, max_examples: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the image embeddings (the first `max_examples`)."""
    arrays = self._load()[3]
    chunks, n = [], 0
    for image_emb, _ in arrays:
      if max_examples is not None and n >= max_examples:
        break
      take = image_emb if max_examples is None else image_emb[:max_examples - n]
      chunks.append(np.asarray(take, np.float64))
      n += len(take)
    emb = np.concatenate(chunks)
    return emb.mean(0).astype(np.float32), emb.std(0).astype(np.float32)


class AttachEmbeddings(grain.transforms.Map):
  """Adds `clip_image_emb` and `clip_text_emb` [B, D] to a batch, by its samples' keys."""

  def __init__(self, table: EmbeddingTable):
    self.table = table

  def map(self, batch: dict) -> dict:
    batch.update(self.table.lookup(batch['key']))
    return batch


if __name__ == '__main__':
  from unclip_jax import embed  # pylint: disable=g-import-not-at-top
  embed.run()
