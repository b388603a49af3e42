"""Gaussian diffusion (DDPM) math: forward process, posterior, model parameterisations, losses.

Notation follows Ho et al. 2020 (DDPM) and Nichol & Dhariwal 2021 (improved DDPM):

  q(x_t | x_0)       = N(sqrt(alphas_cumprod_t) x_0, (1 - alphas_cumprod_t) I)
  q(x_{t-1} | x_t, x_0) = N(posterior_mean_coef1_t x_0 + posterior_mean_coef2_t x_t,
                           posterior_variance_t I)
  p(x_{t-1} | x_t)   = N(mean of q with x_0 replaced by the model's pred_x0, Sigma_t)

Arrays are batch-first and of any rank ([B, D] embeddings, [B, H, W, C] images); per-timestep
coefficients are gathered with `t` (int32 [B]) and broadcast against the trailing axes. A
model's output has the shape of x_t, except with var_type 'learned_range', where the LAST axis
is doubled: [..., :C] is the mean-part prediction and [..., C:] the variance interpolation v.

Nothing here calls a model: callers evaluate the model and hand its output in, so all
functions are pure and usable under jit. A `GaussianDiffusion` is a pytree (its arrays are
leaves, its configuration static), so it can be closed over or passed as a jit argument.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import schedules

Array = jax.Array

MEAN_TYPES = ('eps', 'x0', 'v')
VAR_TYPES = ('fixed_small', 'fixed_large', 'learned_range')
LOSS_TYPES = ('mse', 'hybrid')

# Reference timestep range for `rescale_timesteps` and for the vb-term scale: improved DDPM
# divides its VB term by 1000 / num_timesteps relative to a 1000-step process.
_REFERENCE_STEPS = 1000.0


# ---------------------------------------------------------------------------------------------
# Gaussian helpers
# ---------------------------------------------------------------------------------------------

def mean_flat(x: Array) -> Array:
  """Mean over every axis but the first: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> Array:
  """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats.

  All arguments broadcast against each other (scalars allowed); returns their broadcast shape.
  """
  return 0.5 * (logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2) - 1.0)


def gaussian_log_likelihood(x, means, log_scales) -> Array:
  """Elementwise continuous log density log N(x; means, exp(log_scales)^2) in nats.

  `log_scales` is the log standard deviation. Broadcast shape of the arguments.
  """
  z = (x - means) * jnp.exp(-log_scales)
  return -0.5 * (math.log(2.0 * math.pi) + jnp.square(z)) - log_scales


def discretized_gaussian_log_likelihood(x, means, log_scales, *, num_bins: int = 256) -> Array:
  """Elementwise log probability of data x in [-1, 1] quantised to `num_bins` levels.

  The Gaussian N(means, exp(log_scales)^2) is integrated over the bin of width 2/(num_bins-1)
  around x; the lowest and highest bins extend to -inf and +inf (DDPM's decoder L_0,
  Ho et al. 2020 eq. 13). Uses the exact normal CDF (jax.scipy.special.ndtr / log_ndtr), not
  the tanh approximation of the reference code, and evaluates each bin on the side of the
  Gaussian where the CDF difference does not cancel; probabilities are floored at 1e-12.

  Args:
    x: data in [-1, 1], any shape.
    means, log_scales: broadcastable to x; log_scales is the log standard deviation.
    num_bins: number of quantisation levels of the data (256 for 8-bit images).

  Returns:
    log-likelihoods in nats, shape of x.
  """
  half_bin = 1.0 / (num_bins - 1)
  inv_std = jnp.exp(-log_scales)
  upper = (x - means + half_bin) * inv_std
  lower = (x - means - half_bin) * inv_std
  log_cdf_upper = jax.scipy.special.log_ndtr(upper)             # log P(z < upper)
  log_sf_lower = jax.scipy.special.log_ndtr(-lower)             # log P(z > lower)
  # P(lower < z < upper), computed on the side of 0 where both CDF values are small.
  right_side = lower > 0
  prob = jnp.where(right_side,
                   jax.scipy.special.ndtr(-lower) - jax.scipy.special.ndtr(-upper),
                   jax.scipy.special.ndtr(upper) - jax.scipy.special.ndtr(lower))
  log_mid = jnp.log(jnp.maximum(prob, 1e-12))
  edge = 1.0 - half_bin / 2  # halfway into the outermost bins
  return jnp.where(x < -edge, log_cdf_upper, jnp.where(x > edge, log_sf_lower, log_mid))


def _gather(values: Array, t: Array, ndim: int) -> Array:
  """values[t] reshaped to broadcast against an array of rank `ndim` with batch axis first."""
  t = jnp.asarray(t)
  out = values[t]
  return out.reshape(out.shape + (1,) * (ndim - out.ndim))


# ---------------------------------------------------------------------------------------------
# The diffusion process
# ---------------------------------------------------------------------------------------------

_ARRAY_FIELDS = (
    'betas', 'log_betas', 'alphas_cumprod', 'alphas_cumprod_prev', 'sqrt_alphas_cumprod_prev',
    'one_minus_alphas_cumprod_prev', 'sqrt_one_minus_alphas_cumprod_prev', 'sqrt_alphas_cumprod',
    'sqrt_one_minus_alphas_cumprod', 'log_one_minus_alphas_cumprod', 'sqrt_recip_alphas_cumprod',
    'sqrt_recipm1_alphas_cumprod', 'posterior_variance', 'posterior_log_variance_clipped',
    'posterior_mean_coef1', 'posterior_mean_coef2', 'fixed_large_variance',
    'fixed_large_log_variance', 'timestep_map')
_STATIC_FIELDS = ('num_timesteps', 'mean_type', 'var_type', 'loss_type', 'rescale_timesteps',
                  'num_train_timesteps', 'host_alphas_cumprod', 'host_timestep_map')


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
  """A discrete Gaussian diffusion process of `num_timesteps` steps and its parameterisation.

  Build with `GaussianDiffusion.create(betas, ...)`; `respace` gives a shorter process over a
  subset of the timesteps for faster sampling. Indices `t` passed to every method are indices
  into THIS process (0 .. num_timesteps-1); `model_timesteps(t)` gives what the model sees.

  Static configuration:
    num_timesteps: T.
    mean_type: what the model predicts: 'eps' (the noise), 'x0' (the clean data) or 'v'
      (v = sqrt(alphas_cumprod) eps - sqrt(1 - alphas_cumprod) x0, Salimans & Ho 2022).
    var_type: 'fixed_small' (posterior variance, DDPM's sigma^2 = beta~), 'fixed_large'
      (sigma^2 = beta, with the posterior variance at t=0) or 'learned_range' (the model
      interpolates log sigma^2 between the two, improved DDPM eq. 15).
    loss_type: 'mse' (L_simple) or 'hybrid' (L_simple + L_vlb for the learned variance).
    rescale_timesteps: whether model_timesteps maps onto a float 0..1000 range.
    num_train_timesteps: length of the original (training) process timestep_map points into.
    host_alphas_cumprod, host_timestep_map: float64 / int copies kept on the host so that
      respacing stays exact (and works on an instance that went through jit).

  Arrays (float32 [T], except timestep_map int32 [T]), named as in the papers:
    betas, log_betas, alphas_cumprod, alphas_cumprod_prev (1 at t=0), sqrt_alphas_cumprod_prev,
    one_minus_alphas_cumprod_prev, sqrt_one_minus_alphas_cumprod_prev (for DDIM; 1 - ab near
    t = 0 loses most of its digits if formed in float32), sqrt_alphas_cumprod,
    sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod,
    sqrt_recipm1_alphas_cumprod, posterior_variance (beta_t (1 - ab_{t-1}) / (1 - ab_t), 0 at
    t=0), posterior_log_variance_clipped (log posterior variance with the t=0 entry replaced
    by t=1's, since it is 0), posterior_mean_coef1/2 (coefficients of x_0 and x_t in the
    posterior mean), fixed_large_variance / fixed_large_log_variance (beta_t, with the
    posterior variance of t=1 at t=0, as in improved DDPM), timestep_map (index -> original
    training timestep; identity unless respaced).
  """

  num_timesteps: int
  mean_type: str
  var_type: str
  loss_type: str
  rescale_timesteps: bool
  num_train_timesteps: int
  host_alphas_cumprod: tuple = dataclasses.field(repr=False)
  host_timestep_map: tuple = dataclasses.field(repr=False)
  betas: Array = dataclasses.field(repr=False)
  log_betas: Array = dataclasses.field(repr=False)
  alphas_cumprod: Array = dataclasses.field(repr=False)
  alphas_cumprod_prev: Array = dataclasses.field(repr=False)
  sqrt_alphas_cumprod_prev: Array = dataclasses.field(repr=False)
  one_minus_alphas_cumprod_prev: Array = dataclasses.field(repr=False)
  sqrt_one_minus_alphas_cumprod_prev: Array = dataclasses.field(repr=False)
  sqrt_alphas_cumprod: Array = dataclasses.field(repr=False)
  sqrt_one_minus_alphas_cumprod: Array = dataclasses.field(repr=False)
  log_one_minus_alphas_cumprod: Array = dataclasses.field(repr=False)
  sqrt_recip_alphas_cumprod: Array = dataclasses.field(repr=False)
  sqrt_recipm1_alphas_cumprod: Array = dataclasses.field(repr=False)
  posterior_variance: Array = dataclasses.field(repr=False)
  posterior_log_variance_clipped: Array = dataclasses.field(repr=False)
  posterior_mean_coef1: Array = dataclasses.field(repr=False)
  posterior_mean_coef2: Array = dataclasses.field(repr=False)
  fixed_large_variance: Array = dataclasses.field(repr=False)
  fixed_large_log_variance: Array = dataclasses.field(repr=False)
  timestep_map: Array = dataclasses.field(repr=False)

  # --- pytree protocol ---

  def tree_flatten(self):
    return (tuple(getattr(self, f) for f in _ARRAY_FIELDS),
            tuple(getattr(self, f) for f in _STATIC_FIELDS))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(**dict(zip(_STATIC_FIELDS, aux)), **dict(zip(_ARRAY_FIELDS, children)))

  # --- construction ---

  @classmethod
  def create(cls, betas, *, mean_type: str = 'eps', var_type: str = 'fixed_small',
             loss_type: str | None = None, timestep_map: Sequence[int] | None = None,
             rescale_timesteps: bool = False,
             num_train_timesteps: int | None = None) -> GaussianDiffusion:
    """Builds the process from its betas.

    Args:
      betas: [T] noise variances per step, each in (0, 1) (e.g. `schedules.get_betas`);
        all derived quantities are computed from them in float64 and stored as float32.
      mean_type: 'eps', 'x0' or 'v' (see the class docstring).
      var_type: 'fixed_small', 'fixed_large' or 'learned_range'.
      loss_type: 'mse' or 'hybrid'; default 'hybrid' for learned_range and 'mse' otherwise.
        'hybrid' requires learned_range (it only trains the variance) and learned_range
        requires 'hybrid' (under 'mse' its variance channels would get no gradient).
      timestep_map: [T] original timestep of each step (default identity); set by `respace`.
      rescale_timesteps: if True, `model_timesteps` returns float32 timesteps scaled to
        0..1000 (guided-diffusion's rescale_timesteps) instead of int32.
      num_train_timesteps: length of the original process (default: T if timestep_map is
        None, else max(timestep_map) + 1). Only used by rescale_timesteps.
    """
    if mean_type not in MEAN_TYPES:
      raise ValueError(f'unknown mean_type {mean_type!r}; expected one of {MEAN_TYPES}')
    if var_type not in VAR_TYPES:
      raise ValueError(f'unknown var_type {var_type!r}; expected one of {VAR_TYPES}')
    if loss_type is None:
      loss_type = 'hybrid' if var_type == 'learned_range' else 'mse'
    if loss_type not in LOSS_TYPES:
      raise ValueError(f'unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}')
    if (loss_type == 'hybrid') != (var_type == 'learned_range'):
      raise ValueError(f"loss_type {loss_type!r} does not fit var_type {var_type!r}: "
                       "'hybrid' goes with 'learned_range' and 'mse' with fixed variances")

    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
      raise ValueError(f'betas must be a non-empty 1-D array, got shape {betas.shape}')
    if not np.all((betas > 0) & (betas < 1)):
      raise ValueError('every beta must be in (0, 1)')
    num_timesteps = betas.shape[0]
    if timestep_map is None:
      timestep_map = np.arange(num_timesteps)
    timestep_map = np.asarray(timestep_map, dtype=np.int64)
    if timestep_map.shape != (num_timesteps,):
      raise ValueError(f'timestep_map must have shape ({num_timesteps},), '
                       f'got {timestep_map.shape}')
    if num_train_timesteps is None:
      num_train_timesteps = int(timestep_map.max()) + 1

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    one_minus = 1.0 - alphas_cumprod
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / one_minus
    # posterior_variance[0] is 0; the clipped log uses t=1's value there (t=0's beta for T=1).
    first = posterior_variance[1] if num_timesteps > 1 else betas[0]
    posterior_variance_clipped = np.append(first, posterior_variance[1:])
    fixed_large_variance = np.append(first, betas[1:])

    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return cls(
        num_timesteps=int(num_timesteps),
        mean_type=mean_type,
        var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=bool(rescale_timesteps),
        num_train_timesteps=int(num_train_timesteps),
        host_alphas_cumprod=tuple(float(a) for a in alphas_cumprod),
        host_timestep_map=tuple(int(i) for i in timestep_map),
        betas=f32(betas),
        log_betas=f32(np.log(betas)),
        alphas_cumprod=f32(alphas_cumprod),
        alphas_cumprod_prev=f32(alphas_cumprod_prev),
        sqrt_alphas_cumprod_prev=f32(np.sqrt(alphas_cumprod_prev)),
        one_minus_alphas_cumprod_prev=f32(1.0 - alphas_cumprod_prev),
        sqrt_one_minus_alphas_cumprod_prev=f32(np.sqrt(1.0 - alphas_cumprod_prev)),
        sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(one_minus)),
        log_one_minus_alphas_cumprod=f32(np.log(one_minus)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / alphas_cumprod)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / alphas_cumprod - 1.0)),
        posterior_variance=f32(posterior_variance),
        posterior_log_variance_clipped=f32(np.log(posterior_variance_clipped)),
        posterior_mean_coef1=f32(betas * np.sqrt(alphas_cumprod_prev) / one_minus),
        posterior_mean_coef2=f32((1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / one_minus),
        fixed_large_variance=f32(fixed_large_variance),
        fixed_large_log_variance=f32(np.log(fixed_large_variance)),
        timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
    )

  def keep_timesteps(self, timesteps: Sequence[int]) -> GaussianDiffusion:
    """A shorter process over the given steps of this one (indices into this process).

    The kept steps keep their alphas_cumprod: beta_i = 1 - ab[k_i] / ab[k_{i-1}] (with
    ab[k_{-1}] = 1), computed from this process's float64 alphas_cumprod, so one step of the
    new process jumps straight from step k_i to k_{i-1}. timestep_map composes, so the model is
    always called with ORIGINAL training timesteps. Call outside jit.

    Args:
      timesteps: distinct indices in [0, num_timesteps); order does not matter.

    Returns:
      A GaussianDiffusion with len(timesteps) steps and the same mean/var/loss types.
    """
    keep = sorted(set(int(i) for i in timesteps))
    if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
      raise ValueError(f'timesteps to keep must be a non-empty subset of '
                       f'[0, {self.num_timesteps}), got {list(timesteps)!r}')
    kept_alphas_cumprod = np.asarray(self.host_alphas_cumprod, np.float64)[keep]
    betas = 1.0 - kept_alphas_cumprod / np.append(1.0, kept_alphas_cumprod[:-1])
    timestep_map = np.asarray(self.host_timestep_map, np.int64)[keep]
    return GaussianDiffusion.create(
        betas, mean_type=self.mean_type, var_type=self.var_type, loss_type=self.loss_type,
        timestep_map=timestep_map, rescale_timesteps=self.rescale_timesteps,
        num_train_timesteps=self.num_train_timesteps)

  def respace(self, spacing: str | int | Sequence[int]) -> GaussianDiffusion:
    """A shorter process keeping `schedules.space_timesteps(num_timesteps, spacing)`.

    E.g. `diffusion.respace('25')` for 25 evenly spaced steps, 'ddim50' for DDIM striding,
    '10,10,5' for section counts. See `keep_timesteps`.
    """
    return self.keep_timesteps(schedules.space_timesteps(self.num_timesteps, spacing))

  # --- timesteps ---

  def sample_timesteps(self, rng: Array, batch_size: int) -> Array:
    """Uniformly random step indices: int32 [batch_size] in [0, num_timesteps)."""
    return jax.random.randint(rng, (batch_size,), 0, self.num_timesteps, dtype=jnp.int32)

  def model_timesteps(self, t: Array) -> Array:
    """What the model is conditioned on for step indices t (int32 [B]).

    Returns timestep_map[t] (int32 [B], original training timesteps), or with
    rescale_timesteps that times 1000 / num_train_timesteps as float32 [B].
    """
    mapped = self.timestep_map[jnp.asarray(t)]
    if self.rescale_timesteps:
      return mapped.astype(jnp.float32) * (_REFERENCE_STEPS / self.num_train_timesteps)
    return mapped

  # --- forward process ---

  def q_mean_variance(self, x0: Array, t: Array) -> tuple[Array, Array, Array]:
    """q(x_t | x_0): (mean [x0.shape], variance, log_variance [B, 1, ...] broadcastable)."""
    mean = _gather(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
    variance = _gather(1.0 - self.alphas_cumprod, t, x0.ndim)
    log_variance = _gather(self.log_one_minus_alphas_cumprod, t, x0.ndim)
    return mean, variance, log_variance

  def q_sample(self, x0: Array, t: Array, noise: Array) -> Array:
    """A draw from q(x_t | x_0) with the given standard normal noise: [x0.shape]."""
    return (_gather(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

  def q_posterior_mean_variance(self, x0: Array, x_t: Array,
                                t: Array) -> tuple[Array, Array, Array]:
    """q(x_{t-1} | x_t, x_0): (mean, variance, log_variance_clipped), all [x_t.shape]."""
    mean = (_gather(self.posterior_mean_coef1, t, x_t.ndim) * x0
            + _gather(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
    variance = jnp.broadcast_to(_gather(self.posterior_variance, t, x_t.ndim), x_t.shape)
    log_variance = jnp.broadcast_to(
        _gather(self.posterior_log_variance_clipped, t, x_t.ndim), x_t.shape)
    return mean, variance, log_variance

  # --- conversions between parameterisations ---

  def predict_x0_from_eps(self, x_t: Array, t: Array, eps: Array) -> Array:
    """x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t): [x_t.shape]."""
    return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

  def predict_eps_from_x0(self, x_t: Array, t: Array, x0: Array) -> Array:
    """eps = (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t): [x_t.shape]."""
    return ((_gather(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
            / _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

  def predict_v(self, x0: Array, t: Array, noise: Array) -> Array:
    """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0: [x0.shape]."""
    return (_gather(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
            - _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)

  def predict_x0_from_v(self, x_t: Array, t: Array, v: Array) -> Array:
    """x_0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v: [x_t.shape]."""
    return (_gather(self.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
            - _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)

  def predict_eps_from_v(self, x_t: Array, t: Array, v: Array) -> Array:
    """eps = sqrt(ab_t) v + sqrt(1 - ab_t) x_t: [x_t.shape]."""
    return (_gather(self.sqrt_alphas_cumprod, t, x_t.ndim) * v
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t)

  # --- the reverse process ---

  def split_model_output(self, model_output: Array, x_t: Array) -> tuple[Array, Array | None]:
    """(mean part [x_t.shape], variance part [x_t.shape] or None for fixed variances)."""
    channels = x_t.shape[-1]
    if self.var_type == 'learned_range':
      expected = x_t.shape[:-1] + (2 * channels,)
    else:
      expected = x_t.shape
    if model_output.shape != expected:
      raise ValueError(f'model output shape {model_output.shape} does not fit x_t '
                       f'{x_t.shape} with var_type {self.var_type!r} (expected {expected})')
    if self.var_type == 'learned_range':
      return model_output[..., :channels], model_output[..., channels:]
    return model_output, None

  def pred_x0_from_output(self, mean_part: Array, x_t: Array, t: Array) -> Array:
    """The model's x_0 estimate from its mean-part output, per mean_type (unclipped)."""
    if self.mean_type == 'eps':
      return self.predict_x0_from_eps(x_t, t, mean_part)
    if self.mean_type == 'v':
      return self.predict_x0_from_v(x_t, t, mean_part)
    return mean_part

  def pred_eps_from_output(self, mean_part: Array, x_t: Array, t: Array) -> Array:
    """The model's noise estimate from its mean-part output, per mean_type (unclipped)."""
    if self.mean_type == 'eps':
      return mean_part
    if self.mean_type == 'v':
      return self.predict_eps_from_v(x_t, t, mean_part)
    return self.predict_eps_from_x0(x_t, t, mean_part)

  def p_mean_variance(self, model_output: Array, x_t: Array, t: Array, *,
                      clip_range: float | None = None) -> dict[str, Array]:
    """p(x_{t-1} | x_t) given the model's output at (x_t, t).

    Args:
      model_output: [x_t.shape], or [..., 2C] for learned_range (mean part, then v in [-1, 1]
        with log sigma^2 = frac log(beta_t) + (1 - frac) posterior_log_variance_clipped_t,
        frac = (v + 1) / 2).
      x_t: [B, ...] current sample.
      t: int32 [B] step indices into this process.
      clip_range: if set, pred_x0 is clipped to [-clip_range, clip_range] before it enters
        the posterior mean (e.g. 1 for images in [-1, 1]).

    Returns:
      dict with 'mean', 'variance', 'log_variance', 'pred_x0', each [x_t.shape].
    """
    mean_part, var_part = self.split_model_output(model_output, x_t)
    if self.var_type == 'learned_range':
      min_log = _gather(self.posterior_log_variance_clipped, t, x_t.ndim)
      max_log = _gather(self.log_betas, t, x_t.ndim)
      frac = (var_part + 1.0) / 2.0
      log_variance = frac * max_log + (1.0 - frac) * min_log
      variance = jnp.exp(log_variance)
    else:
      if self.var_type == 'fixed_small':
        variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
      else:
        variance, log_variance = self.fixed_large_variance, self.fixed_large_log_variance
      variance = jnp.broadcast_to(_gather(variance, t, x_t.ndim), x_t.shape)
      log_variance = jnp.broadcast_to(_gather(log_variance, t, x_t.ndim), x_t.shape)

    pred_x0 = self.pred_x0_from_output(mean_part, x_t, t)
    if clip_range is not None:
      pred_x0 = jnp.clip(pred_x0, -clip_range, clip_range)
    mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
    return {'mean': mean, 'variance': variance, 'log_variance': log_variance,
            'pred_x0': pred_x0}

  # --- training ---

  def training_target(self, x0: Array, t: Array, noise: Array) -> Array:
    """What the mean part of the model output regresses onto: eps, x_0 or v [x0.shape]."""
    if self.mean_type == 'eps':
      return noise
    if self.mean_type == 'v':
      return self.predict_v(x0, t, noise)
    return x0

  def snr(self, t: Array) -> Array:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of step t: float32 [t.shape]."""
    a = self.alphas_cumprod[jnp.asarray(t)]
    return a / (1.0 - a)

  def min_snr_weights(self, t: Array, gamma: float) -> Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for this process's mean_type: [t.shape].

    The weight on the x_0 error becomes min(SNR_t, gamma), which caps the weight of the
    low-noise steps that dominate x_0/v/eps regressions and lets the mid-noise steps (where
    layout and shape are decided) learn faster. Expressed on this process's own target:
    eps: min(SNR, gamma) / SNR; v: min(SNR, gamma) / (SNR + 1); x0: min(SNR, gamma).
    """
    if gamma <= 0:
      raise ValueError(f'min-SNR gamma must be positive, got {gamma}')
    snr = self.snr(t)
    clipped = jnp.minimum(snr, gamma)
    if self.mean_type == 'eps':
      return clipped / snr
    if self.mean_type == 'v':
      return clipped / (snr + 1.0)
    return clipped

  def vb_terms_bpd(self, model_output: Array, x0: Array, x_t: Array, t: Array, *,
                   discretized_decoder: bool = True) -> Array:
    """One term of the variational bound per example, in bits per dimension: [B].

    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL
    -log p(x_0 | x_1) at t == 0, each averaged over the non-batch axes and divided by log 2.
    The decoder is the discretised Gaussian of 8-bit data in [-1, 1] when
    `discretized_decoder`, else the continuous Gaussian density (for embeddings and other
    non-quantised data; then the value is a negative log density, not a probability).
    Gradients flow into model_output as given (see `training_losses` for the stop-gradient).
    """
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
    out = self.p_mean_variance(model_output, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out['mean'], out['log_variance']))
    log_likelihood = (discretized_gaussian_log_likelihood if discretized_decoder
                      else gaussian_log_likelihood)
    decoder_nll = -mean_flat(log_likelihood(x0, out['mean'], 0.5 * out['log_variance']))
    return jnp.where(jnp.asarray(t) == 0, decoder_nll, kl) / math.log(2.0)

  def training_losses(self, model_output: Array, x0: Array, t: Array, noise: Array, *,
                      weights: Array | None = None, mse_weights: Array | None = None,
                      discretized_decoder: bool = True) -> dict[str, Array]:
    """Per-example training losses for a model output at x_t = q_sample(x0, t, noise).

    The caller evaluates `model_output = model(q_sample(x0, t, noise), model_timesteps(t))`;
    x_t is recomputed here from the same (x0, t, noise).

    mse: mean over non-batch axes of (target - mean part)^2, target per mean_type (eps, x0
      or v). This is L_simple.
    vb: for loss_type 'hybrid' (learned_range), `vb_terms_bpd` of the output with a
      stop-gradient on its mean part, so the VB term trains only the variance channels, times
      num_timesteps / 1000: improved DDPM's L_hybrid = L_simple + lambda L_vlb with lambda =
      0.001, L_vlb = sum over T steps = T E_t[L_t] (identical to improved-diffusion's
      RESCALED_MSE loss). Zeros for 'mse'.
    loss: (mse_weights * mse + vb), times `weights` when given.

    Args:
      model_output: model output at (x_t, t): [x0.shape] or [..., 2C] for learned_range.
      x0: [B, ...] clean data.
      t: int32 [B] step indices into this process.
      noise: [x0.shape] the standard normal noise used to form x_t.
      weights: optional float [B] per-example loss weights.
      mse_weights: optional float [B] weights of the mse term alone (e.g.
        `min_snr_weights`); the variance's VB term keeps its own weighting.
      discretized_decoder: decoder NLL at t == 0, see `vb_terms_bpd`.

    Returns:
      dict of float32 [B] arrays: 'loss', 'mse', 'vb'.
    """
    model_output = model_output.astype(jnp.float32)
    x0 = x0.astype(jnp.float32)
    x_t = self.q_sample(x0, t, noise)
    mean_part, var_part = self.split_model_output(model_output, x_t)
    mse = mean_flat(jnp.square(self.training_target(x0, t, noise) - mean_part))
    if self.loss_type == 'hybrid':
      frozen = jnp.concatenate([jax.lax.stop_gradient(mean_part), var_part], axis=-1)
      vb = self.vb_terms_bpd(frozen, x0, x_t, t, discretized_decoder=discretized_decoder)
      vb = vb * (self.num_timesteps / _REFERENCE_STEPS)
    else:
      vb = jnp.zeros_like(mse)
    loss = (mse if mse_weights is None else mse * jnp.asarray(mse_weights, jnp.float32)) + vb
    if weights is not None:
      loss = loss * jnp.asarray(weights, jnp.float32)
    return {'loss': loss, 'mse': mse, 'vb': vb}


def diffusion_from_config(schedule: str, num_steps: int, **kwargs: Any) -> GaussianDiffusion:
  """`GaussianDiffusion.create(schedules.get_betas(schedule, num_steps), **kwargs)`."""
  return GaussianDiffusion.create(schedules.get_betas(schedule, num_steps), **kwargs)
