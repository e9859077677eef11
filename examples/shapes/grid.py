"""Draw the README's sample grid from the shipped shapes model.

    python -m examples.shapes.grid [--model fastdiff/data/shapes-model] [--out docs/shapes-grid.png]

Row 1-2: held-out prompts (attribute triples the model never saw), default sampler, 20 steps.
Row 3: the same first 8 prompts with the outlined-style hypernetwork at strength 1.
Row 4: prompts naming "pink", with the textual-inversion embedding loaded.
Captions print in grid order. Seeds are fixed, so the picture is reproducible.
"""
from __future__ import annotations

import argparse
import os
import sys

from PIL import Image

from examples.shapes import data as D
from examples.shapes.evaluate import EMBEDDING, HYPERNETWORK, MODEL, generate, novel_prompts

DEFAULT_OUT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "shapes-grid.png"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling (default 2)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    a = p.parse_args(argv)

    import fastdiff

    pipe = fastdiff.load(a.model)
    held = [c for c, _ in D.heldout_prompts(16, seed=1)]
    pink = [c for c, _ in novel_prompts(8, seed=1)]
    kw = {"seed": 1, "steps": a.steps}
    images = generate(pipe, held, **kw)
    images += generate(pipe, held[:8], hypernetworks=[(os.path.join(a.model, HYPERNETWORK), 1.0)], **kw)
    images += generate(pipe, pink, embeddings=[os.path.join(a.model, EMBEDDING)], **kw)
    captions = held + [f"{c}  [hypernetwork]" for c in held[:8]] + pink
    sheet = Image.fromarray(D.contact_sheet(images, columns=8))
    sheet = sheet.resize((sheet.width * a.scale, sheet.height * a.scale), Image.NEAREST)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    sheet.save(a.out)
    for i, c in enumerate(captions):
        print(f"row {i // 8 + 1} col {i % 8 + 1}: {c}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
