"""One sampler step equals diffusers' DDPMScheduler / UnCLIPScheduler / DDIMScheduler step.

diffusers computes its schedule in float32 torch, which loses ~1e-3 relative precision in
quantities like 1 - alphas_cumprod near t = 0; we compute ours in float64 and store float32.
To compare formulations rather than roundings, the reference schedulers get our float64
schedule and float64 inputs; our float32 step must match them to rtol 1e-5. A separate test
checks that the float32 schedules themselves agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

diffusers = pytest.importorskip('diffusers')
torch = pytest.importorskip('torch')

from unclip_jax.diffusion import samplers, schedules  # pylint: disable=wrong-import-position
from unclip_jax.diffusion.gaussian_diffusion import GaussianDiffusion  # pylint: disable=wrong-import-position

DIFFUSERS_SCHEDULE = {'cosine': 'squaredcos_cap_v2', 'linear': 'linear'}
DIFFUSERS_PREDICTION = {'eps': 'epsilon', 'x0': 'sample', 'v': 'v_prediction'}
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _use_float64_schedule(scheduler, betas):
  """Replaces a diffusers scheduler's float32 schedule tensors by our float64 schedule."""
  betas = torch.tensor(betas, dtype=torch.float64)
  scheduler.betas = betas
  scheduler.alphas = 1.0 - betas
  scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
  scheduler.one = torch.tensor(1.0, dtype=torch.float64)
  scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
  return scheduler


def _inputs(seed, shape, output_channels, output_scale=1.0):
  """float32 x_t, model output and noise (channels last), identical in both frameworks."""
  rng = np.random.RandomState(seed)
  x_t = rng.randn(*shape).astype(np.float32)
  out = (output_scale * rng.randn(*shape[:-1], output_channels)).astype(np.float32)
  if output_channels == 2 * shape[-1]:
    out[..., shape[-1]:] = rng.uniform(-1, 1, shape[:-1] + (shape[-1],))  # v in [-1, 1]
  return x_t, out


def _torch_noise(seed, shape):
  """What diffusers' randn_tensor draws for `shape` in float64 from a generator seeded `seed`."""
  return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _to_torch(x):
  """channels-last float32 numpy -> channels-first float64 torch."""
  x = torch.tensor(np.asarray(x), dtype=torch.float64)
  return x.permute(0, x.ndim - 1, *range(1, x.ndim - 1)) if x.ndim > 2 else x


def _from_torch(x):
  x = x.numpy()
  return np.moveaxis(x, 1, -1) if x.ndim > 2 else x


def _compare_steps(ours, reference_step, x_t, out, timesteps, seed):
  """Runs diffusers row by row (scalar timesteps); ours is (x_prev, pred_x0) for the batch."""
  x_prev, pred_x0 = ours
  for row, t in enumerate(timesteps):
    ref_prev, ref_x0 = reference_step(_to_torch(out[row:row + 1]), t, _to_torch(x_t[row:row + 1]),
                                      seed + row)
    np.testing.assert_allclose(pred_x0[row:row + 1], _from_torch(ref_x0), **TOLERANCE,
                               err_msg=f'pred_x0 at t={t}')
    np.testing.assert_allclose(x_prev[row:row + 1], _from_torch(ref_prev), **TOLERANCE,
                               err_msg=f'x_prev at t={t}')


def _noise_rows(seed, rows, shape_per_row):
  """Our per-row noise: the same draws diffusers makes (channels-first) moved channels-last."""
  noise = [_from_torch(_torch_noise(seed + r, (1,) + shape_per_row)) for r in range(rows)]
  return jnp.asarray(np.concatenate(noise).astype(np.float32))


def test_schedules_match_diffusers_float32():
  from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
  np.testing.assert_allclose(schedules.cosine_betas(1000), betas_for_alpha_bar(1000).numpy(),
                             rtol=1e-6)
  linear = diffusers.DDPMScheduler(beta_schedule='linear')
  np.testing.assert_allclose(schedules.linear_betas(1000), linear.betas.numpy(), rtol=1e-6)
  for name in ('cosine', 'linear'):
    ours = GaussianDiffusion.create(schedules.get_betas(name, 1000))
    theirs = diffusers.DDPMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[name])
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=1e-4)


@pytest.mark.parametrize('schedule', ['cosine', 'linear'])
@pytest.mark.parametrize('mean_type', ['eps', 'x0', 'v'])
@pytest.mark.parametrize('variance_type', ['fixed_small', 'fixed_small_log'])
@pytest.mark.parametrize('clip', [False, True])
def test_ddpm_step_matches_ddpm_scheduler(schedule, mean_type, variance_type, clip):
  betas = schedules.get_betas(schedule, 1000)
  diffusion = GaussianDiffusion.create(betas, mean_type=mean_type, var_type='fixed_small')
  scheduler = _use_float64_schedule(diffusers.DDPMScheduler(
      beta_schedule=DIFFUSERS_SCHEDULE[schedule], prediction_type=DIFFUSERS_PREDICTION[mean_type],
      variance_type=variance_type, clip_sample=clip), betas)
  timesteps = [999, 500, 37, 1, 0]
  shape, seed = (len(timesteps), 6), 100
  x_t, out = _inputs(0, shape, 6, output_scale=2.0)
  noise = _noise_rows(seed, len(timesteps), shape[1:])
  ours = jax.jit(samplers.ddpm_step, static_argnames='clip_range')(
      diffusion, jnp.asarray(out), jnp.asarray(x_t), jnp.asarray(timesteps, jnp.int32), noise,
      clip_range=1.0 if clip else None)

  def reference(o, t, x, s):
    r = scheduler.step(o, t, x, generator=torch.Generator().manual_seed(s))
    return r.prev_sample, r.pred_original_sample

  _compare_steps(ours, reference, x_t, out, timesteps, seed)


def test_learned_range_step_matches_ddpm_scheduler():
  betas = schedules.cosine_betas(1000)
  diffusion = GaussianDiffusion.create(betas, var_type='learned_range')
  scheduler = _use_float64_schedule(diffusers.DDPMScheduler(
      beta_schedule='squaredcos_cap_v2', variance_type='learned_range', clip_sample=True), betas)
  timesteps = [999, 400, 2, 1, 0]
  shape, seed = (len(timesteps), 2, 3, 4), 200
  x_t, out = _inputs(1, shape, 8)
  noise = _noise_rows(seed, len(timesteps), (4, 2, 3))
  ours = samplers.ddpm_step(diffusion, jnp.asarray(out), jnp.asarray(x_t),
                            jnp.asarray(timesteps, jnp.int32), noise, clip_range=1.0)

  def reference(o, t, x, s):
    r = scheduler.step(o, t, x, generator=torch.Generator().manual_seed(s))
    return r.prev_sample, r.pred_original_sample

  _compare_steps(ours, reference, x_t, out, timesteps, seed)


def test_respaced_ddpm_step_matches_ddpm_scheduler_custom_timesteps():
  betas = schedules.linear_betas(1000)
  diffusion = GaussianDiffusion.create(betas).respace('10,5')
  scheduler = _use_float64_schedule(diffusers.DDPMScheduler(clip_sample=False), betas)
  kept = [int(k) for k in diffusion.timestep_map]
  scheduler.set_timesteps(timesteps=kept[::-1])
  indices = [14, 9, 5, 1, 0]
  timesteps = [kept[i] for i in indices]
  shape, seed = (len(indices), 5), 300
  x_t, out = _inputs(2, shape, 5)
  noise = _noise_rows(seed, len(indices), shape[1:])
  ours = samplers.ddpm_step(diffusion, jnp.asarray(out), jnp.asarray(x_t),
                            jnp.asarray(indices, jnp.int32), noise)

  def reference(o, t, x, s):
    r = scheduler.step(o, t, x, generator=torch.Generator().manual_seed(s))
    return r.prev_sample, r.pred_original_sample

  _compare_steps(ours, reference, x_t, out, timesteps, seed)


def _unclip_reference(scheduler, timesteps_desc):
  def reference(o, t, x, s):
    i = timesteps_desc.index(t)
    prev = timesteps_desc[i + 1] if i + 1 < len(timesteps_desc) else None
    r = scheduler.step(o, t, x, prev_timestep=prev, generator=torch.Generator().manual_seed(s))
    return r.prev_sample, r.pred_original_sample
  return reference


def test_karlo_decoder_step_matches_unclip_scheduler():
  """karlo's decoder: cosine, eps, learned_range, clip to [-1, 1], 25 of 1000 steps."""
  betas = schedules.cosine_betas(1000)
  diffusion = GaussianDiffusion.create(betas, var_type='learned_range').respace('25')
  scheduler = _use_float64_schedule(diffusers.UnCLIPScheduler(
      variance_type='learned_range', prediction_type='epsilon', clip_sample=True,
      clip_sample_range=1.0), betas)
  scheduler.set_timesteps(25)
  timesteps_desc = [int(t) for t in scheduler.timesteps]
  assert timesteps_desc[::-1] == [int(t) for t in diffusion.timestep_map]
  indices = [24, 23, 12, 1, 0]
  shape, seed = (len(indices), 4, 4, 3), 400
  x_t, out = _inputs(3, shape, 6)
  noise = _noise_rows(seed, len(indices), (3, 4, 4))
  ours = jax.jit(samplers.ddpm_step, static_argnames='clip_range')(
      diffusion, jnp.asarray(out), jnp.asarray(x_t), jnp.asarray(indices, jnp.int32), noise,
      clip_range=1.0)
  _compare_steps(ours, _unclip_reference(scheduler, timesteps_desc), x_t, out,
                 [timesteps_desc[24 - i] for i in indices], seed)


def test_karlo_prior_step_matches_unclip_scheduler():
  """karlo's prior: cosine, x0 prediction, fixed small variance, clip to [-10, 10]."""
  betas = schedules.cosine_betas(1000)
  diffusion = GaussianDiffusion.create(betas, mean_type='x0').respace('25')
  scheduler = _use_float64_schedule(diffusers.UnCLIPScheduler(
      variance_type='fixed_small_log', prediction_type='sample', clip_sample=True,
      clip_sample_range=10.0), betas)
  scheduler.set_timesteps(25)
  timesteps_desc = [int(t) for t in scheduler.timesteps]
  indices = [24, 18, 6, 1, 0]
  shape, seed = (len(indices), 16), 500
  x_t, out = _inputs(4, shape, 16, output_scale=8.0)  # some predictions beyond +-10
  assert np.abs(out).max() > 10
  noise = _noise_rows(seed, len(indices), shape[1:])
  ours = samplers.ddpm_step(diffusion, jnp.asarray(out), jnp.asarray(x_t),
                            jnp.asarray(indices, jnp.int32), noise, clip_range=10.0)
  _compare_steps(ours, _unclip_reference(scheduler, timesteps_desc), x_t, out,
                 [timesteps_desc[24 - i] for i in indices], seed)


def test_converted_stages_keep_unclip_scheduler_timesteps_for_every_step_count():
  """Under `sampling.timesteps='unclip'` (what the karlo converter sets) every step count from 2
  to 100 keeps UnCLIPScheduler's timesteps, also the counts where guided-diffusion's spacing
  (the default rule) keeps another one (e.g. 21: 499 where diffusers keeps 500)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  differ = []
  for count in range(2, 101):
    scheduler = diffusers.UnCLIPScheduler()
    scheduler.set_timesteps(count)
    want = sorted(int(t) for t in scheduler.timesteps)
    for steps in (count, str(count)):
      sampling = ml_collections.ConfigDict({'steps': steps, 'timesteps': 'unclip'})
      assert schedules.space_timesteps(1000, schedules.stage_spacing(sampling)) == want, count
    if schedules.space_timesteps(1000, count) != want:
      differ.append(count)
  assert {21, 23, 31, 35, 39, 43, 45, 59} <= set(differ)
  sampling = ml_collections.ConfigDict({'steps': 'ddim27', 'timesteps': 'unclip'})
  assert schedules.stage_spacing(sampling) == 'ddim27'
  with pytest.raises(ValueError, match='UnCLIPScheduler takes 2 to 1000 steps'):
    schedules.space_timesteps(1000, 'unclip1')


@pytest.mark.parametrize('schedule', ['cosine', 'linear'])
@pytest.mark.parametrize('mean_type', ['eps', 'x0', 'v'])
@pytest.mark.parametrize('clip, clipped_eps', [(False, False), (True, True), (True, False)])
def test_ddim_step_matches_ddim_scheduler(schedule, mean_type, clip, clipped_eps):
  betas = schedules.get_betas(schedule, 1000)
  diffusion = GaussianDiffusion.create(betas, mean_type=mean_type).respace('ddim50')
  scheduler = _use_float64_schedule(diffusers.DDIMScheduler(
      beta_schedule=DIFFUSERS_SCHEDULE[schedule], prediction_type=DIFFUSERS_PREDICTION[mean_type],
      clip_sample=clip, set_alpha_to_one=True), betas)
  scheduler.set_timesteps(50)
  assert sorted(int(t) for t in scheduler.timesteps) == [int(t) for t in diffusion.timestep_map]
  indices = [49, 30, 1, 0]
  shape = (len(indices), 6)
  x_t, out = _inputs(5, shape, 6, output_scale=2.0)
  step = jax.jit(samplers.ddim_step,
                 static_argnames=('clip_range', 'eps_from_clipped_x0', 'eta'))
  for eta in (0.0, 0.7):
    noise = np.random.RandomState(6).randn(*shape).astype(np.float32)
    x_prev, pred_x0 = step(diffusion, jnp.asarray(out), jnp.asarray(x_t),
                           jnp.asarray(indices, jnp.int32), jnp.asarray(noise), eta=eta,
                           clip_range=1.0 if clip else None, eps_from_clipped_x0=clipped_eps)
    for row, i in enumerate(indices):
      kw = {'variance_noise': _to_torch(noise[row:row + 1])} if eta else {}
      ref = scheduler.step(_to_torch(out[row:row + 1]), int(diffusion.timestep_map[i]),
                           _to_torch(x_t[row:row + 1]), eta=eta,
                           use_clipped_model_output=clipped_eps, **kw)
      np.testing.assert_allclose(pred_x0[row:row + 1], ref.pred_original_sample.numpy(),
                                 **TOLERANCE)
      np.testing.assert_allclose(x_prev[row:row + 1], ref.prev_sample.numpy(), **TOLERANCE,
                                 err_msg=f'eta={eta} index={i}')


def test_karlo_decoder_chain_against_float32_unclip_scheduler():
  """Unmodified (float32) diffusers, every step of the 25: equal up to its float32 rounding.

  The largest differences (~5e-4) are at t = 0 and t = 999, where diffusers' float32
  1 - alphas_cumprod and alphas_cumprod lose most of their digits; elsewhere ~1e-6.
  """
  diffusion = GaussianDiffusion.create(schedules.cosine_betas(1000),
                                       var_type='learned_range').respace('25')
  scheduler = diffusers.UnCLIPScheduler(variance_type='learned_range', prediction_type='epsilon',
                                        clip_sample=True, clip_sample_range=1.0)
  scheduler.set_timesteps(25)
  timesteps_desc = [int(t) for t in scheduler.timesteps]
  shape, seed = (25, 4, 4, 3), 600
  x_t, out = _inputs(7, shape, 6)
  noise = np.concatenate([
      _from_torch(torch.randn((1, 3, 4, 4), generator=torch.Generator().manual_seed(seed + r)))
      for r in range(25)])
  x_prev, _ = samplers.ddpm_step(diffusion, jnp.asarray(out), jnp.asarray(x_t),
                                 jnp.arange(25, dtype=jnp.int32), jnp.asarray(noise),
                                 clip_range=1.0)
  for i in range(25):
    t = timesteps_desc[24 - i]
    prev = timesteps_desc[25 - i] if i > 0 else None
    ref = scheduler.step(_to_torch(out[i:i + 1]).float(), t, _to_torch(x_t[i:i + 1]).float(),
                         prev_timestep=prev, generator=torch.Generator().manual_seed(seed + i))
    atol = 1e-3 if t in (0, 999) else 2e-5
    np.testing.assert_allclose(x_prev[i:i + 1], _from_torch(ref.prev_sample.double()), atol=atol,
                               err_msg=f't={t}')
