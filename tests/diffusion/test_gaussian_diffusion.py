"""GaussianDiffusion: closed forms, conversions, respacing, p(x_{t-1}|x_t) and training losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion import gaussian_diffusion as gd
from unclip_jax.diffusion import schedules
from unclip_jax.diffusion.gaussian_diffusion import GaussianDiffusion

SHAPES = [(4, 6), (4, 3, 5, 2)]  # embeddings [B, D] and images [B, H, W, C]


def _diffusion(schedule='cosine', steps=1000, **kw):
  return GaussianDiffusion.create(schedules.get_betas(schedule, steps), **kw)


def _normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_stored_quantities_match_closed_forms():
  betas = schedules.cosine_betas(1000)
  d = GaussianDiffusion.create(betas)
  ab = np.cumprod(1 - betas)
  ab_prev = np.append(1.0, ab[:-1])
  assert d.num_timesteps == 1000 and d.betas.dtype == jnp.float32
  np.testing.assert_allclose(d.alphas_cumprod, ab, rtol=1e-6)
  np.testing.assert_allclose(d.alphas_cumprod_prev, ab_prev, rtol=1e-6)
  posterior_variance = betas * (1 - ab_prev) / (1 - ab)
  np.testing.assert_allclose(d.posterior_variance, posterior_variance, rtol=1e-6)
  assert float(d.posterior_variance[0]) == 0.0
  np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(posterior_variance[1:]),
                             rtol=1e-6)
  assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
  np.testing.assert_allclose(d.posterior_mean_coef1, betas * np.sqrt(ab_prev) / (1 - ab), rtol=1e-6)
  np.testing.assert_allclose(d.posterior_mean_coef2,
                             (1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab), rtol=1e-6)
  np.testing.assert_allclose(d.fixed_large_variance[1:], betas[1:], rtol=1e-6)
  np.testing.assert_array_equal(d.timestep_map, np.arange(1000))


def test_posterior_is_the_gaussian_product():
  """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): check the precision and mean."""
  d = _diffusion('linear', 100)
  betas, ab = np.asarray(schedules.linear_betas(100)), np.cumprod(1 - schedules.linear_betas(100))
  t = 37
  x0, x_t = 0.3, -1.2
  precision = (1 - betas[t]) / betas[t] + 1 / (1 - ab[t - 1])
  mean = (np.sqrt(1 - betas[t]) * x_t / betas[t] + np.sqrt(ab[t - 1]) * x0 / (1 - ab[t - 1]))
  mean /= precision
  m, v, logv = d.q_posterior_mean_variance(jnp.full((1, 1), x0), jnp.full((1, 1), x_t),
                                           jnp.array([t]))
  assert float(v[0, 0]) == pytest.approx(1 / precision, rel=1e-5)
  assert float(logv[0, 0]) == pytest.approx(-math.log(precision), rel=1e-5)
  assert float(m[0, 0]) == pytest.approx(mean, rel=1e-5)


def test_q_sample_statistics():
  d = _diffusion()
  n, t = 40000, 300
  x0 = jnp.full((n, 1), 0.7)
  ts = jnp.full((n,), t, jnp.int32)
  x_t = d.q_sample(x0, ts, _normal(0, (n, 1)))
  ab = float(d.alphas_cumprod[t])
  assert float(x_t.mean()) == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
  assert float(x_t.var()) == pytest.approx(1 - ab, rel=0.03)
  mean, var, log_var = d.q_mean_variance(x0[:2], ts[:2])
  np.testing.assert_allclose(mean, math.sqrt(ab) * 0.7, rtol=1e-6)
  np.testing.assert_allclose(var, 1 - ab, rtol=1e-6)
  np.testing.assert_allclose(log_var, math.log(1 - ab), rtol=1e-5)


@pytest.mark.parametrize('shape', SHAPES)
def test_parameterisations_round_trip(shape):
  d = _diffusion()
  t = jnp.array([0, 10, 500, 990], jnp.int32)
  x0, eps = _normal(1, shape), _normal(2, shape)
  x_t = d.q_sample(x0, t, eps)
  np.testing.assert_allclose(d.predict_x0_from_eps(x_t, t, eps), x0, atol=2e-4)
  np.testing.assert_allclose(d.predict_eps_from_x0(x_t, t, x0), eps, atol=2e-4)
  v = d.predict_v(x0, t, eps)
  np.testing.assert_allclose(d.predict_x0_from_v(x_t, t, v), x0, atol=1e-5)
  np.testing.assert_allclose(d.predict_eps_from_v(x_t, t, v), eps, atol=1e-5)
  ab = np.cumprod(1 - schedules.cosine_betas(1000))[np.asarray(t)]
  ab = ab.reshape((-1,) + (1,) * (len(shape) - 1))
  np.testing.assert_allclose(v, np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0, atol=1e-6)


def test_normal_kl():
  m, lv = jnp.array([0.3, -2.0]), jnp.array([0.1, -3.0])
  np.testing.assert_allclose(gd.normal_kl(m, lv, m, lv), 0, atol=1e-7)
  m1, s1, m2, s2 = 0.5, 0.7, -0.2, 1.3
  closed = math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
  got = gd.normal_kl(m1, 2 * math.log(s1), m2, 2 * math.log(s2))
  assert float(got) == pytest.approx(closed, rel=1e-6)
  assert float(gd.normal_kl(m2, 2 * math.log(s2), m1, 2 * math.log(s1))) > 0


def test_discretized_gaussian_is_a_distribution_over_bins():
  levels = jnp.linspace(-1, 1, 256)[None]
  means = jnp.array([[0.0], [0.9], [-1.5]])
  log_scales = jnp.log(jnp.array([[0.5], [0.01], [0.2]]))
  log_p = jax.jit(gd.discretized_gaussian_log_likelihood)(levels, means, log_scales)
  np.testing.assert_allclose(jnp.exp(log_p).sum(-1), 1.0, atol=1e-4)
  # An interior bin is the Gaussian mass between its edges.
  x, mean, std = 0.2, 0.25, 0.03
  edges = (np.array([x - 1 / 255, x + 1 / 255]) - mean) / std
  mass = 0.5 * (math.erf(edges[1] / math.sqrt(2)) - math.erf(edges[0] / math.sqrt(2)))
  got = gd.discretized_gaussian_log_likelihood(jnp.array(x), mean, math.log(std))
  assert float(got) == pytest.approx(math.log(mass), rel=1e-4)
  dense = gd.gaussian_log_likelihood(jnp.array(x), mean, math.log(std))
  assert float(dense) == pytest.approx(-0.5 * math.log(2 * math.pi) - math.log(std)
                                       - 0.5 * ((x - mean) / std) ** 2, rel=1e-6)


def test_respacing_keeps_alphas_cumprod_at_kept_steps():
  d = _diffusion(var_type='learned_range')
  r = d.respace('25')
  kept = schedules.space_timesteps(1000, '25')
  assert r.num_timesteps == 25 and r.var_type == 'learned_range' and r.loss_type == 'hybrid'
  np.testing.assert_array_equal(r.timestep_map, kept)
  np.testing.assert_allclose(r.alphas_cumprod, np.asarray(d.alphas_cumprod)[kept], rtol=1e-6)
  ab = np.cumprod(1 - schedules.cosine_betas(1000))[kept]
  np.testing.assert_allclose(r.betas, 1 - ab / np.append(1.0, ab[:-1]), rtol=1e-6)
  assert float(r.betas[0]) == pytest.approx(float(d.betas[0]), rel=1e-6)
  t = jnp.array([0, 1, 24], jnp.int32)
  np.testing.assert_array_equal(r.model_timesteps(t), [0, 42, 999])
  assert r.model_timesteps(t).dtype == jnp.int32
  # Respacing a respaced process composes the maps.
  rr = r.keep_timesteps([0, 12, 24])
  np.testing.assert_array_equal(rr.timestep_map, [0, 500, 999])
  np.testing.assert_allclose(rr.alphas_cumprod, np.asarray(d.alphas_cumprod)[[0, 500, 999]],
                             rtol=1e-6)
  # Respacing to every step changes nothing.
  full = d.respace('1000')
  np.testing.assert_allclose(full.betas, d.betas, rtol=1e-6)
  with pytest.raises(ValueError, match='subset'):
    d.keep_timesteps([0, 1000])


def test_rescaled_model_timesteps():
  d = _diffusion('linear', 4000, rescale_timesteps=True).respace('ddim4')
  np.testing.assert_array_equal(d.timestep_map, [0, 1000, 2000, 3000])
  got = d.model_timesteps(jnp.arange(4))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, [0, 250, 500, 750])


def test_create_validates_its_configuration():
  betas = schedules.cosine_betas(10)
  with pytest.raises(ValueError, match="'epsilon'"):
    GaussianDiffusion.create(betas, mean_type='epsilon')
  with pytest.raises(ValueError, match="'learned'"):
    GaussianDiffusion.create(betas, var_type='learned')
  with pytest.raises(ValueError, match='does not fit'):
    GaussianDiffusion.create(betas, var_type='learned_range', loss_type='mse')
  with pytest.raises(ValueError, match='does not fit'):
    GaussianDiffusion.create(betas, loss_type='hybrid')
  with pytest.raises(ValueError, match=r'\(0, 1\)'):
    GaussianDiffusion.create(np.append(betas, 1.0))


def test_is_a_pytree_usable_by_closure_and_as_argument():
  d = _diffusion('linear', 50, var_type='learned_range')
  leaves, treedef = jax.tree_util.tree_flatten(d)
  assert all(isinstance(leaf, jax.Array) for leaf in leaves)
  x0 = _normal(0, (2, 3))
  t = jnp.array([5, 7], jnp.int32)
  by_arg = jax.jit(lambda diff, x: diff.q_sample(x, t, x))(d, x0)
  by_closure = jax.jit(lambda x: d.q_sample(x, t, x))(x0)
  np.testing.assert_allclose(by_arg, by_closure, rtol=1e-6)
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert rebuilt.respace('ddim5').num_timesteps == 5


def test_sample_timesteps_is_uniform_int32():
  d = _diffusion('cosine', 10)
  t = d.sample_timesteps(jax.random.PRNGKey(0), 5000)
  assert t.shape == (5000,) and t.dtype == jnp.int32
  counts = np.bincount(np.asarray(t), minlength=10)
  assert counts.shape == (10,) and counts.min() > 400


@pytest.mark.parametrize('shape', SHAPES)
def test_p_mean_variance(shape):
  d = _diffusion(var_type='learned_range')
  t = jnp.array([0, 3, 500, 999], jnp.int32)
  x_t, eps = _normal(0, shape), _normal(1, shape)
  out = d.p_mean_variance(jnp.concatenate([eps, -jnp.ones(shape)], -1), x_t, t)
  pred_x0 = d.predict_x0_from_eps(x_t, t, eps)
  np.testing.assert_allclose(out['pred_x0'], pred_x0, rtol=1e-6)
  np.testing.assert_allclose(out['mean'], d.q_posterior_mean_variance(pred_x0, x_t, t)[0],
                             rtol=1e-6)
  _, post_var, post_log_var = d.q_posterior_mean_variance(pred_x0, x_t, t)
  np.testing.assert_allclose(out['log_variance'], post_log_var, rtol=1e-6)  # v = -1: beta~
  up = d.p_mean_variance(jnp.concatenate([eps, jnp.ones(shape)], -1), x_t, t)
  log_betas = np.log(schedules.cosine_betas(1000)[np.asarray(t)])
  log_betas = log_betas.reshape((-1,) + (1,) * (len(shape) - 1))
  np.testing.assert_allclose(up['log_variance'], np.broadcast_to(log_betas, shape), rtol=1e-5)
  np.testing.assert_allclose(up['variance'], np.exp(up['log_variance']), rtol=1e-6)
  clipped = d.p_mean_variance(jnp.concatenate([eps, jnp.zeros(shape)], -1), x_t, t,
                              clip_range=0.5)
  np.testing.assert_allclose(clipped['pred_x0'], jnp.clip(pred_x0, -0.5, 0.5))
  with pytest.raises(ValueError, match='does not fit'):
    d.p_mean_variance(eps, x_t, t)

  small = _diffusion()
  out = small.p_mean_variance(eps, x_t, t)
  np.testing.assert_allclose(out['variance'], post_var, rtol=1e-6)
  large = _diffusion(var_type='fixed_large', mean_type='x0').p_mean_variance(eps, x_t, t)
  np.testing.assert_allclose(large['pred_x0'], eps)
  np.testing.assert_allclose(large['variance'][1:],
                             np.broadcast_to(np.exp(log_betas[1:]), (3,) + shape[1:]), rtol=1e-5)
  np.testing.assert_allclose(large['variance'][0], small.posterior_variance[1], rtol=1e-6)


@pytest.mark.parametrize('mean_type', ['eps', 'x0', 'v'])
def test_mse_regresses_the_mean_type_target(mean_type):
  d = _diffusion(mean_type=mean_type)
  shape = (4, 3, 3, 2)
  t = jnp.array([0, 10, 400, 999], jnp.int32)
  x0, noise = _normal(0, shape), _normal(1, shape)
  target = {'eps': noise, 'x0': x0, 'v': d.predict_v(x0, t, noise)}[mean_type]
  exact = d.training_losses(target, x0, t, noise)
  np.testing.assert_allclose(exact['mse'], 0, atol=1e-10)
  np.testing.assert_array_equal(exact['vb'], 0)
  off = d.training_losses(target + 0.5, x0, t, noise)
  np.testing.assert_allclose(off['mse'], 0.25, rtol=1e-5)
  np.testing.assert_allclose(off['loss'], off['mse'])
  weights = jnp.array([1.0, 0.0, 2.0, 0.5])
  weighted = d.training_losses(target + 0.5, x0, t, noise, weights=weights)
  np.testing.assert_allclose(weighted['loss'], 0.25 * weights, rtol=1e-5)


def _hybrid_setup(t):
  d = _diffusion(var_type='learned_range')
  shape = (len(t), 4, 4, 3)
  x0 = jnp.clip(_normal(0, shape), -1, 1)
  noise = _normal(1, shape)
  out = jnp.concatenate([noise + 0.3 * _normal(2, shape), 0.5 * _normal(3, shape)], -1)
  return d, x0, jnp.asarray(t, jnp.int32), noise, out


def test_hybrid_vb_trains_only_the_variance():
  d, x0, t, noise, out = _hybrid_setup([0, 5, 500, 999])

  @jax.jit
  def grads(o):
    term_grad = lambda k: jax.grad(lambda o: d.training_losses(o, x0, t, noise)[k].sum())(o)
    return term_grad('vb'), term_grad('mse'), term_grad('loss')

  vb_grad, mse_grad, total_grad = grads(out)
  np.testing.assert_array_equal(vb_grad[..., :3], 0)
  assert float(jnp.abs(vb_grad[..., 3:]).min(axis=(1, 2, 3)).min()) > 0
  np.testing.assert_array_equal(mse_grad[..., 3:], 0)
  np.testing.assert_allclose(total_grad, vb_grad + mse_grad, rtol=1e-6)


def test_hybrid_vb_is_the_scaled_kl_and_decoder_nll_at_t0():
  d, x0, t, noise, out = _hybrid_setup([0, 5, 500, 999])
  losses = d.training_losses(out, x0, t, noise)
  x_t = d.q_sample(x0, t, noise)
  p = d.p_mean_variance(out, x_t, t)
  true_mean, _, true_log_var = d.q_posterior_mean_variance(x0, x_t, t)
  kl = gd.mean_flat(gd.normal_kl(true_mean, true_log_var, p['mean'], p['log_variance']))
  nll = -gd.mean_flat(gd.discretized_gaussian_log_likelihood(x0, p['mean'],
                                                             0.5 * p['log_variance']))
  scale = d.num_timesteps / 1000 / math.log(2)
  np.testing.assert_allclose(losses['vb'][1:], kl[1:] * scale, rtol=1e-5)
  assert float(losses['vb'][0]) == pytest.approx(float(nll[0]) * scale, rel=1e-5)
  assert abs(float(nll[0]) - float(kl[0])) > 1e-2  # t == 0 really is the other term
  np.testing.assert_allclose(losses['loss'], losses['mse'] + losses['vb'], rtol=1e-6)
  # A respaced (here 100-step) hybrid loss scales its VB term by 100 / 1000.
  short = d.respace('100')
  short_losses = short.training_losses(out, x0, jnp.array([0, 1, 50, 99]), noise)
  direct = short.vb_terms_bpd(out, x0, short.q_sample(x0, jnp.array([0, 1, 50, 99]), noise),
                              jnp.array([0, 1, 50, 99]))
  np.testing.assert_allclose(short_losses['vb'], direct * 0.1, rtol=1e-6)
  # Continuous decoder NLL for non-quantised data.
  dense = d.training_losses(out, x0, t, noise, discretized_decoder=False)
  dense_nll = -gd.mean_flat(gd.gaussian_log_likelihood(x0, p['mean'], 0.5 * p['log_variance']))
  assert float(dense['vb'][0]) == pytest.approx(float(dense_nll[0]) * scale, rel=1e-5)
  np.testing.assert_allclose(dense['vb'][1:], losses['vb'][1:])


def test_hybrid_vb_vanishes_for_the_true_posterior():
  d, x0, t, noise, _ = _hybrid_setup([3, 200, 700])
  perfect = jnp.concatenate([noise, -jnp.ones_like(noise)], -1)  # true eps, sigma^2 = beta~
  losses = jax.jit(d.training_losses)(perfect, x0, t, noise)
  np.testing.assert_allclose(losses['vb'], 0, atol=1e-5)
  np.testing.assert_allclose(losses['mse'], 0, atol=1e-10)


@pytest.mark.parametrize('mean_type', ['eps', 'x0', 'v'])
def test_min_snr_weights_put_min_snr_gamma_on_the_x0_error(mean_type):
  """weights * (target error)^2 == min(SNR, gamma) * (implied x0 error)^2, whatever the target."""
  d = _diffusion(mean_type=mean_type)
  shape = (4, 3, 3, 2)
  t = jnp.array([0, 300, 600, 999], jnp.int32)
  x0, noise, x_t_noise = _normal(0, shape), _normal(1, shape), _normal(2, shape)
  x_t = d.q_sample(x0, t, noise)
  output = d.training_target(x0, t, noise) + 0.1 * x_t_noise   # a wrong prediction
  pred_x0 = d.pred_x0_from_output(output, x_t, t)
  gamma = 5.0
  snr = np.asarray(d.snr(t))
  want = np.minimum(snr, gamma) * np.mean(np.square(pred_x0 - x0), axis=(1, 2, 3))
  losses = d.training_losses(output, x0, t, noise, mse_weights=d.min_snr_weights(t, gamma))
  np.testing.assert_allclose(losses['loss'], want, rtol=2e-3)
  assert snr[0] > gamma > snr[-1]    # both branches of the min are exercised
  with pytest.raises(ValueError, match='gamma must be positive'):
    d.min_snr_weights(t, 0.0)
