"""The CUDA-graph fast path (fastdiff/graphs.py).

On CPU the graph's body runs eagerly on its static buffers (`capture=False`): that checks the
buffer logic (row buckets, per-row timesteps and contexts, hypernetwork strengths read from
device scalars) against the eager BatchDenoiser. On CUDA: the captured graph against the
eager fp16 path, the fp16 path against fastdiff's fp32 path (PSNR), warm-up, re-use without
re-capture, and concurrent calls.
"""
import math
import os
import shutil
import threading

import numpy as np
import pytest
import torch

import checkpoints as C
import fastdiff
from fastdiff.graphs import GraphCache

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = C.tiny_clip_config(width=64, layers=2)
    cfg.update(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
               pad_token_id=49407)
    root = str(tmp_path_factory.mktemp("graphs") / "model")
    C.save_diffusers_folder(root, C.tiny_unet(), C.tiny_vae(), C.clip_model(cfg, seed=3))
    shutil.rmtree(os.path.join(root, "tokenizer"))  # use the CLIP vocabulary fastdiff ships
    return root


@pytest.fixture(scope="module")
def hn_file(tmp_path_factory):
    """A NovelAI-layout hypernetwork for the tiny model's widths (context 64, attention 32/64)."""
    g = torch.Generator().manual_seed(5)

    def module(d):
        return {"linear1.weight": torch.randn(2 * d, d, generator=g) / d**0.5,
                "linear1.bias": 0.1 * torch.randn(2 * d, generator=g),
                "linear2.weight": torch.randn(d, 2 * d, generator=g) / (2 * d) ** 0.5,
                "linear2.bias": 0.1 * torch.randn(d, generator=g)}

    path = tmp_path_factory.mktemp("hn") / "hn.pt"
    torch.save({d: [module(d), module(d)] for d in (32, 64)}, path)
    return str(path)


ARGS = dict(steps=4, width=32, height=32, output_type="latent")


def _eager_graphs(pipe):
    pipe.graphs = GraphCache(capture=False)
    return pipe


@pytest.mark.parametrize("sampler,cfg", [("euler_ancestral", 7.0), ("dpmpp_2m", 1.0), ("heun", 3.5)])
def test_graph_body_matches_denoiser(model_dir, hn_file, sampler, cfg):
    plain = fastdiff.load(model_dir, device="cpu")
    graphed = _eager_graphs(fastdiff.load(model_dir, device="cpu"))
    for prompt, hn, seed in [("a red circle", [(hn_file, 0.5)], 11), ("a blue (square:1.3)", [(hn_file, 1.0)], 12),
                             ("a green diamond", (), 13)]:
        kw = dict(ARGS, sampler=sampler, guidance_scale=cfg, seed=seed, hypernetworks=hn, num_images=2)
        ref = plain(prompt, **kw).images
        out = graphed(prompt, **kw).images
        assert C.rel_err(out, ref) <= 1e-5, (prompt, hn)
    # one graph per hypernetwork set: a new prompt or strength reused the first
    assert graphed.graphs.captures == 2


def test_hypernetwork_strength_changes_graph_output(model_dir, hn_file):
    pipe = _eager_graphs(fastdiff.load(model_dir, device="cpu"))
    outs = [pipe("a red circle", seed=3, hypernetworks=[(hn_file, s)], **ARGS).images for s in (0.0, 1.0, 0.0)]
    assert pipe.graphs.captures == 1
    assert C.rel_err(outs[1], outs[0]) > 1e-3  # the strength reached the graph's buffer
    assert torch.equal(outs[0], outs[2])
    none = pipe("a red circle", seed=3, **ARGS).images
    assert C.rel_err(outs[0], none) <= 1e-6  # strength 0 == no hypernetwork


def test_cuda_graphs_need_cuda(model_dir):
    if CUDA:
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        fastdiff.load(model_dir, device="cpu", cuda_graphs=True)


# ---------------------------------------------------------------------------------- CUDA


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.mark.cuda
@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_cuda_graph_equals_eager_fp16(model_dir, sampler):
    graphed = fastdiff.load(model_dir, device="cuda", dtype=torch.float16)
    eager = fastdiff.load(model_dir, device="cuda", dtype=torch.float16, cuda_graphs=False)
    assert graphed.graphs is not None and eager.graphs is None
    kw = dict(ARGS, sampler=sampler, seed=21, num_images=2)
    a = graphed("a red circle on a blue background", **kw).images
    b = eager("a red circle on a blue background", **kw).images
    assert graphed.graphs.captures == 1
    assert C.rel_err(a, b) <= 1e-3


@pytest.mark.cuda
def test_cuda_fp16_matches_fp32(model_dir):
    fast = fastdiff.load(model_dir, device="cuda", dtype=torch.float16)
    ref = fastdiff.load(model_dir, device="cuda", dtype=torch.float32, cuda_graphs=False)
    kw = dict(steps=20, width=64, height=64, output_type="np", seed=5, num_images=4)
    a = fast("a yellow triangle on a black background", **kw).images
    b = ref("a yellow triangle on a black background", **kw).images
    assert psnr(a, b) >= 30.0


@pytest.mark.cuda
def test_cuda_warmup_and_reuse(model_dir, hn_file):
    pipe = fastdiff.load(model_dir, device="cuda", dtype=torch.float16)
    assert pipe.warmup([(2, 32, 32)], hypernetworks=[hn_file]) == 1
    base = pipe("a red circle", seed=1, num_images=2, hypernetworks=[(hn_file, 0.0)], **{**ARGS}).images
    other = pipe("a white square", seed=1, num_images=2, hypernetworks=[(hn_file, 1.0)], **ARGS).images
    again = pipe("a red circle", seed=1, num_images=2, hypernetworks=[(hn_file, 0.0)], **ARGS).images
    assert pipe.graphs.captures == 1  # prompt and strength changes replayed the warm graph
    assert torch.equal(base, again)
    assert C.rel_err(other, base) > 1e-2


@pytest.mark.cuda
def test_cuda_concurrent_calls(model_dir):
    pipe = fastdiff.load(model_dir, device="cuda", dtype=torch.float16)
    jobs = [("a red circle", 1), ("a blue square", 2), ("a black diamond", 3), ("a white triangle", 4)]
    serial = [pipe(p, seed=s, **ARGS).images for p, s in jobs]
    results = [None] * len(jobs)

    def run(i):
        p, s = jobs[i]
        results[i] = pipe(p, seed=s, **ARGS).images

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, serial):  # batched with each other: equal within fp16 rounding
        assert C.rel_err(a, b) <= 1e-3


def test_channels_last_unet_matches(model_dir):
    """channels_last (an option on CUDA, measured faster there) changes memory layout only."""
    ref = fastdiff.load(model_dir, device="cpu")
    cl = _eager_graphs(fastdiff.load(model_dir, device="cpu", channels_last=True))
    cl.graphs.channels_last = True
    assert cl.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    kw = dict(ARGS, seed=9, num_images=2)
    assert C.rel_err(cl("a red circle", **kw).images, ref("a red circle", **kw).images) <= 1e-5


@pytest.mark.cuda
def test_cuda_join_mid_way_replays_bucket_graphs(model_dir):
    """A request joining a running batch on CUDA: equal to its solo run within fp16 rounding,
    and the batch-size changes replay the row buckets' graphs instead of capturing new ones."""
    pipe = fastdiff.load(model_dir, device="cuda", dtype=torch.float16)
    kw = dict(ARGS, steps=12)
    alone_a = pipe("a red circle", seed=1, **kw).images
    alone_b = pipe("a blue square", seed=2, guidance_scale=3.0, **{**kw, "steps": 5}).images
    captures = pipe.graphs.captures
    ha = pipe.submit("a red circle", seed=1, **kw)
    while ha.progress()["steps_done"] < 3:
        pass
    hb = pipe.submit("a blue square", seed=2, guidance_scale=3.0, **{**kw, "steps": 5})
    a, b = ha.result(timeout=120).images, hb.result(timeout=120).images
    assert max(list(pipe.engine.batches)[-20:]) == 2  # they shared UNet calls
    assert pipe.graphs.captures - captures <= 1  # at most the 4-row bucket was new
    assert C.rel_err(a, alone_a) <= 1e-3 and C.rel_err(b, alone_b) <= 1e-3
