"""CLIP tokenizer: ids must equal transformers' CLIPTokenizer built from the vocabulary as
OpenAI CLIP defines it (derived here independently from the shipped bpe file)."""
import html
import json
import random
import unicodedata
from pathlib import Path

import pytest

from fastdiff import tokenizer as tokmod
from fastdiff.tokenizer import CLIPTokenizer, write_clip_vocab

BOS, EOS = 49406, 49407

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "masterpiece, best quality, (1girl:1.2), solo!!! looking at viewer...",
    "what's this? it's 100% the cat's pajamas; they're here -- we'll see/maybe",
    "café crème brûlée, naïve façade, Ångström, Straße",
    "e\u0301te\u0301 (decomposed accents)",
    "東京の夜景, 猫, 고양이, кошка",
    "emoji 🐱🐶 🚀✨ 👩‍👩‍👧 flag 🇯🇵",
    "3.14159 1234567890 1st 2nd 20x30 0.5",
    "   lots \t of\n\n  whitespace   ",
    "fish &amp; chips &lt;3 &quot;quoted&quot; &#39;x&#39; &amp;amp;",
    "<|startoftext|>special<|endoftext|> tokens",
    "under_score hyphen-ated CamelCase #hashtag @user $5 ~tilde^ {braces} |pipe|",
    "",
    "!",
    " ".join(f"word{i}" for i in range(60)),  # > 77 tokens
]


def _clip_clean(text):
    """CLIP's basic_clean (ftfy when installed, HTML unescape twice); transformers' fast
    tokenizer does NFC, whitespace and lower-casing but not this step."""
    if tokmod.ftfy is not None:
        text = tokmod.ftfy.fix_text(text)
    return html.unescape(html.unescape(text))


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    """vocab.json + merges.txt as OpenAI CLIP defines its vocabulary from the bpe file."""
    return Path(write_clip_vocab(tmp_path_factory.mktemp("clip_vocab")))


@pytest.fixture(scope="module")
def ref(vocab_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(vocab_dir))


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


def test_vocab_matches_reference_definition(tok, ref, vocab_dir):
    expected = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    assert tok.vocab_size == len(expected) == 49408
    assert tok.encoder == expected
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.comma_id) == (BOS, EOS, EOS, 267)
    assert (ref.bos_token_id, ref.eos_token_id) == (BOS, EOS)


def test_known_ids(tok):
    assert tok("a photo of a cat")[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.encode("A  PHOTO\tof a cat ") == [320, 1125, 539, 320, 2368]
    assert tok.encode("cat, cat") == [2368, 267, 2368]
    assert tok.encode("<|startoftext|><|endoftext|>") == [BOS, EOS]
    assert tok.encode("fish &amp;amp; chips") == tok.encode("fish & chips")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_transformers(tok, ref, prompt):
    expected = ref(_clip_clean(prompt), add_special_tokens=False)["input_ids"]
    assert tok.encode(prompt) == expected


@pytest.mark.parametrize("prompt", PROMPTS)
def test_padded_and_truncated_match_transformers(tok, ref, prompt):
    expected = ref(_clip_clean(prompt), padding="max_length", max_length=77, truncation=True)["input_ids"]
    got = tok(prompt)
    assert len(got) == 77 and got == expected


def test_long_prompt_truncation(tok):
    long = " ".join(["cat"] * 100)
    ids = tok(long)
    assert ids == [BOS] + [2368] * 75 + [EOS]
    with pytest.raises(ValueError):
        tok(long, truncate=False)


def test_sd2_pad_with_zero(ref, vocab_dir):
    import transformers

    ref2 = transformers.CLIPTokenizer.from_pretrained(str(vocab_dir), pad_token="!")
    tok2 = CLIPTokenizer(pad_id=0)
    # transformers makes the pad token "!" a special token that is split out of the text
    # ("!!!" -> 0 0 0); OpenCLIP, which SD 2.x was trained with, gives "!!!" -> 995 as we do.
    assert tok2.encode("wow!!!") == [2781, 995]
    for prompt in (p for p in PROMPTS if "!" not in p):
        expected = ref2(_clip_clean(prompt), padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert tok2(prompt) == expected
    assert tok2("a cat")[:6] == [BOS, 320, 2368, EOS, 0, 0]


def test_random_strings_match_transformers(tok, ref):
    rng = random.Random(1234)
    pool = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 ,.;:!?'\"()[]{}<>-_/\\&#%*+=|~`^@$") + list(
        "  \t\néèüößçñåø中文字猫犬日本語한국어жизнь🐱🚀✨€£¥©®™"
    )
    for _ in range(200):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.3:
            text = text.replace(rng.choice("aeiou"), "'s ")
        assert tok.encode(text) == ref(_clip_clean(text), add_special_tokens=False)["input_ids"], repr(text)


def test_decode_roundtrip(tok):
    text = "hello, wörld! 猫 🐱 3.5"
    assert tok.decode(tok.encode(text)) == "hello , wörld ! 猫 🐱 3 . 5"


def test_without_ftfy_falls_back_to_nfc(tok, monkeypatch):
    monkeypatch.setattr(tokmod, "ftfy", None)
    composed = unicodedata.normalize("NFC", "e\u0301te\u0301")
    assert tok.encode("E\u0301te\u0301 &amp;") == tok.encode(composed + " &")
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_from_folder_vocab_merges(vocab_dir, tmp_path, tok):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((vocab_dir / name).read_bytes())
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    t = CLIPTokenizer.from_folder(folder)
    assert t.pad_id == 0 and t.eos_id == EOS and t.bos_id == BOS
    for prompt in PROMPTS:
        assert t.encode(prompt) == tok.encode(prompt)
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    assert CLIPTokenizer.from_folder(folder).pad_id == EOS
    assert CLIPTokenizer.from_folder(folder, pad_id=0).pad_id == 0


def test_from_folder_tokenizer_json(ref, tmp_path, tok):
    ref.save_pretrained(str(tmp_path))
    folder = tmp_path / "only_json"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    t = CLIPTokenizer.from_folder(folder)
    for prompt in PROMPTS:
        assert t.encode(prompt) == tok.encode(prompt)


def test_from_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        CLIPTokenizer.from_folder(tmp_path)
