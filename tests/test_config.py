"""Config presets, command-line overrides and the errors for invalid configs."""

import os
import subprocess
import sys

import pytest

from configs import clip as clip_config
from unclip_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('preset', ['tiny', 'vit_b16', 'vit_l14'])
def test_presets_are_valid(preset):
  c = clip_config.get_config(preset)
  config_lib.validate(c, num_devices=8)
  assert c.data.resolution == c.model.vision.image_size
  assert c.tokenizer.context_length == c.model.text.context_length


def test_published_sizes():
  b16, l14 = clip_config.get_config('vit_b16'), clip_config.get_config('vit_l14')
  assert (b16.model.vision.patch_size, b16.model.vision.width, b16.model.embed_dim) == (16, 768, 512)
  assert (l14.model.vision.patch_size, l14.model.vision.depth, l14.model.embed_dim) == (14, 24, 768)
  assert l14.model.text.vocab_size == 49408 and l14.model.text.context_length == 77


def test_shared_fields_follow_overrides():
  c = clip_config.get_config('tiny')
  c.data.resolution = 48
  assert c.model.vision.image_size == 48


def test_unknown_preset():
  with pytest.raises(ValueError, match='unknown preset'):
    clip_config.get_config('vit_h99')


@pytest.mark.parametrize('field,value,message', [
    ('batch_size', 12, r'config.batch_size: 12 is not divisible by the data-parallel size 8'),
    ('mesh.shape', (2, 2, 1), r'config.mesh.shape: \(2, 2, 1\) has 4 devices but 8'),
    ('mesh.shape', (3, -1, 1), r'config.mesh.shape: .* does not divide the 8 devices'),
    ('mesh.shape', (2, 2), r'config.mesh.shape: .* must have 3 entries'),
    ('mesh.rules', (('batch', 'pipeline'),), r'config.mesh.rules'),
    ('dtype', 'float8', r'config.dtype'),
    ('attention', 'flash', r"config.attention: 'flash' is not 'auto' or 'xla'"),
    ('optim.lr', -1.0, r'config.optim.lr: must be positive'),
    ('optim.accum_steps', 3, r'config.optim.accum_steps'),
    ('ema.decay', 1.0, r'config.ema.decay'),
])
def test_invalid_configs_name_the_field(field, value, message):
  c = clip_config.get_config('tiny')
  node = c
  *parents, leaf = field.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c, num_devices=8)


def test_a_unet_attention_level_it_does_not_have_is_refused_before_anything_runs():
  from configs import decoder as decoder_config  # pylint: disable=g-import-not-at-top
  c = decoder_config.get_config('tiny')
  config_lib.validate(c, num_devices=8)
  # Unpatched with two levels: downsampling factors 1 and 2, while the preset attends at 4.
  c.model.unet.patch_size, c.model.unet.channel_mult = 1, (1, 2)
  with pytest.raises(config_lib.ConfigError, match=(
      r'^config.model.unet.attention_resolutions: \(4,\) are downsampling factors; \[4\] is '
      r'not one of \[1, 2\] \(patch_size 1, len\(channel_mult\) = 2\)$')):
    config_lib.validate(c, num_devices=8)
  c.model.unet.attention_resolutions = (2,)
  config_lib.validate(c, num_devices=8)


def test_mesh_resolution():
  assert config_lib.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  assert config_lib.resolve_mesh_shape((1, 1, -1), 8) == (1, 1, 8)


def _main(*args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run([sys.executable, '-m', 'unclip_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('override,message', [
    ('--config.optim.lrr=1e-3', 'lrr'),
    ('--config.optim.lr=fast', 'lr'),
    ('--config.batch_size=7', 'config.batch_size: 7 is not divisible by the data-parallel size 2'),
    ("--config.mesh.shape=(1,1,4)", 'config.mesh.shape: (1, 1, 4) has 4 devices but 2'),
    ('--config.mesh.shape=abc', "config.mesh.shape: ('abc',) is not a tuple of 3 integers"),
])
def test_command_line_rejects_bad_configs_before_compiling(tmp_path, override, message):
  result = _main('--config=configs/clip.py:tiny', f'--workdir={tmp_path}', override)
  assert result.returncode != 0
  assert message in result.stderr and 'Traceback' not in result.stderr, result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


@pytest.mark.parametrize('preset,published', [('vit_b16', 149_620_737), ('vit_l14', 427_616_513)])
def test_presets_have_the_published_parameter_counts(preset, published):
  """OpenAI CLIP ViT-B/16 and ViT-L/14 parameter counts, from shapes only (nothing allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unclip_jax import stages  # pylint: disable=g-import-not-at-top
  config = clip_config.get_config(preset)
  stage = stages.get_stage(config)
  spec = stage.batch_spec(1)
  shapes = jax.eval_shape(lambda: stage.init(
      jax.random.PRNGKey(0), {k: jnp.zeros(s.shape, s.dtype) for k, s in spec.items()}))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert count == published


def test_an_exports_config_is_a_config_file(untrained_run):
  """`configs/export.py:PATH` gives an export's own config (what `config.init_from` needs), and
  the installed presets stand in for `configs/...` paths outside the source tree."""
  from unclip_jax import cli  # pylint: disable=g-import-not-at-top
  from unclip_jax.stages import export  # pylint: disable=g-import-not-at-top
  module = config_lib.preset_module('export')
  config = module.get_config(os.path.join(untrained_run, 'decoder'))
  saved, _ = export.load_export(os.path.join(untrained_run, 'decoder'))
  assert config.to_dict() == saved.to_dict() and config.stage == 'decoder'
  with pytest.raises(FileNotFoundError, match='is not an export'):
    module.get_config(untrained_run)
  elsewhere = cli.resolve_config_paths(['--config=nowhere/configs/clip.py:tiny', '--x=1'])
  assert elsewhere[0].endswith(os.path.join('configs', 'clip.py') + ':tiny')
  assert os.path.exists(elsewhere[0][len('--config='):-len(':tiny')]) and elsewhere[1] == '--x=1'
