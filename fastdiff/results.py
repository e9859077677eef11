"""What a generation returns: images with the parameters that made them, written as PNG files
that A1111-compatible tools read (a `parameters` tEXt chunk)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

# A1111's display names, so its PNG-info readers recognise our files.
A1111_SAMPLER_NAMES = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "uni_pc": "UniPC",
    "lcm": "LCM",
}
A1111_SCHEDULE_NAMES = {
    "normal": "Automatic",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
}


def _one_line(text: str) -> str:
    """A1111's parser takes a line starting 'Negative prompt:' as the start of the negative
    prompt, so a prompt's line that starts so is joined to the line before it (CLIP reads a
    line break as a space: the prompt means the same). Other line breaks stay."""
    lines = str(text).splitlines() or [""]
    out = [lines[0]]
    for line in lines[1:]:
        if line.strip().startswith("Negative prompt:"):
            out[-1] = f"{out[-1]} {line}"
        else:
            out.append(line)
    return "\n".join(out)


def parameters_text(p: dict) -> str:
    """A1111's infotext: prompt, 'Negative prompt: ...', then 'Key: value, ...'. Neither
    prompt can start a line that A1111 would read as a negative prompt."""
    lines = [_one_line(p["prompt"])]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {_one_line(p['negative_prompt'])}")
    fields = [
        ("Steps", p["steps"]),
        ("Sampler", A1111_SAMPLER_NAMES.get(p["sampler"], p["sampler"])),
        ("Schedule type", A1111_SCHEDULE_NAMES.get(p["schedule"], p["schedule"])),
        ("CFG scale", p["guidance_scale"]),
        ("Seed", p["seed"]),
        ("Size", f"{p['width']}x{p['height']}"),
        ("Model hash", p.get("model_hash")),
        ("Model", p.get("model_name")),
        ("Clip skip", p["clip_skip"] if p.get("clip_skip", 1) != 1 else None),
        ("Denoising strength", p.get("strength")),
        ("Hypernetworks", p.get("hypernetworks") or None),
        ("Version", f"fastdiff {p['version']}"),
    ]
    kv = []
    for k, v in fields:
        if v is None:
            continue
        s = str(v)
        if "," in s or ":" in s or "\n" in s:
            s = json.dumps(s, ensure_ascii=False)  # A1111's quote(); its parser json-decodes it
        kv.append(f"{k}: {s}")
    lines.append(", ".join(kv))
    return "\n".join(lines)


@dataclass
class GenerationResult:
    """images[i] was made with parameters[i] (its seed is seeds[i])."""

    images: list
    parameters: list = field(default_factory=list)
    output_type: str = "pil"

    @property
    def seeds(self) -> list[int]:
        return [p["seed"] for p in self.parameters]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]

    def __iter__(self):
        return iter(self.images)

    def save(self, folder: str, prefix: str = "") -> list[str]:
        """Write PNG files named <prefix><seed>.png (an existing name gets a counter)."""
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        if self.output_type != "pil":
            raise ValueError(f"save() needs output_type='pil', this result is {self.output_type!r}")
        prefix = str(prefix)
        if any(c in prefix for c in ("/", "\\", "\0", os.sep, os.altsep or "/")) or prefix in (".", ".."):
            raise ValueError(f"prefix {prefix!r} must be the start of a file name, not a path")
        os.makedirs(folder, exist_ok=True)
        paths = []
        for img, p in zip(self.images, self.parameters):
            assert isinstance(img, Image.Image)
            info = PngInfo()
            info.add_text("parameters", parameters_text(p))
            base = os.path.join(folder, f"{prefix}{p['seed']}")
            path, n = base + ".png", 1
            while os.path.exists(path):
                path, n = f"{base}-{n}.png", n + 1
            img.save(path, pnginfo=info)
            paths.append(path)
        return paths
