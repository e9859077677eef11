"""Webdataset shards: the plan (which captions go to which shard), the samples' bytes, and a
writer that makes a shard appear only when it is whole.

A shard is a plain tar (`00000.tar`, ...) of samples `KEY.png|jpg|webp`, `KEY.txt` (the
caption) and `KEY.json` (indices, seed, generation parameters, model hash). The key is
`CAPTION_IMAGE` (`000000042_003`): a caption's images are adjacent and in one shard. Every byte
is a function of the pixels and the arguments (tar headers carry no time, owner or
permissions of this run), so a rerun writes the same files.

A shard is written as `.NAME.tar.<random>.tmp` and renamed to `NAME.tar` after an fsync: a
finished name means a finished shard, whatever killed the process and when.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from dataclasses import dataclass

from fastdiff.results import parameters_text

IMAGE_FORMATS = ("png", "jpg", "webp")
JPEG_QUALITY = 95
WEBP_QUALITY = 95
TMP_SUFFIX = ".tmp"


@dataclass
class Shard:
    index: int
    captions: list  # [(caption index, text), ...]

    @property
    def name(self) -> str:
        return shard_name(self.index)


def shard_name(index: int) -> str:
    return f"{index:05d}.tar"


def captions_per_shard(shard_size: int, images_per_caption: int) -> int:
    """Whole captions only: a shard holds at most `shard_size` images, and at least one caption."""
    return max(1, shard_size // images_per_caption)


def plan(indices, texts, shard_size: int, images_per_caption: int) -> list[Shard]:
    per = captions_per_shard(shard_size, images_per_caption)
    pairs = list(zip(indices, texts))
    return [Shard(k, pairs[s:s + per]) for k, s in enumerate(range(0, len(pairs), per))]


def sample_key(caption_index: int, image_index: int) -> str:
    # no dots: webdataset splits a member name at its first dot into key and extension
    return f"{caption_index:09d}_{image_index:03d}"


def seed_of(base: int, caption_index: int, image_index: int, images_per_caption: int) -> int:
    """Image j of caption i: base + i * images_per_caption + j. One call per caption with
    seed=base + i * n and num_images=n makes exactly these (image j of a call uses seed + j)."""
    return base + caption_index * images_per_caption + image_index


def encode_image(image, fmt: str, parameters: dict) -> bytes:
    """A PIL image -> file bytes. PNG carries A1111's infotext (`parameters` text chunk)."""
    buf = io.BytesIO()
    if fmt == "png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", parameters_text(parameters))
        image.save(buf, "PNG", pnginfo=info)
    elif fmt == "jpg":
        image.save(buf, "JPEG", quality=JPEG_QUALITY)
    elif fmt == "webp":
        image.save(buf, "WEBP", quality=WEBP_QUALITY)
    else:
        raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}")
    return buf.getvalue()


def sample_files(caption_index: int, image_index: int, caption: str, image, parameters: dict,
                 fmt: str) -> list[tuple[str, bytes]]:
    """One sample's members, in the order they go into the tar."""
    key = sample_key(caption_index, image_index)
    meta = {"key": key, "caption_index": caption_index, "image_index": image_index, "seed": parameters["seed"],
            "caption": caption, "model_hash": parameters.get("model_hash"), "parameters": parameters,
            "infotext": parameters_text(parameters)}
    return [(f"{key}.{fmt}", encode_image(image, fmt, parameters)),
            (f"{key}.txt", caption.encode("utf-8")),
            (f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))]


class ShardWriter:
    """Members go to a temporary file; `close()` fsyncs it and renames it to the shard's name;
    `abort()` removes it."""

    def __init__(self, out: str, name: str):
        self.path = os.path.join(out, name)
        self.tmp = os.path.join(out, f".{name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.images = 0

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def add_sample(self, files) -> None:
        for name, data in files:
            self.add(name, data)
        self.images += 1

    def close(self) -> str:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(self.path))
        return self.path

    def abort(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}{TMP_SUFFIX}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str) -> None:
    """Make a rename durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partials(out: str) -> int:
    """Delete what an interrupted run left half-written; returns how many files."""
    n = 0
    for name in os.listdir(out):
        if name.endswith(TMP_SUFFIX):
            os.remove(os.path.join(out, name))
            n += 1
    return n
