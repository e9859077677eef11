"""The CLIP byte-level BPE tokenizer, giving exactly the token ids OpenAI's CLIP gives.

Behaviour follows OpenAI CLIP's `simple_tokenizer.py`: clean the text (ftfy, HTML unescape
twice, collapse whitespace), lower-case it, split it with CLIP's regex, map each piece's UTF-8
bytes onto printable characters, then apply BPE merges by rank with '</w>' marking the end of a
word. The vocabulary is OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT, see data/LICENSE-CLIP),
shipped in fastdiff/data; a diffusers `tokenizer/` folder (vocab.json + merges.txt) can be read
instead. Nothing is fetched at run time.

ftfy is what CLIP uses to clean text; when it is not installed we fall back to NFC
normalisation, which is what ftfy's cleaning reduces to for well-formed text (it differs only
for mojibake, curly quotes, ligatures and full-width characters).

SD 2.x pads with id 0 ("!"). transformers, given a folder whose pad token is "!", also splits
every "!" in the text out as that special token ("wow!!!" -> ... 0 0 0); we tokenize the text
as OpenCLIP (which SD 2.x was trained with) and A1111 do ("!!!" is one token, 995).
"""
from __future__ import annotations

import functools
import gzip
import html
import json
import re
import unicodedata
from pathlib import Path

import regex

try:
    import ftfy
except ImportError:  # optional: see module docstring
    ftfy = None

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_BPE_PATH = DATA_DIR / "bpe_simple_vocab_16e6.txt.gz"

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77
N_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the 16e6 file

# CLIP's pre-tokenisation: the two special tokens, English contractions, runs of letters,
# single digits, runs of anything else that is not whitespace.
_PIECE_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE_RE = re.compile(r"\s+")  # stdlib re, as CLIP: its \s also takes \x1c-\x1f


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP byte -> character table: printable bytes map to themselves, the other 68
    bytes to the characters from U+0100 on, so every byte string is a printable str."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """CLIP's text cleaning and lower-casing (basic_clean + whitespace_clean + lower)."""
    text = ftfy.fix_text(text) if ftfy is not None else unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RE.sub(" ", text).strip().lower()


def clip_vocab_from_merges(merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's vocabulary as its id order defines it: the 256 byte characters, the same with
    '</w>', one token per merge, then the two special tokens."""
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    return vocab


def read_bpe_merges(path: str | Path = DEFAULT_BPE_PATH) -> list[tuple[str, str]]:
    """The merges CLIP uses from OpenAI's bpe_simple_vocab file (first line is a header)."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]


def write_clip_vocab(folder: str | Path, pad_token: str = EOS_TOKEN) -> str:
    """Write CLIP's vocabulary as a diffusers `tokenizer/` folder (vocab.json, merges.txt,
    tokenizer_config.json), derived from the shipped bpe file: what transformers' CLIPTokenizer
    and `CLIPTokenizer.from_folder` read. `pad_token`: "<|endoftext|>" (SD 1.x) or "!" (SD 2.x)."""
    merges = read_bpe_merges()
    vocab = clip_vocab_from_merges(merges)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": CONTEXT_LENGTH, "pad_token": pad_token}), encoding="utf-8")
    return str(folder)


class CLIPTokenizer:
    """CLIP BPE tokenizer. `pad_id` is 49407 (end token) for SD 1.x, 0 ("!") for SD 2.x.

    `encode(text)` gives the ids without BOS/EOS and without truncation; `__call__(text)` gives
    the 77 ids a diffusers pipeline feeds its text encoder (BOS, at most 75 tokens, EOS, pad).
    """

    def __init__(self, merges: list[tuple[str, str]] | None = None, vocab: dict[str, int] | None = None,
                 pad_id: int | None = None):
        if merges is None:
            merges = read_bpe_merges()
        if vocab is None:
            vocab = {tok: i for i, tok in enumerate(clip_vocab_from_merges(merges))}
        self.encoder = vocab
        self.decoder = {i: tok for tok, i in vocab.items()}
        self.bpe_ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_id = vocab[BOS_TOKEN]
        self.eos_id = vocab[EOS_TOKEN]
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.comma_id = vocab.get(",</w>")
        self.context_length = CONTEXT_LENGTH
        # Special tokens written in the text stay whole, as in CLIP.
        self._specials = {BOS_TOKEN: [self.bos_id], EOS_TOKEN: [self.eos_id]}
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path, pad_id: int | None = None) -> "CLIPTokenizer":
        """Read a diffusers/transformers `tokenizer/` folder: vocab.json + merges.txt, or
        tokenizer.json. The pad token comes from special_tokens_map.json/tokenizer_config.json
        unless `pad_id` is given (SD 2.x folders say "!", id 0)."""
        folder = Path(folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
            merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        elif (folder / "tokenizer.json").is_file():
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            vocab = model["vocab"]
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        else:
            raise FileNotFoundError(f"{folder}: no vocab.json + merges.txt or tokenizer.json")
        if pad_id is None:
            pad_token = _folder_pad_token(folder)
            if pad_token is not None:
                if pad_token not in vocab:
                    raise ValueError(f"{folder}: pad token {pad_token!r} is not in the vocabulary")
                pad_id = vocab[pad_token]
        return cls(merges=merges, vocab=vocab, pad_id=pad_id)

    # ---- encoding -----------------------------------------------------------------------
    def _bpe(self, piece: str) -> list[int]:
        """Ids of one pre-tokenised piece (already byte-mapped): merge the adjacent pair with
        the lowest rank until no pair is a known merge."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        word = [*piece[:-1], piece[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best_rank, best = None, None
            for pair in zip(word, word[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, pair
            if best is None:
                break
            first, second = best
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.encoder[tok] for tok in word]
        if len(self._cache) < 100_000:
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS/EOS, no truncation."""
        out: list[int] = []
        for piece in _PIECE_RE.findall(clean_text(text)):
            special = self._specials.get(piece)
            if special is not None:
                out.extend(special)
            else:
                out.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return out

    def __call__(self, text: str, truncate: bool = True) -> list[int]:
        """BOS + ids + EOS padded with pad_id to 77, as diffusers' `tokenizer(..., padding=
        "max_length", truncation=True)`; longer prompts are cut to 75 tokens (or rejected)."""
        ids = self.encode(text)
        n = self.context_length - 2
        if len(ids) > n:
            if not truncate:
                raise ValueError(f"prompt has {len(ids)} tokens, more than {n}")
            ids = ids[:n]
        ids = [self.bos_id, *ids, self.eos_id]
        return ids + [self.pad_id] * (self.context_length - len(ids))

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        text = bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()


def _folder_pad_token(folder: Path) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad is not None:
                return pad
    return None


@functools.lru_cache(maxsize=4)
def default_tokenizer(pad_id: int | None = None) -> CLIPTokenizer:
    """The shipped CLIP vocabulary; pad_id None/49407 for SD 1.x, 0 for SD 2.x."""
    return CLIPTokenizer(pad_id=pad_id)
