"""The tfds builder of CaptionedShapes (`captioned_shapes`): array_record files of the generated
examples. The only part of the dataset that needs tensorflow-datasets."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from unclip_jax.data import captioned_shapes as shapes
from unclip_jax.data.captioned_shapes import ATTRIBUTES, encode_png, generate_example


class CaptionedShapesConfig(tfds.core.BuilderConfig):
  """Config: image resolution, split sizes, generation seed and whether the train split holds
  out ``HELD_OUT_COMBINATIONS`` (the name then ends in ``_h``)."""

  def __init__(self, *, resolution: int = 32, num_train: int = 20000,
               num_test: int = 1000, seed: int = 0, held_out_combinations: bool = True,
               **kwargs):
    name = (f'r{resolution}_n{num_train}_t{num_test}_s{seed}' +
            ('_h' if held_out_combinations else ''))
    super().__init__(name=name, **kwargs)
    self.resolution = resolution
    self.num_train = num_train
    self.num_test = num_test
    self.seed = seed
    self.held_out_combinations = held_out_combinations


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
  """tfds builder of the procedural CaptionedShapes dataset.

  Features: 'image' (PNG bytes, decoded by the input pipeline), 'caption'
  (text), 'shape'/'color'/'background'/'size'/'position' (ClassLabel) and
  'id' (int64 index within the split; record i has id i).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [CaptionedShapesConfig()]
  # Nothing is downloaded, so there is no checksums file to locate next to the
  # code (tfds' lookup would also need the `importlib_resources` package).
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        'image': tfds.features.Tensor(shape=(), dtype=np.object_),
        'caption': tfds.features.Text(),
        'id': tfds.features.Scalar(dtype=np.int64),
    }
    for name, names in ATTRIBUTES.items():
      features[name] = tfds.features.ClassLabel(names=list(names))
    # Records are stored in id order (record i has id i); readers shuffle.
    return self.dataset_info_from_configs(
        description=shapes.__doc__, features=tfds.features.FeaturesDict(features),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {'train': self._generate_examples('train', self.builder_config.num_train),
            'test': self._generate_examples('test', self.builder_config.num_test)}

  def _generate_examples(self, split: str, num: int):
    config = self.builder_config
    for index in range(num):
      ex = generate_example(config.seed, split, index, config.resolution,
                            config.held_out_combinations)
      ex['image'] = encode_png(ex['image'])
      yield index, ex


def prepare(data_dir: str | None = None, resolution: int = 32,
            num_train: int = 20000, num_test: int = 1000,
            seed: int = 0, held_out_combinations: bool = True) -> CaptionedShapes:
  """Returns the builder for this config, generating the data if missing.

  Args:
    data_dir: tfds data directory; None -> ``default_data_dir()``.
    resolution, num_train, num_test, seed, held_out_combinations: the dataset
      config.
  Returns:
    a prepared ``CaptionedShapes`` builder (array_record files on disk).
  """
  config = CaptionedShapesConfig(resolution=resolution, num_train=num_train,
                                 num_test=num_test, seed=seed,
                                 held_out_combinations=held_out_combinations)
  # Use the registered instance for the default config (tfds rejects a new
  # object with the same name).
  config = CaptionedShapes.builder_configs.get(config.name, config)

  def make_builder():
    return CaptionedShapes(config=config, data_dir=data_dir or shapes.default_data_dir(),
                           file_format='array_record')

  builder = make_builder()
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
    except OSError:
      # Another process (e.g. another host of the same job) finished writing
      # the same config first and our final rename failed: use its files.
      builder = make_builder()
      if not builder.is_prepared():
        raise
  return builder
