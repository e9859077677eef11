"""A1111 prompt syntax, chunking, textual-inversion slots and emphasis."""
import pytest
import torch

from fastdiff.prompts import (
    BREAK,
    apply_emphasis,
    empty_chunk,
    equalize_chunks,
    parse_attention,
    tokenize,
    tokenize_batch,
)
from fastdiff.tokenizer import CLIPTokenizer

BOS, EOS, COMMA = 49406, 49407, 267
CAT, DOG = 2368, 1929  # "cat</w>", "dog</w>"


@pytest.fixture(scope="module")
def tok():
    t = CLIPTokenizer()
    assert t.encode("cat dog ,") == [CAT, DOG, COMMA]
    return t


@pytest.fixture(scope="module")
def tok2():
    return CLIPTokenizer(pad_id=0)


# ---- parse_attention: A1111's documented examples (parse_prompt_attention's docstring) ----

A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize("text,expected", A1111_EXAMPLES)
def test_parse_a1111_examples(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", [("", 1.0)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
        ("(word:1.2)", [("word", 1.2)]),
        ("((word:1.2))", [("word", 1.2 * 1.1)]),
        ("[(word:1.5)]", [("word", 1.5 / 1.1)]),
        ("(a [b] c)", [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1.1)]),
        ("(word:-0.5)", [("word", -0.5)]),
        ("(word:.5)", [("word", 0.5)]),
        ("(word: 1.2)", [("word: 1.2", 1.1)]),  # A1111: no space allowed before the weight
        ("a:1.2) b] c)", [("a:1.2) b] c)", 1.0)]),  # closers with nothing open are text
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("a \\\\ b \\x", [("a \\ b x", 1.0)]),  # escaped backslash kept, stray one dropped
        ("time: 12:30", [("time: 12:30", 1.0)]),
        ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # not a number: text (A1111 raises here)
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("a\nBREAK\tb", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("BREAKFAST break BREAK", [("BREAKFAST break", 1.0), BREAK, ("", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # A1111's quirk, kept
    ],
)
def test_parse_more(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


# ---- chunking ----------------------------------------------------------------------------

def _words(word, n):
    return " ".join([word] * n)


def test_short_prompt(tok, tok2):
    p = tokenize("a photo of a cat", tok)
    assert len(p) == 1 and p.fixes == [] and p.token_count == 5
    assert p.ids[0] == [BOS, 320, 1125, 539, 320, CAT] + [EOS] * 71
    assert p.weights[0] == [1.0] * 77
    assert p.ids[0] == tok("a photo of a cat")
    p2 = tokenize("a photo of a cat", tok2)
    assert p2.ids[0] == [BOS, 320, 1125, 539, 320, CAT, EOS] + [0] * 70
    assert p2.ids[0] == tok2("a photo of a cat")


def test_empty_prompt(tok, tok2):
    assert tokenize("", tok).ids == [[BOS] + [EOS] * 76]
    assert tokenize("", tok2).ids == [[BOS, EOS] + [0] * 75]
    assert empty_chunk(tok2) == ([BOS, EOS] + [0] * 75, [1.0] * 77)


def test_weights_per_token(tok):
    p = tokenize("a (cat:1.5) [dog]", tok)
    assert p.ids[0][:5] == [BOS, 320, CAT, DOG, EOS]
    assert p.weights[0][:5] == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0])
    assert p.weights[0][5:] == [1.0] * 72


def test_emphasis_off_takes_text_literally(tok):
    p = tokenize("(cat) BREAK dog", tok, emphasis=False)
    assert len(p) == 1
    assert p.ids[0][1:6] == tok.encode("(cat) BREAK dog")
    assert set(p.weights[0]) == {1.0}


@pytest.mark.parametrize("n", [75, 76, 150, 151, 200])
def test_long_prompt_chunks(tok, tok2, n):
    for t in (tok, tok2):
        p = tokenize(_words("cat", n), t)
        n_chunks = -(-n // 75)
        assert len(p) == n_chunks and p.token_count == n
        for c in range(n_chunks):
            k = min(75, n - 75 * c)
            assert p.ids[c] == [BOS] + [CAT] * k + [EOS] + [t.pad_id if k < 75 else EOS] * (75 - k)
            assert len(p.weights[c]) == 77 and set(p.weights[c]) == {1.0}


def test_chunk_carries_weights(tok):
    p = tokenize(_words("cat", 70) + " (" + _words("dog", 10) + ":1.3)", tok)
    assert len(p) == 2
    assert p.weights[0][71:76] == pytest.approx([1.3] * 5) and p.weights[0][:71] == [1.0] * 71
    assert p.weights[1][1:6] == pytest.approx([1.3] * 5) and p.weights[1][6:] == [1.0] * 71


def test_break(tok):
    p = tokenize("a cat BREAK a dog", tok)
    assert len(p) == 2
    assert p.ids[0][:4] == [BOS, 320, CAT, EOS] and p.ids[1][:4] == [BOS, 320, DOG, EOS]
    assert p.token_count == 75 + 2
    # BREAK at the start leaves an empty first chunk; at the end it adds nothing.
    assert tokenize("BREAK cat", tok).ids[0] == [BOS] + [EOS] * 76
    assert len(tokenize("cat BREAK", tok)) == 1
    assert len(tokenize("a BREAK b BREAK c", tok)) == 3


def test_comma_backtrack(tok):
    prompt = _words("cat", 70) + ", " + _words("dog", 10)  # 81 tokens, comma at 70
    p = tokenize(prompt, tok)
    assert len(p) == 2
    assert p.ids[0] == [BOS] + [CAT] * 70 + [COMMA] + [EOS] * 5
    assert p.ids[1] == [BOS] + [DOG] * 10 + [EOS] * 66
    assert p.token_count == 75 + 10

    off = tokenize(prompt, tok, comma_padding_backtrack=0)
    assert off.ids[0] == [BOS] + [CAT] * 70 + [COMMA] + [DOG] * 4 + [EOS]
    assert off.ids[1] == [BOS] + [DOG] * 6 + [EOS] * 70


def test_comma_too_far_back(tok):
    prompt = _words("cat", 50) + ", " + _words("dog", 30)  # comma 25 tokens before the end
    p = tokenize(prompt, tok)
    assert p.ids[0] == [BOS] + [CAT] * 50 + [COMMA] + [DOG] * 24 + [EOS]
    assert p.ids[1][:8] == [BOS] + [DOG] * 6 + [EOS]
    q = tokenize(prompt, tok, comma_padding_backtrack=25)
    assert q.ids[0] == [BOS] + [CAT] * 50 + [COMMA] + [EOS] * 25


# ---- textual-inversion slots ---------------------------------------------------------------

def test_embedding_slots(tok):
    emb = {"myemb": 3}
    assert len(tok.encode("myemb")) >= 2  # a multi-token name
    p = tokenize("a photo of myemb, cat", tok, emb)
    assert p.fixes == [(0, 4, "myemb")]
    assert p.ids[0][:10] == [BOS, 320, 1125, 539, 0, 0, 0, COMMA, CAT, EOS]
    w = tokenize("a photo of (myemb:1.5)", tok, emb)
    assert w.fixes == [(0, 4, "myemb")] and w.weights[0][4:7] == [1.5] * 3
    # Case-insensitive like the tokenizer; whole tokens only.
    assert tokenize("MyEmb", tok, emb).fixes == [(0, 1, "myemb")]
    assert tokenize("myembx myem", tok, emb).fixes == []


def test_embedding_longest_name_first(tok):
    p = tokenize("cat dog cat", tok, {"cat": 1, "cat dog": 2})
    assert p.fixes == [(0, 1, "cat dog"), (0, 3, "cat")]
    assert p.ids[0][:5] == [BOS, 0, 0, 0, EOS]


def test_embedding_never_split_across_chunks(tok):
    p = tokenize(_words("cat", 73) + " myemb dog", tok, {"myemb": 4})
    assert len(p) == 2
    assert p.ids[0] == [BOS] + [CAT] * 73 + [EOS] * 3
    assert p.fixes == [(1, 1, "myemb")]
    assert p.ids[1][:7] == [BOS, 0, 0, 0, 0, DOG, EOS]


def test_embedding_moves_with_comma_backtrack(tok):
    p = tokenize(_words("cat", 70) + ", myemb " + _words("dog", 5), tok, {"myemb": 2})
    assert p.ids[0] == [BOS] + [CAT] * 70 + [COMMA] + [EOS] * 5
    assert p.ids[1][:9] == [BOS, 0, 0] + [DOG] * 5 + [EOS]
    assert p.fixes == [(1, 1, "myemb")]


def test_embedding_too_long(tok):
    with pytest.raises(ValueError):
        tokenize("x", tok, {"huge": 76})


# ---- batches -------------------------------------------------------------------------------

def test_equalize_chunks(tok, tok2):
    for t in (tok, tok2):
        short, long = tokenize("a cat", t), tokenize(_words("cat", 100), t)
        a, b = equalize_chunks([short, long], t)
        assert len(a) == len(b) == 2
        assert a.ids[0] == short.ids[0] and a.ids[1] == empty_chunk(t)[0] and a.weights[1] == [1.0] * 77
        assert b.ids == long.ids
        assert len(short) == 1  # inputs are not modified
        assert [len(p) for p in equalize_chunks([short], t, n_chunks=3)] == [3]
        with pytest.raises(ValueError):
            equalize_chunks([long], t, n_chunks=1)


def test_tokenize_batch(tok):
    b = tokenize_batch(["(myemb:1.2) cat", _words("dog", 80), "myemb"], tok, {"myemb": 2})
    assert b.n_chunks == 2
    assert b.ids.shape == b.weights.shape == (3, 154)
    assert b.ids.dtype == torch.long and b.weights.dtype == torch.float32
    assert b.fixes == [(0, 0, 1, "myemb"), (2, 0, 1, "myemb")]
    assert b.ids[0, :5].tolist() == [BOS, 0, 0, CAT, EOS]
    assert b.weights[0, 1:3].tolist() == pytest.approx([1.2, 1.2])
    assert b.ids[0, 77:].tolist() == [BOS] + [EOS] * 76
    assert b.ids[1, 77:84].tolist() == [BOS] + [DOG] * 5 + [EOS]


# ---- emphasis ------------------------------------------------------------------------------

def _emphasis_ref(z, w):
    """Per prompt and 77-token chunk: z * w rescaled to the chunk's original mean (fp64)."""
    z, w = z.double(), w.double()
    out = torch.empty_like(z)
    for b in range(z.shape[0]):
        for c in range(0, z.shape[1], 77):
            zc, wc = z[b, c : c + 77], w[b, c : c + 77]
            weighted = zc * wc[:, None]
            out[b, c : c + 77] = weighted * (zc.mean() / weighted.mean())
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("B,k,dim", [(1, 1, 16), (2, 2, 24), (3, 3, 8)])
def test_apply_emphasis_fp32(B, k, dim):
    g = torch.Generator().manual_seed(B * 100 + k)
    z = torch.randn(B, 77 * k, dim, generator=g) + 0.3
    w = 0.5 + torch.rand(B, 77 * k, generator=g)
    out = apply_emphasis(z, w)
    ref = _emphasis_ref(z, w)
    assert out.dtype == z.dtype and out.shape == z.shape and torch.isfinite(out).all()
    assert _rel(out, ref) <= 1e-5
    means = out.double().reshape(B, k, -1).mean(-1)
    assert torch.allclose(means, z.double().reshape(B, k, -1).mean(-1), rtol=1e-5, atol=1e-6)
    assert _rel(out, z) > 1e-2  # the weights did something


def test_apply_emphasis_fp16_and_identity():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(2, 154, 32, generator=g) + 0.2
    w = 0.5 + torch.rand(2, 154, generator=g)
    out16 = apply_emphasis(z.half(), w)
    assert out16.dtype == torch.float16
    assert _rel(out16, _emphasis_ref(z.half(), w)) <= 2e-3
    assert _rel(apply_emphasis(z, torch.ones(2, 154)), z) <= 1e-6


def test_apply_emphasis_zero_mean_output_stays_finite():
    """A text encoder whose final LayerNorm has no bias gives chunks averaging to exactly 0
    (here: every token's features sum to 0 exactly). Unweighted chunks must come back as they
    were, not 0/0 = NaN; weighted ones stay finite and keep their weighting."""
    g = torch.Generator().manual_seed(11)
    half = torch.randint(-4, 5, (2, 154, 8), generator=g).double()
    z = torch.cat([half, -half], dim=-1)  # each token's 16 features sum to exactly 0
    assert (z.reshape(2, 2, -1).mean(-1) == 0).all()
    w = torch.ones(2, 154, dtype=torch.float64)
    assert torch.equal(apply_emphasis(z, w), z)
    w[0, 5] = 1.3  # chunk (0, 0) weighted, its mean is still 0
    out = apply_emphasis(z, w)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 5], 1.3 * z[0, 5])
    torch.testing.assert_close(out[1], z[1])
    # Elsewhere the rescale is A1111's, to the last bit for unweighted chunks.
    z2 = torch.randn(1, 77, 16, generator=g) + 0.2
    assert torch.equal(apply_emphasis(z2, torch.ones(1, 77)), z2)


def test_apply_emphasis_with_prompt_weights(tok):
    b = tokenize_batch(["a (cat:1.4) [dog]", "plain"], tok)
    z = torch.randn(2, 77 * b.n_chunks, 12, generator=torch.Generator().manual_seed(3)) + 0.1
    assert _rel(apply_emphasis(z, b.weights), _emphasis_ref(z, b.weights)) <= 1e-5
    with pytest.raises(ValueError):
        apply_emphasis(z[:, :70], b.weights[:, :70])
