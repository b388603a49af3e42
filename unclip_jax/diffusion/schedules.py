"""Noise schedules (betas) and timestep respacing.

Everything here is host-side numpy in float64: the schedules are small, computed once, and
their precision matters (1 - alphas_cumprod near t = 0 and the betas of respaced steps are
differences of nearly equal numbers). `GaussianDiffusion.create` turns them into float32
device constants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# guided-diffusion's linear schedule for 1000 steps; other lengths scale both ends by
# 1000 / num_steps so the total amount of noise stays comparable.
_LINEAR_BETA_START_1000 = 1e-4
_LINEAR_BETA_END_1000 = 0.02


def _check_num_steps(num_steps) -> int:
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f'num_steps must be a positive integer, got {num_steps!r}')
  return int(num_steps)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """The cosine schedule of improved DDPM (Nichol & Dhariwal 2021, eq. 17).

  alphas_cumprod follows f(u) = cos((u + s) / (1 + s) * pi / 2)^2 at u = t / num_steps, and
  beta_t = 1 - f((t + 1) / T) / f(t / T), capped at `max_beta` so the last step (where f
  reaches 0) stays invertible. This is diffusers' 'squaredcos_cap_v2'.

  Args:
    num_steps: T, the number of diffusion steps.
    s: the small offset that keeps beta_0 from being vanishingly small.
    max_beta: upper bound on every beta.

  Returns:
    float64 [T] betas.
  """
  num_steps = _check_num_steps(num_steps)
  u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  f = np.cos((u + s) / (1.0 + s) * (math.pi / 2.0)) ** 2
  betas = 1.0 - f[1:] / f[:-1]
  return np.minimum(betas, max_beta)


def linear_betas(num_steps: int, beta_start: float | None = None,
                 beta_end: float | None = None) -> np.ndarray:
  """The linear schedule of DDPM (Ho et al. 2020): betas evenly spaced from start to end.

  Args:
    num_steps: T, the number of diffusion steps.
    beta_start: beta_0. Default 1e-4 * 1000 / T (guided-diffusion's scaling, so 1e-4 at T=1000).
    beta_end: beta_{T-1}. Default 0.02 * 1000 / T.

  Returns:
    float64 [T] betas.
  """
  num_steps = _check_num_steps(num_steps)
  scale = 1000.0 / num_steps
  if beta_start is None:
    beta_start = _LINEAR_BETA_START_1000 * scale
  if beta_end is None:
    beta_end = _LINEAR_BETA_END_1000 * scale
  if not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(f'linear betas need 0 < beta_start <= beta_end < 1, got '
                     f'beta_start={beta_start}, beta_end={beta_end} for num_steps={num_steps}')
  return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


_SCHEDULES = {'cosine': cosine_betas, 'linear': linear_betas}


def get_betas(name: str, num_steps: int) -> np.ndarray:
  """The named schedule ('cosine' or 'linear') with default parameters: float64 [num_steps]."""
  if name not in _SCHEDULES:
    raise ValueError(f'unknown beta schedule {name!r}; expected one of {sorted(_SCHEDULES)}')
  return _SCHEDULES[name](num_steps)


def _parse_int(text: str, spacing) -> int:
  try:
    return int(text.strip())
  except ValueError:
    raise ValueError(f'bad timestep spacing {spacing!r}: {text!r} is not an integer') from None


def _ddim_stride_steps(num_steps: int, count: int, spacing) -> list[int]:
  """range(0, num_steps, stride) for the integer stride that gives exactly `count` steps."""
  if count < 1:
    raise ValueError(f'bad timestep spacing {spacing!r}: the step count must be positive')
  for stride in range(1, num_steps + 1):
    steps = range(0, num_steps, stride)
    if len(steps) == count:
      return list(steps)
    if len(steps) < count:
      break
  raise ValueError(f'bad timestep spacing {spacing!r}: no integer stride gives exactly {count} '
                   f'of {num_steps} steps')


def _section_steps(start: int, size: int, count: int) -> list[int]:
  """`count` steps spread evenly over [start, start + size), both ends included.

  The position advances by a running float sum and is rounded half-to-even at each step, as in
  guided-diffusion's (and karlo's) respace.py, so a checkpoint sampled with "25" there sees the
  same timesteps here. For a few counts (e.g. 21 of 1000) that differs by one step from
  `round(k * stride)`, which is what diffusers' UnCLIPScheduler.set_timesteps computes ("unclipN"
  spacing, and `sampling.timesteps='unclip'` in stages converted from diffusers).
  """
  stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
  position = 0.0
  steps = []
  for _ in range(count):
    steps.append(start + round(position))
    position += stride
  return steps


def unclip_timesteps(num_steps: int, count: int, spacing=None) -> list[int]:
  """diffusers' UnCLIPScheduler.set_timesteps: round(k·(T−1)/(N−1)) for k < N (float64,
  half to even), ascending."""
  if not 2 <= count <= num_steps:
    raise ValueError(f'bad timestep spacing {spacing or count!r}: UnCLIPScheduler takes 2 to '
                     f'{num_steps} steps')
  ratio = (num_steps - 1) / (count - 1)
  return sorted({int(t) for t in (np.arange(count) * ratio).round()})


def stage_spacing(sampling) -> str | int | Sequence[int]:
  """A stage's `sampling.steps` under its `sampling.timesteps` rule: a bare step count ('25')
  means guided-diffusion's spacing ('guided_diffusion', the default) or, for stages converted
  from diffusers ('unclip'), UnCLIPScheduler's timesteps ('unclip25'). Other forms ('ddim27',
  '10,10,5', 'unclip25') are taken as they are."""
  steps = sampling.steps
  rule = sampling.get('timesteps', 'guided_diffusion')
  if rule not in ('guided_diffusion', 'unclip'):
    raise ValueError(f"sampling.timesteps: {rule!r}; expected 'guided_diffusion' or 'unclip'")
  bare = isinstance(steps, (int, np.integer)) or (isinstance(steps, str) and
                                                   steps.strip().isdigit())
  return f'unclip{int(steps)}' if rule == 'unclip' and bare else steps


def space_timesteps(num_steps: int, spacing: str | int | Sequence[int]) -> list[int]:
  """Which of `num_steps` original timesteps a respaced (faster) sampler keeps.

  Args:
    num_steps: length of the original process.
    spacing: one of
      * an int N or its string "N": N steps evenly spaced over [0, num_steps - 1], both ends
        included;
      * "ddimN": range(0, num_steps, stride) with the integer stride giving exactly N steps
        (the DDIM paper's striding; it never includes num_steps - 1 unless N == num_steps);
      * "unclipN": diffusers' UnCLIPScheduler's N timesteps (`unclip_timesteps`);
      * "n1,n2,..." or a sequence of ints: the process is cut into that many equal sections
        (the first num_steps % k sections one step longer) and section i gets n_i evenly spaced
        steps, both section ends included (guided-diffusion's section counts).

  Returns:
    Sorted list of distinct original timesteps to keep.

  Raises:
    ValueError: naming the spacing, if it cannot be parsed or asks for more steps than exist.
  """
  num_steps = _check_num_steps(num_steps)
  if isinstance(spacing, bool):
    raise ValueError(f'bad timestep spacing {spacing!r}')
  if isinstance(spacing, (int, np.integer)):
    counts = [int(spacing)]
  elif isinstance(spacing, str):
    text = spacing.strip()
    if text.startswith('ddim'):
      return _ddim_stride_steps(num_steps, _parse_int(text[len('ddim'):], spacing), spacing)
    if text.startswith('unclip'):
      return unclip_timesteps(num_steps, _parse_int(text[len('unclip'):], spacing), spacing)
    if not text:
      raise ValueError(f'bad timestep spacing {spacing!r}: empty')
    counts = [_parse_int(part, spacing) for part in text.split(',')]
  elif isinstance(spacing, Sequence):
    counts = []
    for c in spacing:
      if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
        raise ValueError(f'bad timestep spacing {spacing!r}: section counts must be ints')
      counts.append(int(c))
    if not counts:
      raise ValueError(f'bad timestep spacing {spacing!r}: empty')
  else:
    raise ValueError(f'bad timestep spacing {spacing!r}: expected an int, a string or a '
                     f'sequence of section counts')

  if len(counts) > num_steps:
    raise ValueError(f'bad timestep spacing {spacing!r}: {len(counts)} sections for only '
                     f'{num_steps} steps')
  size_per, extra = divmod(num_steps, len(counts))
  start = 0
  steps = []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if count < 1:
      raise ValueError(f'bad timestep spacing {spacing!r}: section counts must be positive, '
                       f'got {count}')
    if count > size:
      raise ValueError(f'bad timestep spacing {spacing!r}: cannot take {count} steps from a '
                       f'section of {size} steps (of {num_steps})')
    steps += _section_steps(start, size, count)
    start += size
  return sorted(set(steps))
