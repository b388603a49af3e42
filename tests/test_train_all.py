"""The whole-system job (README's first command), shortened: every stage trains in order on the
frozen CLIP, the report, grid and logs are written, and a second run skips the finished
stages."""

import glob
import json
import os
import time

import pytest
from PIL import Image

from configs import unclip as unclip_configs
from unclip_jax import train_all
from unclip_jax import workdir as workdir_lib

from tests import helpers


@pytest.mark.slow
def test_job_trains_every_stage_then_samples_scores_and_skips_finished_stages(job_run):
  """The job from the command line on webdataset shards (`conftest.JOB_RUN`; its stages'
  learning is checked in the stages' tests), then its stages again in-process: each is found
  finished and skipped."""
  workdir, report, overrides = job_run
  assert list(report['stages']) == ['clip', 'prior', 'decoder', 'upsampler']
  for name in train_all.STAGES:
    stage_dir = os.path.join(workdir, name)
    assert os.path.exists(os.path.join(stage_dir, 'export', 'config.json')), name
    assert glob.glob(os.path.join(stage_dir, 'events.out.tfevents.*')), name
    assert report['stages'][name]['eval'], name
  # The prior and decoder trained on the job's CLIP, from one set of precomputed embeddings: the
  # images' at the CLIP's 32px, also for the 16px decoder.
  prior_config = json.load(open(os.path.join(workdir, 'prior', 'config.json')))
  assert prior_config['clip']['workdir'] == os.path.join(workdir, 'clip')
  assert prior_config['data']['embeddings_dir'] == os.path.join(workdir, 'embeddings_32px')
  decoder_config = json.load(open(os.path.join(workdir, 'decoder', 'config.json')))
  assert decoder_config['data']['embeddings_dir'] == os.path.join(workdir, 'embeddings_32px')
  assert [os.path.basename(d) for d in glob.glob(os.path.join(workdir, 'embeddings_*'))] == [
      'embeddings_32px']

  s = report['sample']
  assert s['num_prompts'] == 12 and s['resolution'] == 32
  print(s)
  # The CLIP score (100 x cosine) of the generated images against their prompts, above that of
  # each image against another's prompt, below the held-out images' own. Measured: 37–46 over
  # runs (mismatched 12–16), real 92.
  assert s['clip_score_mismatched'] + 10 < s['clip_score'] < s['clip_score_real']
  # The shards' JSON names each held-out image's attributes (`config.data.attribute_labels`),
  # so the pixel checker reads the samples and the shards' own images (all right). The decoder's
  # 160 steps at 16px learn the background colour first: 10 of 12 measured (chance 1/8); the
  # shape's colour and outline come later (0 of 12).
  assert s['real']['all_accuracy'] == 1.0, s['real']
  assert s['generated']['background_accuracy'] >= 0.5, s['generated']
  sample_dir = os.path.join(workdir, 'sample')
  assert Image.open(os.path.join(sample_dir, 'grid.png')).size[0] == 4 * 128
  assert len(glob.glob(os.path.join(sample_dir, 'images', '*.png'))) == 12
  prompts = open(os.path.join(sample_dir, 'prompts.txt')).read().split('\n')[:12]
  assert all(prompts)
  readings = open(os.path.join(sample_dir, 'readings.tsv')).read().splitlines()
  assert len(readings) == 13 and readings[0] == (
      'image\tprompt\tclip_score\tcolor\tbackground\tshape\tshape_iou')
  assert [line.split('\t')[1] for line in readings[1:]] == prompts
  assert glob.glob(os.path.join(sample_dir, 'events.out.tfevents.*'))

  # Again on the same workdir: every stage is found finished and skipped.
  config = helpers.apply_flag_overrides(unclip_configs.get_config('tiny'), overrides)
  again = train_all.train_stages(config, workdir)
  for name in train_all.STAGES:
    assert again[name]['eval'] == report['stages'][name]['eval']
    assert again[name]['seconds'] < 5, name


@pytest.mark.parametrize('preset', ['tiny', 'gpu'])
def test_job_presets_are_valid_and_chain(preset):
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = unclip_configs.get_config(preset)
  for name in train_all.STAGES:
    config_lib.validate(config[name], num_devices=1)
  train_all.check_chain(config)
  up = config.upsampler
  assert up.data.resolution == up.upsampler.scale * config.decoder.data.resolution


@pytest.mark.parametrize('field,value,message', [
    ('decoder.data.resolution', 64,
     r'config.upsampler.data.resolution: 64px at upsampler.scale 2 takes 32px images, but the '
     r'decoder draws 64px .* set the upsampler to 128px'),
    ('upsampler.data.resolution', 72, r'takes 36px images'),
    ('prior.clip.normalize', False, r'config.prior.clip.normalize \(False\) and '
                                    r'config.decoder.clip.normalize \(True\) differ'),
    # A stage's own fields too (`config_lib.validate`), named as the job's.
    ('decoder.model.unet.channel_mult', '(1,)',
     r'^config.decoder.model.unet.attention_resolutions: \(4,\) are downsampling factors; '
     r'\[4\] is not one of \[2\]'),
])
def test_job_refuses_stages_that_do_not_chain_before_training(tmp_path, field, value, message):
  from unclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = helpers.apply_flag_overrides(unclip_configs.get_config('tiny'),
                                        (f'--config.{field}={value}',))
  with pytest.raises(config_lib.ConfigError, match=message):
    train_all.train_stages(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'clip')    # nothing trained


def _fake_training(monkeypatch, fail=None, wait=10.0):
  """Replaces the stages' training with a recorder: [(stage, thread name)] in start order. The
  decoder waits (up to `wait` s) for the upsampler to start, so an overlap is observed, not
  raced."""
  import threading  # pylint: disable=g-import-not-at-top
  from unclip_jax import train  # pylint: disable=g-import-not-at-top
  started, upsampler_started = [], threading.Event()

  def fake(config, workdir):
    del workdir
    started.append((config.stage, threading.current_thread().name))
    if config.stage == 'upsampler':
      upsampler_started.set()
    if config.stage == 'decoder':
      started.append(('upsampler started during the decoder', upsampler_started.wait(wait)))
    if config.stage == fail:
      raise RuntimeError(f'{fail} failed')
    return {'metric': 1.0}
  monkeypatch.setattr(train, 'train_and_evaluate', fake)
  monkeypatch.setattr(train_all, '_clip_fingerprint', lambda workdir: 'clip')
  return started


@pytest.mark.parametrize('overlap', [False, True])
def test_job_trains_the_upsampler_alongside_the_decoder_when_asked(tmp_path, monkeypatch, overlap):
  started = _fake_training(monkeypatch, wait=10.0 if overlap else 0.1)
  config = unclip_configs.get_config('tiny')
  config.precompute_embeddings = False
  config.overlap_upsampler = overlap
  report = train_all.train_stages(config, str(tmp_path / 'run'))
  assert list(report) == list(train_all.STAGES)          # the report keeps the stages' order
  assert all(report[name]['eval'] == {'metric': 1.0} for name in train_all.STAGES)
  names = [s for s, _ in started if s in train_all.STAGES]
  threads = {s: t for s, t in started if s in train_all.STAGES}
  main = threads['clip']
  if overlap:
    assert names == ['clip', 'prior', 'upsampler', 'decoder'] or names == [
        'clip', 'prior', 'decoder', 'upsampler']
    assert ('upsampler started during the decoder', True) in started
    assert threads['upsampler'] != main and threads['decoder'] == main
  else:
    assert names == list(train_all.STAGES)
    assert ('upsampler started during the decoder', False) in started
    assert set(threads.values()) == {main}


def test_job_raises_the_overlapped_upsamplers_error(tmp_path, monkeypatch):
  _fake_training(monkeypatch, fail='upsampler')
  config = unclip_configs.get_config('tiny')
  config.precompute_embeddings = False
  with pytest.raises(RuntimeError, match='upsampler failed'):
    train_all.train_stages(config, str(tmp_path / 'run'))


def test_sampling_on_the_built_in_data_also_reads_the_images_with_the_pixel_checker(
    untrained_run, data_dir):
  """On the built-in source the job's samples are also scored by the pixel checker (colours and
  shape as the prompt asks), beside the CLIP score every source gets."""
  config = unclip_configs.get_config('tiny')
  config.upsampler.data.update(data_dir=data_dir, resolution=32, num_train=256, num_test=64)
  config.sample.update(num_prompts=4, batch_size=4, grid_columns=2)
  report = train_all.sample_and_score(config, untrained_run)
  assert report['num_prompts'] == 4 and report['resolution'] == 32
  assert set(report['generated']) >= {'color_accuracy', 'background_accuracy', 'shape_accuracy',
                                      'size_accuracy', 'size_asked', 'position_accuracy',
                                      'position_asked', 'all_accuracy'}
  assert report['real']['size_accuracy'] >= 0.9 and report['real']['position_accuracy'] >= 0.9
  assert report['real']['color_accuracy'] >= 0.9     # the checker reads the dataset's own images
  assert sum(sum(c.values()) for c in report['generated_shapes'].values()) == 4
  # Half the prompts ask for a combination the training split never shows, half have none.
  from unclip_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
  prompts = open(os.path.join(untrained_run, 'sample', 'prompts.txt')).read().splitlines()
  assert report['generated_unseen']['num_prompts'] == report['generated_seen']['num_prompts'] == 2
  held = [f'{c} {s}' for s, c in captioned_shapes.HELD_OUT_COMBINATIONS[('shape', 'color')]]
  assert not any(h in p for p in prompts[2:] for h in held)   # seen: no held-out colour pair
  assert set(report['generated_unseen']) >= set(report['generated'])
  readings = open(os.path.join(untrained_run, 'sample', 'readings.tsv')).read().splitlines()
  assert readings[0] == 'image\tprompt\tclip_score\tcolor\tbackground\tshape\tshape_iou'
  assert len(readings) == 5


def _fake_finishing_training(monkeypatch):
  """Stages' training replaced by one that leaves what a finished run leaves (a checkpoint at
  the last step, an export, its evaluation); the CLIP's fingerprint stands for its learning
  rate. Returns the list of stages trained, in order."""
  from unclip_jax import train  # pylint: disable=g-import-not-at-top
  trained = []

  def fake(config, workdir):
    trained.append(config.stage)
    root = workdir_lib.path(workdir)
    step = root / 'checkpoints' / str(config.num_train_steps)
    step.mkdir(parents=True, exist_ok=True)
    (step / 'commit_success.txt').write_text('')   # what orbax writes last on Cloud Storage
    for name in ('eval_metrics.json', 'export/config.json'):
      workdir_lib.atomic_write_json(root / name, {'metric': 1.0})
    return {'metric': 1.0}

  def fingerprint(workdir):
    recorded = workdir_lib.read_json(workdir_lib.path(workdir) / 'clip' / train_all.INPUTS_NAME)
    return f'clip-lr-{recorded["config"]["optim.lr"]}'
  monkeypatch.setattr(train, 'train_and_evaluate', fake)
  monkeypatch.setattr(train_all, '_clip_fingerprint', fingerprint)
  return trained


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_job_retrains_stages_whose_inputs_changed(tmp_path, monkeypatch, caplog, request, where):
  """Each stage records its inputs. The CLIP retrained (its learning rate changed) makes the
  prior and decoder stale too (another CLIP fingerprint): the three are retrained, their old
  runs moved to stale/, the upsampler skipped. More steps resume a stage (not an input);
  'refuse' stops with one line naming the change; 'keep' uses the stale stage. The same in a
  job directory on Cloud Storage (a local emulator)."""
  trained = _fake_finishing_training(monkeypatch)
  config = unclip_configs.get_config('tiny')
  config.precompute_embeddings = config.overlap_upsampler = False
  if where == 'gs':   # nothing may reach the local disk (no 'gs:' folder in the working one)
    workdir = f'{request.getfixturevalue("gcs_bucket")}/job-{time.time_ns()}/run'
    monkeypatch.chdir(tmp_path)
  else:
    workdir = str(tmp_path / 'run')
  root = workdir_lib.path(workdir)
  stale = lambda: sorted(p.name for p in (root / 'stale').iterdir())
  train_all.train_stages(config, workdir)
  assert trained == list(train_all.STAGES)
  recorded = workdir_lib.read_json(root / 'prior' / train_all.INPUTS_NAME)
  assert recorded['clip_fingerprint'] == f'clip-lr-{config.clip.optim.lr}'
  assert recorded['config']['optim.lr'] == config.prior.optim.lr
  assert 'clip.workdir' not in recorded['config'] and 'eval.num_examples' not in recorded['config']

  del trained[:]
  train_all.train_stages(config, workdir)          # nothing changed: every stage skipped
  assert trained == []
  old_lr = config.clip.optim.lr
  config.clip.optim.lr = old_lr * 2
  train_all.train_stages(config, workdir)
  assert trained == ['clip', 'prior', 'decoder']
  assert stale() == ['clip', 'decoder', 'prior']
  assert (f'Stage prior was trained on other inputs (CLIP clip-lr-{old_lr} → clip-lr-'
          in caplog.text)
  assert f'optim.lr {old_lr!r} → {old_lr * 2!r}' in caplog.text

  del trained[:]
  config.upsampler.num_train_steps += 10            # more steps: resumed, not moved aside
  config.decoder.optim.lr *= 3
  config.stale_stages = 'refuse'
  with pytest.raises(train_all.StaleStageError,
                     match=r'stage decoder in .*/run/decoder was trained on other inputs than '
                           r"this job's \(optim.lr .* → .*\); set --config.stale_stages=retrain"):
    train_all.train_stages(config, workdir)
  assert trained == [] and stale() == ['clip', 'decoder', 'prior']
  config.stale_stages = 'keep'
  train_all.train_stages(config, workdir)
  assert trained == ['upsampler']
  assert 'Stage decoder in' in caplog.text and 'kept as it is' in caplog.text
  assert not (root / 'stale' / 'upsampler').exists()
  assert (root / 'stale' / 'prior' / 'export' / 'config.json').exists()
  assert os.listdir(tmp_path) == (['run'] if where == 'local' else [])


def test_sigterm_stops_the_job_after_the_stages_that_were_training_checkpointed(
    tmp_path, monkeypatch):
  """SIGTERM while the decoder trains, beside the upsampler's thread: the decoder's run and the
  upsampler's (which sees the same request) both end, the job returns no report and writes
  none, the later stages do not start, and the job's lock is released."""
  import signal  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  from unclip_jax import preemption  # pylint: disable=g-import-not-at-top
  from unclip_jax import train  # pylint: disable=g-import-not-at-top
  from unclip_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  finished, upsampler_running = [], threading.Event()

  def fake(config, workdir):
    del workdir
    if config.stage == 'upsampler':     # a run that stops at the next step once asked
      upsampler_running.set()
      while not preemption.received():
        threading.Event().wait(0.01)
    if config.stage == 'decoder':
      assert upsampler_running.wait(10)
      os.kill(os.getpid(), signal.SIGTERM)
      while not preemption.received():
        threading.Event().wait(0.01)
    finished.append(config.stage)
    return {} if preemption.received() else {'metric': 1.0}
  monkeypatch.setattr(train, 'train_and_evaluate', fake)
  monkeypatch.setattr(train_all, '_clip_fingerprint', lambda workdir: 'clip')
  config = unclip_configs.get_config('tiny')
  config.precompute_embeddings, config.overlap_upsampler = False, True
  workdir = str(tmp_path / 'run')
  previous = signal.getsignal(signal.SIGTERM)
  try:
    assert train_all.run(config, workdir) == {}
  finally:
    preemption.clear()
  assert sorted(finished) == ['clip', 'decoder', 'prior', 'upsampler']
  assert not os.path.exists(os.path.join(workdir, 'report.json'))
  assert not os.path.exists(os.path.join(workdir, 'sample'))
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_NAME))
  assert signal.getsignal(signal.SIGTERM) == previous
