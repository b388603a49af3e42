"""`clip_embeddings`: CLIP embeddings people already hold, in the layout clip-retrieval writes
and embedding-reader reads (e.g. the released LAION ViT-L/14 embeddings):

  FOLDER/img_emb/img_emb_N.npy             float16/float32 [n_N, D], one row per sample
  FOLDER/text_emb/text_emb_N.npy           (optional) the captions' embeddings, same rows
  FOLDER/metadata/metadata_N.parquet       n_N rows: the caption (`config.data.caption_key`,
                                           default 'caption'), a key (`key_key`, default 'key'
                                           when present, else N:row) and other columns (labels)

`config.data.paths` names the folder (`eval_paths` the held-out one). A prior trains from these
without touching an image: each example carries `clip_image_emb` (made unit-norm, as our own
embeddings are) and its caption. Files whose row counts disagree are refused, naming them. The
layout records no fingerprint of the CLIP that made it: only its width can be checked against
the prior's CLIP (`config.clip`), which must be the same model (e.g. a converted ViT-L/14).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow.parquet as pq

from unclip_jax.data import sources

_NUMBER = re.compile(r'_(\d+)\.(npy|parquet)$')


def _numbered(folder: str, prefix: str, suffix: str) -> dict[int, str]:
  if not os.path.isdir(folder):
    return {}
  out = {}
  for name in os.listdir(folder):
    m = _NUMBER.search(name)
    if name.startswith(prefix) and name.endswith(suffix) and m:
      out[int(m.group(1))] = os.path.join(folder, name)
  return out


class ClipEmbeddingsSource(sources.RandomAccessSource):
  """Rows of an embedding-reader folder, in file order."""

  def __init__(self, folder: str, *, caption_key: str = 'caption', key_key=None,
               field: str = 'config.data.paths'):
    if '://' in folder:
      raise ValueError(f'{field}: {folder} is remote; read embedding folders from local (or '
                       'mounted) storage')
    self.folder, self.field = folder, field
    images = _numbered(os.path.join(folder, 'img_emb'), 'img_emb', '.npy')
    texts = _numbered(os.path.join(folder, 'text_emb'), 'text_emb', '.npy')
    metadata = _numbered(os.path.join(folder, 'metadata'), 'metadata', '.parquet')
    if not images:
      raise FileNotFoundError(f'{field}: {folder!r} has no img_emb/img_emb_N.npy (the '
                              'clip-retrieval / embedding-reader layout)')
    missing = sorted(set(images) - set(metadata))
    if missing:
      raise FileNotFoundError(f'{field}: {folder!r} has img_emb_{missing[0]}.npy but no '
                              f'metadata/metadata_{missing[0]}.parquet (the captions)')
    self.numbers = sorted(images)
    self._image_files = [images[n] for n in self.numbers]
    self._text_files = [texts.get(n) for n in self.numbers]
    self._meta_files = [metadata[n] for n in self.numbers]
    self.caption_key, self.key_key = caption_key, key_key
    counts = []
    for n, image_file, text_file, meta_file in zip(self.numbers, self._image_files,
                                                   self._text_files, self._meta_files):
      rows = np.load(image_file, mmap_mode='r').shape[0]
      meta_rows = pq.ParquetFile(meta_file).metadata.num_rows
      if meta_rows != rows:
        raise ValueError(f'{field}: {os.path.basename(image_file)} has {rows} embeddings but '
                         f'{os.path.basename(meta_file)} {meta_rows} rows')
      if text_file is not None and np.load(text_file, mmap_mode='r').shape[0] != rows:
        raise ValueError(f'{field}: {os.path.basename(text_file)} has '
                         f'{np.load(text_file, mmap_mode="r").shape[0]} rows, '
                         f'{os.path.basename(image_file)} {rows}')
      counts.append(rows)
    self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self.embed_dim = int(np.load(self._image_files[0], mmap_mode='r').shape[1])
    self._arrays = None

  def _open(self):
    if self._arrays is None:   # opened lazily: the source pickles small into grain workers
      arrays = []              # (read threads may race here: publish the list when complete)
      for image_file, text_file, meta_file in zip(self._image_files, self._text_files,
                                                  self._meta_files):
        meta = pq.read_table(meta_file).to_pylist()
        arrays.append((np.load(image_file, mmap_mode='r'),
                       None if text_file is None else np.load(text_file, mmap_mode='r'), meta))
      self._arrays = arrays
    return self._arrays

  def __getstate__(self):
    return dict(self.__dict__, _arrays=None)

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, index: int) -> dict:
    f = int(np.searchsorted(self.offsets, index, side='right')) - 1
    row = index - int(self.offsets[f])
    image_emb, text_emb, meta = self._open()[f]
    record = meta[row]
    key_col = self.key_key or ('key' if 'key' in record else None)
    key = str(record[key_col]) if key_col and record.get(key_col) is not None else \
        f'{self.numbers[f]}:{row}'
    unit = lambda v: (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)
    image = unit(np.asarray(image_emb[row], np.float32))
    text = unit(np.asarray(text_emb[row], np.float32)) if text_emb is not None else \
        np.zeros_like(image)
    labels = {k: v for k, v in record.items() if k != self.caption_key and
              (v is None or isinstance(v, (str, int, float, bool)))}
    return {'key': key, 'caption': record.get(self.caption_key), 'labels': labels,
            'clip_image_emb': image, 'clip_text_emb': text}

  def image_embeddings(self, max_rows=None) -> np.ndarray:
    """The first `max_rows` image embeddings [n, D], unit-norm (for the prior's statistics)."""
    out, n = [], 0
    for image_emb, _, _ in self._open():
      if max_rows is not None and n >= max_rows:
        break
      take = np.asarray(image_emb if max_rows is None else image_emb[:max_rows - n], np.float32)
      out.append(take / np.maximum(np.linalg.norm(take, axis=-1, keepdims=True), 1e-12))
      n += len(take)
    return np.concatenate(out)

  def describe(self) -> str:
    return f'the embedding folder {self.folder} ({len(self)} rows in {len(self.numbers)} files)'


def make(data_config, split: str) -> ClipEmbeddingsSource:
  field = 'config.data.paths' if split == 'train' else 'config.data.eval_paths'
  folder = data_config.get('paths' if split == 'train' else 'eval_paths')
  if not folder:
    raise FileNotFoundError(f'{field} is empty: name the embedding folder (holding img_emb/, '
                            'metadata/)')
  return ClipEmbeddingsSource(folder.rstrip('/'),
                              caption_key=sources.data_field(data_config, 'caption_key',
                                                             'caption'),
                              key_key=data_config.get('key_key'), field=field)
