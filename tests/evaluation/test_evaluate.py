"""`unclip-evaluate`: images from captions through a run, FID/KID/precision/recall against the
run's held-out images, CLIP score, per guidance setting; resumable; report, grid and curve."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from unclip_jax import evaluate
from unclip_jax import pipeline as pipeline_lib
from unclip_jax.evaluation import inception


def _random_inception_weights(path):
  """The FID Inception's tensors under pytorch-fid's names, random (He-scaled convolutions,
  random batch-norm statistics), saved as safetensors."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)

  def draw(path_, leaf):
    key = str(path_[-1].key)
    if key == 'kernel' and len(leaf.shape) == 2:          # the classifier
      return 0.01 * rng.normal(size=leaf.shape)
    if key == 'kernel':                                   # HWIO
      return rng.normal(size=leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:3]))
    base = {'scale': 1.0, 'bias': 0.0, 'mean': 0.0, 'var': 1.0}[key]
    return base + 0.1 * rng.uniform(0 if key == 'var' else -1, 1, size=leaf.shape)
  params = jax.tree_util.tree_map_with_path(draw, inception.abstract_params())
  save_file(inception.state_dict_from_params(params), path)
  return path


def test_evaluate_writes_the_report_grid_and_curve_and_resumes_after_a_kill(
    untrained_run, tmp_path, monkeypatch):
  """Two decoder guidance settings of 8 images from the held-out captions, against the held-out
  images' statistics. Killed during the second setting's batch, the same call generates only
  that batch again."""
  weights = _random_inception_weights(str(tmp_path / 'inception.safetensors'))
  out = str(tmp_path / 'eval')
  calls, real, real_score = [], pipeline_lib.UnclipPipeline.text_to_image, evaluate.score

  def counted(self, prompts, **kwargs):
    calls.append(kwargs['decoder'].guidance_scale)
    if kill_at and len(calls) == kill_at:
      raise KeyboardInterrupt('killed')
    return real(self, prompts, **kwargs)
  monkeypatch.setattr(pipeline_lib.UnclipPipeline, 'text_to_image', counted)
  # Both calls on one pipeline object, so that the second reuses its compiled stages (a
  # restarted process compiles them again; nothing else differs).
  pipe = pipeline_lib.UnclipPipeline.from_run(untrained_run)
  monkeypatch.setattr(pipeline_lib.UnclipPipeline, 'from_run', lambda root: pipe)
  run = lambda: evaluate.evaluate(untrained_run, weights, out, num=8, batch_size=8,
                                  decoder_guidance=['1', '3'], kid_subset_size=8,
                                  progress=False)
  kill_at = 2
  with pytest.raises(KeyboardInterrupt):
    run()
  assert calls == [1.0, 3.0] and not os.path.exists(os.path.join(out, 'report.json'))
  calls.clear()
  kill_at = None
  scored = []
  monkeypatch.setattr(evaluate, 'score', lambda *a, **k: scored.append(1) or real_score(*a, **k))
  report = run()
  assert calls == [3.0] and len(scored) == 1   # the first setting was neither redrawn nor rescored
  assert [s['setting'] for s in report['settings']] == ['prior_default_decoder_1',
                                                        'prior_default_decoder_3']
  for s in report['settings']:
    assert s['num_images'] == 8 and s['fid'] > 0 and np.isfinite(s['kid'])
    assert 0 <= s['precision'] <= 1 and 0 <= s['recall'] <= 1 and s['clip_score'] >= 0
  # Different guidance, different images: the two settings' FIDs differ.
  assert report['settings'][0]['fid'] != report['settings'][1]['fid']
  with open(os.path.join(out, 'report.json')) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  assert Image.open(os.path.join(out, 'guidance_curve.png')).size[0] > 300
  grid = Image.open(os.path.join(out, 'prior_default_decoder_1', 'grid.png'))
  assert grid.size[0] == 4 * 128
  assert os.path.exists(os.path.join(out, 'reference.npz'))


def test_captions_come_from_files_or_the_held_out_split(tmp_path, untrained_run):
  txt, jsonl = tmp_path / 'c.txt', tmp_path / 'c.jsonl'
  txt.write_text('a red circle\n\na blue square\n')
  jsonl.write_text('{"text": "a green star"}\n{"text": "a red cross"}\n')
  assert evaluate.read_captions(str(txt), 3) == ['a red circle', 'a blue square', 'a red circle']
  assert evaluate.read_captions(str(jsonl), 2, caption_key='text') == ['a green star',
                                                                       'a red cross']
  with pytest.raises(ValueError, match=r"c.jsonl, line 1: no 'caption' field"):
    evaluate.read_captions(str(jsonl), 2)
  with pytest.raises(ValueError, match="neither 'held_out' nor a file"):
    evaluate.read_captions(str(tmp_path / 'missing.txt'), 2)
  held_out = evaluate.read_captions('held_out', 4, untrained_run)
  assert len(held_out) == 4 and all('background' in c for c in held_out)
