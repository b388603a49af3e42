"""The CLIP stage: contrastive training of the text and image towers, zero-shot evaluation,
and the frozen export that the prior and decoder stages load.

The contrastive loss is computed over the global batch: inside the jitted step the embeddings are
global arrays, so every example is contrasted with every other example on every device.
"""

import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unclip_jax import workdir as workdir_lib
from unclip_jax.data import sources
from unclip_jax.data import tokenizers
from unclip_jax.stages import export
from unclip_jax.models.clip import CLIP, MISSING_TOWER

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# Zero-shot prompts for the built-in data: the attribute's value in a full caption, averaged over
# every combination of the other attributes (prompt ensembling, as in CLIP).
# Size and position appear in the prompts of their own attribute only (the position as the
# captions' first phrase for it: 'in the top left', 'at the top', 'on the left', 'in the center').
ZERO_SHOT_TEMPLATE = 'a {size}{color} {shape}{position} on a {background} background'
ZERO_SHOT_ATTRIBUTES = ('shape', 'color', 'background', 'size', 'position')


def zero_shot_prompts(attribute: str, value: str) -> list[str]:
  """Every caption of the template in which `attribute` is `value`."""
  from unclip_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
  names = captioned_shapes.ATTRIBUTES
  prompts = []
  for shape in names['shape']:
    for color in names['color']:
      for background in names['background']:
        fields = dict(shape=shape, color=color, background=background)
        fields[attribute] = value
        if fields['color'] != fields['background']:
          prompts.append(full_prompt(fields))
  return sorted(set(prompts))


def full_prompt(fields: dict[str, str]) -> str:
  """The zero-shot template for `fields` (attribute → value name); size and position are
  optional, the others required."""
  from unclip_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
  size, position = fields.get('size'), fields.get('position')
  return captioned_shapes.fix_articles(ZERO_SHOT_TEMPLATE.format(**dict(
      fields, size=f'{size} ' if size else '',
      position=f' {captioned_shapes.position_phrases(position)[0]}' if position else '')))


# Read apart from the others as well: the attributes captions name only sometimes.
GIVEN_REST_ATTRIBUTES = ('size', 'position')


def given_rest_prompts(attribute: str, labels: dict[str, np.ndarray]) -> list[str]:
  """For each image (`labels`: attribute → [N] indices), the full prompt of each value of
  `attribute` with every other attribute as the image has it: [N * num_values], image-major.
  Whether an embedding holds the attribute at all, which prompts averaged over the other
  attributes (`zero_shot_prompts`) can hide."""
  from unclip_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
  names = captioned_shapes.ATTRIBUTES
  prompts = []
  for i in range(len(labels[attribute])):
    fields = {k: names[k][int(labels[k][i])] for k in names}
    prompts.extend(full_prompt(dict(fields, **{attribute: value})) for value in names[attribute])
  return prompts


def given_rest_accuracy(emb: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> float:
  """How often each embedding [N, D] is nearest its own value among its classes [N, K, D]."""
  predicted = np.argmax(np.einsum('nd,nkd->nk', emb, classes), axis=1)
  return float(np.mean(predicted == labels))


TOKENIZER_KINDS = ('auto', 'words', 'clip_bpe')
# Zero-shot prompts for data with class labels (`config.data.label_key`), CLIP's style, when
# the config names none; the class embedding averages them (prompt ensembling).
DEFAULT_TEMPLATES = ('a photo of a {}.', 'a picture of a {}.', 'an image of a {}.', 'a {}.')


def tokenizer_kind(config: ml_collections.ConfigDict) -> str:
  """`config.tokenizer.kind`, with 'auto' resolved: 'words' for the built-in data (its small
  fixed vocabulary), 'clip_bpe' for any other source."""
  kind = config.tokenizer.kind
  if kind not in TOKENIZER_KINDS:
    raise ValueError(f'config.tokenizer.kind: {kind!r} is not one of {TOKENIZER_KINDS}')
  if kind == 'auto':
    return 'words' if sources.source_name(config.data) == 'shapes' else 'clip_bpe'
  return kind


def make_tokenizer(config: ml_collections.ConfigDict):
  """The tokenizer of `config.tokenizer`: 'words' (the built-in data only) or 'clip_bpe' (CLIP's
  BPE, from `tokenizer.path`, else the vocabulary an installed open_clip ships)."""
  t = config.tokenizer
  kind = tokenizer_kind(config)
  if kind == 'words':
    source = sources.source_name(config.data) if 'data' in config else 'shapes'
    if source != 'shapes':
      raise ValueError(f"config.tokenizer.kind: the 'words' tokenizer knows only the built-in "
                       f"data's words, not the captions of source {source!r}; use 'clip_bpe' "
                       "(or 'auto')")
    from unclip_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
    return tokenizers.WordTokenizer(captioned_shapes.caption_vocabulary(), t.context_length,
                                    strict=True)
  path = t.path or tokenizers.default_bpe_path()
  if not path:
    raise ValueError("config.tokenizer.path: the CLIP BPE tokenizer needs its vocabulary: set "
                     "it to a bpe_simple_vocab_16e6.txt.gz, a merges.txt / tokenizer.json or a "
                     "Hugging Face CLIP tokenizer folder (or install open_clip_torch, which "
                     "ships bpe_simple_vocab_16e6.txt.gz)")
  return tokenizers.ClipTokenizer.from_file(path, context_length=t.context_length)


def build_model(config: ml_collections.ConfigDict) -> CLIP:
  """The CLIP of `config.model`; `model.text` or `model.vision` may be None (one tower)."""
  m = config.model
  return CLIP(text=_tower_args(m.text), vision=_tower_args(m.vision), embed_dim=m.embed_dim,
              dtype=DTYPES[config.dtype])


def _tower_args(tower) -> Optional[dict]:
  """A tower's config as module arguments (lists, e.g. from config.json, as tuples)."""
  if tower is None:
    return None
  return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(tower).items()}


def resolve_tokenizer_path(config: ml_collections.ConfigDict, root: str):
  """Makes a relative `config.tokenizer.path` absolute when it names a path under `root`.

  A converted export keeps its tokenizer in `export/tokenizer` and records the relative path
  'tokenizer', so the folder can be moved. Absolute paths (and relative ones that do not exist
  under `root`, e.g. relative to the working directory) are left as they are.
  """
  t = config.get('tokenizer')
  if t is None or not t.get('path') or _is_absolute(t.path):
    return
  candidate = workdir_lib.path(root) / t.path
  if candidate.exists():
    t.path = os.fspath(candidate)


def _is_absolute(path: str) -> bool:
  return os.path.isabs(path) or workdir_lib.is_remote(path)


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array):
  """Symmetric InfoNCE over the batch.

  Args:
    image_emb, text_emb: unit-normalised [B, D]; row i of each is a matching pair.
    scale: the (clamped) logit scale.
  Returns:
    (loss, {'i2t_accuracy', 't2i_accuracy', 'logit_scale'}).
  """
  logits = scale * image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T
  labels = jnp.arange(logits.shape[0])
  loss_i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss_t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  metrics = {'i2t_accuracy': jnp.mean(jnp.argmax(logits, 1) == labels),
             't2i_accuracy': jnp.mean(jnp.argmax(logits, 0) == labels),
             'logit_scale': scale}
  return (loss_i2t + loss_t2i) / 2, metrics


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray) -> dict[str, float]:
  """Recall@1/@5 of each pair's image among all texts and text among all images."""
  similarity = image_emb @ text_emb.T
  metrics = {}
  for k in (1, 5):
    metrics[f'image_to_text_recall@{k}'] = recall_at_k(similarity, k)
    metrics[f'text_to_image_recall@{k}'] = recall_at_k(similarity.T, k)
  return metrics


def zero_shot_accuracy(image_emb: np.ndarray, classes: np.ndarray,
                       labels: np.ndarray) -> dict[str, float]:
  """Accuracy (top-1, top-5) of the nearest class embedding [C, D] over the examples whose
  label [N] is a class (>= 0), and how many those were."""
  keep = labels >= 0
  if not keep.any():
    return {'zero_shot_examples': 0.0}
  scores = image_emb[keep] @ classes.T
  order = np.argsort(-scores, axis=1)
  truth = labels[keep][:, None]
  return {'zero_shot_accuracy': float(np.mean(order[:, 0] == truth[:, 0])),
          'zero_shot_top5_accuracy': float(np.mean(np.any(order[:, :5] == truth, axis=1))),
          'zero_shot_examples': float(keep.sum())}


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
  """CLIP score of each image–text pair [N]: 100 × cosine, clipped at 0 (Hessel et al. 2021's
  CLIPScore without its 2.5 weight, as text-to-image papers report it)."""
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return 100.0 * np.maximum(np.sum(unit(image_emb) * unit(text_emb), -1), 0.0)


def recall_at_k(similarity: np.ndarray, k: int) -> float:
  """Fraction of rows whose own index (the diagonal) is among their top-k columns."""
  topk = np.argsort(-similarity, axis=1)[:, :k]
  return float(np.mean(np.any(topk == np.arange(len(similarity))[:, None], axis=1)))


class Stage:
  """See `unclip_jax.stages` for the interface."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self._tokenizer = None
    if config.model.text is not None and config.tokenizer.kind == 'auto':
      self._fit_text_tower_to_tokenizer()
    elif config.model.text is not None and tokenizer_kind(config) == 'words':
      self.tokenizer_unchecked()   # cheap; refuses data it cannot read now, not mid-run
    self.model = build_model(config)
    self._encoders = None

  def _fit_text_tower_to_tokenizer(self):
    """With `tokenizer.kind = 'auto'` the tokenizer follows the data, and the text tower's
    vocabulary and end token follow the tokenizer (the built-in data's 'words' fit the tiny
    presets' 128 ids; CLIP's BPE needs 49408)."""
    tok, text = self.tokenizer_unchecked(), self.config.model.text
    if tok.vocab_size > text.vocab_size or tok.eot_id != text.eot_id:
      logging.info('config.model.text: vocab_size %d -> %d and eot_id %d -> %d for the %s '
                   'tokenizer', text.vocab_size, tok.vocab_size, text.eot_id, tok.eot_id,
                   type(tok).__name__)
      text.vocab_size = max(tok.vocab_size, text.vocab_size)
      text.eot_id = tok.eot_id

  def tokenizer_unchecked(self):
    if self._tokenizer is None:
      self._tokenizer = make_tokenizer(self.config)
    return self._tokenizer

  @property
  def tokenizer(self):
    tok = self.tokenizer_unchecked()
    text = self.config.model.text
    if text is None:
      return tok
    if tok.vocab_size > text.vocab_size:
      raise ValueError(f'config.model.text.vocab_size: {text.vocab_size} is smaller than the '
                       f'tokenizer vocabulary ({tok.vocab_size})')
    if tok.eot_id != text.eot_id:
      raise ValueError(f'config.model.text.eot_id: {text.eot_id} differs from the '
                       f"tokenizer's end token {tok.eot_id}")
    return tok

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """'image' [B, S, S, 3] and 'tokens' [B, L]; a one-tower CLIP has only its own input."""
    m = self.config.model
    spec = {}
    if m.vision is not None:
      size = m.vision.image_size
      spec['image'] = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
    if m.text is not None:
      spec['tokens'] = jax.ShapeDtypeStruct((batch_size, m.text.context_length), jnp.int32)
    return spec

  def init(self, rng, batch):
    if 'image' not in batch:
      return self.model.init(rng, batch['tokens'], method=CLIP.encode_text)
    if 'tokens' not in batch:
      return self.model.init(rng, batch['image'], method=CLIP.encode_image)
    return self.model.init(rng, batch['image'], batch['tokens'])

  def constants(self):
    return {}

  def loss(self, params, batch, rng, constants):
    del rng, constants  # CLIP's loss is deterministic and needs nothing fixed.
    image_emb, text_emb, scale = self.model.apply({'params': params}, batch['image'],
                                                  batch['tokens'])
    return contrastive_loss(image_emb, text_emb, scale)

  def accumulated_loss_and_grads(self, params, batch, rng, constants, accum: int):
    """The contrastive loss of the whole batch and its gradients, computed a microbatch at a
    time (gradient caching, Gao et al. 2021): every microbatch's embeddings first (no
    activations kept), then the loss over all of them and its gradients with respect to the
    embeddings and the logit scale, then each microbatch's backward pass from its slice of those
    gradients. The same loss and gradients as `accum_steps=1` (every pair is contrasted with
    the whole batch, not only its microbatch), with one microbatch's activations in memory."""
    del rng, constants
    micro = {k: batch[k].reshape((accum, batch[k].shape[0] // accum) + batch[k].shape[1:])
             for k in ('image', 'tokens')}

    def embed(p, mb):
      image_emb, text_emb, _ = self.model.apply({'params': p}, mb['image'], mb['tokens'])
      return image_emb, text_emb

    image_emb, text_emb = jax.lax.map(lambda mb: embed(params, mb), micro)
    flat = lambda x: x.reshape((-1,) + x.shape[2:])

    def loss_of(image_emb, text_emb, logit_scale):
      return contrastive_loss(image_emb, text_emb, jnp.exp(logit_scale))

    (loss, metrics), (g_image, g_text, g_scale) = jax.value_and_grad(
        loss_of, argnums=(0, 1, 2), has_aux=True)(flat(image_emb), flat(text_emb),
                                                  params['logit_scale'])

    def backward(grads, xs):
      mb, gi, gt = xs
      _, vjp = jax.vjp(lambda p: embed(p, mb), params)
      (g,) = vjp((gi, gt))
      return jax.tree.map(jnp.add, grads, g), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(backward, zeros, (micro, g_image.reshape(image_emb.shape),
                                              g_text.reshape(text_emb.shape)))
    grads = dict(grads, logit_scale=grads['logit_scale'] + g_scale)
    return (loss, metrics), grads

  def constrain_params(self, params):
    """After each update: the logit scale's parameter is clamped to [0, log(max_logit_scale)]
    (as OpenAI's training does), so that its gradient never vanishes at the clamp."""
    top = float(np.log(self.model.max_logit_scale))
    return dict(params, logit_scale=jnp.clip(params['logit_scale'], 0.0, top))

  def make_iterator(self, split, batch_size, *, seed, shuffle, process_index, process_count):
    from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    return input_pipeline.make_iterator(
        self.config.data, split=split, batch_size=batch_size, tokenizer=self.tokenizer,
        seed=seed, shuffle=shuffle, process_index=process_index, process_count=process_count)

  # --- evaluation -----------------------------------------------------------------------------

  def _compiled_encoders(self):
    if self._encoders is None:
      image = jax.jit(lambda p, x: self.model.apply({'params': p}, x,
                                                    method=CLIP.encode_image))
      text = jax.jit(lambda p, t: self.model.apply({'params': p}, t,
                                                   method=CLIP.encode_text)[0])
      self._encoders = image, text
    return self._encoders

  def embed_images(self, params, images: np.ndarray) -> np.ndarray:
    """Images [N, H, W, 3] in [-1, 1] → unit embeddings [N, D], in batches."""
    encode, _ = self._compiled_encoders()
    return batched(lambda x: encode(params, x), images, self.config.eval.batch_size)

  def embed_texts(self, params, texts: list[str]) -> np.ndarray:
    """Texts → unit embeddings [N, D], in batches."""
    _, encode = self._compiled_encoders()
    tokens = self.tokenizer(list(texts))
    return batched(lambda t: encode(params, t), tokens, self.config.eval.batch_size)

  def zero_shot_classifier(self, params, attribute: str) -> np.ndarray:
    """The built-in data: unit class embeddings [num_classes, D] for one attribute, from
    ensembled prompts."""
    from unclip_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
    return self.class_embeddings(
        params, [zero_shot_prompts(attribute, value)
                 for value in captioned_shapes.ATTRIBUTES[attribute]])

  def given_rest_classifier(self, params, attribute: str, labels: dict) -> np.ndarray:
    """The built-in data: per image, unit embeddings [N, num_values, D] of `attribute`'s
    values with the image's other attributes (`given_rest_prompts`)."""
    classes = self.embed_texts(params, given_rest_prompts(attribute, labels))
    return classes.reshape(len(labels[attribute]), -1, classes.shape[-1])

  def class_embeddings(self, params, prompts_per_class: list[list[str]]) -> np.ndarray:
    """Unit class embeddings [C, D]: each class's prompts embedded and averaged."""
    rows = []
    for prompts in prompts_per_class:
      emb = self.embed_texts(params, prompts).mean(0)
      rows.append(emb / np.linalg.norm(emb))
    return np.stack(rows)

  def label_classifier(self, params) -> np.ndarray:
    """Unit class embeddings [C, D] of `config.data.class_names` under the zero-shot templates."""
    from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    names = input_pipeline.class_names(self.config.data)
    templates = tuple(self.config.eval.get('zero_shot_templates') or DEFAULT_TEMPLATES)
    return self.class_embeddings(params, [[t.format(n) for t in templates] for n in names])

  def evaluate(self, params, workdir: Optional[str] = None) -> dict[str, float]:
    """On the held-out split: image↔text retrieval recall@1/@5 (any data); zero-shot accuracy
    of the class in `config.data.label_key` (data with labels); on the built-in data, zero-shot
    accuracy per attribute."""
    del workdir
    from unclip_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    e = self.config.eval
    data = input_pipeline.load_split(self.config.data, 'test', tokenizer=self.tokenizer,
                                     max_examples=e.num_examples)
    image_emb = self.embed_images(params, data['image'])
    metrics = {}
    if sources.source_name(self.config.data) == 'shapes':
      for attribute in ZERO_SHOT_ATTRIBUTES:
        classes = self.zero_shot_classifier(params, attribute)
        predicted = np.argmax(image_emb @ classes.T, axis=1)
        metrics[f'zero_shot_{attribute}_accuracy'] = float(np.mean(predicted == data[attribute]))
      for attribute in GIVEN_REST_ATTRIBUTES:
        classes = self.given_rest_classifier(params, attribute, data)
        metrics[f'zero_shot_{attribute}_given_rest_accuracy'] = given_rest_accuracy(
            image_emb, classes, data[attribute])
    if 'label' in data:
      metrics.update(zero_shot_accuracy(image_emb, self.label_classifier(params), data['label']))
    _, encode_text = self._compiled_encoders()
    text_emb = batched(lambda t: encode_text(params, t), data['tokens'], e.batch_size)
    metrics.update(retrieval_metrics(image_emb, text_emb))
    return metrics

  def sample(self, params, workdir, step):
    del params, workdir, step  # CLIP draws nothing.

  # --- export for later stages ----------------------------------------------------------------

  def export(self, params, workdir: str):
    """Saves the (EMA) params and config to `workdir/export`, loadable by `load_frozen`."""
    save_frozen(os.path.join(workdir, 'export'), params, self.config)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of `x` on this host, also when it is sharded across processes."""
  if jax.process_count() > 1 and not x.is_fully_replicated:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(x, tiled=True)
  return jax.device_get(x)


def batched(fn, array: np.ndarray, batch_size: int) -> np.ndarray:
  """Applies `fn` to fixed-size chunks (the last one padded), so it compiles once."""
  out = []
  for i in range(0, len(array), batch_size):
    chunk = array[i:i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(to_host(fn(chunk)))[:batch_size - pad])
  return np.concatenate(out).astype(np.float32)


def save_frozen(path: str, params, config: ml_collections.ConfigDict):
  """Writes a CLIP's `params` and config under `path`; `load_frozen` reads it back.

  A CLIP that reads captions with the BPE tokenizer gets its vocabulary file copied into
  `path/tokenizer/` (the config names it relatively), so the export works where the file it
  was trained with (e.g. an installed open_clip's) is absent."""
  config = ml_collections.ConfigDict(config.to_dict())
  t = config.get('tokenizer')
  text_tower = config.get('model', {}).get('text') is not None
  copies = {}
  if t is not None and text_tower and tokenizer_kind(config) == 'clip_bpe':
    root = workdir_lib.path(path)
    inside = t.path and not _is_absolute(t.path) and (root / t.path).exists()
    # The vocabulary the run found itself (kind 'auto': an installed open_clip's), was given,
    # or (re-exporting) the copy inside the export being replaced.
    if inside:    # kept where it is: its files (a whole folder) go into the new export
      source = root / t.path
      files = (workdir_lib.files_under(source) if source.is_dir() else
               [workdir_lib.path(f) for f in tokenizers.tokenizer_files(source)])
      copies = {os.fspath(f.relative_to(root)): os.fspath(f) for f in files}
    else:
      source = t.path or (tokenizers.default_bpe_path() if t.kind == 'auto' else None)
      if source:
        files = tokenizers.tokenizer_files(source)
        copies = {os.path.join('tokenizer', os.path.basename(f)): f for f in files}
        t.path = os.path.join('tokenizer', os.path.basename(files[0]))
  export.save_export(path, params, config, files=copies)


def with_clip_fingerprint(config: ml_collections.ConfigDict,
                          clip: 'FrozenClip') -> ml_collections.ConfigDict:
  """A copy of a CLIP-conditioned stage's config recording its CLIP (`clip.fingerprint`), so
  that loading the export with another CLIP is refused."""
  from unclip_jax.data import embeddings  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  config.clip.fingerprint = embeddings.clip_fingerprint(clip.params)
  return config


class FrozenClip:
  """A trained CLIP for the later stages: tokenizer, text and image encoders, fixed params."""

  def __init__(self, stage: Stage, params):
    self.stage = stage
    self.params = params
    self.config = stage.config

  @property
  def tokenizer(self):
    return self.stage.tokenizer

  def encode_text(self, tokens: jax.Array, params=None,
                  normalize: bool = True) -> tuple[jax.Array, jax.Array]:
    """Tokens [B, L] → (unit embedding [B, D], token encodings [B, L, width]). Jit-able.

    The token encodings are the text tower's last hidden states after its final LayerNorm
    (Hugging Face's `last_hidden_state`); the embedding is the projected pooled state,
    L2-normalised (Hugging Face's `text_embeds` / its norm), or as it is with normalize=False.
    `params` default to the loaded ones; pass them explicitly inside a compiled step.
    """
    params = self.params if params is None else params
    return self.stage.model.apply({'params': params}, tokens, normalize=normalize,
                                  method=CLIP.encode_text)

  def encode_image(self, images: jax.Array, params=None, normalize: bool = True) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] → unit embedding [B, D] (raw with normalize=False).

    Images of another size are resized (bilinear, whole image, aspect ratio not kept) to the
    CLIP's input size first; the tower then applies its own pixel normalisation, if any.
    """
    params = self.params if params is None else params
    if self.config.model.vision is None:
      raise ValueError(MISSING_TOWER.format(tower='image', flag='vision'))
    size = self.config.model.vision.image_size
    if images.shape[1:3] != (size, size):
      images = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]),
                                'bilinear')
    return self.stage.model.apply({'params': params}, images, normalize=normalize,
                                  method=CLIP.encode_image)

  def embed_images(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Images [N, H, W, 3] in [-1, 1] (any size) → unit embeddings [N, D], in fixed-size
    batches under one compiled call."""
    if getattr(self, '_embed_images', None) is None:
      self._embed_images = jax.jit(lambda p, x: self.encode_image(x, p))
    return batched(lambda x: self._embed_images(self.params, x), np.asarray(images),
                    batch_size)

  def embed_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Texts → unit embeddings [N, D] (the tokenizer's truncation applies)."""
    if getattr(self, '_embed_texts', None) is None:
      self._embed_texts = jax.jit(lambda p, t: self.encode_text(t, p)[0])
    tokens = np.asarray(self.tokenizer(list(texts)))
    return batched(lambda t: self._embed_texts(self.params, t), tokens, batch_size)

  def token_mask(self, tokens: jax.Array) -> jax.Array:
    """[B, L] bool: True up to and including the end token (the real caption tokens).

    The end token is found by the text tower's own rule (`model.text.pool`).
    """
    text = self.config.model.text
    if text is None:
      raise ValueError(MISSING_TOWER.format(tower='text', flag='text'))
    if text.get('pool', 'eot') == 'argmax':
      eot = jnp.argmax(tokens, axis=-1)
    else:
      eot = jnp.argmax(tokens == text.eot_id, axis=-1)
    return jnp.arange(tokens.shape[-1])[None, :] <= eot[:, None]


def load_frozen(path: str) -> FrozenClip:
  """Loads a CLIP saved by `save_frozen` (a CLIP run's `workdir/export`, or the workdir).

  A relative `config.tokenizer.path` that exists inside the export folder (a converted CLIP's
  'tokenizer') is resolved against it, so exports can be moved.
  """
  config, params = export.load_export(path, what='CLIP')
  resolve_tokenizer_path(config, export.export_dir(path))
  return FrozenClip(Stage(config), params)


def random_clip(config: ml_collections.ConfigDict, seed: int = 0) -> FrozenClip:
  """An untrained CLIP of the given config (for compiling and benchmarking later stages)."""
  from unclip_jax import stages  # pylint: disable=g-import-not-at-top
  stage = Stage(config)
  params = stages.init_params(stage, jax.random.PRNGKey(seed))
  return FrozenClip(stage, params)


def abstract_clip(config: ml_collections.ConfigDict) -> FrozenClip:
  """A CLIP whose params are shapes only (jax.ShapeDtypeStruct): for lowering and compiling
  later stages' steps without allocating the CLIP."""
  from unclip_jax import stages  # pylint: disable=g-import-not-at-top
  stage = Stage(config)
  return FrozenClip(stage, jax.eval_shape(lambda: stages.init_params(stage, jax.random.PRNGKey(0))))
