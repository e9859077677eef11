"""A1111 / NovelAI hypernetworks: small residual MLPs on the context of every attention.

For an attention whose context (cross-attention: the text context; self-attention: the normed
hidden states) has width d, a hypernetwork with modules for d computes
    k_ctx = h_k(ctx),  v_ctx = h_v(ctx),  h(x) = x + mlp(x) * strength
and the attention uses to_k(k_ctx), to_v(v_ctx). Without a module for d it is the identity.
Several hypernetworks chain: the k (v) output of one is the k (v) input of the next, as A1111.

Each mlp is A1111's Sequential `linear`: per step i of the layer structure ls,
Linear(d*ls[i], d*ls[i+1]), then the activation (none after the last Linear unless
activate_output), then LayerNorm (layer_norm), then a Dropout slot where the dropout structure
is non-zero. Dropout is inference-off: its slots are nn.Identity, so the parameter indices
still line up with the checkpoint keys (linear.0.weight, linear.2.weight, ...).

A loaded hypernetwork's strength lives on the Hypernetwork (`.strength`); the modules take it as
an argument, so a caller can apply one at another strength without touching it (the engine
snapshots each call's strengths, and under a CUDA graph passes a 0-dim device tensor). `Hypernetwork.from_state_dicts`
builds one from what fastdiff.formats.read_hypernetwork returns; fastdiff.addons.load_hypernetwork
does both.
"""
from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module] | None] = {
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
        ACTIVATIONS.setdefault(_n.lower(), _c)


class HypernetworkModule(nn.Module):
    """One residual MLP: forward(x, strength) = x + linear(x) * strength."""

    def __init__(self, dim: int, layer_structure, activation: str | None, layer_norm: bool,
                 activate_output: bool, dropout_structure):
        super().__init__()
        act_cls = None
        if activation is not None:
            if activation not in ACTIVATIONS:
                raise ValueError(f"unsupported activation function {activation!r}")
            act_cls = ACTIVATIONS[activation]
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

    def forward(self, x: torch.Tensor, strength) -> torch.Tensor:
        # x [..., dim]; strength a float or a 0-dim tensor
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
        self.layers = nn.ModuleDict({str(d): nn.ModuleList(list(kv)) for d, kv in sorted(modules.items())})
        self.eval()
        self.requires_grad_(False)

    @classmethod
    def from_state_dicts(cls, name: str, config: dict, state_dicts: dict, strength: float = 1.0) -> "Hypernetwork":
        """Build from plain data: `config` with layer_structure, activation_func, is_layer_norm,
        activate_output, dropout_structure (kept as `.info`); `state_dicts` {width: (sd_k, sd_v)}
        with A1111's key names (linear.N.weight, ...)."""
        modules = {}
        for dim, pair in sorted(state_dicts.items()):
            built = []
            for sd in pair:
                # built on the meta device, then given the file's tensors: nothing is allocated
                # or initialised beyond what the (already checked) state dict holds
                with torch.device("meta"):
                    mod = HypernetworkModule(int(dim), config["layer_structure"], config["activation_func"],
                                             config["is_layer_norm"], config["activate_output"],
                                             config["dropout_structure"])
                mod.load_state_dict({k: v.detach().to(torch.float32, copy=True) for k, v in sd.items()},
                                    strict=True, assign=True)  # a copy: never backed by a mapped file
                built.append(mod)
            modules[int(dim)] = tuple(built)
        return cls(name, modules, strength=strength, info=dict(config))

    @property
    def dims(self) -> list[int]:
        return [int(d) for d in self.layers]

    def apply_kv(self, ctx_k: torch.Tensor, ctx_v: torch.Tensor, strength=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ctx_k, ctx_v) through the modules for their width, at `strength` (a float or a 0-dim
        device tensor; None: `.strength`)."""
        pair = self.layers[str(ctx_k.shape[-1])] if str(ctx_k.shape[-1]) in self.layers else None
        if strength is None:
            strength = self.strength
        if pair is None or (not isinstance(strength, torch.Tensor) and strength == 0.0):
            return ctx_k, ctx_v
        return pair[0](ctx_k, strength), pair[1](ctx_v, strength)

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
