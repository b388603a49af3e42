"""Tests for the procedural CaptionedShapes dataset and its tfds builder."""

import io

import numpy as np
import pytest
from PIL import Image

from unclip_jax.data import captioned_shapes as cs

RES = 32
SIZES = dict(num_train=200, num_test=50)


def _attrs(**names):
  return {k: cs.ATTRIBUTES[k].index(v) for k, v in names.items()}


def _records(builder, split):
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('captioned_shapes'))


@pytest.fixture(scope='module')
def builder(data_dir):
  return cs.prepare(data_dir, resolution=RES, seed=0, **SIZES)


# ----------------------------------------------------------------- render


def test_attribute_vocabularies():
  assert set(cs.ATTRIBUTES) == {'shape', 'color', 'background', 'size', 'position'}
  assert cs.ATTRIBUTES['background'] == tuple(cs.COLORS)
  assert len(cs.ATTRIBUTES['position']) == 9
  colors = np.array(list(cs.COLORS.values()), dtype=float)
  dist = np.linalg.norm(colors[:, None] - colors[None], axis=-1)
  assert dist[~np.eye(len(colors), dtype=bool)].min() > 100


def test_sample_attributes_background_differs():
  rng = np.random.default_rng(0)
  for _ in range(500):
    a = cs.sample_attributes(rng)
    assert a['background'] != a['color']
    for k, v in a.items():
      assert 0 <= v < len(cs.ATTRIBUTES[k])


@pytest.mark.parametrize('shape', cs.SHAPES)
@pytest.mark.parametrize('size', cs.SIZES)
def test_render_colours(shape, size):
  attrs = _attrs(shape=shape, color='red', background='blue', size=size,
                 position='center')
  img = cs.render(attrs, RES, np.random.default_rng(1))
  assert img.shape == (RES, RES, 3) and img.dtype == np.uint8
  tol = cs.COLOR_JITTER + 1
  bg, fg = np.array(cs.COLORS['blue']), np.array(cs.COLORS['red'])
  for corner in (img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]):
    np.testing.assert_allclose(corner, bg, atol=tol)
  np.testing.assert_allclose(img[RES // 2, RES // 2], fg, atol=tol)
  is_bg = np.abs(img.astype(int) - bg).max(-1) <= tol
  is_fg = np.abs(img.astype(int) - fg).max(-1) <= tol
  assert is_bg.mean() > 0.5 and is_fg.sum() >= 4


def test_render_distinct_shapes_sizes_positions():
  def area(**kw):
    img = cs.render(_attrs(**kw), RES, np.random.default_rng(0))
    return (np.abs(img.astype(int) - cs.COLORS['white']).max(-1) < 60).mean()

  base = dict(color='white', background='black', position='center')
  areas = [area(shape=s, size='large', **base) for s in cs.SHAPES]
  # Fill ratios: star < triangle < cross < circle < square.
  assert np.argsort(areas).tolist() == [cs.SHAPES.index(s) for s in
                                        ('star', 'triangle', 'cross', 'circle', 'square')]
  sizes = [area(shape='square', size=z, **base) for z in cs.SIZES]
  assert sizes == sorted(sizes)
  imgs = [cs.render(_attrs(shape='circle', color='red', background='blue',
                           size='small', position=p), RES, np.random.default_rng(0))
          for p in cs.POSITIONS]
  for i in range(len(imgs)):
    for j in range(i):
      assert not np.array_equal(imgs[i], imgs[j])


def test_render_deterministic_and_jittered():
  attrs = _attrs(shape='star', color='yellow', background='purple',
                 size='medium', position='top left')
  a = cs.render(attrs, RES, np.random.default_rng(5))
  b = cs.render(attrs, RES, np.random.default_rng(5))
  c = cs.render(attrs, RES, np.random.default_rng(6))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_render_same_scene_across_resolutions():
  attrs = _attrs(shape='triangle', color='green', background='white',
                 size='large', position='bottom right')
  big = cs.render(attrs, 64, np.random.default_rng(3))
  small = cs.render(attrs, 32, np.random.default_rng(3))
  down = big.astype(float).reshape(32, 2, 32, 2, 3).mean((1, 3))
  assert np.abs(down - small).mean() < 2.0


# ---------------------------------------------------------------- captions


def test_captions_name_attributes_and_vary():
  rng = np.random.default_rng(0)
  captions = set()
  for _ in range(500):
    a = cs.sample_attributes(rng)
    text = cs.caption(a, rng)
    captions.add(text)
    words = cs.caption_words(text)
    for key in ('shape', 'color', 'background'):
      assert cs.ATTRIBUTES[key][a[key]] in words, (key, text)
    assert text == text.lower()
    assert ' a o' not in text and not text.startswith('a o')  # 'an orange'
  assert len(captions) > 300


def test_caption_vocabulary_covers_captions():
  vocab = cs.caption_vocabulary()
  assert vocab == sorted(set(vocab))
  rng = np.random.default_rng(1)
  seen = set()
  for _ in range(3000):
    seen.update(cs.caption_words(cs.caption(cs.sample_attributes(rng), rng)))
  assert seen <= set(vocab)
  assert {'top', 'left', 'small', 'large', 'corner'} <= seen


# ----------------------------------------------------------------- builder


def test_builder_splits_and_files(builder):
  assert builder.builder_config.name == f'r{RES}_n200_t50_s0_h'
  assert builder.info.splits['train'].num_examples == 200
  assert builder.info.splits['test'].num_examples == 50
  files = list(builder.data_path.glob('*.array_record-*'))
  assert {f.name.split('.')[0].split('-')[-1] for f in files} == {'train', 'test'}
  for name in cs.ATTRIBUTES:
    assert builder.info.features[name].names == list(cs.ATTRIBUTES[name])


def test_builder_records_match_generator(builder):
  records = _records(builder, 'test')
  assert [r['id'] for r in records] == list(range(50))
  for r in records[:10]:
    ex = cs.generate_example(0, 'test', r['id'], RES)
    img = np.asarray(Image.open(io.BytesIO(r['image'])))
    np.testing.assert_array_equal(img, ex['image'])
    assert r['caption'].decode() == ex['caption']
    for k in cs.ATTRIBUTES:
      assert r[k] == ex[k]


def test_builder_deterministic_and_seeded(builder, tmp_path):
  again = cs.prepare(str(tmp_path / 'a'), resolution=RES, seed=0, **SIZES)
  other = cs.prepare(str(tmp_path / 'b'), resolution=RES, seed=1, **SIZES)
  for split in ('train', 'test'):
    assert _records(builder, split) == _records(again, split)
    ours = {r['image'] for r in _records(builder, split)}
    assert not ours & {r['image'] for r in _records(other, split)}


def test_train_test_disjoint(builder):
  train = {r['image'] for r in _records(builder, 'train')}
  test = {r['image'] for r in _records(builder, 'test')}
  assert len(train) == 200 and len(test) == 50 and not train & test


def test_prepare_reuses_and_default_dir(builder, data_dir, monkeypatch):
  monkeypatch.setenv('UNCLIP_DATA_DIR', data_dir)
  assert cs.default_data_dir() == data_dir
  again = cs.prepare(None, resolution=RES, seed=0, **SIZES)
  assert again.data_path == builder.data_path
  monkeypatch.delenv('UNCLIP_DATA_DIR')
  assert cs.default_data_dir().endswith('.cache/unclip_jax/datasets')


# ----------------------------------------------------- held-out combinations


def test_held_out_combinations_are_valid_and_spread():
  """Each held-out pair names real values; no shape, colour or position is held out twice
  within one attribute pair, so every value stays seen with the other shapes."""
  for (a, b), pairs in cs.HELD_OUT_COMBINATIONS.items():
    assert all(x in cs.ATTRIBUTES[a] and y in cs.ATTRIBUTES[b] for x, y in pairs)
    assert len({x for x, _ in pairs}) == len({y for _, y in pairs}) == len(pairs) == 5


def test_train_split_never_shows_a_held_out_combination_and_the_test_split_does(builder):
  """Provably disjoint: every training record (its labels, from which its image and caption
  are drawn) and 20,000 more training draws have none; the held-out split has them at the
  rate of a uniform draw (1 - 35/40 * 40/45 = 0.22), and its captions ask for some."""
  for record in _records(builder, 'train'):
    assert not cs.unseen_combinations(record), record
  rng = np.random.default_rng(1)
  assert not any(cs.unseen_combinations(cs.sample_attributes(rng, exclude_held_out=True))
                 for _ in range(20000))
  draws = [cs.sample_attributes(rng) for _ in range(20000)]
  assert abs(np.mean([bool(cs.unseen_combinations(a)) for a in draws]) - 2 / 9) < 0.015
  test = _records(builder, 'test')
  unseen = [r for r in test if cs.unseen_combinations(r)]
  assert 3 <= len(unseen) <= 25
  assert any(cs.asks_for_unseen(r['caption'].decode(), r) for r in unseen)
  # No training caption names a held-out shape in its held-out colour.
  held = [f'{color} {shape}' for shape, color in cs.HELD_OUT_COMBINATIONS[('shape', 'color')]]
  assert not any(h in r['caption'].decode() for r in _records(builder, 'train') for h in held)
  assert any(h in r['caption'].decode() for r in test for h in held)


def test_asks_for_unseen_reads_the_caption():
  red_circle = _attrs(shape='circle', color='red', background='blue', size='small',
                      position='bottom')
  assert cs.unseen_combinations(red_circle) == [('shape', 'color')]
  assert cs.asks_for_unseen('a small red circle on a blue background', red_circle)
  corner = _attrs(shape='star', color='red', background='blue', size='small',
                  position='bottom right')
  assert cs.unseen_combinations(corner) == [('shape', 'position')]
  assert cs.asks_for_unseen('a red star at the bottom right', corner)
  assert not cs.asks_for_unseen('a red star on blue', corner)    # position not asked for
  seen = _attrs(shape='star', color='red', background='blue', size='small', position='top')
  assert not cs.unseen_combinations(seen) and not cs.asks_for_unseen('a red star', seen)


def test_holding_out_is_a_setting_with_its_own_dataset_name(tmp_path):
  plain = cs.prepare(str(tmp_path), resolution=16, seed=0, num_train=300, num_test=8,
                     held_out_combinations=False)
  assert plain.builder_config.name == 'r16_n300_t8_s0'
  assert any(cs.unseen_combinations(r) for r in _records(plain, 'train'))


def test_a_counterfactual_changes_position_or_size_and_its_caption_names_the_change():
  from unclip_jax.data import shape_checker
  rng = np.random.default_rng(0)
  changed = []
  for _ in range(300):
    a = cs.sample_attributes(rng, exclude_held_out=True)
    b, image, text = cs.counterfactual(a, 64, rng, exclude_held_out=True)
    diff = [k for k in cs.ATTRIBUTES if a[k] != b[k]]
    assert diff in (['size'], ['position']), (a, b)
    changed.append(diff[0])
    assert cs.mentions(text, diff[0], b[diff[0]]), text
    for key in ('shape', 'color', 'background'):
      assert cs.ATTRIBUTES[key][b[key]] in cs.caption_words(text), (key, text)
    assert not cs.unseen_combinations(b), b
    # The image is the counterfactual scene: the pixel checker reads its attributes.
    reading = shape_checker.analyze(image)
    assert {k: reading[k] for k in cs.ATTRIBUTES} == {
        k: cs.ATTRIBUTES[k][v] for k, v in b.items()}, (b, reading)
  # Position two times in three.
  assert 0.58 < changed.count('position') / len(changed) < 0.75
  # Without the rule, held-out combinations can be drawn (five positions, one per shape).
  held = sum(bool(cs.unseen_combinations(cs.counterfactual(
      cs.sample_attributes(rng, exclude_held_out=True), 32, rng)[0])) for _ in range(400))
  assert held > 0
