"""Text tokenizers: the CLIP byte-level BPE tokenizer and a tiny word-level one.

Both tokenizers share one interface:

* ``tok(texts, context_length=None) -> np.ndarray`` of int32, shape ``[B, L]``:
  each row is ``[sot] + ids + [eot]`` padded with ``pad_id`` (0). Text that is
  too long is truncated so that ``eot`` stays the last token (row ``L - 1``),
  as in OpenAI CLIP / open_clip. ``texts`` is a ``str`` (B = 1) or a sequence
  of ``str``; the empty string gives ``[sot, eot, 0, ...]``.
* ``tok.encode(text) -> list[int]`` (no special tokens) and
  ``tok.decode(ids) -> str`` (special tokens and trailing padding dropped).
* properties ``vocab_size``, ``sot_id``, ``eot_id``, ``pad_id``, ``context_length``.

:class:`ClipTokenizer` reproduces OpenAI's CLIP tokenizer (vocab 49408, context
77) id for id. It is built on the Rust ``tokenizers`` library for speed and is
loaded with :meth:`ClipTokenizer.from_file` from a local vocabulary file; nothing
is downloaded. :class:`WordTokenizer` needs no file: it maps a fixed word list
to ids and is used by the built-in synthetic dataset.
"""

from __future__ import annotations

import abc
import gzip
import html
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from etils import epath

import numpy as np

try:  # OpenAI cleans text with ftfy; without it we fall back to NFC normalisation.
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None

__all__ = ["ClipTokenizer", "WordTokenizer", "bytes_to_unicode"]

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
NUM_OPENAI_MERGES = 49152 - 256 - 2  # merges OpenAI keeps from bpe_simple_vocab_16e6
# OpenAI's pre-tokenisation pattern (special tokens are matched separately).
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_FILE_NAMES = ("tokenizer.json", "merges.txt", "bpe_simple_vocab_16e6.txt.gz")
_EXPECTED = (
    "an OpenAI bpe_simple_vocab_16e6.txt.gz, a Hugging Face merges.txt "
    "(optionally with vocab.json beside it) or tokenizer.json, or a directory "
    f"holding one of {', '.join(_FILE_NAMES)} (directly or in tokenizer/)"
)


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """Return OpenAI/GPT-2's reversible map from each byte (0..255) to a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + n for n in range(len(others))]
    return {b: chr(c) for b, c in zip(printable + others, chars)}


def _as_text_list(texts: str | Sequence[str]) -> list[str]:
    """Return ``texts`` as a list of str; raise TypeError for anything else."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
    return texts


def _check_str(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text


class _Tokenizer(abc.ABC):
    """Shared padding/truncation logic; subclasses implement ``encode`` and ``decode``."""

    _sot_id: int
    _eot_id: int

    def __init__(self, context_length: int):
        self._context_length = self._check_context_length(context_length)

    @staticmethod
    def _check_context_length(length: int) -> int:
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 2:
            raise ValueError(f"context_length must be an int >= 2 (room for sot and eot), got {length!r}")
        return int(length)

    @property
    def context_length(self) -> int:
        """Default row length ``L`` of :meth:`__call__`."""
        return self._context_length

    @property
    def sot_id(self) -> int:
        """Id of the start-of-text token."""
        return self._sot_id

    @property
    def eot_id(self) -> int:
        """Id of the end-of-text token."""
        return self._eot_id

    @property
    def pad_id(self) -> int:
        """Id used for padding (0, as in OpenAI CLIP)."""
        return 0

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without sot/eot."""

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """Tokenize ``texts`` (a str or a sequence of B str) to an int32 array ``[B, L]``.

        Each row is ``[sot] + encode(text) + [eot]`` zero padded to ``L`` (default
        ``self.context_length``); longer text is cut so that ``eot`` sits at ``L - 1``.
        """
        texts = _as_text_list(texts)
        length = self._check_context_length(self.context_length if context_length is None else context_length)
        out = np.full((len(texts), length), self.pad_id, dtype=np.int32)
        for row, ids in zip(out, self._encode_many(texts)):
            ids = [self.sot_id, *ids[: length - 2], self.eot_id]
            row[: len(ids)] = ids
        return out

    def _content_ids(self, ids: Sequence[int] | np.ndarray) -> list[int]:
        """1-D ids with trailing padding stripped and sot/eot dropped."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {ids.shape}")
        ids = ids.tolist()
        while ids and ids[-1] == self.pad_id:
            ids.pop()
        return [i for i in ids if i not in (self.sot_id, self.eot_id)]


class ClipTokenizer(_Tokenizer):
    """OpenAI CLIP's byte-level BPE tokenizer (vocab 49408, context length 77).

    Text is cleaned like OpenAI's (``ftfy.fix_text`` if ftfy is installed, else
    NFC; ``html.unescape`` twice; whitespace collapsed and stripped; lower-cased),
    split with OpenAI's regex, mapped to byte characters and BPE-merged with a
    ``</w>`` end-of-word suffix. Usually built with :meth:`from_file`.

    Args:
        merges: BPE merges in priority order, as ``(left, right)`` string pairs.
        vocab: token -> id. ``None`` derives OpenAI's vocabulary from ``merges``:
            256 byte tokens, the same with ``</w>``, one token per merge, then
            ``<|startoftext|>`` and ``<|endoftext|>``.
        context_length: default row length of :meth:`__call__`.
    """

    def __init__(self, merges: Sequence[tuple[str, str]], vocab: dict[str, int] | None = None,
                 context_length: int = 77):
        super().__init__(context_length)
        from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        merges = [tuple(m) for m in merges]
        if vocab is None:
            vocab = _openai_vocab(merges)
        for token in (SOT_TOKEN, EOT_TOKEN):
            if token not in vocab:
                raise ValueError(f"the vocabulary has no {token} token; not a CLIP vocabulary")
        backend = Tokenizer(BPE(vocab=dict(vocab), merges=merges, unk_token=EOT_TOKEN, fuse_unk=False,
                                continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
        # Python-side cleaning (_clean) already does this; it makes the backend usable on raw text too.
        backend.normalizer = normalizers.Sequence(
            [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.add_special_tokens([SOT_TOKEN, EOT_TOKEN])
        self.backend = backend  # the underlying tokenizers.Tokenizer
        self._sot_id, self._eot_id = vocab[SOT_TOKEN], vocab[EOT_TOKEN]
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

    @classmethod
    def from_file(cls, path: str | Path, context_length: int = 77) -> "ClipTokenizer":
        """Load from a file or directory, local or remote (gs://; see the module docstring for
        the formats).

        Accepts OpenAI/open_clip's ``bpe_simple_vocab_16e6.txt.gz``, a Hugging Face
        ``merges.txt`` (with ``vocab.json`` beside it if present), ``vocab.json``
        (with ``merges.txt`` beside it), ``tokenizer.json``, or a directory holding
        one of those directly or in a ``tokenizer/`` subfolder (HF model folder,
        diffusers pipeline). Raises FileNotFoundError / ValueError naming the path.
        """
        file = _find_tokenizer_file(epath.Path(path))
        cls._check_context_length(context_length)
        try:
            merges, vocab = _read_tokenizer_file(file)
            return cls(merges, vocab, context_length)
        except FileNotFoundError:
            raise
        except Exception as e:  # parse errors, bad merges (tokenizers raises plain Exception)
            raise ValueError(f"{file} is not a usable CLIP BPE tokenizer file ({e}); expected {_EXPECTED}") from e

    @property
    def vocab_size(self) -> int:
        """Number of token ids (49408 for OpenAI CLIP)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def clean(text: str) -> str:
        """OpenAI's text cleaning: ftfy (or NFC), html.unescape x2, whitespace collapse, lower-case."""
        text = ftfy.fix_text(text) if ftfy is not None else unicodedata.normalize("NFC", text)
        text = html.unescape(html.unescape(text))
        return " ".join(text.split()).lower()

    def encode(self, text: str) -> list[int]:
        """Token ids of one str, without sot/eot and without truncation."""
        return self.backend.encode(self.clean(_check_str(text)), add_special_tokens=False).ids

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        encodings = self.backend.encode_batch([self.clean(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a 1-D id sequence (e.g. one row of ``__call__``): special tokens and
        trailing padding dropped, ``</w>`` read as a space, result stripped."""
        data = bytearray()
        for i in self._content_ids(ids):
            token = self.backend.id_to_token(i)
            if token is None:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            word_end = token.endswith(END_OF_WORD)
            data.extend(self._byte_decoder[c] for c in (token[: -len(END_OF_WORD)] if word_end else token))
            if word_end:
                data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()


def default_bpe_path() -> str | None:
    """The ``bpe_simple_vocab_16e6.txt.gz`` an installed open_clip ships (found without importing
    it, which would import torch), or None."""
    import importlib.util  # pylint: disable=g-import-not-at-top

    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return str(path)
    return None


def _openai_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """OpenAI's vocabulary for ``merges``: bytes, bytes + ``</w>``, merges, sot, eot."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def tokenizer_files(path: str | Path) -> list[str]:
    """The file(s) the tokenizer at ``path`` is read from: the tokenizer file first, then a
    ``vocab.json`` that a ``merges.txt`` reads beside it."""
    file = _find_tokenizer_file(epath.Path(path))
    files = [str(file)]
    if file.name == "merges.txt" and file.with_name("vocab.json").is_file():
        files.append(str(file.with_name("vocab.json")))
    return files


def _find_tokenizer_file(path: Path) -> Path:
    """Resolve ``path`` (a file, or a directory holding one) to a tokenizer file."""
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file not found: {path}; expected {_EXPECTED}")
    if path.is_file():
        return path
    for folder in (path, path / "tokenizer"):
        for name in _FILE_NAMES:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"no tokenizer file in directory {path}; expected {_EXPECTED}")


def _read_tokenizer_file(file: Path) -> tuple[list[tuple[str, str]], dict[str, int] | None]:
    """Read ``(merges, vocab or None)`` from one tokenizer file of any supported format."""
    if file.name.endswith(".gz"):
        with file.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        return _parse_merges(lines[1 : NUM_OPENAI_MERGES + 1]), None  # line 0 is a header, as in OpenAI
    if file.suffix == ".json":
        data = json.loads(file.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            return _read_hf_tokenizer_json(data)
        if isinstance(data, dict) and data and all(isinstance(v, int) for v in data.values()):
            return _read_merges_txt(file.with_name("merges.txt"), data)  # vocab.json
        raise ValueError("JSON is neither a Hugging Face tokenizer.json nor a vocab.json")
    vocab_file = file.with_name("vocab.json")
    vocab = json.loads(vocab_file.read_text(encoding="utf-8")) if vocab_file.is_file() else None
    return _read_merges_txt(file, vocab)


def _read_merges_txt(file: Path, vocab: dict[str, int] | None):
    """Merges from a HF merges.txt. Without a vocab, keep the first 48894 as OpenAI does;
    with one, keep the merges whose parts and result it contains."""
    if not file.is_file():
        raise FileNotFoundError(f"merges file not found: {file}; expected {_EXPECTED}")
    lines = file.read_text(encoding="utf-8").split("\n")
    if lines and "#version" in lines[0]:
        lines = lines[1:]
    merges = _parse_merges(lines)
    if vocab is None:
        return merges[:NUM_OPENAI_MERGES], None
    return [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab], vocab


def _parse_merges(lines: list[str]) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(lines):
        parts = line.split()
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
        elif parts:
            raise ValueError(f"line {n + 1} is not a BPE merge ('left right'): {line[:60]!r}")
    if not merges:
        raise ValueError("no BPE merges found")
    return merges


def _read_hf_tokenizer_json(data: dict):
    """(merges, vocab) from a HF tokenizer.json with a CLIP-style BPE model."""
    model = data["model"]
    if model.get("type", "BPE") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
        raise ValueError(f"tokenizer.json model is not a BPE with end_of_word_suffix {END_OF_WORD!r}")
    vocab = dict(model["vocab"])
    for added in data.get("added_tokens") or []:
        vocab.setdefault(added["content"], added["id"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return merges, vocab


class WordTokenizer(_Tokenizer):
    """Word-level tokenizer over a fixed word list; needs no vocabulary file.

    Ids: pad 0, sot 1, eot 2, unk 3, then ``words`` in order from 4. Text is
    lower-cased and split on whitespace and punctuation (punctuation dropped);
    unknown words map to unk.

    Args:
        words: distinct words (letters/digits only; lower-cased here).
        context_length: default row length of :meth:`__call__`.
        strict: refuse (ValueError naming the word) text with a word outside ``words``
            instead of mapping it to unk: a corpus the vocabulary cannot represent.
    """

    UNK_ID = 3
    _WORD_RE = re.compile(r"[^\W_]+")  # runs of letters/digits

    def __init__(self, words: Sequence[str], context_length: int = 16, strict: bool = False):
        super().__init__(context_length)
        self.strict = strict
        if isinstance(words, str):
            raise TypeError("words must be a sequence of str, not a single str")
        words = tuple(_check_str(w).lower() for w in words)
        for w in words:
            if not self._WORD_RE.fullmatch(w):
                raise ValueError(f"word {w!r} must be letters/digits only (it could never be produced)")
        if len(set(words)) != len(words):
            raise ValueError("words must be distinct (case-insensitively)")
        self._words = words
        self._ids = {w: i + 4 for i, w in enumerate(words)}
        self._sot_id, self._eot_id = 1, 2

    @property
    def words(self) -> tuple[str, ...]:
        """The vocabulary words; ``words[i]`` has id ``i + 4``."""
        return self._words

    @property
    def vocab_size(self) -> int:
        """4 special ids + number of words."""
        return 4 + len(self._words)

    def encode(self, text: str) -> list[int]:
        """Word ids of one str (unknown words -> 3, or ValueError when strict), without sot/eot."""
        ids = [self._ids.get(w, self.UNK_ID) for w in self._WORD_RE.findall(_check_str(text).lower())]
        if self.strict and self.UNK_ID in ids:
            unknown = [w for w in self._WORD_RE.findall(text.lower()) if w not in self._ids]
            raise ValueError(
                f"the word tokenizer knows only the built-in data's {len(self._words)} words; "
                f"{text[:80]!r} has {unknown[0]!r}. Use the CLIP BPE tokenizer "
                "(config.tokenizer.kind='clip_bpe') for this text")
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Space-joined words of a 1-D id sequence; pad/sot/eot dropped, unk shown as ``<unk>``."""
        out = []
        for i in self._content_ids(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if i == self.UNK_ID:
                out.append("<unk>")
            elif i >= 4:
                out.append(self._words[i - 4])
        return " ".join(out)
