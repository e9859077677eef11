"""argparse types the commands share (`fastdiff generate`, `fastdiff dataset`): light, so that
`--help` stays instant."""
from __future__ import annotations

import argparse


def size(text: str) -> tuple[int, int]:
    """WxH -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    return w, h


def hypernetwork(text: str) -> tuple[str, float]:
    """PATH[:STRENGTH] -> (path, strength); a Windows drive letter or a path with colons keeps
    its colons."""
    path, sep, strength = text.rpartition(":")
    if sep and path:
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0
