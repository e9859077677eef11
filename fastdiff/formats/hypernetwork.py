"""A1111 / NovelAI hypernetworks (.pt): small residual MLPs on the context of every attention.

For an attention whose context (cross-attention: the text context; self-attention: the normed
hidden states) has width d, a hypernetwork with modules for d computes
    k_ctx = h_k(ctx),  v_ctx = h_v(ctx),  h(x) = x + mlp(x) * strength
and the attention uses to_k(k_ctx), to_v(v_ctx). Without a module for d it is the identity.
Several hypernetworks chain: the k (v) output of one is the k (v) input of the next, as A1111.

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
activate_output True, no layer norm, no dropout). Dropout is inference-off: its slots are
nn.Identity so the parameter indices still line up.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .files import FormatError, load_pickle

_ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "linear": None,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,  # A1111 maps "swish" to Hardswish; files trained with it expect that
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
# A1111 also accepts any torch.nn activation class by its lower-cased name.
for _n in dir(nn.modules.activation):
    _c = getattr(nn.modules.activation, _n)
    if isinstance(_c, type) and issubclass(_c, nn.Module) and _c.__module__ == "torch.nn.modules.activation":
        _ACTIVATIONS.setdefault(_n.lower(), _c)


def _dropout_structure(layer_structure, use_dropout, last_layer_dropout) -> list[float]:
    n = len(layer_structure)
    if not use_dropout:
        return [0.0] * n
    return [0.0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0]


class HypernetworkModule(nn.Module):
    """One residual MLP: forward(x, strength) = x + linear(x) * strength."""

    def __init__(self, dim: int, layer_structure, activation: str | None, layer_norm: bool,
                 activate_output: bool, dropout_structure):
        super().__init__()
        act_cls = None
        if activation is not None:
            if activation not in _ACTIVATIONS:
                raise ValueError(f"unsupported activation function {activation!r}")
            act_cls = _ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        n = len(layer_structure)
        for i in range(n - 1):
            layers.append(nn.Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])))
            if act_cls is not None and (i < n - 2 or activate_output):
                layers.append(act_cls())
            if layer_norm:
                layers.append(nn.LayerNorm(int(dim * layer_structure[i + 1])))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                layers.append(nn.Identity())  # Dropout at training time
        self.linear = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        p = self.linear[0].weight
        y = self.linear(x.to(p.dtype)) * strength
        return (x.to(p.dtype) + y).to(x.dtype)


class Hypernetwork(nn.Module):
    """`hn(ctx) -> (ctx_k, ctx_v)`: the kv_hook of an attention module. `strength` can be changed
    at any time without reloading."""

    def __init__(self, name: str, modules: dict[int, tuple[HypernetworkModule, HypernetworkModule]],
                 strength: float = 1.0, info: dict | None = None):
        super().__init__()
        self.name = name
        self.strength = float(strength)
        self.info = info or {}
        self.strength_buffer = None  # 0-dim device tensor while captured in a CUDA graph
        self.layers = nn.ModuleDict({str(d): nn.ModuleList(list(kv)) for d, kv in sorted(modules.items())})
        self.eval()
        self.requires_grad_(False)

    @property
    def dims(self) -> list[int]:
        return [int(d) for d in self.layers]

    def apply_kv(self, ctx_k: torch.Tensor, ctx_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.layers[str(ctx_k.shape[-1])] if str(ctx_k.shape[-1]) in self.layers else None
        # Inside a CUDA graph the strength is read from a device scalar (`strength_buffer`,
        # refreshed before each replay), so changing it needs no re-capture.
        s = self.strength if self.strength_buffer is None else self.strength_buffer
        if pair is None or (self.strength_buffer is None and self.strength == 0.0):
            return ctx_k, ctx_v
        return pair[0](ctx_k, s), pair[1](ctx_v, s)

    def forward(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply_kv(ctx, ctx)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, strength={self.strength}, dims={self.dims}"


class HypernetworkStack(nn.Module):
    """Several hypernetworks applied in order; `stack(ctx) -> (ctx_k, ctx_v)`. Strengths live on
    the members: `stack[0].strength = 0.5` or `stack.set_strength('name', 0.5)`."""

    def __init__(self, hypernetworks=()):
        super().__init__()
        self.items = nn.ModuleList(list(hypernetworks))

    def __getitem__(self, i) -> Hypernetwork:
        if isinstance(i, str):
            for h in self.items:
                if h.name == i:
                    return h
            raise KeyError(i)
        return self.items[i]

    def __len__(self) -> int:
        return len(self.items)

    def append(self, hn: Hypernetwork) -> None:
        self.items.append(hn)

    def set_strength(self, which, strength: float) -> None:
        self[which].strength = float(strength)

    def forward(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = v = ctx
        for h in self.items:
            k, v = h.apply_kv(k, v)
        return k, v


_NAI_RENAME = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
               "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


def load_hypernetwork(path: str, strength: float = 1.0, name: str | None = None) -> Hypernetwork:
    """Read an A1111 or NovelAI hypernetwork .pt file."""
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a dict, found {type(data).__name__}: not a hypernetwork")
    sizes = {k: v for k, v in data.items() if isinstance(k, int)}
    if not sizes:
        raise FormatError(f"{path}: no per-width module pairs (int keys such as 768): not a hypernetwork")
    layer_structure = data.get("layer_structure") or [1, 2, 1]
    if layer_structure[0] != 1 or layer_structure[-1] != 1:
        raise FormatError(f"{path}: layer_structure {layer_structure} must start and end with 1")
    activation = data.get("activation_func")
    if activation is not None and activation not in _ACTIVATIONS:
        raise FormatError(f"{path}: unsupported activation function {activation!r}")
    layer_norm = bool(data.get("is_layer_norm", False))
    activate_output = bool(data.get("activate_output", True))
    dropout = data.get("dropout_structure")
    use_dropout = (dropout is not None and any(dropout)) or bool(data.get("use_dropout", False))
    if dropout is None:
        dropout = _dropout_structure(layer_structure, use_dropout, bool(data.get("last_layer_dropout", False)))
    if len(dropout) != len(layer_structure):
        raise FormatError(f"{path}: dropout_structure {dropout} does not match layer_structure {layer_structure}")

    modules = {}
    for dim, pair in sorted(sizes.items()):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(s, dict) for s in pair):
            raise FormatError(f"{path}: width {dim}: expected a [k, v] pair of state dicts")
        built = []
        for which, sd in zip("kv", pair):
            sd = {_NAI_RENAME.get(k, k): v for k, v in sd.items()}
            mod = HypernetworkModule(dim, layer_structure, activation, layer_norm, activate_output, dropout)
            want = mod.state_dict()
            missing, unexpected = set(want) - set(sd), set(sd) - set(want)
            if missing or unexpected:
                raise FormatError(
                    f"{path}: width {dim} {which}-module: keys do not match layer_structure {layer_structure}, "
                    f"activation {activation!r}, layer norm {layer_norm}: missing {sorted(missing)[:4]}, "
                    f"unexpected {sorted(unexpected)[:4]}"
                )
            for k, v in sd.items():
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(want[k].shape):
                    got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise FormatError(f"{path}: width {dim} {which}-module {k}: expected {list(want[k].shape)}, found {got}")
            mod.load_state_dict({k: v.float() for k, v in sd.items()})
            built.append(mod)
        modules[dim] = tuple(built)
    info = {
        "layer_structure": list(layer_structure), "activation_func": activation, "is_layer_norm": layer_norm,
        "activate_output": activate_output, "dropout_structure": list(dropout),
        "format": "NovelAI" if "layer_structure" not in data else "A1111",
    }
    hn_name = name or data.get("name") or os.path.splitext(os.path.basename(path))[0]
    return Hypernetwork(str(hn_name), modules, strength=strength, info=info)
