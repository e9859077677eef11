"""Images over HTTP: base64 PNG out (with A1111's infotext chunk), base64 images in, and A1111's
infotext parser for /png-info."""
from __future__ import annotations

import base64
import binascii
import io
import json
import re

MAX_DECODED_PIXELS = 64 * 1024 * 1024  # a base64 image that claims more is refused before decoding


def encode_png(image, infotext: str | None) -> str:
    """A PIL image -> base64 PNG, its infotext in a tEXt chunk named 'parameters' (A1111's)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(text: str, field: str):
    """base64 (a data: URL prefix allowed) -> a loaded PIL image. ValueError naming `field` for
    bad base64 or bytes that are not an image."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(text, str) or not text:
        raise ValueError(f"{field}: an image must be a non-empty base64 string")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}: not valid base64") from None
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_DECODED_PIXELS:
            raise ValueError(f"{field}: image of {image.width}x{image.height} pixels is too large "
                             f"(at most {MAX_DECODED_PIXELS} pixels)")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{field}: not a readable image ({e})") from None
    return image


# A1111's modules/infotext_utils.py parse_generation_parameters, for the fields fastdiff writes
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> dict:
    """'prompt\\nNegative prompt: ...\\nSteps: 20, Size: 64x64, ...' -> {"Prompt": ...,
    "Negative prompt": ..., "Steps": "20", "Size-1": "64", "Size-2": "64", ...}. Values stay
    strings, as A1111 returns them; a quoted value is JSON-decoded."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM_RE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM_RE.findall(last):
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        m = _SIZE_RE.match(value)
        if m:
            out[f"{key}-1"], out[f"{key}-2"] = m.group(1), m.group(2)
        else:
            out[key] = value
    out.setdefault("Clip skip", "1")
    return out
