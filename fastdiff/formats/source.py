"""What a reader hands to the pipeline: components (config dict + lazy tensors under diffusers /
transformers names) and `load_into`, which streams them into an already-built module."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from .files import FormatError, TensorFile, check_finite


@dataclass(frozen=True)
class LazyTensor:
    """A tensor still on disk: `file[key]`, optionally rows [start, stop) of it (q/k/v split of a
    fused in_proj) and/or viewed as `view_shape` (a 1x1 conv kernel read as a linear weight)."""

    file: TensorFile
    key: str
    rows: tuple[int, int] | None = None
    view_shape: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.view_shape is not None:
            return self.view_shape
        s = self.file.shape(self.key)
        if self.rows is not None:
            s = (self.rows[1] - self.rows[0],) + tuple(s[1:])
        return tuple(s)

    @property
    def dtype(self) -> torch.dtype:
        return self.file.dtype(self.key)

    def load(self) -> torch.Tensor:
        t = self.file.get(self.key, self.rows)
        if self.view_shape is not None:
            t = t.reshape(self.view_shape)
        return t

    @property
    def where(self) -> str:
        extra = f" rows {self.rows[0]}:{self.rows[1]}" if self.rows else ""
        return f"{self.file.path}:{self.key}{extra}"


def _squeeze_1x1(lt: LazyTensor) -> LazyTensor:
    """Conv 1x1 (or conv1d k=1) kernel -> linear weight, when it has that form."""
    s = lt.file.shape(lt.key)
    if len(s) > 2 and all(d == 1 for d in s[2:]):
        return replace(lt, view_shape=tuple(s[:2]))
    return lt


class Component:
    """One network's weights: `config` (the diffusers config.json / transformers CLIPTextConfig
    dict) and a mapping from parameter name to LazyTensor."""

    def __init__(self, name: str, config: dict, tensors: dict[str, LazyTensor], origin: str):
        self.name = name
        self.config = config
        self.tensors = tensors
        self.origin = origin

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __getitem__(self, key: str) -> LazyTensor:
        return self.tensors[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything read into memory at once (tests, small models); prefer load_into."""
        return {k: v.load() for k, v in self.tensors.items()}

    def dtypes(self) -> Counter:
        return Counter(str(v.dtype).replace("torch.", "") for v in self.tensors.values())

    def num_params(self) -> int:
        return sum(math.prod(v.shape) for v in self.tensors.values())

    def __repr__(self) -> str:
        return f"Component({self.name!r}, {len(self)} tensors from {self.origin})"


@dataclass
class ModelSource:
    """A whole Stable Diffusion model as found on disk. `family` is 'sd1' or 'sd2';
    `prediction_type` 'epsilon' or 'v_prediction' (`prediction_rule` says how it was decided);
    `tokenizer` is {'kind': 'clip', 'pad_token_id': ..., 'path': folder or None, ...}."""

    path: str
    format: str
    family: str
    unet: Component | None
    vae: Component | None
    text_encoder: Component | None
    scheduler: dict
    tokenizer: dict
    prediction_rule: str = ""
    notes: list[str] = field(default_factory=list)
    tensor_count: int = 0
    file_dtypes: dict = field(default_factory=dict)  # dtype name -> tensor count, as stored

    @property
    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")

    @property
    def family_label(self) -> str:
        return {"sd1": "SD 1.x", "sd2": "SD 2.x"}.get(self.family, self.family)

    def components(self) -> dict[str, Component]:
        return {n: c for n, c in (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder)) if c}

    def with_vae(self, vae: Component) -> "ModelSource":
        """This model with its VAE replaced (a standalone VAE file, see open_vae)."""
        if self.unet is not None:
            unet_in = self.unet.config.get("in_channels", 4)
            lat = vae.config.get("latent_channels", 4)
            if unet_in not in (lat, 2 * lat + 1, 2 * lat):
                raise FormatError(
                    f"{vae.origin}: VAE has {lat} latent channels, the UNet of {self.path} takes {unet_in}"
                )
        return replace(self, vae=vae, notes=self.notes + [f"VAE replaced by {vae.origin}"])


def _target_tensors(module: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str, bool]]:
    """state_dict names -> (owning submodule, attribute, is_parameter), persistent buffers included."""
    out = {}
    for mod_name, mod in module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for n, p in mod._parameters.items():
            if p is not None:
                out.setdefault(prefix + n, (mod, n, True))
        non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
        for n, b in mod._buffers.items():
            if b is not None and n not in non_persistent:
                out.setdefault(prefix + n, (mod, n, False))
    return out


def _few(names, n: int = 5) -> str:
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_into(module: torch.nn.Module, source: Component, device=None, dtype=None, *,
              check_finite_weights: bool = True) -> torch.nn.Module:
    """Stream `source`'s tensors into `module`'s parameters and persistent buffers, one tensor at a
    time (read, convert to device/dtype, write; never two full copies of the model).

    device/dtype default to each parameter's current ones (a parameter on 'meta' goes to CPU);
    dtype applies to floating-point tensors only. Keys and shapes are checked in full before
    anything is written, so on a mismatch the module is left untouched. A tensor holding NaN or
    inf is refused (FormatError naming file and key) as it is read, while it is in cache anyway."""
    target = _target_tensors(module)
    src_keys, tgt_keys = set(source.keys()), set(target)
    problems = []
    missing, unexpected = tgt_keys - src_keys, src_keys - tgt_keys
    if missing:
        problems.append(f"{len(missing)} missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_few(unexpected)}")
    mismatched = []
    for k in sorted(src_keys & tgt_keys):
        mod, attr, _ = target[k]
        want = tuple(getattr(mod, attr).shape)
        got = tuple(source[k].shape)
        if want != got:
            mismatched.append(f"{k}: expected {list(want)}, found {list(got)}")
        elif getattr(mod, attr).is_floating_point() and not (
            source[k].dtype.is_floating_point
        ):
            mismatched.append(f"{k}: expected a floating-point tensor, found {source[k].dtype}")
    if mismatched:
        more = f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        problems.append("shape mismatch: " + "; ".join(mismatched[:5]) + more)
    if problems:
        raise FormatError(
            f"{source.origin}: {source.name} weights do not fit {type(module).__name__}: " + "; ".join(problems)
        )

    device = torch.device(device) if device is not None else None
    written = 0
    try:
        for k in source.keys():
            mod, attr, is_param = target[k]
            cur = getattr(mod, attr)
            want_dev = device or (cur.device if cur.device.type != "meta" else torch.device("cpu"))
            want_dt = dtype if (dtype is not None and cur.is_floating_point()) else cur.dtype
            src = source[k].load()
            if check_finite_weights:
                check_finite(src, source[k].file.path, source[k].key)
            with torch.no_grad():
                if cur.device == want_dev and cur.dtype == want_dt:
                    cur.copy_(src)  # in place: one conversion, no second buffer
                else:
                    new = torch.empty(cur.shape, device=want_dev, dtype=want_dt)
                    new.copy_(src)
                    if is_param:
                        mod._parameters[attr] = torch.nn.Parameter(new, requires_grad=cur.requires_grad)
                    else:
                        mod._buffers[attr] = new
            del src, cur
            written += 1
    except FormatError as e:
        raise FormatError(f"{e} (after {written} of {len(source)} tensors were written: the module is partly loaded)") from None
    return module
