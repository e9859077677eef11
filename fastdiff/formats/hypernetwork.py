"""A1111 / NovelAI hypernetwork files (.pt), read into plain data: per context width a (k, v)
pair of state dicts with A1111's key names, plus the structure they need (fastdiff.models.
hypernetwork builds the modules; fastdiff.addons.load_hypernetwork does both).

File layouts (both pickles, read with weights_only=True):
  A1111:   {320: [sd_k, sd_v], 640: ..., 'layer_structure': [1, 2, 1], 'activation_func': 'relu',
            'is_layer_norm': False, 'activate_output': False, 'use_dropout': True,
            'last_layer_dropout': False, 'dropout_structure': [...], 'weight_initialization': ...}
           each sd the state dict of a Sequential `linear`: per step i, Linear(d*ls[i], d*ls[i+1]),
           then the activation (none after the last Linear unless activate_output), then
           LayerNorm (is_layer_norm), then Dropout where the dropout structure is non-zero; keys
           like linear.0.weight, linear.2.weight count those modules.
  NovelAI: {768: [sd_k, sd_v], ...}, sd with linear1.weight/bias, linear2.weight/bias
           (= layer_structure [1, 2, 1], no activation).
Defaults for missing fields follow A1111's loader (layer_structure [1, 2, 1], activation None,
activate_output True, no layer norm, no dropout). Every check a file can fail (keys, shapes,
structure) is made here, so a FormatError names the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .files import FormatError, check_finite, load_pickle

MAX_WIDTH = 16384  # attention widths of SD-family models are 320..1280; anything near this is no hypernetwork
MAX_LAYERS = 32


def _activation_names() -> frozenset[str]:
    """The activation_func values A1111 accepts: its own names plus any torch.nn activation
    class by its lower-cased name ("linear" means none)."""
    names = {"linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid"}
    act = torch.nn.modules.activation
    for n in dir(act):
        c = getattr(act, n)
        if isinstance(c, type) and issubclass(c, torch.nn.Module) and c.__module__ == act.__name__:
            names.add(n.lower())
    return frozenset(names)


ACTIVATION_NAMES = _activation_names()

_NAI_RENAME = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
               "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


@dataclass
class HypernetworkFile:
    """What a hypernetwork file holds. `config`: layer_structure, activation_func, is_layer_norm,
    activate_output, dropout_structure, format ("A1111" or "NovelAI"). `state_dicts`:
    {width: (sd_k, sd_v)}, keys as A1111's Sequential `linear` (linear.0.weight, ...)."""

    name: str
    config: dict
    state_dicts: dict[int, tuple[dict, dict]]

    @property
    def dims(self) -> list[int]:
        return sorted(self.state_dicts)

    def num_params(self) -> int:
        return sum(t.numel() for pair in self.state_dicts.values() for sd in pair for t in sd.values())


def _dropout_structure(layer_structure, use_dropout, last_layer_dropout) -> list[float]:
    n = len(layer_structure)
    if not use_dropout:
        return [0.0] * n
    return [0.0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0]


def _numbers(xs) -> bool:
    import math

    return isinstance(xs, (list, tuple)) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in xs)


def expected_shapes(dim: int, config: dict) -> dict[str, tuple[int, ...]]:
    """The state dict one module of width `dim` has: A1111's Sequential counts a Linear, then an
    activation (none after the last Linear unless activate_output; "linear" is none), then a
    LayerNorm, then a Dropout where the dropout structure is non-zero."""
    ls, act = config["layer_structure"], config["activation_func"]
    has_act = act is not None and act != "linear"
    dropout = config["dropout_structure"]
    out: dict[str, tuple[int, ...]] = {}
    idx, n = 0, len(ls)
    for i in range(n - 1):
        d_in, d_out = int(dim * ls[i]), int(dim * ls[i + 1])
        out[f"linear.{idx}.weight"], out[f"linear.{idx}.bias"] = (d_out, d_in), (d_out,)
        idx += 1
        if has_act and (i < n - 2 or config["activate_output"]):
            idx += 1
        if config["is_layer_norm"]:
            out[f"linear.{idx}.weight"], out[f"linear.{idx}.bias"] = (d_out,), (d_out,)
            idx += 1
        if dropout is not None and dropout[i + 1] > 0:
            idx += 1
    return out


def read_hypernetwork(path: str, name: str | None = None) -> HypernetworkFile:
    """Read an A1111 or NovelAI hypernetwork .pt file."""
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a dict, found {type(data).__name__}: not a hypernetwork")
    sizes = {k: v for k, v in data.items() if isinstance(k, int) and not isinstance(k, bool)}
    if not sizes:
        raise FormatError(f"{path}: no per-width module pairs (int keys such as 768): not a hypernetwork")
    for dim in sizes:
        if not 1 <= dim <= MAX_WIDTH:
            raise FormatError(f"{path}: width {dim} is not in [1, {MAX_WIDTH}]")
    layer_structure = data.get("layer_structure") or [1, 2, 1]
    if not _numbers(layer_structure) or not 2 <= len(layer_structure) <= MAX_LAYERS \
            or not all(0 < x <= 64 for x in layer_structure):
        raise FormatError(f"{path}: layer_structure {layer_structure!r:.80} must be a list of 2..{MAX_LAYERS} "
                          "numbers in (0, 64]")
    if layer_structure[0] != 1 or layer_structure[-1] != 1:
        raise FormatError(f"{path}: layer_structure {layer_structure} must start and end with 1")
    activation = data.get("activation_func")
    if activation is not None and (not isinstance(activation, str) or activation not in ACTIVATION_NAMES):
        raise FormatError(f"{path}: unsupported activation function {activation!r:.80}")
    for flag in ("is_layer_norm", "activate_output", "use_dropout", "last_layer_dropout"):
        if not isinstance(data.get(flag, False), (bool, int)):
            raise FormatError(f"{path}: {flag} is a {type(data[flag]).__name__}, expected true or false")
    layer_norm = bool(data.get("is_layer_norm", False))
    activate_output = bool(data.get("activate_output", True))
    dropout = data.get("dropout_structure")
    if dropout is not None and (not _numbers(dropout) or not all(0 <= x <= 1 for x in dropout)):
        raise FormatError(f"{path}: dropout_structure {dropout!r:.80} must be a list of numbers in [0, 1]")
    use_dropout = (dropout is not None and any(dropout)) or bool(data.get("use_dropout", False))
    if dropout is None:
        dropout = _dropout_structure(layer_structure, use_dropout, bool(data.get("last_layer_dropout", False)))
    if len(dropout) != len(layer_structure):
        raise FormatError(f"{path}: dropout_structure {dropout} does not match layer_structure {layer_structure}")
    config = {
        "layer_structure": list(layer_structure), "activation_func": activation, "is_layer_norm": layer_norm,
        "activate_output": activate_output, "dropout_structure": list(dropout),
        "format": "NovelAI" if "layer_structure" not in data else "A1111",
    }

    state_dicts = {}
    for dim, pair in sorted(sizes.items()):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(s, dict) for s in pair):
            raise FormatError(f"{path}: width {dim}: expected a [k, v] pair of state dicts")
        if any(int(dim * x) < 1 for x in layer_structure):
            raise FormatError(f"{path}: width {dim} x layer_structure {layer_structure} has layers of width 0")
        want = expected_shapes(dim, config)
        checked = []
        for which, sd in zip("kv", pair):
            sd = {_NAI_RENAME.get(k, k): v for k, v in sd.items()}
            missing, unexpected = set(want) - set(sd), set(sd) - set(want)
            if missing or unexpected:
                raise FormatError(
                    f"{path}: width {dim} {which}-module: keys do not match layer_structure {layer_structure}, "
                    f"activation {activation!r}, layer norm {layer_norm}: missing {sorted(missing)[:4]}, "
                    f"unexpected {sorted(unexpected)[:4]}"
                )
            for k, v in sd.items():
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != want[k]:
                    got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise FormatError(f"{path}: width {dim} {which}-module {k}: expected {list(want[k])}, found {got}")
                if not v.is_floating_point():
                    raise FormatError(f"{path}: width {dim} {which}-module {k}: dtype {v.dtype}, expected floating point")
                check_finite(v, path, f"{dim}.{which}.{k}")
            checked.append(sd)
        state_dicts[dim] = tuple(checked)
    hn_name = name or data.get("name") or os.path.splitext(os.path.basename(path))[0]
    return HypernetworkFile(str(hn_name), config, state_dicts)
