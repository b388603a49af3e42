"""Test helpers without side effects (importable from subprocesses)."""


def tiny_clip_config(data_dir: str, **overrides):
  """configs/clip.py:tiny shrunk further for unit tests (16px, 1-2 layers, 256 examples)."""
  from configs import clip  # pylint: disable=g-import-not-at-top
  c = clip.get_config('tiny')
  c.data.data_dir = data_dir
  c.data.resolution = 16
  c.data.num_train = 256
  c.data.num_test = 64
  c.model.embed_dim = 32
  c.model.text.update(width=32, depth=1, num_heads=2)
  c.model.vision.update(width=32, depth=2, num_heads=2)
  c.batch_size = 16
  c.num_train_steps = 8
  c.optim.warmup_steps = 2
  c.log_every_steps = 4
  c.checkpoint.every_steps = 4
  c.checkpoint.async_save = False
  c.eval.num_examples = 64
  c.eval.batch_size = 64
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c
