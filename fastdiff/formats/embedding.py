"""Textual-inversion embeddings: A1111 .pt ({'string_to_param': {'*': [n, dim]}, 'name': ...}),
A1111 .safetensors ({'emb_params': [n, dim]}), diffusers learned_embeds ({token: [dim] or
[n, dim]}, .bin or .safetensors). SDXL embeddings (clip_l / clip_g) are refused.

The prompt trigger (`Embedding.name`) is the file name without extension, as A1111 does; for
diffusers files named learned_embeds.* it is the stored token instead."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .files import FormatError, check_finite, load_pickle, safetensors_header, sniff

MAX_VECTORS = 75  # one CLIP chunk
MAX_WIDTH = 4096  # SD 1.x is 768 wide, SD 2.x 1024


@dataclass
class Embedding:
    name: str
    vectors: torch.Tensor  # [n, dim]
    path: str = ""

    @property
    def num_vectors(self) -> int:
        return self.vectors.shape[0]

    @property
    def width(self) -> int:
        return self.vectors.shape[1]

    def check_width(self, width: int) -> "Embedding":
        """Raise FormatError unless the vectors are `width` wide (the text encoder's hidden size)."""
        check_embedding_width(self, width)
        return self


def check_embedding_width(emb: Embedding, width: int) -> None:
    if emb.width == width:
        return
    hint = ""
    if emb.width == 1024 and width == 768:
        hint = " (SD 2.x embedding into an SD 1.x model?)"
    elif emb.width == 768 and width == 1024:
        hint = " (SD 1.x embedding into an SD 2.x model?)"
    raise FormatError(
        f"embedding {emb.name} has width {emb.width}, the model's text encoder expects {width}{hint}"
        + (f" [{emb.path}]" if emb.path else "")
    )


def _as_matrix(t, path: str, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"{path}: {what} is a {type(t).__name__}, expected a tensor")
    t = t.detach()
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[0] == 0:
        raise FormatError(f"{path}: {what} has shape {list(t.shape)}, expected [n, dim] or [dim]")
    if not t.is_floating_point():
        raise FormatError(f"{path}: {what} has dtype {t.dtype}, expected floating point")
    _check_size(t.shape, path, what)
    check_finite(t, path, what)
    return t.float().clone()


def _check_size(shape, path: str, what: str) -> None:
    n, width = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[-1])
    if len(shape) == 2 and n > MAX_VECTORS:
        raise FormatError(f"{path}: {what} has {n} vectors; a prompt chunk holds at most {MAX_VECTORS}")
    if width > MAX_WIDTH:
        raise FormatError(f"{path}: {what} is {width} wide; text encoders are at most {MAX_WIDTH}")


def _from_dict(data: dict, path: str) -> tuple[torch.Tensor, str | None]:
    """(vectors, stored token or None) from whatever dict an embedding file holds."""
    if "clip_l" in data or "clip_g" in data:
        raise FormatError(f"{path}: an SDXL embedding (clip_l/clip_g); fastdiff supports SD 1.x/2.x embeddings only")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if hasattr(params, "_parameters"):  # torch.nn.ParameterDict in the original TI code
            params = dict(params._parameters)
        if not isinstance(params, dict) or len(params) != 1:
            raise FormatError(f"{path}: string_to_param must hold exactly one tensor, found "
                              f"{len(params) if isinstance(params, dict) else type(params).__name__}")
        return _as_matrix(next(iter(params.values())), path, "string_to_param"), None
    if "emb_params" in data:
        return _as_matrix(data["emb_params"], path, "emb_params"), None
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) == len(data):
        # diffusers learned_embeds: {token: [dim]} (several tokens for a multi-vector one, in order)
        if len(tensors) > MAX_VECTORS:
            raise FormatError(f"{path}: {len(tensors)} token tensors; a prompt chunk holds at most {MAX_VECTORS}")
        mats = [_as_matrix(v, path, repr(k)) for k, v in tensors.items()]
        widths = {m.shape[1] for m in mats}
        if len(widths) != 1:
            raise FormatError(f"{path}: tokens have different widths {sorted(widths)}")
        vectors = torch.cat(mats)
        if vectors.shape[0] > MAX_VECTORS:
            raise FormatError(f"{path}: {vectors.shape[0]} vectors; a prompt chunk holds at most {MAX_VECTORS}")
        return vectors, str(next(iter(tensors)))
    raise FormatError(f"{path}: no string_to_param / emb_params / token tensors: not a textual-inversion embedding "
                      f"(keys: {list(data)[:5]})")


def load_embedding(path: str, name: str | None = None) -> Embedding:
    """Read one textual-inversion embedding file."""
    kind = sniff(path)
    if kind == "safetensors":
        # sizes come from the header; the data is read only once they are known to be small
        header = {k: v for k, v in safetensors_header(path).items() if k != "__metadata__"}
        if len(header) > MAX_VECTORS:
            raise FormatError(f"{path}: {len(header)} tensors; not a textual-inversion embedding")
        for k, v in header.items():
            if len(v["shape"]) not in (1, 2):
                raise FormatError(f"{path}: {k!r} has shape {v['shape']}, expected [n, dim] or [dim]")
            _check_size(v["shape"], path, repr(k))
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                data = {k: f.get_tensor(k) for k in header}
        except Exception as e:
            raise FormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    elif kind in ("torch-zip", "pickle"):
        if kind == "pickle" and os.path.getsize(path) > 64 * 1024 * 1024:  # read whole: no mmap for legacy pickles
            raise FormatError(f"{path}: {os.path.getsize(path)} bytes is far too large for a textual-inversion embedding")
        data = load_pickle(path, mmap=True, extra_safe_globals=(torch.nn.ParameterDict,))
        if not isinstance(data, dict):
            raise FormatError(f"{path}: expected a dict, found {type(data).__name__}: not an embedding")
    else:
        raise FormatError(f"{path}: is a directory, expected an embedding file")
    vectors, token = _from_dict(data, path)
    stem = os.path.splitext(os.path.basename(path))[0]
    if name is None:
        name = token if (token and stem.startswith("learned_embeds")) else stem
    return Embedding(name=name, vectors=vectors, path=path)
