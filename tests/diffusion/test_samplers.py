"""DDPM/DDIM samplers and classifier-free guidance: oracle recovery, determinism, one loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion import samplers, schedules
from unclip_jax.diffusion.gaussian_diffusion import GaussianDiffusion

SHAPE = (3, 4, 4, 2)
X0 = jnp.asarray(np.random.RandomState(0).uniform(-0.9, 0.9, SHAPE[1:]), jnp.float32)


def _base(mean_type='eps', var_type='fixed_small', schedule='cosine'):
  return GaussianDiffusion.create(schedules.get_betas(schedule, 1000), mean_type=mean_type,
                                  var_type=var_type)


def _oracle(base):
  """The exact model for the one-point data distribution {X0}, called with ORIGINAL timesteps."""
  ab = np.cumprod(1 - np.asarray(schedules.get_betas('cosine', 1000), np.float64))

  def model_fn(x, t_model):
    a = jnp.asarray(ab, jnp.float32)[t_model].reshape((-1,) + (1,) * (x.ndim - 1))
    eps = (x - jnp.sqrt(a) * X0) / jnp.sqrt(1 - a)
    target = {'eps': eps, 'x0': jnp.broadcast_to(X0, x.shape),
              'v': jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * X0}[base.mean_type]
    if base.var_type == 'learned_range':
      return jnp.concatenate([target, jnp.zeros_like(target)], -1)
    return target

  return model_fn


@pytest.mark.parametrize('mean_type, var_type, spacing', [
    ('eps', 'fixed_small', '50'),
    ('x0', 'fixed_large', '10,10,5'),
    ('v', 'learned_range', '25'),
])
def test_ddpm_recovers_a_point_distribution(mean_type, var_type, spacing):
  base = _base(mean_type, var_type)
  diffusion = base.respace(spacing)
  sample = jax.jit(lambda rng: samplers.ddpm_sample(diffusion, _oracle(base), SHAPE, rng,
                                                    clip_range=1.0, return_trajectory=True))
  x0, trajectory = sample(jax.random.PRNGKey(1))
  np.testing.assert_allclose(x0, jnp.broadcast_to(X0, SHAPE), atol=1e-4)
  assert trajectory.shape == (diffusion.num_timesteps,) + SHAPE
  np.testing.assert_allclose(trajectory[-1], jnp.broadcast_to(X0, SHAPE), atol=1e-4)


@pytest.mark.parametrize('mean_type, spacing, eta', [('eps', 'ddim20', 0.0), ('v', '15', 0.5)])
def test_ddim_recovers_a_point_distribution(mean_type, spacing, eta):
  base = _base(mean_type)
  diffusion = base.respace(spacing)
  sample = jax.jit(lambda rng: samplers.ddim_sample(diffusion, _oracle(base), SHAPE, rng,
                                                    eta=eta, clip_range=1.0))
  np.testing.assert_allclose(sample(jax.random.PRNGKey(2)), jnp.broadcast_to(X0, SHAPE),
                             atol=1e-4)


def _noisy_model(x, t):
  """A model whose output depends on x and t so that the sampling path matters."""
  return 0.5 * jnp.sin(x + t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1)) / 100)


def test_sampling_is_reproducible_and_respects_supplied_noise():
  diffusion = _base().respace('20')
  ddpm = jax.jit(lambda rng, noise: samplers.ddpm_sample(
      diffusion, _noisy_model, SHAPE, rng, noise=noise, return_trajectory=True))
  ddpm_free = jax.jit(lambda rng: samplers.ddpm_sample(diffusion, _noisy_model, SHAPE, rng))
  ddim = jax.jit(lambda rng, noise: samplers.ddim_sample(diffusion, _noisy_model, SHAPE, rng,
                                                         noise=noise))
  rng_a, rng_b = jax.random.PRNGKey(3), jax.random.PRNGKey(4)
  x_T = jax.random.normal(jax.random.PRNGKey(5), SHAPE)

  np.testing.assert_array_equal(ddpm_free(rng_a), ddpm_free(rng_a))
  assert float(jnp.abs(ddpm_free(rng_a) - ddpm_free(rng_b)).max()) > 1e-2
  out_a, traj_a = ddpm(rng_a, x_T)
  out_b, traj_b = ddpm(rng_b, x_T)
  # The first step sees the supplied x_T in both runs; later steps differ by their noise.
  t_last = jnp.full((SHAPE[0],), diffusion.num_timesteps - 1, jnp.int32)
  first = diffusion.p_mean_variance(_noisy_model(x_T, diffusion.model_timesteps(t_last)), x_T,
                                    t_last)['pred_x0']
  np.testing.assert_allclose(traj_a[0], first, rtol=1e-6)
  np.testing.assert_array_equal(traj_a[0], traj_b[0])
  assert float(jnp.abs(out_a - out_b).max()) > 1e-2
  # Deterministic DDIM with supplied noise does not depend on rng at all.
  np.testing.assert_array_equal(ddim(rng_a, x_T), ddim(rng_b, x_T))
  with pytest.raises(ValueError, match='noise shape'):
    samplers.ddpm_sample(diffusion, _noisy_model, SHAPE, rng_a, noise=x_T[:1])


def test_last_step_adds_no_noise_and_ddim_eta1_is_ddpm():
  d = _base().respace('30')
  x0, eps = jnp.broadcast_to(X0, SHAPE), jax.random.normal(jax.random.PRNGKey(6), SHAPE)
  noise = jax.random.normal(jax.random.PRNGKey(7), SHAPE)
  t = jnp.array([0, 1, 17], jnp.int32)
  x_t = d.q_sample(x0, t, eps)
  ddpm_prev, _ = samplers.ddpm_step(d, eps, x_t, t, noise)
  ddpm_mean = d.p_mean_variance(eps, x_t, t)['mean']
  np.testing.assert_array_equal(ddpm_prev[0], ddpm_mean[0])
  assert float(jnp.abs(ddpm_prev[1:] - ddpm_mean[1:]).min()) > 0
  # With the model's eps consistent with x_t, DDIM at eta = 1 is the DDPM posterior step.
  ddim_prev, _ = samplers.ddim_step(d, eps, x_t, t, noise, eta=1.0)
  np.testing.assert_allclose(ddim_prev, ddpm_prev, atol=2e-6)
  with pytest.raises(ValueError, match='needs noise'):
    samplers.ddim_step(d, eps, x_t, t, None, eta=0.5)


def _primitive_names(jaxpr):
  """Names of all primitives in a jaxpr, including those of nested jaxprs (loop bodies)."""
  names = []
  for eqn in jaxpr.eqns:
    names.append(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          names += _primitive_names(inner)
  return names


def test_samplers_compile_to_a_single_loop():
  diffusion = _base().respace('50')
  for sampler in (samplers.ddpm_sample, samplers.ddim_sample):
    fn = lambda rng, s=sampler: s(diffusion, _noisy_model, SHAPE, rng)
    names = _primitive_names(jax.make_jaxpr(fn)(jax.random.PRNGKey(0)).jaxpr)
    assert names.count('sin') == 1, 'the model must be traced once, not once per step'
    assert names.count('scan') + names.count('while') == 1


def _two_branch(calls):
  """cond rows: x + 1 (mean) and 0.25 (variance); uncond rows: 2x and -0.75."""

  def f(x2, t2):
    calls.append(x2.shape)
    b = x2.shape[0] // 2
    mean = jnp.concatenate([x2[:b] + 1.0, 2.0 * x2[b:]], 0)
    var = jnp.concatenate([jnp.full_like(x2[:b], 0.25), jnp.full_like(x2[b:], -0.75)], 0)
    return mean, var

  return f


@pytest.mark.parametrize('learned_variance', [False, True])
def test_classifier_free_guidance(learned_variance):
  calls = []
  branches = _two_branch(calls)

  def f(x2, t2):
    mean, var = branches(x2, t2)
    return jnp.concatenate([mean, var], -1) if learned_variance else mean

  x = jax.random.normal(jax.random.PRNGKey(8), SHAPE)
  t = jnp.array([5, 5, 5], jnp.int32)
  cond, uncond = x + 1.0, 2.0 * x

  def mean_var(out):
    c = SHAPE[-1]
    return (out[..., :c], out[..., c:]) if learned_variance else (out, None)

  for scale, expected in ((1.0, cond), (0.0, uncond), (3.0, uncond + 3.0 * (cond - uncond))):
    calls.clear()
    out = samplers.classifier_free_guidance(f, scale, learned_variance=learned_variance)(x, t)
    assert calls == [(2 * SHAPE[0],) + SHAPE[1:]]  # one call on the doubled batch
    mean, var = mean_var(out)
    np.testing.assert_allclose(mean, expected, atol=1e-5)
    if learned_variance:
      np.testing.assert_array_equal(var, jnp.full(SHAPE, 0.25))  # conditional, unguided
  # One scale per example.
  per_example = samplers.classifier_free_guidance(f, jnp.array([0.0, 1.0, 2.0]),
                                                  learned_variance=learned_variance)(x, t)
  mean, _ = mean_var(per_example)
  np.testing.assert_allclose(mean[0], uncond[0], atol=1e-5)
  np.testing.assert_allclose(mean[1], cond[1], atol=1e-5)
  np.testing.assert_allclose(mean[2], 2 * cond[2] - uncond[2], atol=1e-5)


def test_guided_sampling_runs_under_jit():
  base = _base(var_type='learned_range')
  diffusion = base.respace('10')
  oracle = _oracle(base)
  # Both branches are the oracle: any guidance scale must still recover X0.
  f = lambda x2, t2: oracle(x2, t2)
  guided = samplers.classifier_free_guidance(f, 4.0, learned_variance=True)
  x0 = jax.jit(lambda rng: samplers.ddpm_sample(diffusion, guided, SHAPE, rng,
                                                clip_range=1.0))(jax.random.PRNGKey(9))
  np.testing.assert_allclose(x0, jnp.broadcast_to(X0, SHAPE), atol=1e-4)
