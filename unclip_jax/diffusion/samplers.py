"""Samplers for a `GaussianDiffusion`: ancestral DDPM and DDIM, plus classifier-free guidance.

A sampler runs the whole reverse chain inside one `jax.lax.scan` (a single compiled while
loop, whatever the number of steps), never syncs with the host, and is a pure function of its
inputs: wrap it in `jax.jit` with a static `shape` (and the model function closed over).

The model is any `ModelFn`: `model_fn(x_t, t_model) -> model_output`, where t_model are the
ORIGINAL training timesteps (`diffusion.model_timesteps(t)`, int32 [B]; float32 if the
diffusion rescales timesteps). The samplers do the mapping, so a model trained on the full
process is used unchanged by a respaced one. A model that needs a different network at some
steps (karlo's super-resolution switches models at the last step) can branch on t_model with
`jax.lax.cond`/`jnp.where` inside model_fn.

Single steps (`ddpm_step`, `ddim_step`) are exposed for callers that drive their own loop and
for parity tests against other implementations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.gaussian_diffusion import GaussianDiffusion

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]


def classifier_free_guidance(model_fn_cond_uncond: Callable[[Array, Array], Array],
                             guidance_scale: float | Array, *,
                             learned_variance: bool) -> ModelFn:
  """Wraps a two-branch model into a guided ModelFn (Ho & Salimans 2022).

  Args:
    model_fn_cond_uncond: f(x_twice, t_twice) -> out_twice on a batch of 2B whose first B rows
      are evaluated with the conditioning and the last B rows without it (the caller arranges
      that, e.g. by closing over [cond; null_cond]).
    guidance_scale: s, a scalar or a [B] array (one scale per example). s = 1 gives the
      conditional model, s = 0 the unconditional one, s > 1 extrapolates past the conditional.
    learned_variance: whether the output's last axis holds [mean part, variance part]
      (var_type 'learned_range').

  Returns:
    A ModelFn g(x [B, ...], t [B]) that calls f ONCE on (concat([x, x]), concat([t, t])) and
    returns uncond + s (cond - uncond) on the mean-part channels (the whole output for fixed
    variances; eps, x0 or v, whatever the model predicts). With learned_variance the variance
    channels (second half of the last axis) are the conditional branch's, unguided, as in
    GLIDE and karlo.
  """

  def guided(x: Array, t: Array) -> Array:
    batch = x.shape[0]
    out = model_fn_cond_uncond(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0))
    cond, uncond = out[:batch], out[batch:]
    scale = jnp.asarray(guidance_scale, dtype=out.dtype)
    if scale.ndim == 1:
      scale = scale.reshape((batch,) + (1,) * (out.ndim - 1))
    if not learned_variance:
      return uncond + scale * (cond - uncond)
    channels = out.shape[-1] // 2
    cond_mean, cond_var = cond[..., :channels], cond[..., channels:]
    uncond_mean = uncond[..., :channels]
    return jnp.concatenate([uncond_mean + scale * (cond_mean - uncond_mean), cond_var], axis=-1)

  return guided


def _nonzero_mask(t: Array, ndim: int) -> Array:
  """1.0 where t > 0 else 0.0, shaped [B, 1, ...] (no noise is added on the last step)."""
  return (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (ndim - 1))


def ddpm_step(diffusion: GaussianDiffusion, model_output: Array, x_t: Array, t: Array,
              noise: Array, *, clip_range: float | None = None) -> tuple[Array, Array]:
  """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (DDPM, Ho et al. 2020 alg. 2).

  x_{t-1} = mean + exp(log_variance / 2) noise, without the noise where t == 0.

  Args:
    diffusion: the (possibly respaced) process; t indexes it.
    model_output: the model's output at (x_t, model_timesteps(t)).
    x_t: [B, ...] current sample.
    t: int32 [B] step indices.
    noise: [x_t.shape] standard normal noise.
    clip_range: clip pred_x0 to [-clip_range, clip_range] (None: no clipping).

  Returns:
    (x_{t-1} [x_t.shape], pred_x0 [x_t.shape]).
  """
  out = diffusion.p_mean_variance(model_output, x_t, t, clip_range=clip_range)
  std = jnp.exp(0.5 * out['log_variance'])
  x_prev = out['mean'] + _nonzero_mask(t, x_t.ndim) * std * noise
  return x_prev, out['pred_x0']


def ddim_step(diffusion: GaussianDiffusion, model_output: Array, x_t: Array, t: Array,
              noise: Array | None = None, *, eta: float = 0.0,
              clip_range: float | None = None,
              eps_from_clipped_x0: bool = True) -> tuple[Array, Array]:
  """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12) over this process's steps.

  x_{t-1} = sqrt(ab_{t-1}) pred_x0 + sqrt(1 - ab_{t-1} - sigma_t^2) eps + sigma_t noise,
  sigma_t = eta sqrt(posterior_variance_t) (eta = 0: deterministic DDIM, eta = 1: the DDPM
  posterior variance). "t-1" is the previous step of this (respaced) process. A learned
  variance output is ignored.

  Args:
    diffusion: the (possibly respaced) process; t indexes it.
    model_output: the model's output at (x_t, model_timesteps(t)).
    x_t: [B, ...] current sample.
    t: int32 [B] step indices.
    noise: [x_t.shape] standard normal noise; may be None when eta == 0.
    eta: stochasticity, a float >= 0.
    clip_range: clip pred_x0 to [-clip_range, clip_range] (None: no clipping).
    eps_from_clipped_x0: derive eps from the (clipped) pred_x0 and x_t, as guided-diffusion
      does (and diffusers' DDIMScheduler with use_clipped_model_output=True). If False, eps is
      the model's own (unclipped) estimate, as in diffusers' default. The two agree when
      nothing is clipped.

  Returns:
    (x_{t-1} [x_t.shape], pred_x0 [x_t.shape]).
  """
  mean_part, _ = diffusion.split_model_output(model_output, x_t)
  pred_x0 = diffusion.pred_x0_from_output(mean_part, x_t, t)
  if clip_range is not None:
    pred_x0 = jnp.clip(pred_x0, -clip_range, clip_range)
  if eps_from_clipped_x0:
    eps = diffusion.predict_eps_from_x0(x_t, t, pred_x0)
  else:
    eps = diffusion.pred_eps_from_output(mean_part, x_t, t)

  shape = (-1,) + (1,) * (x_t.ndim - 1)
  gather = lambda values: values[t].reshape(shape)
  x_prev = gather(diffusion.sqrt_alphas_cumprod_prev) * pred_x0
  if isinstance(eta, (int, float)) and eta == 0:
    return x_prev + gather(diffusion.sqrt_one_minus_alphas_cumprod_prev) * eps, pred_x0
  if noise is None:
    raise ValueError('ddim_step with eta != 0 needs noise')
  sigma_sq = jnp.square(eta) * gather(diffusion.posterior_variance)
  direction = jnp.sqrt(jnp.maximum(gather(diffusion.one_minus_alphas_cumprod_prev) - sigma_sq, 0.0))
  x_prev = x_prev + direction * eps + _nonzero_mask(t, x_t.ndim) * jnp.sqrt(sigma_sq) * noise
  return x_prev, pred_x0


def _initial_noise(rng: Array, shape: Sequence[int], noise: Array | None) -> Array:
  if noise is None:
    return jax.random.normal(rng, tuple(shape), jnp.float32)
  if tuple(noise.shape) != tuple(shape):
    raise ValueError(f'noise shape {noise.shape} does not match sample shape {tuple(shape)}')
  return noise


def step_noise(rng: Array, index: int | Array, shape: Sequence[int]) -> Array:
  """The standard normal noise [shape] that a sampler called with `rng` adds at step `index`
  (an index into the respaced process, T-1 first). Exposed so that other implementations can be
  driven with the same noise (parity tests)."""
  return jax.random.normal(jax.random.fold_in(jax.random.split(rng)[1], index), tuple(shape),
                           jnp.float32)


def _run_chain(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: Sequence[int],
               rng: Array, noise: Array | None, step_fn, return_trajectory: bool):
  """Scans step_fn(model_output, x_t, t, step_noise) over t = T-1 .. 0 in one loop."""
  init_rng = jax.random.split(rng)[0]
  x_init = _initial_noise(init_rng, shape, noise)
  batch = shape[0]

  def body(x, index):
    t = jnp.full((batch,), index, dtype=jnp.int32)
    model_output = model_fn(x, diffusion.model_timesteps(t))
    x_prev, pred_x0 = step_fn(model_output, x, t, step_noise(rng, index, x.shape))
    return x_prev.astype(x.dtype), (pred_x0 if return_trajectory else None)

  indices = jnp.arange(diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  x0, trajectory = jax.lax.scan(body, x_init, indices)
  return (x0, trajectory) if return_trajectory else x0


def ddpm_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: Sequence[int],
                rng: Array, *, noise: Array | None = None, clip_range: float | None = None,
                return_trajectory: bool = False):
  """Ancestral sampling over all steps of `diffusion` (respaced or not), T-1 down to 0.

  Args:
    diffusion: the process to reverse.
    model_fn: ModelFn, called once per step with (x_t [shape], original timesteps [B]).
    shape: static sample shape, batch first.
    rng: PRNG key. Step i's noise is drawn from fold_in(split(rng)[1], i); x_T from
      split(rng)[0] unless `noise` is given.
    noise: optional x_T [shape] (makes the start reproducible independently of rng).
    clip_range: clip pred_x0 to [-clip_range, clip_range] each step (None: no clipping).
    return_trajectory: also return pred_x0 of every step.

  Returns:
    x_0 [shape]; with return_trajectory, (x_0, pred_x0s [T, *shape]) where pred_x0s[k] is the
    prediction at step T-1-k (so the last row is the final step's).
  """
  step = lambda out, x, t, n: ddpm_step(diffusion, out, x, t, n, clip_range=clip_range)
  return _run_chain(diffusion, model_fn, shape, rng, noise, step, return_trajectory)


def ddim_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: Sequence[int],
                rng: Array, *, eta: float = 0.0, noise: Array | None = None,
                clip_range: float | None = None, eps_from_clipped_x0: bool = True,
                return_trajectory: bool = False):
  """DDIM sampling (Song et al. 2021) over all steps of `diffusion`, T-1 down to 0.

  Respace the diffusion first (e.g. `diffusion.respace('ddim50')`) to sample in fewer steps.
  Arguments and returns as `ddpm_sample`; `eta` and `eps_from_clipped_x0` as in `ddim_step`.
  With eta == 0 and `noise` given the result does not depend on rng.
  """
  step = lambda out, x, t, n: ddim_step(diffusion, out, x, t, n, eta=eta, clip_range=clip_range,
                                        eps_from_clipped_x0=eps_from_clipped_x0)
  return _run_chain(diffusion, model_fn, shape, rng, noise, step, return_trajectory)


def sample(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: Sequence[int], rng: Array,
           sampling, *, noise: Array | None = None, clip_range: float | None = None) -> Array:
  """`ddpm_sample` or `ddim_sample` (with `sampling.eta`) as `sampling.sampler` names.

  `sampling` is a stage config's `sampling` block; an unknown sampler raises ValueError naming
  the field.
  """
  if sampling.sampler == 'ddim':
    return ddim_sample(diffusion, model_fn, shape, rng, eta=sampling.eta, noise=noise,
                       clip_range=clip_range)
  if sampling.sampler == 'ddpm':
    return ddpm_sample(diffusion, model_fn, shape, rng, noise=noise, clip_range=clip_range)
  raise ValueError(f"config.sampling.sampler: {sampling.sampler!r} is not 'ddpm' or 'ddim'")
