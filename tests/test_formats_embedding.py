"""Textual-inversion embeddings: A1111 .pt, A1111 .safetensors, diffusers learned_embeds."""
import pytest
import torch

from checkpoints import save_safetensors
from fastdiff.formats import Embedding, FormatError, load_embedding


def _vecs(n, dim, seed):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_a1111_pt_multi_vector(tmp_path):
    vec = _vecs(4, 768, 0)
    p = tmp_path / "my-style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vec)},
                "name": "stored-name", "step": 3000, "sd_checkpoint": "abc", "sd_checkpoint_name": "x"}, p)
    e = load_embedding(str(p))
    assert isinstance(e, Embedding) and e.name == "my-style"  # A1111 triggers by file name
    assert e.vectors.shape == (4, 768) and e.num_vectors == 4 and e.width == 768
    assert torch.equal(e.vectors, vec) and not e.vectors.requires_grad
    assert load_embedding(str(p), name="other").name == "other"


def test_original_ti_parameterdict(tmp_path):
    """rinongal's textual_inversion saved string_to_param as an nn.ParameterDict."""
    vec = _vecs(2, 768, 1)
    p = tmp_path / "old.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)},
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec)})}, p)
    e = load_embedding(str(p))
    assert torch.equal(e.vectors, vec)


def test_a1111_safetensors(tmp_path):
    vec = _vecs(3, 1024, 2)
    p = save_safetensors({"emb_params": vec}, str(tmp_path / "sd2-thing.safetensors"))
    e = load_embedding(p)
    assert e.name == "sd2-thing" and torch.equal(e.vectors, vec)
    e.check_width(1024)


@pytest.mark.parametrize("ext", ["bin", "safetensors"])
def test_diffusers_learned_embeds(tmp_path, ext):
    one = _vecs(1, 768, 3)[0]
    p = tmp_path / f"learned_embeds.{ext}"
    if ext == "bin":
        torch.save({"<cat-toy>": one}, p)
    else:
        save_safetensors({"<cat-toy>": one}, str(p))
    e = load_embedding(str(p))
    assert e.name == "<cat-toy>" and e.vectors.shape == (1, 768) and torch.equal(e.vectors[0], one)
    # multi-vector: [n, dim] under one token, or several tokens in order
    multi = _vecs(3, 768, 4)
    torch.save({"<m>": multi}, tmp_path / "multi.bin")
    assert torch.equal(load_embedding(str(tmp_path / "multi.bin")).vectors, multi)
    torch.save({"<m>": multi[0], "<m>_1": multi[1], "<m>_2": multi[2]}, tmp_path / "split.bin")
    assert torch.equal(load_embedding(str(tmp_path / "split.bin")).vectors, multi)


def test_width_mismatch_message(tmp_path):
    p = save_safetensors({"emb_params": _vecs(2, 1024, 5)}, str(tmp_path / "X.safetensors"))
    e = load_embedding(p)
    with pytest.raises(FormatError) as err:
        e.check_width(768)
    assert "embedding X has width 1024, the model's text encoder expects 768 (SD 2.x embedding into an SD 1.x model?)" in str(err.value)
    with pytest.raises(FormatError, match=r"SD 1\.x embedding into an SD 2\.x model"):
        Embedding("Y", _vecs(1, 768, 6)).check_width(1024)
    with pytest.raises(FormatError, match="width 64, the model's text encoder expects 128$"):
        Embedding("Z", _vecs(1, 64, 6)).check_width(128)


def test_refusals(tmp_path):
    xl = save_safetensors({"clip_l": _vecs(2, 768, 7), "clip_g": _vecs(2, 1280, 8)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(FormatError, match=r"xl\.safetensors: an SDXL embedding"):
        load_embedding(xl)
    p = tmp_path / "two.pt"
    torch.save({"string_to_param": {"*": _vecs(1, 768, 9), "+": _vecs(1, 768, 9)}}, p)
    with pytest.raises(FormatError, match="exactly one tensor"):
        load_embedding(str(p))
    torch.save({"name": "no tensors here"}, p)
    with pytest.raises(FormatError, match="not a textual-inversion embedding"):
        load_embedding(str(p))
    torch.save({"emb_params": torch.ones(2, 3, 4)}, p)
    with pytest.raises(FormatError, match=r"emb_params has shape \[2, 3, 4\]"):
        load_embedding(str(p))
    png = tmp_path / "emb.pt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(FormatError, match="PNG image"):
        load_embedding(str(png))
