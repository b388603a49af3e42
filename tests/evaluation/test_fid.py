"""FID/KID on the standard Inception: the network against torch-fidelity's (random weights saved
as a PyTorch file, converted by our loader), the resize against pytorch-fid's, and the metrics
against their definitions."""

import importlib.util
import sys
import types

import jax
import numpy as np
import pytest

from unclip_jax.convert.torch_io import ConversionError
from unclip_jax.evaluation import fid
from unclip_jax.evaluation import inception

torch = pytest.importorskip('torch')


def _torch_fidelity_inception():
  """torch-fidelity's FID Inception module. Its package's `__init__` imports torchvision (for
  datasets), which does not run beside every torch build; the Inception itself is plain torch,
  so it is imported from a bare package."""
  spec = importlib.util.find_spec('torch_fidelity')
  if spec is None:
    pytest.skip('torch-fidelity is not installed')
  saved = {k: v for k, v in sys.modules.items() if k.startswith('torch_fidelity')}
  package = types.ModuleType('torch_fidelity')
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules['torch_fidelity'] = package
  try:
    import torch_fidelity.feature_extractor_inceptionv3 as module  # pylint: disable=g-import-not-at-top
  finally:
    for k in [k for k in sys.modules if k.startswith('torch_fidelity')]:
      del sys.modules[k]
    sys.modules.update(saved)
  return module


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """(torch-fidelity's FeatureExtractorInceptionV3 loaded from a random-weights .pth, the path):
  every weight and batch-norm statistic random, scaled so that activations keep their size."""
  module = _torch_fidelity_inception()
  cls = module.FeatureExtractorInceptionV3
  with pytest.MonkeyPatch.context() as patch:   # built without reading or loading weights
    patch.setattr(torch, 'load', lambda *a, **k: {})
    patch.setattr(torch.nn.Module, 'load_state_dict', lambda self, *a, **k: None)
    blank = cls('inception-v3-compat', ['2048'], feature_extractor_weights_path='none')
  gen = torch.Generator().manual_seed(0)
  state = {}
  for name, value in blank.state_dict().items():
    if name.endswith('num_batches_tracked'):
      state[name] = value
    elif name.endswith('running_mean'):
      state[name] = 0.1 * torch.randn(value.shape, generator=gen)
    elif name.endswith('running_var'):
      state[name] = 0.5 + torch.rand(value.shape, generator=gen)
    elif name.endswith('bn.weight'):
      state[name] = 0.8 + 0.4 * torch.rand(value.shape, generator=gen)
    elif name.endswith('bias'):
      state[name] = 0.1 * torch.randn(value.shape, generator=gen)
    else:   # He-scaled weights: a ReLU network that neither vanishes nor explodes
      fan_in = int(np.prod(value.shape[1:]))
      state[name] = torch.randn(value.shape, generator=gen) * np.sqrt(2.0 / fan_in)
  path = str(tmp_path_factory.mktemp('inception') / 'pt_inception-random.pth')
  torch.save(state, path)
  model = cls('inception-v3-compat', ['2048', 'logits'], feature_extractor_weights_path=path)
  return model, path


def test_pool_features_and_logits_match_torch_fidelity(reference):
  """Random 299px images: our pool features and logits equal the reference's to 1e-4 of their
  largest magnitude (measured: 4e-7 and 9e-7)."""
  model, path = reference
  params = inception.load_params(path)
  images = np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
  with torch.no_grad():
    want_features, want_logits = (t.numpy() for t in model(
        torch.tensor(images.transpose(0, 3, 1, 2))))
  x = (images.astype(np.float32) - 128) / 128     # its normalisation; 299px: no resize
  features, logits = jax.jit(lambda p, x: inception.FIDInceptionV3().apply(
      {'params': p}, x, logits=True))(params, x)
  assert features.shape == (2, inception.FEATURES) and logits.shape == (2, inception.NUM_CLASSES)
  assert np.abs(want_features).max() > 0.1            # not a vanishing network
  for ours, want in ((features, want_features), (logits, want_logits)):
    rel = np.abs(np.asarray(ours) - want).max() / np.abs(want).max()
    assert rel < 1e-4, rel
  np.testing.assert_allclose(inception.pool_features(params, x), features, rtol=1e-5, atol=1e-6)


def test_weights_with_a_missing_or_misshapen_tensor_are_refused(reference):
  from unclip_jax.convert import torch_io  # pylint: disable=g-import-not-at-top
  _, path = reference
  state = torch_io.load_state_dict(path)
  del state['Mixed_6c.branch7x7_2.conv.weight']
  with pytest.raises(ConversionError, match=r"no tensor 'Mixed_6c.branch7x7_2.conv.weight'"):
    inception.params_from_state_dict(state)
  state = torch_io.load_state_dict(path)
  state['fc.bias'] = np.zeros(1000, np.float32)
  with pytest.raises(ConversionError, match=r'fc/bias has shape \(1000,\), the model expects '
                                            r'\(1008,\)'):
    inception.params_from_state_dict(state)


@pytest.mark.parametrize('size', [32, 512])
def test_resize_matches_pytorch_fids_interpolation(size):
  """Up from 32px and down from 512px: bilinear, half-pixel centres, no antialiasing, as
  `F.interpolate(mode='bilinear', align_corners=False)`."""
  images = np.random.default_rng(1).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.tensor(images.transpose(0, 3, 1, 2)),
                                         size=(299, 299), mode='bilinear', align_corners=False)
  ours = inception.resize_for_inception(images)
  np.testing.assert_allclose(np.asarray(ours), want.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def _feature_sets(n=300, d=12, shift=0.0, seed=0):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return rng.normal(size=(n, d)) @ mix, rng.normal(size=(n, d)) @ mix * 1.3 + shift


def test_fid_is_the_frechet_distance_of_the_gaussians():
  """Against the definition through the eigenvalues of S1·S2 (whose square roots' sum is
  Tr (S1 S2)^½), to 1e-6; 0 for a set against itself."""
  a, b = _feature_sets(shift=0.5)
  sa, sb = fid.statistics(a), fid.statistics(b)
  np.testing.assert_allclose(sa.sigma, np.cov(a.T), rtol=1e-12)
  eig = np.linalg.eigvals(sa.sigma @ sb.sigma).astype(complex)
  want = (np.sum((sa.mu - sb.mu) ** 2) + np.trace(sa.sigma) + np.trace(sb.sigma)
          - 2 * np.sqrt(eig).real.sum())
  assert fid.frechet_distance(sa, sb) == pytest.approx(want, rel=1e-6)
  assert abs(fid.frechet_distance(sa, sa)) < 1e-6
  with pytest.raises(ValueError, match='statistics of different sizes'):
    fid.frechet_distance(sa, fid.statistics(a[:, :5]))


def test_kid_is_the_unbiased_polynomial_mmd():
  """One subset holding every feature: KID is the unbiased MMD² with k(x, y) = (x·y/D + 1)³,
  written out pair by pair; near 0 for two samples of one distribution, larger when shifted."""
  a, b = _feature_sets(n=40, d=6, shift=0.3)
  k = lambda u, v: (u @ v / 6 + 1) ** 3
  m = len(a)
  xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
  mean, std = fid.kernel_inception_distance(a, b, num_subsets=1, subset_size=m)
  assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9) and std == 0.0
  same_a, same_b = _feature_sets(n=400, seed=1)
  same = fid.kernel_inception_distance(same_a, same_a[::-1] + 0 * same_b, num_subsets=5,
                                       subset_size=200)[0]
  shifted = fid.kernel_inception_distance(*_feature_sets(n=400, shift=1.0, seed=2),
                                          num_subsets=5, subset_size=200)[0]
  assert abs(same) < 0.05 * shifted


def test_precision_and_recall():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(200, 4))
  assert fid.precision_recall(real, real.copy()) == (1.0, 1.0)
  assert fid.precision_recall(real, real + 100.0) == (0.0, 0.0)
  # Generated samples from a narrow part of the real distribution: precise, little recall.
  precision, recall = fid.precision_recall(real, 0.2 * rng.normal(size=(200, 4)))
  assert precision > 0.9 and recall < 0.5


def test_statistics_round_trip_in_pytorch_fids_npz(tmp_path):
  stats = fid.statistics(_feature_sets()[0])
  path = str(tmp_path / 'ref.npz')
  fid.save_statistics(path, stats)
  with np.load(path) as f:              # the layout pytorch-fid reads: mu, sigma
    np.testing.assert_array_equal(f['mu'], stats.mu)
    np.testing.assert_array_equal(f['sigma'], stats.sigma)
  loaded = fid.load_statistics(path)
  assert loaded.count == 300 and fid.frechet_distance(loaded, stats) == pytest.approx(0, abs=1e-6)
  np.savez(str(tmp_path / 'other.npz'), features=np.zeros(3))
  with pytest.raises(ValueError, match=r'other.npz: not FID statistics \(no mu/sigma'):
    fid.load_statistics(str(tmp_path / 'other.npz'))
  with pytest.raises(ValueError, match='cannot read FID statistics'):
    fid.load_statistics(str(tmp_path / 'missing.npz'))
