"""`unclip-sample` (python -m unclip_jax.sample): prompts from arguments and files, outputs,
clear refusals of bad prompts and missing stages."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from unclip_jax import pipeline as pipeline_lib
from unclip_jax import sample
from tests import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sample(*args, timeout=300):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS='--xla_backend_optimization_level=0' + xla_flags.fast_compile())
  return subprocess.run([sys.executable, '-m', 'unclip_jax.sample', *args], cwd=REPO, env=env,
                        capture_output=True, timeout=timeout, check=False)


def test_read_prompts_from_arguments_and_file(tmp_path):
  path = tmp_path / 'prompts.txt'
  path.write_bytes('a red circle\n\n  a blue star on a white background  \n'.encode())
  assert sample.read_prompts(['a green cross'], str(path)) == [
      'a green cross', 'a red circle', 'a blue star on a white background']
  bad = tmp_path / 'bad.txt'
  bad.write_bytes(b'a red circle\na \xff\xfe star\n')
  with pytest.raises(pipeline_lib.PromptError, match=r'bad.txt, line 2: not valid UTF-8'):
    sample.read_prompts([], str(bad))
  undecodable = b'a \xff circle'.decode('utf-8', 'surrogateescape')   # as argv delivers it
  with pytest.raises(pipeline_lib.PromptError, match='prompt argument 2 is not valid UTF-8'):
    sample.read_prompts(['fine', undecodable], None)
  empty = tmp_path / 'empty.txt'
  empty.write_text('\n \n')
  with pytest.raises(pipeline_lib.PromptError, match='holds no prompts'):
    sample.read_prompts([], str(empty))


def test_command_line_writes_images_sheet_and_settings(untrained_run, tmp_path):
  out = tmp_path / 'out'
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('a yellow square on a black background\n')
  result = _sample(f'--run={untrained_run}', f'--out={out}', f'--prompts_file={prompts}',
                   '--batch_size=2', '--decoder_steps=2', '--seed=7', 'a red circle',
                   'a green star')
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  stdout = result.stdout.decode()
  assert 'batch 2/2: upsampler_0 done' in stdout and 'wrote 3 images' in stdout
  images = [np.asarray(Image.open(out / f'{i:04d}.png')) for i in range(3)]
  assert all(im.shape == (32, 32, 3) for im in images)
  assert Image.open(out / 'contact_sheet.png').size[0] == 3 * 128
  info = json.loads((out / 'generation.json').read_text())
  assert info['prompts'] == ['a red circle', 'a green star',
                             'a yellow square on a black background']
  assert info['seed'] == 7 and info['settings']['decoder'] == {'steps': '2'}
  assert set(info['seconds']) == {'prior', 'decoder', 'upsampler_0'}

  # Refusals: an empty prompt (named by number), no prompts at all.
  result = _sample(f'--run={untrained_run}', f'--out={out}', 'a red circle', ' ')
  assert result.returncode != 0
  assert 'Bad prompt: prompt 1 is empty' in result.stderr.decode()
  result = _sample(f'--run={untrained_run}')
  assert result.returncode != 0 and 'exactly one of them' in result.stderr.decode()
