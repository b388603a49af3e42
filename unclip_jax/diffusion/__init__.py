"""Gaussian diffusion as pure functions over arrays: schedules, the process, samplers.

  schedules            beta schedules (cosine, linear) and timestep respacing
  gaussian_diffusion   GaussianDiffusion: q, posterior, parameterisations, p, training losses
  samplers             DDPM / DDIM sampling loops (one lax.scan) and classifier-free guidance

No Flax and no model code: models enter only as functions `model_fn(x_t, t_model)`.
"""

from unclip_jax.diffusion.gaussian_diffusion import GaussianDiffusion
from unclip_jax.diffusion.samplers import (classifier_free_guidance, ddim_sample, ddim_step,
                                           ddpm_sample, ddpm_step)
from unclip_jax.diffusion.schedules import (cosine_betas, get_betas, linear_betas,
                                            space_timesteps)

__all__ = [
    'GaussianDiffusion', 'classifier_free_guidance', 'ddim_sample', 'ddim_step', 'ddpm_sample',
    'ddpm_step', 'cosine_betas', 'get_betas', 'linear_betas', 'space_timesteps',
]
