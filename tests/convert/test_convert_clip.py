"""Converting Hugging Face / open_clip / OpenAI CLIPs: parity with the PyTorch reference.

Reference models are built from small random configs (nothing is downloaded), saved the way
their libraries save them, converted from the files and compared on random padded tokens and
random images: relative error max|ours - ref| / max|ref| <= 1e-4 in float32.
"""

import json
import os
import shutil

import numpy as np
import pytest

from unclip_jax.convert import __main__ as convert_cli
from unclip_jax.convert import clip as convert
from unclip_jax.convert import torch_io
from tests import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.helpers import import_open_clip, tiny_clip_vocab
from unclip_jax.models.clip import CLIP
from unclip_jax.stages import clip as clip_stage

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOL = 1e-4
CONTEXT = 16
VOCAB, MERGES = tiny_clip_vocab()
SOT, EOT = VOCAB['<|startoftext|>'], VOCAB['<|endoftext|>']
TEXT = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=CONTEXT, bos_token_id=SOT,
            eos_token_id=EOT, pad_token_id=EOT)
VISION = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
PROJ = 24


def _perturb(model, seed):
  return helpers.perturb_torch(model, seed, 0.1)


def _clip_model(act='quick_gelu', seed=0, **text):
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(text_config=dict(TEXT, hidden_act=act, **text),
                                   vision_config=dict(VISION, hidden_act=act),
                                   projection_dim=PROJ)
  return _perturb(transformers.CLIPModel(config), seed)


def _hf_tokenizer(**kwargs):
  return transformers.CLIPTokenizer(vocab=dict(VOCAB), merges=list(MERGES), **kwargs)


def _save(model, folder, tokenizer=True):
  model.save_pretrained(folder)
  if tokenizer:
    _hf_tokenizer().save_pretrained(folder)
  return str(folder)


@pytest.fixture(scope='module')
def hf_clip(tmp_path_factory):
  """{activation: (CLIPModel, its saved folder with a tokenizer)}."""
  out = {}
  for i, act in enumerate(('quick_gelu', 'gelu')):
    model = _clip_model(act, seed=i)
    out[act] = model, _save(model, tmp_path_factory.mktemp(f'hf_clip_{act}'))
  return out


@pytest.fixture(scope='module')
def inputs():
  """Padded tokens [4, 16] (one row filling the context), images in [-1, 1] [2, 32, 32, 3]."""
  rng = np.random.default_rng(0)
  tokens = np.zeros((4, CONTEXT), np.int32)
  for row, n in zip(tokens, (3, 7, 0, CONTEXT - 2)):
    row[0], row[n + 1] = SOT, EOT
    row[1:n + 1] = rng.integers(1, SOT, n)
  images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  return tokens, images


def _pixels(images, mean=convert.OPENAI_PIXEL_MEAN, std=convert.OPENAI_PIXEL_STD):
  """Our [-1, 1] NHWC images → the normalised NCHW pixel_values HF expects."""
  x = ((images + 1) / 2 - np.asarray(mean)) / np.asarray(std)
  return torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))


def _rel(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


@torch.no_grad()
def _hf_text(model, tokens):
  """(unnormalised text embeds, last_hidden_state) of a CLIPModel or CLIPTextModelWithProjection."""
  ids = torch.from_numpy(tokens.astype(np.int64))
  if isinstance(model, transformers.CLIPModel):
    out = model.text_model(input_ids=ids)
    return model.text_projection(out.pooler_output).numpy(), out.last_hidden_state.numpy()
  out = model(input_ids=ids)
  return out.text_embeds.numpy(), out.last_hidden_state.numpy()


@torch.no_grad()
def _hf_image(model, pixels):
  if isinstance(model, transformers.CLIPModel):
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).numpy()
  return model(pixel_values=pixels).image_embeds.numpy()


def _ours(config, params, tokens=None, images=None):
  """Unnormalised (text embeds, hidden states) and image embeds of a converted CLIP."""
  model = clip_stage.build_model(config)
  out = {}
  if tokens is not None:
    out['text'] = model.apply({'params': params}, tokens, normalize=False,
                              method=CLIP.encode_text)
  if images is not None:
    out['image'] = model.apply({'params': params}, images, normalize=False,
                               method=CLIP.encode_image)
  return out


@pytest.mark.parametrize('act', ['quick_gelu', 'gelu'])
def test_hf_clip_model_parity(hf_clip, inputs, act):
  model, folder = hf_clip[act]
  tokens, images = inputs
  config, params = convert.convert_hf_clip(folder)
  m = config.model
  assert (m.text.activation, m.vision.activation) == (act, act)
  assert (m.text.width, m.text.depth, m.text.num_heads, m.text.vocab_size) == (32, 2, 4, len(VOCAB))
  assert (m.text.context_length, m.text.eot_id, m.text.pool, m.embed_dim) == (16, EOT, 'eot', 24)
  assert (m.vision.image_size, m.vision.patch_size, m.vision.mlp_ratio) == (32, 8, 2.5)
  assert config.tokenizer.context_length == CONTEXT and config.dtype == 'float32'
  assert all(v.dtype == np.float32 for v in _leaves(params))
  ours = _ours(config, params, tokens, images)
  ref_emb, ref_hidden = _hf_text(model, tokens)
  assert _rel(ours['text'][0], ref_emb) <= TOL
  assert _rel(ours['text'][1], ref_hidden) <= TOL
  assert _rel(ours['image'], _hf_image(model, _pixels(images))) <= TOL
  assert float(params['logit_scale']) == pytest.approx(float(model.logit_scale.detach()))


def _leaves(tree):
  if isinstance(tree, dict):
    return [leaf for v in tree.values() for leaf in _leaves(v)]
  return [tree]


def test_pytorch_model_bin(hf_clip, tmp_path, inputs):
  model, folder = hf_clip['quick_gelu']
  shutil.copy(os.path.join(folder, 'config.json'), tmp_path)
  torch.save(model.state_dict(), tmp_path / 'pytorch_model.bin')
  config, params = convert.convert_hf_clip(str(tmp_path))
  _, expected = convert.convert_hf_clip(folder)
  assert config.model.to_dict() == convert.convert_hf_clip(folder)[0].model.to_dict()
  for a, b in zip(_leaves(params), _leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_text_and_vision_folders_combined(tmp_path, inputs):
  tokens, images = inputs
  torch.manual_seed(3)
  text_model = _perturb(transformers.CLIPTextModelWithProjection(
      transformers.CLIPTextConfig(**TEXT, projection_dim=PROJ)), 3)
  vision_model = _perturb(transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**VISION, projection_dim=PROJ)), 4)
  text_dir = _save(text_model, tmp_path / 'text')
  vision_dir = _save(vision_model, tmp_path / 'vision', tokenizer=False)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  with open(os.path.join(vision_dir, 'preprocessor_config.json'), 'w') as f:
    json.dump({'image_mean': mean, 'image_std': std}, f)
  config, params = convert.convert_hf_clip(text=text_dir, vision=vision_dir)
  assert tuple(config.model.vision.pixel_mean) == mean
  ours = _ours(config, params, tokens, images)
  ref_emb, ref_hidden = _hf_text(text_model, tokens)
  assert _rel(ours['text'][0], ref_emb) <= TOL
  assert _rel(ours['text'][1], ref_hidden) <= TOL
  assert _rel(ours['image'], _hf_image(vision_model, _pixels(images, mean, std))) <= TOL
  assert float(params['logit_scale']) == pytest.approx(np.log(1 / 0.07))


def test_legacy_eos_token_id_pools_at_the_largest_id(tmp_path, inputs):
  """Configs with eos_token_id=2 (before transformers fixed it) pool at argmax(ids)."""
  model = _clip_model(seed=5, eos_token_id=2)
  config, params = convert.convert_hf_clip(_save(model, tmp_path, tokenizer=False))
  assert (config.model.text.pool, config.model.text.eot_id) == ('argmax', EOT)
  tokens = inputs[0].copy()
  tokens[2, 1:] = np.arange(1, CONTEXT) * 20  # no end token: the largest id is not the last
  ours = _ours(config, params, tokens)
  assert _rel(ours['text'][0], _hf_text(model, tokens)[0]) <= TOL


def test_export_moves_with_its_tokenizer(hf_clip, tmp_path, inputs):
  """The export is self-contained (tokenizer path relative) and FrozenClip matches HF: text
  features = (text_embeds / |text_embeds|, last_hidden_state); images in [-1, 1]."""
  model, folder = hf_clip['quick_gelu']
  tokens, images = inputs
  assert convert_cli.main(['hf-clip', folder, str(tmp_path / 'a')]) == 0   # the command line
  with open(tmp_path / 'a' / 'config.json') as f:
    saved = json.load(f)['tokenizer']
  assert (saved['kind'], saved['path']) == ('clip_bpe', 'tokenizer')
  assert sorted(os.listdir(tmp_path / 'a' / 'tokenizer')) == ['tokenizer.json',
                                                               'tokenizer_config.json']
  shutil.move(str(tmp_path / 'a'), str(tmp_path / 'b'))
  frozen = clip_stage.load_frozen(str(tmp_path / 'b'))

  text_emb, hidden = frozen.encode_text(tokens)
  ref_emb, ref_hidden = _hf_text(model, tokens)
  assert _rel(text_emb, ref_emb / np.linalg.norm(ref_emb, axis=-1, keepdims=True)) <= TOL
  assert _rel(hidden, ref_hidden) <= TOL
  assert _rel(frozen.encode_text(tokens, normalize=False)[0], ref_emb) <= TOL  # karlo's
  ref_img = _hf_image(model, _pixels(images))
  image_emb = frozen.encode_image(images)
  assert _rel(image_emb, ref_img / np.linalg.norm(ref_img, axis=-1, keepdims=True)) <= TOL
  assert _rel(frozen.encode_image(images, normalize=False), ref_img) <= TOL

  texts = ['a photo of the cat', 'A Photo, of THE Dog!!', '', "it's   a  dog's photo...",
           'the cat ' * 20]
  ours = frozen.tokenizer(texts)
  hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
  ref = np.asarray(hf_tok(texts, padding='max_length', truncation=True,
                          max_length=CONTEXT).input_ids)
  assert ours.shape == ref.shape == (5, CONTEXT)
  for row, ref_row in zip(ours, ref):  # identical through the end token...
    end = list(row).index(EOT)
    np.testing.assert_array_equal(row[:end + 1], ref_row[:end + 1])
    assert (row[end + 1:] == 0).all() and (ref_row[end + 1:] == EOT).all()  # ...then pads differ
  assert ours[4, -1] == EOT and (ours[4, 1:-1] != 0).all()  # truncated, end token kept
  assert ours[2, :2].tolist() == [SOT, EOT]


def test_token_mask_marks_the_caption(hf_clip, inputs):
  frozen = clip_stage.FrozenClip(clip_stage.Stage(convert.convert_hf_clip(
      hf_clip['gelu'][1])[0]), None)
  tokens = inputs[0]
  end = np.argmax(tokens == EOT, axis=1)
  expected = np.arange(CONTEXT)[None] <= end[:, None]
  np.testing.assert_array_equal(frozen.token_mask(tokens), expected)


def test_one_tower_clips(hf_clip, tmp_path, inputs):
  """A CLIPTextModelWithProjection alone (karlo's text encoder) loads and encodes text; the
  missing image tower is a clear error (and the other way round)."""
  model, folder = hf_clip['quick_gelu']
  tokens, images = inputs
  text_model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      **TEXT, hidden_act='quick_gelu', projection_dim=PROJ))
  text_model.text_model.load_state_dict(model.text_model.state_dict())
  text_model.text_projection.load_state_dict(model.text_projection.state_dict())
  text_dir = _save(text_model, tmp_path / 'text')
  config, params = convert.convert_hf_clip(text=text_dir)
  assert config.model.vision is None and set(params) == {'text_tower', 'logit_scale'}
  convert.save_converted_clip(str(tmp_path / 'export'), config, params, text_dir)
  frozen = clip_stage.load_frozen(str(tmp_path / 'export'))
  _, hidden = frozen.encode_text(tokens)
  assert _rel(hidden, _hf_text(model, tokens)[1]) <= TOL
  assert frozen.tokenizer('a cat').shape == (1, CONTEXT)
  with pytest.raises(ValueError, match='no image tower; convert one with --vision'):
    frozen.encode_image(images)

  config, params = convert.convert_hf_clip(vision=folder)  # the image tower of a CLIPModel
  assert config.model.text is None and set(params) == {'vision_tower', 'logit_scale'}
  assert _rel(_ours(config, params, images=images)['image'],
              _hf_image(model, _pixels(images))) <= TOL
  with pytest.raises(ValueError, match='no text tower; convert one with --text'):
    _ours(config, params, tokens=tokens)


def _write_state(folder, model, edit):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(folder)
  model.config.to_json_file(os.path.join(folder, 'config.json'))
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  edit(state)
  save_file(state, os.path.join(folder, 'model.safetensors'))
  return str(folder)


def test_errors(hf_clip, tmp_path):
  model, _ = hf_clip['quick_gelu']
  with pytest.raises(torch_io.ConversionError, match='is not a folder'):
    convert.convert_hf_clip(str(tmp_path / 'missing'))
  os.makedirs(tmp_path / 'no_weights')
  model.config.to_json_file(str(tmp_path / 'no_weights' / 'config.json'))
  with pytest.raises(torch_io.ConversionError, match='no weights in'):
    convert.convert_hf_clip(str(tmp_path / 'no_weights'))

  name = 'text_model.encoder.layers.1.mlp.fc1.weight'
  def shrink(state):
    state[name] = state[name][:60]
  wrong = _write_state(tmp_path / 'wrong', model, shrink)
  with pytest.raises(torch_io.ConversionError,
                     match=rf"{name}' has shape \(60, 32\), expected \(64, 32\)"):
    convert.convert_hf_clip(wrong)

  def add(state):
    state['text_model.encoder.layers.0.adapter.weight'] = torch.zeros(2)
  extra = _write_state(tmp_path / 'extra', model, add)
  with pytest.raises(torch_io.ConversionError, match='adapter.weight'):
    convert.convert_hf_clip(extra)

  def drop(state):
    del state['vision_model.post_layernorm.bias']
  missing = _write_state(tmp_path / 'drop', model, drop)
  with pytest.raises(torch_io.ConversionError, match='post_layernorm.bias'):
    convert.convert_hf_clip(missing)

  config, params = convert.convert_hf_clip(hf_clip['gelu'][1])
  with pytest.raises(torch_io.ConversionError, match='tokenizer source .* does not exist'):
    convert.save_converted_clip(str(tmp_path / 'x'), config, params, str(tmp_path / 'nowhere'))


# --- open_clip / OpenAI layout ---------------------------------------------------------------

def _openai_state(model):
  """A HF CLIPModel's weights in OpenAI's / open_clip's state-dict layout."""
  s = {k: v.detach().clone() for k, v in model.state_dict().items()}
  out = {'token_embedding.weight': s['text_model.embeddings.token_embedding.weight'],
         'positional_embedding': s['text_model.embeddings.position_embedding.weight'],
         'ln_final.weight': s['text_model.final_layer_norm.weight'],
         'ln_final.bias': s['text_model.final_layer_norm.bias'],
         'text_projection': s['text_projection.weight'].T.contiguous(),
         'logit_scale': s['logit_scale'],
         'visual.conv1.weight': s['vision_model.embeddings.patch_embedding.weight'],
         'visual.class_embedding': s['vision_model.embeddings.class_embedding'],
         'visual.positional_embedding': s['vision_model.embeddings.position_embedding.weight'],
         'visual.proj': s['visual_projection.weight'].T.contiguous()}
  for ours, hf in (('visual.ln_pre', 'vision_model.pre_layrnorm'),
                   ('visual.ln_post', 'vision_model.post_layernorm')):
    out[ours + '.weight'], out[ours + '.bias'] = s[hf + '.weight'], s[hf + '.bias']
  c = model.config
  for ours, hf, depth in (
      ('transformer.resblocks', 'text_model.encoder.layers', c.text_config.num_hidden_layers),
      ('visual.transformer.resblocks', 'vision_model.encoder.layers',
       c.vision_config.num_hidden_layers)):
    for i in range(depth):
      a, b = f'{ours}.{i}.', f'{hf}.{i}.'
      for part in ('weight', 'bias'):
        out[a + f'attn.in_proj_{part}'] = torch.cat(
            [s[b + f'self_attn.{n}_proj.{part}'] for n in 'qkv'])
        out[a + f'attn.out_proj.{part}'] = s[b + f'self_attn.out_proj.{part}']
        out[a + f'ln_1.{part}'], out[a + f'ln_2.{part}'] = (s[b + f'layer_norm1.{part}'],
                                                            s[b + f'layer_norm2.{part}'])
        out[a + f'mlp.c_fc.{part}'] = s[b + f'mlp.fc1.{part}']
        out[a + f'mlp.c_proj.{part}'] = s[b + f'mlp.fc2.{part}']
  return out


def _check_open_clip_parity(config, params, model, inputs):
  tokens, images = inputs
  ours = _ours(config, params, tokens, images)
  ref_emb, ref_hidden = _hf_text(model, tokens)
  assert _rel(ours['text'][0], ref_emb) <= TOL
  assert _rel(ours['text'][1], ref_hidden) <= TOL
  assert _rel(ours['image'], _hf_image(model, _pixels(images))) <= TOL


def test_openai_layout_inferred_from_shapes(tmp_path, inputs):
  """OpenAI's build_model rules: heads = width // 64, QuickGELU, pooling at the largest id."""
  torch.manual_seed(6)
  config = transformers.CLIPConfig(
      text_config=dict(TEXT, hidden_size=64, intermediate_size=256, num_attention_heads=1),
      vision_config=dict(VISION, hidden_size=64, intermediate_size=256, num_attention_heads=1),
      projection_dim=PROJ)
  model = _perturb(transformers.CLIPModel(config), 6)
  path = str(tmp_path / 'ViT-tiny.pt')
  torch.save(_openai_state(model), path)
  config, params = convert.convert_open_clip(path)
  t, v = config.model.text, config.model.vision
  assert (t.num_heads, t.pool, t.eot_id, t.activation, t.mlp_ratio) == (
      1, 'argmax', EOT, 'quick_gelu', 4.0)
  assert (v.num_heads, v.image_size, v.patch_size, v.depth) == (1, 32, 8, 2)
  assert tuple(v.pixel_mean) == convert.OPENAI_PIXEL_MEAN
  _check_open_clip_parity(config, params, model, inputs)


def _open_clip_config(act):
  return {'embed_dim': PROJ, 'quick_gelu': act == 'quick_gelu',
          'vision_cfg': {'image_size': 32, 'patch_size': 8, 'width': 32, 'layers': 2,
                         'head_width': 8, 'mlp_ratio': 2.5},
          'text_cfg': {'context_length': CONTEXT, 'vocab_size': len(VOCAB), 'width': 32,
                       'heads': 4, 'layers': 2, 'mlp_ratio': 2.0}}


@pytest.mark.parametrize('act', ['quick_gelu', 'gelu'])
def test_open_clip_layout_with_model_config(hf_clip, tmp_path, inputs, act):
  model, _ = hf_clip[act]
  path = str(tmp_path / 'open_clip_pytorch_model.bin')
  torch.save({'state_dict': _openai_state(model)}, path)
  cfg = _open_clip_config(act)
  config_path = tmp_path / 'model.json'
  config_path.write_text(json.dumps(cfg))
  config, params = convert.convert_open_clip(str(tmp_path), str(config_path))
  assert config.model.text.activation == act and config.model.text.num_heads == 4
  _check_open_clip_parity(config, params, model, inputs)
  if act == 'gelu':   # the command line writes the same export
    dst = str(tmp_path / 'export')
    assert convert_cli.main(['open-clip', path, dst, '--model-config', str(config_path),
                             '--tokenizer', hf_clip[act][1]]) == 0
    frozen = clip_stage.load_frozen(dst)
    _check_open_clip_parity(frozen.config, frozen.params, model, inputs)
  with pytest.raises(torch_io.ConversionError, match='ls_init_value'):
    convert.convert_open_clip(path, dict(cfg, text_cfg=dict(cfg['text_cfg'], ls_init_value=0.1)))


def test_open_clip_model(tmp_path, inputs):
  """A real open_clip CLIP built from a config dict, converted with its model config and with the
  sizes inferred from its state dict."""
  try:
    open_clip = import_open_clip()
  except ImportError:
    pytest.skip('open_clip is not installed')
  tokens, images = inputs
  cfg = {'embed_dim': PROJ, 'quick_gelu': True,  # widths of 64: OpenAI's rule gives 1 head
         'vision_cfg': {'image_size': 32, 'patch_size': 8, 'width': 64, 'layers': 1},
         'text_cfg': {'context_length': CONTEXT, 'vocab_size': len(VOCAB), 'width': 64,
                      'heads': 1, 'layers': 1}}
  torch.manual_seed(7)
  model = _perturb(open_clip.CLIP(**cfg), 7)
  path = str(tmp_path / 'open_clip.pt')
  torch.save(model.state_dict(), path)
  with torch.no_grad():
    ref_text = model.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy()
    ref_image = model.encode_image(_pixels(images)).numpy()
  for model_config in (cfg, None):
    config, params = convert.convert_open_clip(path, model_config)
    ours = _ours(config, params, tokens, images)
    assert _rel(ours['text'][0], ref_text) <= TOL
    assert _rel(ours['image'], ref_image) <= TOL


@pytest.mark.filterwarnings('ignore::DeprecationWarning', 'ignore::UserWarning')
def test_torchscript_archives_load(tmp_path):
  """OpenAI's original .pt files are TorchScript archives: load_state_dict falls back to jit."""
  module = torch.jit.script(torch.nn.Linear(3, 2))
  path = str(tmp_path / 'scripted.pt')
  module.save(path)
  state = torch_io.load_state_dict(path)
  assert state['weight'].shape == (2, 3) and state['weight'].dtype == np.float32


def test_mlp_ratio_is_exact():
  for hidden, width in ((8192, 1664), (3072, 768), (4096, 1024), (6144, 1280), (80, 32)):
    assert int(width * convert.mlp_ratio(hidden, width)) == hidden
