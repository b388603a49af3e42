"""Beta schedules and timestep respacing: closed forms, published spacings, bad requests."""

import math

import numpy as np
import pytest

from unclip_jax.diffusion import schedules


def test_cosine_schedule_closed_form():
  betas = schedules.cosine_betas(1000)
  assert betas.shape == (1000,) and betas.dtype == np.float64
  assert np.all(betas > 0) and np.all(betas <= 0.999)
  assert betas[-1] == 0.999  # f(1) = 0: the last beta is the cap
  alphas_cumprod = np.cumprod(1 - betas)
  assert alphas_cumprod[0] == pytest.approx(1, abs=1e-4)
  assert alphas_cumprod[-1] < 1e-6
  # Away from the cap, alphas_cumprod follows f(t+1)/f(0) exactly.
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  for t in (0, 10, 500, 900):
    assert alphas_cumprod[t] == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-10)
  assert np.all(np.diff(alphas_cumprod) < 0)


def test_linear_schedule_endpoints_and_scaling():
  betas = schedules.linear_betas(1000)
  assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
  np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
  short = schedules.linear_betas(250)
  assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)
  custom = schedules.linear_betas(10, beta_start=0.1, beta_end=0.2)
  assert custom[0] == pytest.approx(0.1) and custom[-1] == pytest.approx(0.2)
  with pytest.raises(ValueError, match='beta_start'):
    schedules.linear_betas(10, beta_start=0.5, beta_end=0.1)


def test_get_betas_by_name():
  np.testing.assert_array_equal(schedules.get_betas('cosine', 100), schedules.cosine_betas(100))
  np.testing.assert_array_equal(schedules.get_betas('linear', 100), schedules.linear_betas(100))
  with pytest.raises(ValueError, match="'sigmoid'"):
    schedules.get_betas('sigmoid', 100)
  with pytest.raises(ValueError, match='num_steps'):
    schedules.get_betas('cosine', 0)


def test_space_timesteps_even_single_section():
  steps = schedules.space_timesteps(1000, '25')
  assert len(steps) == 25 and steps[0] == 0 and steps[-1] == 999
  assert steps[:6] == [0, 42, 83, 125, 166, 208]  # 41.625 stride, rounded half to even
  assert schedules.space_timesteps(1000, 25) == steps
  assert schedules.space_timesteps(1000, [25]) == steps
  assert schedules.space_timesteps(1000, '1000') == list(range(1000))
  assert schedules.space_timesteps(1000, '1') == [0]
  assert schedules.space_timesteps(1000, '7') == [0, 166, 333, 500, 666, 832, 999]  # halves to even


def test_space_timesteps_ddim_stride():
  assert schedules.space_timesteps(1000, 'ddim50') == list(range(0, 1000, 20))
  assert schedules.space_timesteps(1000, 'ddim1000') == list(range(1000))
  assert schedules.space_timesteps(1000, 'ddim3') == [0, 334, 668]
  with pytest.raises(ValueError, match="'ddim999'"):
    schedules.space_timesteps(1000, 'ddim999')  # no integer stride gives 999 steps


def test_space_timesteps_sections():
  steps = schedules.space_timesteps(1000, '10,15,20')
  assert len(steps) == 45
  # Sections [0, 334), [334, 667), [667, 1000), each end included.
  first, second, third = steps[:10], steps[10:25], steps[25:]
  assert first[0] == 0 and first[-1] == 333
  assert first == [round(k * 333 / 9) for k in range(10)]
  assert second[0] == 334 and second[-1] == 666
  assert third[0] == 667 and third[-1] == 999
  assert schedules.space_timesteps(1000, (10, 15, 20)) == steps
  # The guided-diffusion docstring example: 300 steps cut into three sections of 100.
  small = schedules.space_timesteps(300, '10,15,20')
  assert small[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
  assert small[10] == 100 and small[24] == 199 and small[25] == 200 and small[-1] == 299


@pytest.mark.parametrize('spacing, match', [
    ('', 'empty'),
    ('abc', "'abc'"),
    ('10,x', "'x' is not an integer"),
    ('ddimfoo', "'ddimfoo'"),
    ('1001', 'cannot take 1001 steps'),
    ('0', 'must be positive'),
    ('10,-1', 'must be positive'),
    ('400,400,400', 'cannot take 400 steps from a section of 334'),
    (2.5, 'expected an int'),
    ([], 'empty'),
])
def test_space_timesteps_rejects_impossible_requests(spacing, match):
  with pytest.raises(ValueError, match=match):
    schedules.space_timesteps(1000, spacing)
