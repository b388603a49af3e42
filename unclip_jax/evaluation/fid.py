"""FID, KID and improved precision/recall from Inception pool features; reference statistics.

Pure functions on feature arrays [N, D] (float, any source: `inception.pool_features`):

  statistics(features)              → Statistics(mu [D], sigma [D, D]), float64
  frechet_distance(a, b)            FID between two Statistics
  kernel_inception_distance(x, y)   KID: unbiased MMD² with the cubic polynomial kernel
                                    k(x, y) = (x·y / D + 1)³, mean and std over random subsets
  precision_recall(real, fake, k)   Kynkäänniemi et al. (2019): k-NN balls around each set
  save_statistics / load_statistics `.npz` with `mu` and `sigma`, the file pytorch-fid writes
                                    and reads (`--save-stats`)
"""

from __future__ import annotations

import dataclasses
import io
from typing import Optional
import zipfile

import numpy as np


@dataclasses.dataclass(frozen=True)
class Statistics:
  mu: np.ndarray      # [D]
  sigma: np.ndarray   # [D, D]
  count: Optional[int] = None   # the number of feature vectors, where known


def statistics(features) -> Statistics:
  """Mean and covariance (unbiased, as np.cov) of features [N, D], in float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f'features: expected [N >= 2, D], got shape {features.shape}')
  return Statistics(features.mean(0), np.cov(features, rowvar=False), len(features))


def frechet_distance(a: Statistics, b: Statistics) -> float:
  """||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^½).

  Tr (S_a S_b)^½ is computed as Tr (S_a^½ S_b S_a^½)^½, the same number for covariance
  (symmetric positive semi-definite) matrices, from two symmetric eigendecompositions: stable
  where the covariances are singular (fewer samples than dimensions), and seconds instead of
  minutes for 2048 dimensions (pytorch-fid's general matrix square root)."""
  mu1, mu2 = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
  s1, s2 = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f'statistics of different sizes: mu {mu1.shape} / {mu2.shape}, sigma '
                     f'{s1.shape} / {s2.shape}')
  w, v = np.linalg.eigh((s1 + s1.T) / 2)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = root @ s2 @ root
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
  diff = mu1 - mu2
  return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _polynomial_mmd(x: np.ndarray, y: np.ndarray) -> float:
  d = x.shape[1]
  kxx = (x @ x.T / d + 1) ** 3
  kyy = (y @ y.T / d + 1) ** 3
  kxy = (x @ y.T / d + 1) ** 3
  m, n = len(x), len(y)
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
               + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def kernel_inception_distance(x, y, *, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
  """KID (mean, std) over `num_subsets` random subsets of `subset_size` of each set (without
  replacement; the subset size is cut to the smaller set's size)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f'KID: feature sets of shapes {x.shape} and {y.shape}')
  size = min(subset_size, len(x), len(y))
  if size < 2:
    raise ValueError(f'KID needs at least 2 features per set, got {len(x)} and {len(y)}')
  rng = np.random.RandomState(seed)
  mmds = [_polynomial_mmd(x[rng.choice(len(x), size, replace=False)],
                          y[rng.choice(len(y), size, replace=False)])
          for _ in range(num_subsets)]
  return float(np.mean(mmds)), float(np.std(mmds))


def _kth_neighbour_radii(features: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
  radii = np.empty(len(features))
  sq = (features ** 2).sum(1)
  for i in range(0, len(features), chunk):
    d = sq[i:i + chunk, None] + sq[None] - 2 * features[i:i + chunk] @ features.T
    radii[i:i + chunk] = np.sqrt(np.maximum(np.sort(d, axis=1)[:, k], 0))  # [:, 0] is itself
  return radii


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray,
              chunk: int = 1024) -> float:
  """The fraction of `points` inside at least one ball (centre, radius)."""
  inside = 0
  csq = (centres ** 2).sum(1)
  for i in range(0, len(points), chunk):
    p = points[i:i + chunk]
    d = np.sqrt(np.maximum((p ** 2).sum(1)[:, None] + csq[None] - 2 * p @ centres.T, 0))
    inside += int((d <= radii[None]).any(1).sum())
  return inside / len(points)


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
  """Improved precision (the fraction of generated samples inside the real manifold: balls of
  each real feature's k-th neighbour distance) and recall (the converse)."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if min(len(real), len(fake)) <= k:
    raise ValueError(f'precision/recall with k={k} needs more than {k} features per set')
  precision = _coverage(fake, real, _kth_neighbour_radii(real, k))
  recall = _coverage(real, fake, _kth_neighbour_radii(fake, k))
  return precision, recall


def save_statistics(path: str, stats: Statistics):
  """`.npz` with `mu` and `sigma` (pytorch-fid's format), written atomically (local or gs://)."""
  from unclip_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  extra = {} if stats.count is None else {'count': np.int64(stats.count)}
  buffer = io.BytesIO()
  np.savez(buffer, mu=stats.mu, sigma=stats.sigma, **extra)
  workdir_lib.atomic_write_bytes(path, buffer.getvalue())


def load_statistics(path: str) -> Statistics:
  """Statistics from an `.npz` holding `mu` and `sigma` (ours or pytorch-fid's; local or
  gs://)."""
  from unclip_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  try:
    f = np.load(io.BytesIO(workdir_lib.path(path).read_bytes()))
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path}: cannot read FID statistics: {e}') from e
  if not isinstance(f, np.lib.npyio.NpzFile):
    raise ValueError(f'{path}: not FID statistics (an array, not an .npz with mu and sigma)')
  with f:
    if 'mu' not in f or 'sigma' not in f:
      raise ValueError(f'{path}: not FID statistics (no mu/sigma; has {sorted(f.files)})')
    count = int(f['count']) if 'count' in f else None
    return Statistics(np.asarray(f['mu'], np.float64), np.asarray(f['sigma'], np.float64),
                      count)
