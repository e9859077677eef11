"""The model that ships with fastdiff (fastdiff/data/shapes-model), checked end to end
by what it draws: the shapes checker (examples/shapes/checker.py) reads background, colour,
shape, position and style off each generated picture and compares them with the prompt. This
catches numerics that parity on random weights cannot (a kernel or sampler that is subtly off
draws wrong colours, shapes or positions). Scores are over the held-out prompts (triples the
model never saw), 20 steps, CFG 3 (examples/shapes/evaluate.py says why), prompt i with
seed i, as `python -m examples.shapes.evaluate` computes them; examples/shapes/README.md has the
numbers of the shipped weights.

The full scoring tests are marked slow (several minutes on 2 cores): `python -m pytest -m slow
tests/test_shapes_model.py`. The default run keeps the default sampler's score, the check that pink
needs the embedding, the single-file export and the main command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from examples.shapes import data as D
from examples.shapes import evaluate as E
from examples.shapes.checker import check, read
from fastdiff.sampling import SAMPLERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "fastdiff", "data", "shapes-model")
N = 100  # held-out prompts per score
TARGET = 0.90  # fully correct pictures, default sampler
SLACK = 0.05  # every other sampler and op path stays within this of TARGET
# Samplers scored on the karras schedule, A1111's usual pairing for them: on the "normal"
# schedule at 20 steps they read worse on this model (the likely cause is that schedule's very
# unequal log-sigma steps, which their multistep / SDE updates divide by). Shipped weights,
# fully correct on "normal" at CFG 3: 0.00 (dpmpp_3m_sde), 0.85 (dpm_2_ancestral), 0.82
# (dpmpp_2m_sde), 0.90 (lms), 0.94 (lcm); on karras 0.89 / 0.96 / 0.93 / 0.95 / 0.95
# (examples/shapes/README.md). Their updates match k-diffusion's in tests/test_sampling.py.
KARRAS = ("dpm_2_ancestral", "lms", "dpmpp_2m_sde", "dpmpp_3m_sde", "lcm")


@pytest.fixture(scope="module")
def pipe():
    import fastdiff

    return fastdiff.load(device="cpu", dtype=torch.float32)  # no path: the shipped model


def test_default_sampler_reaches_the_target(pipe):
    res = E.heldout(pipe, N)  # euler_ancestral, the pipeline's default
    assert res["all"] >= TARGET, res


@pytest.mark.slow
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "euler_ancestral"])
def test_every_sampler(pipe, sampler):
    res = E.heldout(pipe, N, sampler=sampler, schedule="karras" if sampler in KARRAS else "normal")
    assert res["all"] >= TARGET - SLACK, (sampler, res)


@pytest.mark.slow
def test_triton_interpreter_path_draws_what_the_torch_path_draws(pipe, monkeypatch):
    """The Triton kernels (interpreted on the CPU) against the torch ops, same prompts and seeds,
    20 steps: the pictures agree to a few levels and the checker reads the same attributes off
    each pair, so the Triton path's score is the torch path's. Two prompts, not 100: the
    interpreter runs every kernel program in Python (2 prompts: 63 s at 20 steps; 6 in one
    batch: 153 s, so 100 would take ~40 min), so the 100-prompt scores are the torch path's
    (above); on CUDA this test runs the compiled kernels."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU machines)")
    pairs = D.heldout_prompts(N)[:2]
    prompts = [c for c, _ in pairs]
    monkeypatch.setenv("FASTDIFF_OPS", "torch")
    ref = E.generate(pipe, prompts, steps=20)
    monkeypatch.setenv("FASTDIFF_OPS", "triton")
    got = E.generate(pipe, prompts, steps=20)
    for (_, attrs), r, g in zip(pairs, ref, got):
        diff = np.abs(g.astype(int) - r.astype(int))
        assert np.percentile(diff, 99) <= 4 and diff.max() <= 32, np.percentile(diff, [50, 99, 100])
        assert check(g, attrs) == check(r, attrs)
        assert read(g)["iou"] == pytest.approx(read(r)["iou"], abs=0.03)


def test_triton_kernels_on_cuda_score_like_the_torch_path(pipe, monkeypatch):
    """On a GPU the compiled kernels are fast enough to score all N held-out prompts: the
    pipeline's CUDA path (Triton kernels forced, fp16, CUDA graphs) against the torch path's
    score on the CPU in fp32, same prompts and seeds (the noise is drawn on the CPU)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: the interpreter would take hours for N prompts (see the test above)")
    import fastdiff

    ref = E.heldout(pipe, N)
    monkeypatch.setenv("FASTDIFF_OPS", "triton")
    got = E.heldout(fastdiff.load(device="cuda", dtype=torch.float16), N)
    assert got["all"] >= TARGET and abs(got["all"] - ref["all"]) <= SLACK, (got, ref)


@pytest.mark.slow
def test_hypernetwork_makes_shapes_outlined_as_strength_rises(pipe):
    res = E.hypernetwork(pipe, os.path.join(MODEL, E.HYPERNETWORK), (0.0, 0.5, 1.0), N)
    rate = [res[s]["outlined"] for s in (0.0, 0.5, 1.0)]
    assert rate[0] < 0.1 and rate[0] < rate[1] < rate[2] and rate[2] >= 0.6, res
    for s in (0.0, 0.5, 1.0):  # what the caption asks for still holds, the shape class too
        assert res[s]["colour"] >= 0.85 and res[s]["background"] >= 0.95 and res[s]["position"] >= 0.85, (s, res[s])
        assert res[s]["shape"] >= 0.85, (s, res[s])


@pytest.mark.slow
def test_embedding_teaches_a_new_colour_word(pipe):
    res = E.embedding(pipe, os.path.join(MODEL, E.EMBEDDING), N)
    assert res["pink"] >= 0.8, res


def test_without_the_embedding_pink_is_not_drawn():
    """The control: the word alone (no embedding) does not give pink, so the embedding does.
    A fresh pipeline: embeddings a call loads stay loaded (A1111's behaviour)."""
    import fastdiff

    pairs = E.novel_prompts(N)
    images = E.generate(fastdiff.load(device="cpu", dtype=torch.float32), [c for c, _ in pairs])
    hits = [read(im)["colour" if a["colour"] == "pink" else "background"] == "pink" for im, (_, a) in zip(images, pairs)]
    assert np.mean(hits) <= 0.2


def test_single_file_export_reloads_and_draws_the_same(pipe, tmp_path):
    """The folder exported as one LDM single-file checkpoint (SD 1.x key names) with a
    v-parameterisation yaml beside it, as A1111 keeps v-models: same pictures."""
    from checkpoints import save_safetensors, sd1_single_file

    import fastdiff

    def part(module, folder):  # the exporter wants diffusers' config dicts
        with open(os.path.join(MODEL, folder, "config.json")) as f:
            return SimpleNamespace(state_dict=module.state_dict, config=json.load(f))

    sd = sd1_single_file(part(pipe.unet, "unet"), part(pipe.vae, "vae"), pipe.text_encoder)
    path = save_safetensors({k: v.to(torch.float16) for k, v in sd.items()}, str(tmp_path / "shapes.safetensors"))
    (tmp_path / "shapes.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    # Not in any tensor shape: group counts, head counts, the latent size (see formats/ldm.py).
    single = fastdiff.load(path, device="cpu", dtype=torch.float32, config=single_file_config(pipe))
    assert single.info.prediction_type == "v_prediction" and single.info.native_size == D.SIZE
    pairs = D.heldout_prompts(N)[:20]
    prompts = [c for c, _ in pairs]
    a, b = E.generate(pipe, prompts), E.generate(single, prompts)
    assert max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(a, b)) <= 1


def single_file_config(pipe) -> dict:
    u, v, t = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config
    return {"unet": {"norm_num_groups": u.norm_num_groups, "attention_head_dim": u.attention_head_dim,
                     "sample_size": u.sample_size},
            "vae": {"norm_num_groups": v.norm_num_groups, "sample_size": v.sample_size},
            "text_encoder": {"num_attention_heads": t.num_attention_heads}}


def test_main_command_uses_the_shipped_model(tmp_path):
    """README's main command: no --model, a PNG the checker reads as what was asked."""
    r = subprocess.run([sys.executable, "-m", "fastdiff", "generate", "a red circle on a blue background, top left",
                        "--cfg", "3", "--seed", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=os.environ | {"FASTDIFF_OPS": "torch"})
    assert r.returncode == 0, r.stderr
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 1
    from PIL import Image

    im = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert im.shape == (D.SIZE, D.SIZE, 3)
    got = read(im)
    assert (got["shape"], got["colour"], got["background"], got["position"]) == ("circle", "red", "blue", "top left"), got
