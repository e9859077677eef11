"""Score a shapes model with the checker: held-out prompts per sampler, held-out prompts asking
for outlines, the hypernetwork's style rate per strength, the embedding's colour.

    python -m examples.shapes.evaluate [--model fastdiff/data/shapes-model] [--n 100]
                                       [--steps 20] [--cfg 3] [--samplers all|NAME,...]
                                       [--schedule normal|karras|...] [--json FILE]

Every image is generated through fastdiff's public pipeline (the same code `fastdiff generate`
runs); FASTDIFF_OPS picks the op path (`torch`, or `triton` with TRITON_INTERPRET=1 on a CPU).
Prompt i of a run uses seed + i.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from examples.shapes import data as D
from examples.shapes.checker import read, score

MODEL = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "fastdiff", "data", "shapes-model"))
HYPERNETWORK = "shapes-outlined.pt"
EMBEDDING = "pink.safetensors"


# The guidance the scores are taken at. The models are small, and strong guidance pushes their
# colours past the palette colour into a neighbouring one and costs some samplers position:
# at A1111's usual 7 the 2h recipe's weights read 0.80 fully correct on held-out prompts, 0.97
# at 4. 3 was chosen over four trained models (the 2h weights and recipe 1h seeds 0-2), on
# each of which the base model scored better at 3 than at 4 (default sampler 1.00 / 0.86 /
# 0.98 / 0.98 against 0.97 / 0.82 / 0.95 / 0.95) while the add-ons moved by at most 0.01 down;
# two seeds trained afterwards confirmed it (examples/shapes/README.md has the shipped scores).
CFG = 3.0


def generate(pipe, prompts, *, seed=0, steps=20, sampler="euler_ancestral", batch_size=50,
             guidance_scale=CFG, **kw):
    """prompts -> uint8 [64, 64, 3] images, prompt i with seed + i."""
    r = pipe(list(prompts), seed=seed, steps=steps, sampler=sampler, output_type="np",
             batch_size=batch_size, guidance_scale=guidance_scale, **kw)
    return [np.asarray(im) for im in r.images]


def heldout(pipe, n=100, *, seed=0, style="filled", **kw) -> dict:
    """The checker's score over n held-out prompts (triples the model never saw); style
    "outlined" asks for outlined shapes in the caption ("an outlined red circle ...")."""
    pairs = D.heldout_prompts(n, seed, style)
    return score(generate(pipe, [c for c, _ in pairs], seed=seed, **kw), [a for _, a in pairs])


def hypernetwork(pipe, path, strengths=(0.0, 0.5, 1.0), n=100, *, seed=0, **kw) -> dict:
    """{strength: score} on n held-out prompts that do not mention a style; 'outlined' is the
    rate of outlined shapes among all images (the style the hypernetwork imposes)."""
    pairs = D.heldout_prompts(n, seed)
    prompts = [c for c, _ in pairs]
    out = {}
    for s in strengths:
        images = generate(pipe, prompts, seed=seed, hypernetworks=[(path, s)], **kw)
        res = score(images, [a | {"style": "outlined"} for _, a in pairs])
        res["outlined"] = res["style"]
        del res["style"], res["all"]  # colour, shape, background, position: read whatever the style
        out[s] = res
    return out


def novel_prompts(n=100, seed=0) -> list[tuple[str, dict]]:
    """n prompts with the novel colour as the shape's or the background's colour."""
    out = []
    for i in range(n):
        attrs, _, _ = D.sample_attributes(i, seed, "novel", "filled")
        out.append((D.caption(attrs), attrs))
    return out


def embedding(pipe, path, n=100, *, seed=0, **kw) -> dict:
    """Score on prompts naming the embedding's colour word ("a pink circle on ..."), with the
    embedding loaded; 'pink' is the rate at which the pink part reads as pink."""
    pairs = novel_prompts(n, seed)
    images = generate(pipe, [c for c, _ in pairs], seed=seed, embeddings=[path], **kw)
    res = score(images, [a for _, a in pairs])
    hits = []
    for im, (_, a) in zip(images, pairs):
        got = read(im)
        key = "colour" if a["colour"] in D.NOVEL_COLOURS else "background"
        hits.append(got[key] == a[key])
    res["pink"] = float(np.mean(hits))
    return res


def _fmt(res: dict) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in res.items() if k != "n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--n", type=int, default=100, help="prompts per score (default 100)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=CFG, help=f"guidance scale (default {CFG})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samplers", default="euler_ancestral",
                   help="comma-separated sampler names, or 'all' (default: the default sampler)")
    p.add_argument("--schedule", default="normal",
                   help="sigma schedule for the sampler scores (default normal; the hypernetwork and "
                   "embedding scores use the default sampler and schedule)")
    p.add_argument("--no-addons", action="store_true", help="skip the outlined-prompts, hypernetwork and embedding scores")
    p.add_argument("--json", help="write the scores here")
    a = p.parse_args(argv)

    import fastdiff
    from fastdiff.sampling import SAMPLERS

    pipe = fastdiff.load(a.model)
    names = SAMPLERS if a.samplers == "all" else tuple(a.samplers.split(","))
    results: dict = {"model": a.model, "n": a.n, "steps": a.steps, "cfg": a.cfg, "schedule": a.schedule,
                     "ops": os.environ.get("FASTDIFF_OPS", "auto"),
                     "samplers": {}}
    for name in names:
        t0 = time.time()
        res = results["samplers"][name] = heldout(pipe, a.n, seed=a.seed, steps=a.steps, sampler=name,
                                                   schedule=a.schedule, guidance_scale=a.cfg)
        print(f"{name:20s} {_fmt(res)}  ({time.time() - t0:.0f}s)", flush=True)
    if not a.no_addons:
        # The base model asked for outlines in words: the hypernetwork, which imposes the style
        # without the word, draws them about as well as this at best.
        res = results["outlined_prompts"] = heldout(pipe, a.n, seed=a.seed, steps=a.steps, style="outlined",
                                                    guidance_scale=a.cfg)
        print(f"outlined prompts     {_fmt(res)}", flush=True)
        hn = os.path.join(a.model, HYPERNETWORK)
        results["hypernetwork"] = hypernetwork(pipe, hn, n=a.n, seed=a.seed, steps=a.steps, guidance_scale=a.cfg)
        for s, res in results["hypernetwork"].items():
            print(f"hypernetwork {s:<7} {_fmt(res)}", flush=True)
        res = results["embedding"] = embedding(pipe, os.path.join(a.model, EMBEDDING), n=a.n,
                                                seed=a.seed, steps=a.steps, guidance_scale=a.cfg)
        print(f"embedding            {_fmt(res)}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
