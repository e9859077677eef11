"""A1111 prompt syntax: attention weights, BREAK, 75-token chunks, textual-inversion slots.

Behaviour reproduces AUTOMATIC1111 stable-diffusion-webui (modules/prompt_parser.py
`parse_prompt_attention`, modules/sd_hijack_clip.py `tokenize_line`, modules/sd_emphasis.py
"Original"), so that prompts written for A1111 give the same token ids, weights and chunks:

- `(text)` multiplies by 1.1, `[text]` divides by 1.1, `(text:w)` multiplies by w; nesting
  multiplies; brackets left open at the end still apply to everything after them; closers with
  nothing open are plain text; `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters and any other
  backslash is dropped.
- `BREAK` (a whole word, upper case) ends the current chunk.
- A prompt is cut into chunks of 75 tokens, each sent to CLIP as BOS + 75 + EOS (77). When a
  chunk fills up and a comma lies within the last `comma_padding_backtrack` (20) tokens, the
  words after that comma move to the next chunk.
- A textual-inversion name found in the token stream takes n_vectors token slots, never split
  across chunks; the pipeline writes the embedding's vectors into those slots.

Where A1111 differs from itself or fails we choose: a weight that is not a number, e.g.
`(a:1.2.3)`, is kept as text (A1111 raises); embedding slots moved by the comma backtrack keep
their vectors (A1111 leaves the fix behind in the previous chunk).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from fastdiff.tokenizer import CLIPTokenizer

CHUNK_LENGTH = 75  # prompt tokens per chunk; + BOS + EOS = 77
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)  # the marker parse_attention puts where a BREAK was

# One lexical item of the attention syntax, tried in this order (the order matters: an escaped
# bracket must win over a bracket, a weighted closer over a plain colon).
_ITEM_RE = re.compile(
    r"""
    (?P<escaped>\\[()\[\]\\]) |   # literal bracket or backslash
    (?P<backslash>\\) |           # a stray backslash: dropped
    (?P<open>[(\[]) |
    :(?P<weight>[+-]?[.\d]+)\) |  # ':1.2)' closes a round bracket with that weight
    (?P<close>[)\]]) |
    (?P<text>[^\\()\[\]:]+|:)
    """,
    re.X,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into (text, weight) runs; a BREAK shows up as ("BREAK", -1.0).

    >>> parse_attention('an (important) word')
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    runs: list[list] = []  # [text, weight]; weights are multiplied in place as brackets close
    open_round: list[int] = []  # index in runs where each open bracket started
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    def add_text(s: str) -> None:
        for i, part in enumerate(_BREAK_RE.split(s)):
            if i:
                runs.append(list(BREAK))
            runs.append([part, 1.0])

    for m in _ITEM_RE.finditer(text):
        kind = m.lastgroup
        if kind == "escaped":
            runs.append([m.group()[1], 1.0])
        elif kind == "backslash":
            runs.append(["", 1.0])
        elif kind == "open":
            (open_round if m.group() == "(" else open_square).append(len(runs))
        elif kind == "weight" and open_round:
            try:
                factor = float(m.group("weight"))
            except ValueError:  # e.g. '1.2.3': not a weight, keep it as text
                add_text(m.group())
            else:
                scale_from(open_round.pop(), factor)
        elif kind == "close" and m.group() == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif kind == "close" and m.group() == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # text, or a closer / weighted closer with nothing open
            add_text(m.group())

    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    if not runs:
        return [("", 1.0)]
    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


@dataclass
class PromptTokens:
    """One prompt as CLIP chunks. ids/weights: [n_chunks][77] (BOS, 75 tokens, EOS/pad; weight
    1.0 on BOS, EOS and padding). fixes: (chunk, position, name): the embedding `name` fills
    ids[chunk][position : position + n_vectors] (position counts the BOS, so it is >= 1)."""

    ids: list[list[int]]
    weights: list[list[float]]
    fixes: list[tuple[int, int, str]] = field(default_factory=list)
    token_count: int = 0  # prompt tokens, counted as A1111's UI does

    def __len__(self) -> int:
        return len(self.ids)

    def ids_tensor(self) -> torch.Tensor:
        return torch.tensor(self.ids, dtype=torch.long).reshape(-1)  # [77 * n_chunks]

    def weights_tensor(self) -> torch.Tensor:
        return torch.tensor(self.weights, dtype=torch.float32).reshape(-1)  # [77 * n_chunks]


def _embedding_index(tokenizer: CLIPTokenizer, embeddings: dict[str, int]) -> dict[int, list]:
    """first token id -> [(ids of the name, name, n_vectors)], longest name first, so that
    matching is on whole BPE tokens as A1111 does."""
    index: dict[int, list] = {}
    for name, n_vectors in embeddings.items():
        n_vectors = int(n_vectors)
        if not 1 <= n_vectors <= CHUNK_LENGTH:
            raise ValueError(f"embedding {name!r}: {n_vectors} vectors; a chunk holds 1..{CHUNK_LENGTH}")
        ids = tokenizer.encode(name)
        if ids:
            index.setdefault(ids[0], []).append((ids, name, n_vectors))
    for candidates in index.values():
        candidates.sort(key=lambda c: len(c[0]), reverse=True)
    return index


def _finish_chunk(tokens: list[int], weights: list[float], tokenizer: CLIPTokenizer) -> tuple[list[int], list[float]]:
    """BOS + tokens + EOS, then the end token up to 77 for SD 1.x, or pad_id after the first
    EOS for SD 2.x (A1111 writes the pad over everything after the first end token)."""
    fill = CHUNK_LENGTH - len(tokens)
    ids = [tokenizer.bos_id, *tokens, *[tokenizer.eos_id] * fill, tokenizer.eos_id]
    if tokenizer.pad_id != tokenizer.eos_id:
        end = ids.index(tokenizer.eos_id)
        ids[end + 1 :] = [tokenizer.pad_id] * (len(ids) - end - 1)
    return ids, [1.0, *weights, *[1.0] * fill, 1.0]


def empty_chunk(tokenizer: CLIPTokenizer) -> tuple[list[int], list[float]]:
    """The chunk of an empty prompt: BOS, EOS, padding; all weights 1."""
    return _finish_chunk([], [], tokenizer)


def tokenize(prompt: str, tokenizer: CLIPTokenizer, embeddings: dict[str, int] | None = None, *,
             emphasis: bool = True, comma_padding_backtrack: int = 20) -> PromptTokens:
    """Token ids, weights and embedding slots of one A1111 prompt, in 77-token chunks.

    embeddings: textual-inversion name -> number of vectors. emphasis=False takes the prompt
    literally (A1111's emphasis "None": no brackets, no BREAK)."""
    runs = parse_attention(prompt) if emphasis else [(prompt, 1.0)]
    index = _embedding_index(tokenizer, embeddings) if embeddings else {}
    comma = tokenizer.comma_id

    out = PromptTokens(ids=[], weights=[])
    tokens: list[int] = []  # the chunk being filled, without BOS/EOS
    weights: list[float] = []
    fixes: list[tuple[int, str]] = []  # (offset in `tokens`, name)
    last_comma = -1

    def close_chunk(last: bool = False) -> None:
        nonlocal tokens, weights, fixes, last_comma
        out.token_count += len(tokens) if last else CHUNK_LENGTH
        ids, w = _finish_chunk(tokens, weights, tokenizer)
        chunk = len(out.ids)
        out.ids.append(ids)
        out.weights.append(w)
        out.fixes.extend((chunk, offset + 1, name) for offset, name in fixes)
        tokens, weights, fixes, last_comma = [], [], [], -1

    for text, weight in runs:
        if (text, weight) == BREAK:
            close_chunk()
            continue
        ids = tokenizer.encode(text)
        pos = 0
        while pos < len(ids):
            token = ids[pos]
            if token == comma:
                last_comma = len(tokens)
            elif (comma_padding_backtrack and len(tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(tokens) - last_comma <= comma_padding_backtrack):
                # The chunk is full and a comma is near its end: what follows the comma moves on.
                cut = last_comma + 1
                tail = (tokens[cut:], weights[cut:], [(o - cut, n) for o, n in fixes if o >= cut])
                tokens, weights = tokens[:cut], weights[:cut]
                fixes = [(o, n) for o, n in fixes if o < cut]
                close_chunk()
                tokens, weights, fixes = tail
            if len(tokens) == CHUNK_LENGTH:
                close_chunk()

            match = next((c for c in index.get(token, ()) if ids[pos : pos + len(c[0])] == c[0]), None)
            if match is None:
                tokens.append(token)
                weights.append(weight)
                pos += 1
                continue
            name_ids, name, n_vectors = match
            if len(tokens) + n_vectors > CHUNK_LENGTH:
                close_chunk()
            fixes.append((len(tokens), name))
            tokens += [0] * n_vectors  # placeholder ids; the vectors replace their embeddings
            weights += [weight] * n_vectors
            pos += len(name_ids)

    if tokens or not out.ids:
        close_chunk(last=True)
    return out


def equalize_chunks(batch: list[PromptTokens], tokenizer: CLIPTokenizer, n_chunks: int | None = None) -> list[PromptTokens]:
    """Pad every prompt with empty chunks to the batch's largest chunk count (or `n_chunks`,
    e.g. to match prompts with their negative prompts), as A1111 does within a batch."""
    target = max(len(p) for p in batch)
    if n_chunks is not None:
        if n_chunks < target:
            raise ValueError(f"n_chunks={n_chunks} is fewer than the longest prompt's {target} chunks")
        target = n_chunks
    ids, weights = empty_chunk(tokenizer)
    return [
        PromptTokens(
            ids=p.ids + [list(ids) for _ in range(target - len(p))],
            weights=p.weights + [list(weights) for _ in range(target - len(p))],
            fixes=list(p.fixes),
            token_count=p.token_count,
        )
        for p in batch
    ]


@dataclass
class BatchTokens:
    """A batch of prompts with equal chunk counts. ids: [B, 77 * n_chunks] long; weights:
    [B, 77 * n_chunks] float32; fixes: (row, chunk, position, name), the embedding filling
    ids[row, chunk * 77 + position :][:n_vectors]. Encode as ids.view(B * n_chunks, 77)."""

    ids: torch.Tensor
    weights: torch.Tensor
    fixes: list[tuple[int, int, int, str]]
    n_chunks: int


def tokenize_batch(prompts: list[str], tokenizer: CLIPTokenizer, embeddings: dict[str, int] | None = None, *,
                   n_chunks: int | None = None, **kwargs) -> BatchTokens:
    """tokenize() each prompt, equalize_chunks() them, and stack the result as tensors."""
    cache: dict[str, PromptTokens] = {}
    for p in prompts:
        if p not in cache:
            cache[p] = tokenize(p, tokenizer, embeddings, **kwargs)
    batch = equalize_chunks([cache[p] for p in prompts], tokenizer, n_chunks)
    return BatchTokens(
        ids=torch.stack([p.ids_tensor() for p in batch]),
        weights=torch.stack([p.weights_tensor() for p in batch]),
        fixes=[(row, *fix) for row, p in enumerate(batch) for fix in p.fixes],
        n_chunks=len(batch[0]),
    )


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, chunk_length: int = CHUNK_LENGTH + 2) -> torch.Tensor:
    """A1111's "Original" emphasis: z * weight per token, then rescale each prompt's chunk so
    its mean over tokens and channels is what it was before weighting.

    z: [B, 77 * k, dim] text-encoder output; weights: [B, 77 * k]. A1111 encodes one prompt
    per call, one 77-token chunk at a time, so the mean is taken per (prompt, chunk). The
    arithmetic runs in fp32 (fp64 for fp64 input) and the result has z's dtype."""
    B, L, dim = z.shape
    if weights.shape != (B, L) or L % chunk_length:
        raise ValueError(f"z {tuple(z.shape)} and weights {tuple(weights.shape)} do not match in 77-token chunks")
    compute = torch.float64 if z.dtype == torch.float64 else torch.float32
    zc = z.to(compute).reshape(B, L // chunk_length, chunk_length, dim)  # [B, k, 77, dim]
    w = weights.to(device=z.device, dtype=compute).reshape(B, L // chunk_length, chunk_length, 1)
    before = zc.mean(dim=(2, 3), keepdim=True)
    weighted = zc * w
    after = weighted.mean(dim=(2, 3), keepdim=True)
    # A chunk whose weights are all 1 stays as it is: A1111's ratio is exactly 1 there, except
    # 0/0 = NaN when the encoder's output averages to exactly zero (a final LayerNorm without
    # bias does that). A weighted chunk that averages to zero cannot be rescaled; it keeps its
    # weighting rather than becoming NaN.
    keep = (w == 1).all(dim=(2, 3), keepdim=True) | (after == 0)
    ratio = torch.where(keep, torch.ones_like(after), before / after)
    return (weighted * ratio).reshape(B, L, dim).to(z.dtype)


# ---------------------------------------------------------------------- extra networks

# A1111's extra-network tags (modules/extra_networks.py): `<kind:name[:arg...]>`, e.g.
# `<hypernet:anime:0.8>` or `<lora:style:0.7:0.5>`. They are removed from the text before it is
# tokenized; what is left (spaces, commas around the tag) stays as written, as in A1111.
_EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")


def parse_extra_networks(text: str) -> tuple[str, list[tuple[str, str, list[str]]]]:
    """-> (text without the tags, [(kind, name, [args...]), ...]) in the order written.

    >>> parse_extra_networks("a cat <hypernet:ink:0.5>")
    ('a cat ', [('hypernet', 'ink', ['0.5'])])
    """
    found = []

    def take(m):
        name, *args = m.group(2).split(":")
        found.append((m.group(1), name, args))
        return ""

    return _EXTRA_NETWORK_RE.sub(take, text), found


HYPERNETWORK_EXTENSIONS = (".pt", ".safetensors", ".ckpt", ".bin")


def resolve_in_dir(directory, name: str, extensions=HYPERNETWORK_EXTENSIONS, *, what: str = "file") -> str:
    """The file `name` (with or without its extension) directly inside `directory`. A name
    with a path separator, `..` or a drive is refused: names never reach outside the folder."""
    import os

    if not name or name in (".", "..") or any(c in name for c in "/\\:\0") or os.path.isabs(name):
        raise ValueError(f"{what} name {name!r} is refused: give a name inside the folder, not a path")
    entries = {e.name: e.path for e in os.scandir(directory) if e.is_file()}
    for candidate in (name, *(name + ext for ext in extensions)):
        if candidate in entries and candidate.lower().endswith(tuple(extensions)):
            return entries[candidate]
    raise ValueError(f"unknown {what} {name!r}; {directory} has none of that name")


def hypernetwork_tags(prompt, directory):
    """Take `<hypernet:NAME[:MULTIPLIER]>` tags out of a prompt (or each prompt of a list) and
    resolve each NAME inside `directory`. -> (prompt(s) without them, [(path, multiplier)]).
    A name tagged twice is applied once, at its first multiplier. Other kinds of tag are an
    error: this engine has nothing to apply them with."""
    import math

    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    cleaned, pairs, seen = [], [], set()
    for text in texts:
        if not isinstance(text, str):
            return prompt, []  # check_request names the bad prompt
        text, tags = parse_extra_networks(text)
        cleaned.append(text)
        for kind, name, args in tags:
            if kind != "hypernet":
                raise ValueError(f"prompt: <{kind}:...> extra networks are not supported (only <hypernet:...>)")
            try:
                multiplier = float(args[0]) if args and args[0] != "" else 1.0
            except ValueError:
                raise ValueError(f"prompt: <hypernet:{name}:...> multiplier {args[0]!r} is not a number") from None
            if not math.isfinite(multiplier):
                raise ValueError(f"prompt: <hypernet:{name}:...> multiplier must be finite, got {args[0]!r}")
            path = resolve_in_dir(directory, name, what="hypernetwork")
            if path not in seen:
                seen.add(path)
                pairs.append((path, multiplier))
    return (cleaned[0] if isinstance(prompt, str) else cleaned), pairs
