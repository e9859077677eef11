"""Opening weight files safely: content sniffing, lazy safetensors access, pickles only through
``torch.load(weights_only=True)``.

Everything that can go wrong with a user's file (wrong type, truncated, a pickle that wants to run
code) surfaces as a :class:`FormatError` that names the file.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
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


SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file, {key: {dtype, shape, data_offsets}} plus
    "__metadata__", read without touching the data. Duplicate keys (the library would keep the
    last silently) and malformed entries are refused, naming the key."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(SAFETENSORS_MAX_HEADER, size - 8):
            raise FormatError(f"{path}: not a readable safetensors file (header length {n}, file has {size} bytes)")
        raw = f.read(n)

    def no_duplicates(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise FormatError(f"{path}: safetensors header names key {k!r} twice")
            seen[k] = v
        return seen

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except FormatError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: not a readable safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: not a readable safetensors file (header is a {type(header).__name__})")
    data = size - 8 - n
    for k, v in header.items():
        if k == "__metadata__":
            continue
        ok = (isinstance(v, dict) and isinstance(v.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v["shape"])
              and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in v["data_offsets"])
              and 0 <= v["data_offsets"][0] <= v["data_offsets"][1] <= data)
        if not ok:
            raise FormatError(f"{path}: safetensors header entry {k!r} is malformed or points past the end of the file (truncated or corrupt?)")
    return header


def check_finite(t: torch.Tensor, path: str, key: str) -> None:
    """FormatError naming the file and key if a floating-point tensor holds NaN or inf."""
    if not t.is_floating_point() or not t.numel():
        return
    # a wide sum is finite exactly when every element is (fp16/bf16 cannot overflow an fp32
    # sum, fp32 an fp64 one), and it is one fast pass; isfinite() only runs to count, or for fp64 input
    acc = torch.float32 if t.dtype == torch.float16 or t.element_size() == 1 else torch.float64  # fp16 max 65504
    if t.dtype != torch.float64 and bool(torch.isfinite(t.sum(dtype=acc))):
        return
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise FormatError(f"{path}: tensor {key!r} holds {bad} NaN/inf values")


def _global_name(msg: str) -> str | None:
    m = re.search(r"GLOBAL ([\w.]+)", msg)
    return m.group(1) if m else None


_STORAGE_BYTES = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
                  "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
                  "BoolStorage": 1, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1}


class _StorageScan(pickle.Unpickler):
    """Reads a torch zip's data.pkl only to list the storages it refers to: every class is
    replaced by an inert stand-in, so nothing in the pickle runs."""

    class _Inert:
        def __init__(self, *a, **k):
            pass

        def __call__(self, *a, **k):
            return _StorageScan._Inert()

        def __setstate__(self, state):
            pass

        def __setitem__(self, k, v):
            pass

        def append(self, v):
            pass

        def extend(self, v):
            pass

    def __init__(self, f):
        super().__init__(f)
        self.storages = {}  # record key -> bytes expected

    def find_class(self, module, name):
        inert = _StorageScan._Inert()
        inert.name = name
        return inert

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            per = _STORAGE_BYTES.get(getattr(pid[1], "name", None))
            if per is not None and isinstance(pid[4], int):
                self.storages[str(pid[2])] = pid[4] * per
        return _StorageScan._Inert()


def check_zip_records(path: str) -> None:
    """Every tensor record of a torch zip file holds the bytes its pickle says it does (a
    memory-mapped load does not check, and would read past a cut record)."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
            pkl = next((n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                return
            prefix = pkl[: -len("data.pkl")]
            scan = _StorageScan(z.open(pkl))
            scan.load()
    except FormatError:
        raise
    except Exception:
        return  # torch.load read it; a pickle this scan cannot follow is not a size problem
    for key, want in scan.storages.items():
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            raise FormatError(f"{path}: tensor record data/{key} is missing (truncated or corrupt file)")
        if info.file_size < want:
            raise FormatError(f"{path}: tensor record data/{key} holds {info.file_size} bytes, its tensor needs "
                              f"{want} (truncated or corrupt file)")


def load_pickle(path: str, *, mmap: bool = True, extra_safe_globals=()) -> Any:
    """torch.load with weights_only=True (never anything else). mmap is used when the file is in
    the zip format, so tensors are read from disk only when touched. A pickle that needs code is
    refused with the name of what it asked for; nothing in it runs."""
    kind = sniff(path)
    if kind not in ("torch-zip", "pickle"):
        raise FormatError(f"{path}: expected a PyTorch pickle (.ckpt/.pt/.bin), found {kind}")
    use_mmap = mmap and kind == "torch-zip"
    if kind == "torch-zip":
        check_zip_records(path)
    try:
        if extra_safe_globals and hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals(list(extra_safe_globals)):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        wants = _global_name(msg)
        if wants is not None:
            raise FormatError(
                f"refusing to load {path}: the pickle asks to run code ({wants}); only "
                "tensors and plain containers are accepted (torch.load weights_only=True). Convert "
                "it to .safetensors from a source you trust."
            ) from None
        detail = re.sub(r"\s+", " ", msg.split("Please file an issue")[0]).strip()[:200] or repr(e)
        raise FormatError(f"{path}: corrupt or unsupported pickle: {detail}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, MemoryError, OverflowError, RecursionError, UnicodeDecodeError, struct.error, AssertionError) as e:
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
                safetensors_header(path)  # duplicate keys, bad offsets: refused before the library reads it
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
