"""Opening weight files safely: content sniffing, lazy safetensors access, pickles only through
``torch.load(weights_only=True)``.

Everything that can go wrong with a user's file (wrong type, truncated, a pickle that wants to run
code) surfaces as a :class:`FormatError` that names the file.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any

import torch


class FormatError(ValueError):
    """A weight file or folder that fastdiff cannot (or will not) read. The message names the
    file and, where it applies, the key and shapes involved."""


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

# Magic numbers of things people rename to .safetensors/.ckpt by mistake.
_FOREIGN_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"GGUF", "a GGUF file (llama.cpp / stable-diffusion.cpp quantised weights)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"<", "an HTML/XML document (a failed download?)"),
    (b"version https://git-lfs", "a Git LFS pointer, not the weights themselves"),
)


def sniff(path: str) -> str:
    """What a path holds, judged by content: 'directory', 'safetensors', 'torch-zip' (torch.save
    since 1.6), or 'pickle' (legacy torch.save / plain pickle)."""
    if os.path.isdir(path):
        return "directory"
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file or directory")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise FormatError(f"{path}: the file is empty")
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "pickle"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        raise FormatError(f"{path} is a WebP image, not a weight file")
    for magic, what in _FOREIGN_MAGIC:
        if head.startswith(magic):
            raise FormatError(f"{path} is {what}, not a weight file")
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{":
            if 8 + n > size:
                raise FormatError(
                    f"{path}: truncated safetensors file (header says {n} header bytes, file has {size} bytes)"
                )
            return "safetensors"
    raise FormatError(
        f"{path}: not a safetensors, PyTorch or pickle file (it starts with {head[:8]!r})"
    )


def _global_name(msg: str) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", msg)
    return m.group(1) if m else "a non-tensor object"


def load_pickle(path: str, *, mmap: bool = True, extra_safe_globals=()) -> Any:
    """torch.load with weights_only=True (never anything else). mmap is used when the file is in
    the zip format, so tensors are read from disk only when touched. A pickle that needs code is
    refused with the name of what it asked for; nothing in it runs."""
    kind = sniff(path)
    if kind not in ("torch-zip", "pickle"):
        raise FormatError(f"{path}: expected a PyTorch pickle (.ckpt/.pt/.bin), found {kind}")
    use_mmap = mmap and kind == "torch-zip"
    try:
        if extra_safe_globals and hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals(list(extra_safe_globals)):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "GLOBAL" in msg:
            raise FormatError(
                f"refusing to load {path}: the pickle asks to run code ({_global_name(msg)}); only "
                "tensors and plain containers are accepted (torch.load weights_only=True). Convert "
                "it to .safetensors from a source you trust."
            ) from None
        raise FormatError(f"{path}: corrupt pickle: {msg.splitlines()[0] if msg else e!r}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path}: cannot read PyTorch file (truncated or corrupt?): {first}") from None


def _flat_tensors(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """The tensor entries of a loaded checkpoint, unwrapping {'state_dict': ...}; non-tensor
    bookkeeping (global_step, epoch, ...) is dropped."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    out = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not out:
        raise FormatError(f"{path}: holds no tensors")
    return out


class TensorFile:
    """Read-only, lazy access to the tensors of one weight file. For safetensors only the header
    is parsed up front; each get() reads one tensor (or a row range of it). For pickles the
    tensors are memory-mapped where the format allows."""

    def __init__(self, path: str):
        self.path = path
        self.kind = sniff(path)
        self.metadata: dict[str, str] = {}
        self._st = None
        self._tensors: dict[str, torch.Tensor] | None = None
        if self.kind == "safetensors":
            from safetensors import safe_open

            try:
                self._st = safe_open(path, framework="pt", device="cpu")
                self._keys = list(self._st.keys())
                self.metadata = dict(self._st.metadata() or {})
                self._shapes = {}
                self._dtypes = {}
                for k in self._keys:
                    s = self._st.get_slice(k)
                    self._shapes[k] = tuple(s.get_shape())
                    dt = s.get_dtype()
                    if dt not in _SAFETENSORS_DTYPES:
                        raise FormatError(f"{path}: tensor {k!r} has unsupported dtype {dt}")
                    self._dtypes[k] = _SAFETENSORS_DTYPES[dt]
            except FormatError:
                raise
            except Exception as e:  # safetensors raises its own SafetensorError
                raise FormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
        elif self.kind in ("torch-zip", "pickle"):
            self._tensors = _flat_tensors(load_pickle(path), path)
            self._keys = list(self._tensors)
        else:
            raise FormatError(f"{path}: is a directory, expected a weight file")

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in (self._shapes if self._st is not None else self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return self._shapes[key]
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        if self._st is not None:
            return self._dtypes[key]
        return self._tensors[key].dtype

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor (CPU), or rows [start, stop) of its first dimension."""
        try:
            if self._st is not None:
                if rows is None:
                    return self._st.get_tensor(key)
                return self._st.get_slice(key)[rows[0]:rows[1]]
            t = self._tensors[key]
            return t if rows is None else t[rows[0]:rows[1]]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor named {key!r}") from None
        except Exception as e:
            raise FormatError(f"{self.path}: cannot read tensor {key!r}: {e}") from None

    @property
    def format_name(self) -> str:
        return {"safetensors": "safetensors", "torch-zip": "PyTorch checkpoint (zip)",
                "pickle": "PyTorch checkpoint (legacy pickle)"}[self.kind]
