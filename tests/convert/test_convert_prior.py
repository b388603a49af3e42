"""karlo's prior (diffusers PriorTransformer) converts to our DiffusionPrior with numerical parity,
and UnCLIPScheduler settings map onto our diffusion/sampling fields."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

diffusers = pytest.importorskip('diffusers')
torch = pytest.importorskip('torch')

from unclip_jax.convert import diffusers_prior  # pylint: disable=wrong-import-position
from unclip_jax.convert.torch_io import ConversionError  # pylint: disable=wrong-import-position
from unclip_jax.diffusion import gaussian_diffusion  # pylint: disable=wrong-import-position
from unclip_jax.diffusion import samplers, schedules  # pylint: disable=wrong-import-position
from unclip_jax.models.prior import DiffusionPrior  # pylint: disable=wrong-import-position

D, L, B = 24, 7, 4
SIZES = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=D,
             num_embeddings=L, additional_embeddings=4)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """(torch PriorTransformer with random non-trivial weights, its saved folder)."""
  torch.manual_seed(0)
  model = diffusers.PriorTransformer(**SIZES).eval()
  with torch.no_grad():
    for p in model.parameters():  # positional/prd/clip stats start at 0, norms at 1: perturb all
      p.add_(0.3 * torch.randn_like(p))
    model.clip_std.copy_(0.5 + torch.rand_like(model.clip_std))
  folder = str(tmp_path_factory.mktemp('prior'))
  model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope='module')
def converted(reference):
  config, params = diffusers_prior.convert_prior(reference[1])
  sizes = diffusers_prior.read_prior_config(reference[1])
  return diffusers_prior.prior_model(config, sizes), config, params


def _inputs():
  rng = np.random.RandomState(0)
  lengths = [L, 4, 1, 2]  # padding in three rows; the first token (BOS) is always real
  return dict(x_t=rng.randn(B, D).astype(np.float32),
              t=np.array([0, 1, 500, 999]),
              text_emb=rng.randn(B, D).astype(np.float32),
              token_encodings=rng.randn(B, L, D).astype(np.float32),
              token_mask=np.arange(L)[None] < np.array(lengths)[:, None])


def _torch_prior(model, x):
  with torch.no_grad():
    return model(torch.tensor(x['x_t']), timestep=torch.tensor(x['t']),
                 proj_embedding=torch.tensor(x['text_emb']),
                 encoder_hidden_states=torch.tensor(x['token_encodings']),
                 attention_mask=torch.tensor(x['token_mask'])).predicted_image_embedding.numpy()


def _relative_error(ours, ref):
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def test_prediction_matches_prior_transformer(reference, converted):
  model, config, params = converted
  x = _inputs()
  ours = jax.jit(model.apply)({'params': params}, **{k: jnp.asarray(v) for k, v in x.items()})
  ref = _torch_prior(reference[0], x)
  assert _relative_error(ours, ref) <= 1e-4, _relative_error(ours, ref)
  # Padded caption tokens are really masked: changing them changes neither model.
  x['token_encodings'][1, 4:] += 5.0
  np.testing.assert_allclose(_torch_prior(reference[0], x), ref, atol=1e-4)
  assert config.model.width == 32 and config.model.depth == 2 and config.model.num_heads == 2


def test_config_and_null_caption(converted):
  model, config, params = converted
  assert config.model.null_caption == 'empty_prompt' and config.prior.normalization == 'stats'
  assert not np.any(params['null_text_emb']) and not np.any(params['null_token_encodings'])
  x = {k: jnp.asarray(v) for k, v in _inputs().items()}
  with pytest.raises(ValueError, match='empty prompt'):
    model.apply({'params': params}, **x, drop_text=jnp.zeros((B,), bool))
  with pytest.raises(ValueError, match='null_caption'):
    model.clone(null_caption='zeros').apply({'params': params}, **x)


def test_denormalize_is_post_process_latents(reference, converted):
  model, _, params = converted
  x = np.random.RandomState(1).randn(3, D).astype(np.float32)
  with torch.no_grad():
    ref = reference[0].post_process_latents(torch.tensor(x)).numpy()
  ours = model.apply({'params': params}, jnp.asarray(x), method=DiffusionPrior.denormalize)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
  back = model.apply({'params': params}, ours, method=DiffusionPrior.normalize)
  np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)


def test_bin_checkpoint_loads_identically(reference, converted, tmp_path):
  model, folder = reference
  shutil.copy(os.path.join(folder, 'config.json'), tmp_path)
  torch.save(model.state_dict(), tmp_path / 'diffusion_pytorch_model.bin')
  _, params = diffusers_prior.convert_prior(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params, converted[2])


def _folder_with(tmp_path, reference, config_changes=None, state_changes=None):
  """A copy of the reference folder with a changed config.json and/or state dict."""
  model, folder = reference
  with open(os.path.join(folder, 'config.json')) as f:
    cfg = json.load(f)
  cfg.update(config_changes or {})
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(cfg, f)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  state.update(state_changes or {})
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  save_file(state, str(tmp_path / 'diffusion_pytorch_model.safetensors'))
  return str(tmp_path)


def test_errors(reference, tmp_path):
  with pytest.raises(ConversionError, match='not a folder'):
    diffusers_prior.convert_prior(str(tmp_path / 'missing'))
  only_config = tmp_path / 'only_config'
  only_config.mkdir()
  shutil.copy(os.path.join(reference[1], 'config.json'), only_config)
  with pytest.raises(ConversionError, match='no weights'):
    diffusers_prior.convert_prior(str(only_config))
  (tmp_path / 'shape').mkdir()
  bad = _folder_with(tmp_path / 'shape', reference,
                     state_changes={'proj_in.weight': torch.zeros(32, D + 1)})
  with pytest.raises(ConversionError, match=r"'proj_in.weight' has shape \(32, 25\), expected "
                     r'\(32, 24\)'):
    diffusers_prior.convert_prior(bad)
  for field, value in (('norm_in_type', 'layer'), ('additional_embeddings', 3),
                       ('added_emb_type', None), ('time_embed_dim', 64)):
    (tmp_path / field).mkdir()
    with pytest.raises(ConversionError, match=f'{field}={value!r} is not supported'):
      diffusers_prior.convert_prior(_folder_with(tmp_path / field, reference, {field: value}))


def test_clip_config_sizes_are_checked(reference):
  from unclip_jax.convert import base_config  # pylint: disable=g-import-not-at-top
  clip = base_config('clip', 'tiny')
  clip.model.embed_dim, clip.model.text.width = D, D
  clip.model.text.context_length = L
  diffusers_prior.convert_prior(reference[1], clip)
  clip.model.text.context_length = L + 1
  with pytest.raises(ConversionError, match='context_length'):
    diffusers_prior.convert_prior(reference[1], clip)


# --- scheduler ----------------------------------------------------------------------------------

KARLO_SCHEDULERS = {  # karlo's three UnCLIPSchedulers and inference step counts
    'prior': (dict(variance_type='fixed_small_log', prediction_type='sample',
                   clip_sample_range=5.0), 25,
              {'diffusion.mean_type': 'x0', 'diffusion.var_type': 'fixed_small',
               'sampling.clip_range': 5.0}),
    'decoder': (dict(variance_type='learned_range', prediction_type='epsilon'), 25,
                {'diffusion.mean_type': 'eps', 'diffusion.var_type': 'learned_range',
                 'sampling.clip_range': 1.0}),
    'super_res': (dict(variance_type='fixed_small_log', prediction_type='epsilon'), 7,
                  {'diffusion.mean_type': 'eps', 'diffusion.var_type': 'fixed_small',
                   'sampling.clip_range': 1.0}),
}


@pytest.mark.parametrize('which', sorted(KARLO_SCHEDULERS))
def test_scheduler_fields_reproduce_unclip_scheduler(which, tmp_path):
  settings, steps, expected = KARLO_SCHEDULERS[which]
  diffusers.UnCLIPScheduler(**settings).save_pretrained(str(tmp_path))
  fields = diffusers_prior.scheduler_fields(str(tmp_path), steps)
  assert fields == dict(expected, **{'diffusion.schedule': 'cosine', 'diffusion.num_steps': 1000,
                                     'sampling.sampler': 'ddpm', 'sampling.steps': str(steps),
                                     'sampling.timesteps': 'unclip'})
  # Our sampler built from the fields steps like the scheduler (given our float64 schedule, so
  # that formulations are compared, not float32 roundings; see test_diffusers_parity.py).
  betas = schedules.get_betas(fields['diffusion.schedule'], fields['diffusion.num_steps'])
  diffusion = gaussian_diffusion.diffusion_from_config(
      fields['diffusion.schedule'], fields['diffusion.num_steps'],
      mean_type=fields['diffusion.mean_type'],
      var_type=fields['diffusion.var_type']).respace(schedules.stage_spacing(
          ml_collections.ConfigDict({'steps': fields['sampling.steps'],
                                     'timesteps': fields['sampling.timesteps']})))
  scheduler = diffusers.UnCLIPScheduler.from_pretrained(str(tmp_path))
  scheduler.betas = torch.tensor(np.asarray(betas), dtype=torch.float64)
  scheduler.alphas_cumprod = torch.cumprod(1.0 - scheduler.betas, 0)
  scheduler.alphas = 1.0 - scheduler.betas
  scheduler.one = torch.tensor(1.0, dtype=torch.float64)
  scheduler.set_timesteps(steps)
  desc = [int(t) for t in scheduler.timesteps]
  assert desc[::-1] == [int(t) for t in diffusion.timestep_map]
  indices = [steps - 1, steps // 2, 1, 0]
  rng = np.random.RandomState(2)
  x_t = rng.randn(len(indices), 6)
  out = 8.0 * rng.randn(len(indices), 12 if expected['diffusion.var_type'] == 'learned_range'
                        else 6)
  if out.shape[1] == 12:
    out[:, 6:] = rng.uniform(-1, 1, (len(indices), 6))
  noise = [torch.randn((1, 6), generator=torch.Generator().manual_seed(r), dtype=torch.float64)
           for r in range(len(indices))]
  x_prev, pred_x0 = samplers.ddpm_step(
      diffusion, jnp.asarray(out, jnp.float32), jnp.asarray(x_t, jnp.float32),
      jnp.asarray(indices, jnp.int32), jnp.asarray(np.concatenate(noise), jnp.float32),
      clip_range=fields['sampling.clip_range'])
  for row, i in enumerate(indices):
    k = desc.index(int(diffusion.timestep_map[i]))
    ref = scheduler.step(torch.tensor(out[row:row + 1]), desc[k], torch.tensor(x_t[row:row + 1]),
                         prev_timestep=desc[k + 1] if k + 1 < len(desc) else None,
                         generator=torch.Generator().manual_seed(row))
    np.testing.assert_allclose(pred_x0[row], ref.pred_original_sample[0].numpy(), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(x_prev[row], ref.prev_sample[0].numpy(), rtol=1e-5, atol=1e-5)


def test_scheduler_fields_refuse_unsupported_settings(tmp_path):
  with pytest.raises(ConversionError, match='scheduler_config.json is missing'):
    diffusers_prior.scheduler_fields(str(tmp_path))
  base = {'_class_name': 'UnCLIPScheduler', 'num_train_timesteps': 1000}
  for change, field in (({'variance_type': 'fixed_large'}, 'variance_type'),
                        ({'prediction_type': 'v_prediction'}, 'prediction_type'),
                        ({'thresholding': True}, 'thresholding'),
                        ({'_class_name': 'DDIMScheduler'}, '_class_name')):
    with open(tmp_path / 'scheduler_config.json', 'w') as f:
      json.dump(dict(base, **change), f)
    with pytest.raises(ConversionError, match=field):
      diffusers_prior.scheduler_fields(str(tmp_path))
  with open(tmp_path / 'scheduler_config.json', 'w') as f:
    json.dump(dict(base, clip_sample=False), f)
  assert diffusers_prior.scheduler_fields(str(tmp_path))['sampling.clip_range'] is None
