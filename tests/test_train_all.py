"""The whole-system job (README's first command) at a few steps per stage: every stage trains in
order on the frozen CLIP, the report, grid and logs are written, and a second run skips the
finished stages."""

import glob
import json
import os

import ml_collections
import pytest
from PIL import Image

from configs import unclip as unclip_configs
from unclip_jax import train_all

from tests import helpers


def _job_config(data_dir):
  c = unclip_configs.get_config('tiny')
  c.clip = helpers.tiny_clip_config(data_dir)
  c.prior = helpers.tiny_prior_config(data_dir, **{'sampling.steps': '3'})
  c.decoder = helpers.tiny_decoder_config(data_dir, **{'sampling.steps': '3'})
  c.upsampler = helpers.tiny_upsampler_config(data_dir, **{'data.resolution': 32,
                                                           'sampling.steps': '3'})
  c.sample.update(num_prompts=12, batch_size=8, grid_columns=4)
  return c


@pytest.mark.slow
def test_job_trains_every_stage_then_samples_scores_and_skips_finished_stages(data_dir, tmp_path):
  config = _job_config(data_dir)
  workdir = str(tmp_path / 'unclip')
  report = train_all.run(config, workdir)

  assert list(report['stages']) == ['clip', 'prior', 'decoder', 'upsampler']
  for name in train_all.STAGES:
    stage_dir = os.path.join(workdir, name)
    assert os.path.exists(os.path.join(stage_dir, 'export', 'config.json')), name
    assert glob.glob(os.path.join(stage_dir, 'events.out.tfevents.*')), name
    assert report['stages'][name]['eval'], name
  # The prior and decoder trained on the job's CLIP, from its precomputed embeddings.
  prior_config = json.load(open(os.path.join(workdir, 'prior', 'config.json')))
  assert prior_config['clip']['workdir'] == os.path.join(workdir, 'clip')
  assert prior_config['data']['embeddings_dir'] == os.path.join(workdir, 'embeddings_16px')

  s = report['sample']
  assert s['num_prompts'] == 12 and s['resolution'] == 32
  for key in ('color_accuracy', 'background_accuracy', 'shape_accuracy'):
    assert 0.0 <= s['generated'][key] <= 1.0
    assert s['real'][key] >= 0.9          # the checker reads the dataset's own images
  assert json.load(open(os.path.join(workdir, 'report.json'))) == report
  sample_dir = os.path.join(workdir, 'sample')
  assert Image.open(os.path.join(sample_dir, 'grid.png')).size[0] == 4 * 128
  assert len(glob.glob(os.path.join(sample_dir, 'images', '*.png'))) == 12
  prompts = open(os.path.join(sample_dir, 'prompts.txt')).read().split('\n')[:12]
  assert all(prompts)
  assert glob.glob(os.path.join(sample_dir, 'events.out.tfevents.*'))

  # Again on the same workdir: every stage is found finished and skipped.
  again = train_all.train_stages(config, workdir)
  for name in train_all.STAGES:
    assert again[name]['eval'] == report['stages'][name]['eval']
    assert again[name]['seconds'] < 5, name
