"""Tests for unclip_jax.data.tokenizers.

The CLIP parity tests compare against open_clip's reference tokenizer (loaded from
its tokenizer.py by file path, since `import open_clip` pulls in torchvision) and
against transformers' CLIPTokenizer; the vocabulary is the bpe_simple_vocab_16e6.txt.gz
shipped inside the open-clip-torch wheel.
"""

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from unclip_jax.data import tokenizers as tokenizers_module
from unclip_jax.data.tokenizers import ClipTokenizer, WordTokenizer

TEXTS = [
    "a photo of a cat",
    "A PHOTO of a Dog!",
    "Hello, world... what's up?!",
    "don't stop; it's 3:45pm, isn't it? I'll we've they're you'd I'm",
    "1234567890 3.14159 -42 1e10 $99.99 50% 2nd",
    "café naïve résumé Ångström Straße",
    "東京タワーの写真 北京欢迎你 한국어",
    "emoji 🐱🚀👍🏽 ❤️ test",
    "fish &amp; chips &lt;b&gt; &quot;quoted&quot; &#39;x&#39; &amp;amp;",
    "<b>Fish &amp; Chips</b> &amp;amp; more",  # the literal '<' stops ftfy from unescaping
    "   lots   of\t\twhitespace \n\n and\u00a0nbsp\u2003em-space   ",
    "",
    "ΟΔΟΣ Σίσυφος",
    "“smart quotes” ‘single’ — em-dash … ｆｕｌｌｗｉｄｔｈ cafÃ©",
    "control\x00char\x07s",
    "C++ / C# <html> {json: [1,2]} @user #hashtag https://example.com/a?b=c&d=e",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a " * 100,
    " ".join(f"Word{i}, " for i in range(60)),
]
# Texts on which transformers' CLIPTokenizer (no html.unescape; ftfy optional) must agree too.
HF_TEXTS = [TEXTS[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 15, 16, 17, 18)]


def _open_clip_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def bpe_path() -> Path:
    path = _open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        pytest.skip("open-clip-torch ships no bpe_simple_vocab_16e6.txt.gz")
    return path


@pytest.fixture(scope="module")
def ref():
    """open_clip's tokenizer module (SimpleTokenizer, tokenize, _tokenizer)."""
    for name in ("torch", "ftfy", "regex"):
        pytest.importorskip(name)
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_ref", _open_clip_dir() / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clip(bpe_path) -> ClipTokenizer:
    return ClipTokenizer.from_file(bpe_path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, bpe_path) -> Path:
    """A HF-style folder with vocab.json + merges.txt derived (independently of our code) from the bpe file."""
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = [chr(c) for c in [*range(33, 127), *range(161, 173), *range(174, 256)]]
    chars += [chr(256 + n) for n in range(256 - len(chars))]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out = tmp_path_factory.mktemp("hf")
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- CLIP parity


@pytest.mark.parametrize("context_length", [77, 12])
def test_matches_open_clip(clip, ref, context_length):
    expected = ref.SimpleTokenizer(context_length=context_length)(TEXTS).numpy()
    got = clip(TEXTS, context_length=context_length)
    for text, g, e in zip(TEXTS, got, expected):
        np.testing.assert_array_equal(g, e, err_msg=repr(text))
    np.testing.assert_array_equal(clip(TEXTS), ref.tokenize(TEXTS).numpy())


def test_encode_decode_match_open_clip(clip, ref):
    assert clip.vocab_size == ref._tokenizer.vocab_size == 49408
    assert (clip.sot_id, clip.eot_id, clip.pad_id) == (ref._tokenizer.sot_token_id, ref._tokenizer.eot_token_id, 0)
    for text in TEXTS:
        ids = clip.encode(text)
        assert ids == ref._tokenizer.encode(text), text
        assert clip.decode(ids) == ref._tokenizer.decode(ids).strip(), text


def test_matches_transformers(clip, hf_dir):
    transformers = pytest.importorskip("transformers")
    classes = {transformers.CLIPTokenizer, getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)}
    ours = clip(HF_TEXTS)
    for cls in classes:  # one class in transformers>=5, slow + fast before
        hf = cls.from_pretrained(str(hf_dir))
        for text, row in zip(HF_TEXTS, ours):
            ids = hf(text, truncation=True, max_length=77)["input_ids"]
            np.testing.assert_array_equal(row[: len(ids)], ids, err_msg=f"{cls.__name__}: {text!r}")
            assert not row[len(ids):].any()


def test_from_file_formats_agree(clip, hf_dir, bpe_path, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer).from_pretrained(str(hf_dir))
    (tmp_path / "tj").mkdir()
    hf.backend_tokenizer.save(str(tmp_path / "tj" / "tokenizer.json"))
    hf.save_pretrained(str(tmp_path / "pipeline" / "tokenizer"))  # diffusers layout
    # merges.txt alone holding all 262144 merges: the vocab is derived and cut to 48894 merges, as OpenAI does.
    (tmp_path / "merges_only").mkdir()
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    (tmp_path / "merges_only" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines[1:]), encoding="utf-8")

    sources = [hf_dir / "merges.txt", hf_dir / "vocab.json", hf_dir, tmp_path / "merges_only" / "merges.txt",
               tmp_path / "tj" / "tokenizer.json", tmp_path / "pipeline", str(bpe_path)]
    expected = clip(TEXTS)
    for source in sources:
        tok = ClipTokenizer.from_file(source)
        assert (tok.vocab_size, tok.sot_id, tok.eot_id) == (49408, 49406, 49407), source
        np.testing.assert_array_equal(tok(TEXTS), expected, err_msg=str(source))
    assert ClipTokenizer.from_file(hf_dir, context_length=32)("x").shape == (1, 32)


# ----------------------------------------------------------------------------- CLIP behaviour


def test_clip_shapes_truncation_empty(clip):
    out = clip(["a photo of a cat", "", "a " * 200])
    assert out.dtype == np.int32 and out.shape == (3, 77)
    np.testing.assert_array_equal(out[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])
    assert not out[0, 7:].any()
    np.testing.assert_array_equal(out[1, :2], [clip.sot_id, clip.eot_id])
    assert not out[1, 2:].any()
    assert out[2, 0] == clip.sot_id and out[2, -1] == clip.eot_id and (out[2, 1:-1] == 320).all()
    assert clip("one string").shape == (1, 77)
    assert clip(("a", "b"), context_length=5).shape == (2, 5)
    assert clip([]).shape == (0, 77)
    assert clip("a b c d e f", context_length=2).tolist() == [[clip.sot_id, clip.eot_id]]


def test_clip_decode_round_trip(clip):
    text = "a photo of an astronaut riding a horse on mars"
    row = clip(text)[0]
    assert clip.decode(row) == text
    assert clip.decode(clip.encode(text)) == text
    assert clip.decode(clip(text, context_length=5)[0]) == "a photo of"
    assert clip.decode([]) == ""


def test_clip_constructor_from_merges():
    tok = ClipTokenizer([("c", "a"), ("ca", "t</w>")], context_length=8)
    assert tok.vocab_size == 512 + 2 + 2 and (tok.sot_id, tok.eot_id) == (514, 515)
    assert tok.encode("cat") == [513] and tok.decode(tok("Cat cab")[0]) == "cat cab"


def test_clip_without_ftfy(clip, monkeypatch):
    texts = HF_TEXTS + [TEXTS[8], TEXTS[9]]
    expected = clip(texts)
    monkeypatch.setattr(tokenizers_module, "ftfy", None)  # ftfy is optional: NFC + html.unescape still apply
    np.testing.assert_array_equal(clip(texts), expected)
    assert clip.clean(" <b>Fish &amp;amp;\n Chips</b> ") == "<b>fish & chips</b>"


# ----------------------------------------------------------------------------- WordTokenizer


@pytest.fixture()
def words():
    return WordTokenizer(["red", "Green", "cube", "sphere"], context_length=6)


def test_word_ids_unknown_punctuation(words):
    assert (words.pad_id, words.sot_id, words.eot_id, words.vocab_size) == (0, 1, 2, 8)
    assert words.words == ("red", "green", "cube", "sphere")
    assert words("A red cube").tolist() == [[1, 3, 4, 6, 2, 0]]
    assert words.encode("RED, green; cube!sphere...") == [4, 5, 6, 7]
    assert words.encode("blue_cube don't") == [3, 6, 3, 3]
    assert words.decode(words("red blue cube")[0]) == "red <unk> cube"


def test_word_truncation_and_empty(words):
    out = words(["red green cube sphere red green", "", "   "])
    assert out.dtype == np.int32 and out.shape == (3, 6)
    assert out.tolist() == [[1, 4, 5, 6, 7, 2], [1, 2, 0, 0, 0, 0], [1, 2, 0, 0, 0, 0]]
    assert words("red green", context_length=3).tolist() == [[1, 4, 2]]
    assert words.decode(out[0]) == "red green cube sphere"


def test_word_bad_vocab():
    with pytest.raises(ValueError, match="distinct"):
        WordTokenizer(["red", "RED"])
    with pytest.raises(ValueError, match="letters"):
        WordTokenizer(["two words"])
    with pytest.raises(TypeError):
        WordTokenizer("red green")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [123, None, b"bytes", ["ok", 5], [None]])
def test_non_str_text(bad, words):
    with pytest.raises(TypeError, match="str"):
        words(bad)
    with pytest.raises(TypeError, match="str"):
        ClipTokenizer([("a", "b")])(bad)


def test_non_str_encode_and_bad_context(words):
    with pytest.raises(TypeError, match="str"):
        words.encode(5)
    with pytest.raises(ValueError, match="context_length"):
        words("red", context_length=1)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        ClipTokenizer.from_file(tmp_path / "nope.txt.gz")
    with pytest.raises(FileNotFoundError, match="no tokenizer file in directory"):
        ClipTokenizer.from_file(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        ClipTokenizer.from_file(tmp_path / "vocab.json")


@pytest.mark.parametrize("name, content", [
    ("notes.txt", b"this is just some prose\nnot a tokenizer file\n"),
    ("bpe.txt.gz", b"not gzip data"),
    ("blob.bin", bytes(range(256))),
    ("tokenizer.json", b'{"model": {"type": "WordPiece", "vocab": {}}}'),
    ("list.json", b"[1, 2, 3]"),
    ("merges.txt", b"#version: 0.2\nqq zz\n"),  # merge of tokens that are not in the vocabulary
])
def test_not_a_tokenizer_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        ClipTokenizer.from_file(path)
