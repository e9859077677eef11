"""The pipeline and its API on CPU in fp32, on a tiny random SD 1.x model whose
prompts go through CLIP's real vocabulary: parity with diffusers' StableDiffusionPipeline,
seeds, classifier-free guidance batching, input checks before any work, PNG parameters,
img2img, hypernetworks and embeddings, concurrent calls, output types."""
import json
import math
import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from checkpoints import real_vocab_clip, rel_err, tiny_unet, tiny_vae
from fastdiff import sampling
from fastdiff.formats import FormatError
from fastdiff.tokenizer import default_tokenizer

SIZE = dict(width=32, height=32)  # tiny_vae halves: latents [4, 16, 16]
LATENT = (4, 16, 16)
LONG = " ".join(f"word{i}" for i in range(60))  # more than 75 tokens: two CLIP chunks


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return fastdiff.load(tiny_sd_dir, device="cpu", dtype=torch.float32)


def seed_noise(seed, n):
    """fastdiff's initial noise: image i draws from its own CPU generator seeded seed + i."""
    return torch.stack([torch.randn(LATENT, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


def latents(pipe, prompt, **kw):
    kw = {"steps": 3, "seed": 7, **SIZE, **kw}
    return pipe(prompt, output_type="latent", **kw).images


def assert_same_images(a, b):
    """Equal up to fp32 roundoff, image by image: a UNet batch of another size rounds
    differently (~1e-6), which guidance 7 amplifies; a wrong seed or context is ~1 off."""
    assert a.shape == b.shape
    for x, y in zip(a, b):
        assert rel_err(x, y) <= 1e-4


class Spy:
    """Counts (and records the batch of) calls to the networks of a pipeline."""

    def __init__(self, pipe, monkeypatch):
        self.unet_batches, self.text_calls, self.vae_calls = [], 0, 0
        unet_fwd, text_fwd = pipe.unet.forward, pipe.text_encoder.forward
        vae_enc, vae_dec = pipe.vae.encode, pipe.vae.decode

        def unet(x, *a, **k):
            self.unet_batches.append(x.shape[0])
            return unet_fwd(x, *a, **k)

        def text(*a, **k):
            self.text_calls += 1
            return text_fwd(*a, **k)

        def vae(fn):
            def call(*a, **k):
                self.vae_calls += 1
                return fn(*a, **k)
            return call

        monkeypatch.setattr(pipe.unet, "forward", unet)
        monkeypatch.setattr(pipe.text_encoder, "forward", text)
        monkeypatch.setattr(pipe.vae, "encode", vae(vae_enc))
        monkeypatch.setattr(pipe.vae, "decode", vae(vae_dec))

    @property
    def idle(self):
        return not self.unet_batches and not self.text_calls and not self.vae_calls


# ------------------------------------------------------------------------- parity with diffusers

_TRAINING = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 steps_offset=1)  # steps_offset: unused by these spacings


@pytest.fixture(scope="module")
def v_pipe(tiny_sd_dir, tmp_path_factory):
    """The tiny model as an SD 2.x-style v-prediction model whose tokenizer pads with "!" (id 0)."""
    import json
    import shutil

    root = shutil.copytree(tiny_sd_dir, tmp_path_factory.mktemp("v") / "tiny-v")
    for name, key, value in (("scheduler/scheduler_config.json", "prediction_type", "v_prediction"),
                             ("tokenizer/tokenizer_config.json", "pad_token", "!")):
        cfg = json.loads((root / name).read_text())
        (root / name).write_text(json.dumps({**cfg, key: value}))
    p = fastdiff.load(root, device="cpu", dtype=torch.float32)
    assert p.info.prediction_type == "v_prediction" and p.tokenizer.pad_id == 0
    return p


def _euler(prediction_type):
    from diffusers import EulerDiscreteScheduler

    # "normal" = timesteps linspace(999, 0, steps), as diffusers' "linspace" spacing. For 10 steps
    # these are integers, where diffusers' linear-in-sigma and k-diffusion's log-sigma
    # interpolation agree. init_noise_sigma = sigma_max: both start at sigma_max * noise.
    return EulerDiscreteScheduler(timestep_spacing="linspace", prediction_type=prediction_type, **_TRAINING), 1.0


def _dpmpp_2m(prediction_type):
    from diffusers import DPMSolverMultistepScheduler

    # "simple" = every 100th training sigma from t = 999 down (999, 899, ..., 99), which is
    # diffusers' "trailing" spacing; DPM-Solver++(2M) with a first-order first and last step
    # (lower_order_final, final sigma 0), as k-diffusion's sample_dpmpp_2m.
    sched = DPMSolverMultistepScheduler(timestep_spacing="trailing", algorithm_type="dpmsolver++", solver_order=2,
                                        solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
                                        use_karras_sigmas=False, prediction_type=prediction_type, **_TRAINING)
    # diffusers' DPM-Solver works on the variance-preserving x_vp = x / sqrt(1 + sigma^2) and
    # starts from unit noise (init_noise_sigma 1); k-diffusion starts at x = sigma_max * noise.
    # Same trajectory after the change of variables, and at sigma = 0 both are the latents.
    s = float(sampling.sigmas("simple", 10)[0])
    return sched, s / math.sqrt(1 + s * s)


@pytest.mark.parametrize("model,sampler,schedule,reference", [
    ("pipe", "euler", "normal", _euler),
    ("pipe", "dpmpp_2m", "simple", _dpmpp_2m),
    ("v_pipe", "euler", "normal", _euler),
])
def test_final_latents_match_diffusers(request, model, sampler, schedule, reference):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = request.getfixturevalue(model)

    # No A1111 syntax here: diffusers would read brackets as text.
    prompt, negative, seed, n = "a red balloon over a lake, at sunset", "blurry, grey", 1234, 2
    out = pipe(prompt, negative_prompt=negative, steps=10, guidance_scale=7.0, sampler=sampler, schedule=schedule,
               seed=seed, num_images=n, output_type="latent", **SIZE).images
    scheduler, start_scale = reference(pipe.info.prediction_type)
    ref_pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=real_vocab_clip(), unet=tiny_unet(), scheduler=scheduler,
        tokenizer=CLIPTokenizer.from_pretrained(f"{pipe.info.path}/tokenizer"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = ref_pipe(prompt, negative_prompt=negative, num_inference_steps=10, guidance_scale=7.0,
                       num_images_per_prompt=n, latents=seed_noise(seed, n) * start_scale, output_type="latent",
                       **SIZE).images
    assert out.shape == ref.shape == (n, *LATENT) and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-4
    assert rel_err(out[0], out[1]) > 0.1  # the two seeds give two images


# ------------------------------------------------------------------------------------- seeds


def test_seed_i_is_image_i_whatever_the_batching(pipe):
    """euler_ancestral draws fresh noise every step: per-image generators keep it per image."""
    whole = pipe("a cat", steps=3, seed=40, num_images=3, output_type="latent", **SIZE)
    assert whole.seeds == [40, 41, 42] and whole.images.shape == (3, *LATENT)
    for batch_size in (1, 2):
        r = latents(pipe, "a cat", seed=40, num_images=3, batch_size=batch_size)
        assert_same_images(r, whole.images)
    assert_same_images(latents(pipe, "a cat", seed=42), whole.images[2:])
    assert rel_err(whole.images[0], whole.images[1]) > 0.1


def test_prompt_lists_image_independent_of_its_batch(pipe):
    """Image i of a prompt list is the image of its prompt alone with seed + i, even when
    another prompt in the call needs more CLIP chunks."""
    prompts = ["a cat", LONG]
    r = pipe(prompts, negative_prompt="dog", steps=2, seed=10, num_images=2, output_type="latent", **SIZE)
    assert r.seeds == [10, 11, 12, 13]
    assert [p["prompt"] for p in r.parameters] == ["a cat", "a cat", LONG, LONG]
    for i, prompt in enumerate(["a cat", "a cat", LONG, LONG]):
        alone = latents(pipe, prompt, negative_prompt="dog", steps=2, seed=10 + i)
        assert_same_images(r.images[i:i + 1], alone)
    assert_same_images(latents(pipe, prompts, negative_prompt="dog", steps=2, seed=10, num_images=2, batch_size=3),
                       r.images)


def test_no_seed_draws_one_and_reports_it(pipe):
    a = pipe("a cat", steps=2, num_images=2, output_type="latent", **SIZE)
    b = pipe("a cat", steps=2, num_images=2, output_type="latent", **SIZE)
    s = a.seeds[0]
    assert isinstance(s, int) and a.seeds == [s, s + 1] and b.seeds[0] != s
    assert torch.equal(latents(pipe, "a cat", steps=2, seed=s, num_images=2), a.images)


def test_drawn_seed_leaves_room_for_every_image(monkeypatch):
    """A drawn seed is valid for the whole call: seed + num_images - 1 <= MAX_SEED."""
    from fastdiff import request as P

    class Top:  # the largest value randrange can return
        def randrange(self, *args):
            return args[-1] - 1

    monkeypatch.setattr(P.random, "SystemRandom", Top)
    req = P.check_request("x", num_images=4)
    assert req.seed + 3 <= P.MAX_SEED


# -------------------------------------------------------------------------------------- CFG


def test_cfg_one_unet_batch_and_guidance_one_skips_uncond(pipe, monkeypatch):
    spy = Spy(pipe, monkeypatch)
    latents(pipe, "a cat", steps=3, num_images=2, guidance_scale=7.0, sampler="euler")
    assert spy.unet_batches == [4, 4, 4]  # cond + uncond of 2 images, one UNet call per step
    spy.unet_batches.clear()
    latents(pipe, "a cat", steps=3, num_images=2, guidance_scale=1.0, sampler="euler")
    assert spy.unet_batches == [2, 2, 2]


def test_guidance_one_is_cond_only(pipe):
    """With guidance 1 the negative prompt has no effect (uncond is not computed at all)."""
    a = latents(pipe, "a cat", guidance_scale=1.0, negative_prompt="")
    b = latents(pipe, "a cat", guidance_scale=1.0, negative_prompt="a dog, " * 40)
    assert torch.equal(a, b)
    assert rel_err(latents(pipe, "a cat", guidance_scale=3.0), a) > 1e-3


# --------------------------------------------------------------------- bad input, before work


def _cmyk():
    return Image.new("CMYK", (32, 32), (10, 20, 30, 40))


BAD = [
    (dict(width=33), ValueError, r"width must be a positive multiple of 8, got 33"),
    (dict(height=20), ValueError, r"height must be a positive multiple of 8, got 20"),
    (dict(width=0), ValueError, r"width .* got 0"),
    (dict(steps=0), ValueError, r"steps must be an integer >= 1, got 0"),
    (dict(steps=-3), ValueError, r"got -3"),
    (dict(steps=2.5), ValueError, r"got 2\.5"),
    (dict(init_image="RGB", strength=0.0), ValueError, r"strength must be in \(0, 1\], got 0\.0"),
    (dict(init_image="RGB", strength=1.5), ValueError, r"strength must be in \(0, 1\], got 1\.5"),
    (dict(strength=-0.1), ValueError, r"strength must be in \(0, 1\], got -0\.1"),
    (dict(sampler="eulr"), ValueError, r"unknown sampler 'eulr'; valid: euler, "),
    (dict(schedule="cosine"), ValueError, r"unknown schedule 'cosine'"),
    (dict(output_type="jpeg"), ValueError, r"output_type must be one of .* got 'jpeg'"),
    (dict(num_images=0), ValueError, r"num_images must be an integer >= 1, got 0"),
    (dict(seed=-1), ValueError, r"seed must be .* got -1"),
    (dict(guidance_scale=float("nan")), ValueError, r"guidance_scale must be a finite number"),
    (dict(negative_prompt=["x", "y"]), ValueError, r"2 negative prompts for 1 prompts"),
    (dict(clip_skip=0), ValueError, r"clip_skip must be an integer >= 1, got 0"),
    (dict(init_image="CMYK"), ValueError, r"init image has mode 'CMYK'"),
    (dict(init_image="missing.png"), FileNotFoundError, r"init image .*missing\.png does not exist"),
    (dict(init_image="notimage.png"), ValueError, r"init image .*notimage\.png is not a readable image"),
    (dict(hypernetworks=["nope.pt"]), FileNotFoundError, r"hypernetwork .*nope\.pt does not exist"),
    (dict(hypernetworks=[("nope.pt", 0.5)]), FileNotFoundError, r"hypernetwork .*nope\.pt does not exist"),
]


def _materialise(kw, tmp_path):
    kw = dict(kw)
    img = kw.get("init_image")
    if img == "RGB":
        kw["init_image"] = Image.new("RGB", (32, 32), (200, 30, 30))
    elif img == "CMYK":
        kw["init_image"] = _cmyk()
    elif img == "notimage.png":
        (tmp_path / img).write_text("not a png")
        kw["init_image"] = str(tmp_path / img)
    elif img is not None:
        kw["init_image"] = str(tmp_path / img)
    if "hypernetworks" in kw:
        kw["hypernetworks"] = [(str(tmp_path / h[0]), h[1]) if isinstance(h, tuple) else str(tmp_path / h)
                               for h in kw["hypernetworks"]]
    return kw


@pytest.mark.parametrize("kw,exc,msg", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_raises_before_the_networks_run(pipe, monkeypatch, tmp_path, kw, exc, msg):
    spy = Spy(pipe, monkeypatch)
    with pytest.raises(exc, match=msg):
        pipe("a cat", **{"steps": 2, **SIZE, **_materialise(kw, tmp_path)})
    assert spy.idle


@pytest.mark.parametrize("kw,exc,msg", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_raises_before_the_model_loads(tiny_sd_dir, monkeypatch, tmp_path, kw, exc, msg):
    from fastdiff import loader

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loader, "load_pipeline", no_load)
    monkeypatch.setattr(loader, "_CACHE", {})
    with pytest.raises(exc, match=msg):
        fastdiff.generate("a cat", model=tiny_sd_dir, **{"steps": 2, **SIZE, **_materialise(kw, tmp_path)})


def test_missing_model_file(tmp_path, monkeypatch):
    from fastdiff import loader

    built = []
    monkeypatch.setattr(loader, "_build", lambda *a, **k: built.append(a))
    for path in (tmp_path / "no-such-model.safetensors", tmp_path / "no-such-folder"):
        with pytest.raises(FileNotFoundError, match=re.escape(str(path)) + " does not exist"):
            fastdiff.generate("a cat", model=str(path), steps=2, **SIZE)
        with pytest.raises(FileNotFoundError, match="does not exist"):
            fastdiff.load(path)
    assert not built


def test_pipeline_rejects_bad_latents_and_embedding_before_work(pipe, monkeypatch, tmp_path):
    spy = Spy(pipe, monkeypatch)
    with pytest.raises(ValueError, match=r"latents must be \[2, 4, 16, 16\], got \[1, 4, 16, 16\]"):
        pipe("a cat", steps=2, num_images=2, latents=torch.randn(1, *LATENT), **SIZE)
    with pytest.raises(FileNotFoundError, match=r"embedding .*missing-embedding\.pt does not exist"):
        pipe("a cat", steps=2, embeddings=[str(tmp_path / "missing-embedding.pt")], **SIZE)
    assert spy.idle


# ---------------------------------------------------------------------------- PNG parameters

# A1111's parse_generation_parameters key/value pattern (modules/infotext_utils.py).
_A1111_KV = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _parse_infotext(text):
    *lines, last = text.strip().split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    kv = {}
    for k, v in _A1111_KV.findall(last):
        v = v.strip()
        kv[k.strip()] = json.loads(v) if v[:1] == v[-1:] == '"' else v  # A1111's unquote()
    return "\n".join(prompt), "\n".join(negative), kv


def test_infotext_values_round_trip_through_a1111_parsing():
    from fastdiff.results import parameters_text

    model, hns = 'my "best", model:v2', "style:0.5, other:1"
    p = dict(prompt="a cat,\nsecond line", negative_prompt="ugly: very", steps=2, sampler="dpmpp_2m",
             schedule="karras", guidance_scale=7.5, seed=1, width=32, height=48, clip_skip=2, model_hash="0123abcdef",
             model_name=model, hypernetworks=hns, version="9.9")
    prompt, negative, kv = _parse_infotext(parameters_text(p))
    assert (prompt, negative) == ("a cat,\nsecond line", "ugly: very")
    assert kv == {"Steps": "2", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7.5", "Seed": "1",
                  "Size": "32x48", "Model hash": "0123abcdef", "Model": model, "Clip skip": "2",
                  "Hypernetworks": hns, "Version": "fastdiff 9.9"}


def test_png_parameters_chunk(pipe, tmp_path):
    import hashlib

    prompt, negative = "a red (balloon:1.2), at night", "blurry, low quality"
    r = pipe(prompt, negative_prompt=negative, steps=2, guidance_scale=6.5, seed=99, num_images=2, **SIZE)
    paths = r.save(str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["99.png", "100.png"]
    unet_file = f"{pipe.info.path}/unet/diffusion_pytorch_model.safetensors"
    model_hash = hashlib.sha256(open(unet_file, "rb").read()).hexdigest()[:10]
    for path, seed, img in zip(paths, (99, 100), r.images):
        with Image.open(path) as f:
            text = f.text["parameters"]
            assert np.array_equal(np.asarray(f.convert("RGB")), np.asarray(img))
        assert img.info["parameters"] == text  # the returned image carries it too, as A1111's do
        p, n, kv = _parse_infotext(text)
        assert (p, n) == (prompt, negative)
        assert kv["Steps"] == "2" and kv["Sampler"] == "Euler a" and float(kv["CFG scale"]) == 6.5
        assert kv["Seed"] == str(seed) and kv["Size"] == "32x32"
        assert kv["Model hash"] == model_hash and kv["Model"] == "tiny-sd1"
    again = r.save(str(tmp_path))  # never overwrites
    assert [p.rsplit("/", 1)[1] for p in again] == ["99-1.png", "100-1.png"]


def test_loaded_hypernetwork_of_other_widths_is_refused(pipe, monkeypatch, tmp_path):
    path = tmp_path / "wide.pt"
    torch.save({48: [{"linear1.weight": torch.randn(96, 48), "linear1.bias": torch.zeros(96),
                      "linear2.weight": torch.randn(48, 96), "linear2.bias": torch.zeros(48)}] * 2}, path)
    spy = Spy(pipe, monkeypatch)
    with pytest.raises(ValueError, match=r"wide\.pt: its widths \[48\] match none of this model's attention inputs"):
        pipe("a cat", hypernetworks=[str(path)], steps=2, **SIZE)
    assert not spy.unet_batches and not spy.vae_calls


def test_result_parameters(pipe):
    for output_type in ("pil", "latent"):
        r = pipe(["a cat", "a dog"], negative_prompt=["x", "y"], steps=2, seed=3, output_type=output_type,
                 sampler="euler", schedule="karras", guidance_scale=5, **SIZE)
        assert len(r) == len(r.parameters) == 2
        for p, prompt, neg, seed in zip(r.parameters, ("a cat", "a dog"), ("x", "y"), (3, 4)):
            assert (p["prompt"], p["negative_prompt"], p["seed"], p["steps"]) == (prompt, neg, seed, 2)
            assert (p["sampler"], p["schedule"], p["guidance_scale"]) == ("euler", "karras", 5.0)
            assert (p["width"], p["height"], p["strength"]) == (32, 32, None)
    with pytest.raises(ValueError, match="save\\(\\) needs output_type='pil'"):
        r.save("unused")


# ----------------------------------------------------------------------------------- img2img


@pytest.fixture(scope="module")
def init_image():
    g = torch.Generator().manual_seed(5)
    return Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy())


def _steps_taken(pipe, **kw):
    seen = []
    pipe("a cat", seed=1, output_type="latent", sampler="euler", callback=lambda d: seen.append(d["sigma"]),
         **{**SIZE, **kw})
    return seen


@pytest.mark.parametrize("steps,strength", [(10, 1.0), (10, 0.75), (10, 0.5), (4, 0.3), (4, 0.01)])
def test_img2img_steps_follow_a1111(pipe, init_image, steps, strength):
    """A1111 img2img: t_enc = int(min(strength, 0.999) * steps); it samples
    sigmas[steps - t_enc - 1:] of the full schedule, t_enc + 1 steps (strength 1: all of them)."""
    full = sampling.sigmas("normal", steps).tolist()
    seen = _steps_taken(pipe, init_image=init_image, strength=strength, steps=steps)
    t_enc = int(min(strength, 0.999) * steps)
    assert seen == pytest.approx(full[steps - t_enc - 1:-1], rel=1e-12)


def test_img2img(pipe, init_image):
    base = dict(steps=4, seed=3, sampler="euler")
    out = {s: latents(pipe, "a cat", init_image=init_image, strength=s, **base) for s in (0.3, 0.6, 1.0)}
    assert all(v.shape == (1, *LATENT) for v in out.values())
    assert rel_err(out[0.3], out[0.6]) > 1e-2 and rel_err(out[0.6], out[1.0]) > 1e-2
    # The result depends on the image, less so as strength grows.
    other = init_image.transpose(Image.FLIP_LEFT_RIGHT)
    low = rel_err(latents(pipe, "a cat", init_image=other, strength=0.3, **base), out[0.3])
    high = rel_err(latents(pipe, "a cat", init_image=other, strength=1.0, **base), out[1.0])
    assert low > high > 0
    # Paths, RGBA, L and tensors are accepted; other sizes are resized to the output size.
    r = pipe("a cat", init_image=init_image.convert("RGBA").resize((40, 24)), strength=0.5, steps=2, **SIZE)
    assert r.images[0].size == (32, 32) and r.parameters[0]["strength"] == 0.5
    r = pipe("a cat", init_image=init_image.convert("L"), strength=0.5, steps=2, output_type="np", **SIZE)
    assert r.images.shape == (1, 32, 32, 3)
    t = torch.from_numpy(np.asarray(init_image).copy()).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(latents(pipe, "a cat", init_image=t, strength=0.6, **base), out[0.6], rtol=1e-5,
                               atol=1e-6)


# ----------------------------------------------------------------------- hypernetworks, embeddings


def _write_hypernetwork(path, seed):
    """A NovelAI-layout hypernetwork for the tiny model's widths 32 and 64."""
    g = torch.Generator().manual_seed(seed)

    def module(d):
        return {"linear1.weight": torch.randn(2 * d, d, generator=g) / d ** 0.5,
                "linear1.bias": 0.1 * torch.randn(2 * d, generator=g),
                "linear2.weight": torch.randn(d, 2 * d, generator=g) / (2 * d) ** 0.5,
                "linear2.bias": 0.1 * torch.randn(d, generator=g)}

    torch.save({d: [module(d), module(d)] for d in (32, 64)}, path)
    return str(path)


@pytest.fixture(scope="module")
def hn_path(tmp_path_factory):
    return _write_hypernetwork(tmp_path_factory.mktemp("hn") / "tinyhn.pt", seed=0)


def test_hypernetwork_strength_per_call(pipe, hn_path):
    base = latents(pipe, "a cat")
    assert torch.equal(latents(pipe, "a cat", hypernetworks=[(hn_path, 0.0)]), base)
    full = latents(pipe, "a cat", hypernetworks=[hn_path])  # strength 1 by default
    half = latents(pipe, "a cat", hypernetworks=[(hn_path, 0.5)])
    assert rel_err(full, base) > 1e-2 and rel_err(half, base) > 1e-3 and rel_err(full, half) > 1e-3
    # nothing leaks into later calls
    assert torch.equal(latents(pipe, "a cat"), base)
    assert torch.equal(latents(pipe, "a cat", hypernetworks=[(hn_path, 0.5)]), half)
    assert torch.equal(latents(pipe, "a cat", hypernetworks=[(hn_path, 1.0)]), full)
    r = pipe("a cat", hypernetworks=[(hn_path, 0.5)], steps=2, **SIZE)
    assert r.parameters[0]["hypernetworks"] == "tinyhn:0.5"


def test_loaded_hypernetwork_and_stacking(pipe, hn_path):
    base = latents(pipe, "a cat")
    hn = pipe.load_hypernetwork(hn_path, strength=0.5)
    try:
        half = latents(pipe, "a cat")
        assert torch.equal(half, latents(pipe, "a cat", hypernetworks=()))
        hn.strength = 0.0
        assert torch.equal(latents(pipe, "a cat"), base)
        hn.strength = 1.0
        stacked = latents(pipe, "a cat", hypernetworks=[(hn_path, 0.5)])
    finally:
        pipe.unload_hypernetworks()
    assert torch.equal(latents(pipe, "a cat"), base)
    # The same file twice in one call is two hypernetworks, each at its own strength.
    twice = latents(pipe, "a cat", hypernetworks=[(hn_path, 1.0), (hn_path, 0.5)])
    assert torch.equal(twice, stacked)
    assert torch.equal(latents(pipe, "a cat", hypernetworks=[(hn_path, 0.5)]), half)


@pytest.fixture(scope="module")
def embedding_path(tmp_path_factory):
    vec = torch.randn(2, 64, generator=torch.Generator().manual_seed(8))
    path = tmp_path_factory.mktemp("emb") / "tiny-style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vec)}, "name": "x"}, path)
    return str(path), vec


def test_embedding_matches_manual_injection(pipe, embedding_path):
    import copy

    path, vec = embedding_path
    prompt = "a photo in tiny-style at night"
    before = latents(pipe, prompt)
    assert pipe.load_embedding(path) == "tiny-style"
    try:
        after = latents(pipe, prompt)
        ctx = pipe.encode_prompt(prompt)
    finally:
        pipe.embeddings.pop("tiny-style")
    assert rel_err(after, before) > 1e-2
    # Reference: the vectors as two new tokens of a transformers CLIPTextModel.
    tok = default_tokenizer()
    clip = copy.deepcopy(real_vocab_clip())
    clip.resize_token_embeddings(49408 + 2)
    with torch.no_grad():
        clip.get_input_embeddings().weight[49408:] = vec
        ids = [tok.bos_id, *tok.encode("a photo in"), 49408, 49409, *tok.encode("at night"), tok.eos_id]
        ids += [tok.eos_id] * (77 - len(ids))
        ref = clip(torch.tensor([ids])).last_hidden_state
    assert ctx.shape == (1, 77, 64)
    assert rel_err(ctx, ref) <= 1e-5
    # Per-call `embeddings=` loads the file for that call too.
    try:
        torch.testing.assert_close(latents(pipe, prompt, embeddings=[path]), after, rtol=1e-5, atol=1e-6)
    finally:
        pipe.embeddings.pop("tiny-style", None)


# ----------------------------------------------------------------------------------- threads


def test_concurrent_calls_equal_serial_calls(pipe, hn_path):
    jobs = [dict(prompt="a cat", seed=1, hypernetworks=[(hn_path, 1.0)]),
            dict(prompt="a dog", seed=2, hypernetworks=[(hn_path, 0.3)]),
            dict(prompt=["a bird", LONG], seed=3, negative_prompt="grey"),
            dict(prompt="a (cat:1.3)", seed=4, hypernetworks=[(hn_path, 0.0)], guidance_scale=1.0),
            dict(prompt="a cat", seed=1, sampler="dpmpp_2m", num_images=2),
            dict(prompt="a fish", seed=5, hypernetworks=[(hn_path, 0.7)], num_images=2, batch_size=1)]

    def run(job):
        job = dict(job)
        return latents(pipe, job.pop("prompt"), steps=2, **job)

    serial = [run(j) for j in jobs]
    results = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        barrier.wait()
        results[i] = run(jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for got, want in zip(results, serial):
        assert got is not None and torch.equal(got, want)


# ------------------------------------------------------------------------ output types, callback


def test_output_types(pipe):
    kw = dict(steps=2, seed=21, num_images=2, **SIZE)
    pil = pipe("a cat", **kw).images
    arr = pipe("a cat", output_type="np", **kw).images
    pt = pipe("a cat", output_type="pt", **kw).images
    lat = pipe("a cat", output_type="latent", **kw).images
    assert len(pil) == 2 and all(isinstance(i, Image.Image) and i.mode == "RGB" and i.size == (32, 32) for i in pil)
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.shape == (2, 32, 32, 3)
    assert pt.dtype == torch.float32 and pt.shape == (2, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    assert lat.dtype == torch.float32 and lat.shape == (2, *LATENT)
    assert np.array_equal(np.stack([np.asarray(i) for i in pil]), arr)
    assert np.array_equal((pt.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), arr)
    torch.testing.assert_close(pipe.decode(lat), pt, rtol=1e-5, atol=1e-6)
    assert pt.std() > 0.01  # not a flat image


def test_callback_once_per_step(pipe):
    calls = []
    for sampler, steps in (("euler", 4), ("heun", 3), ("dpmpp_2m", 5)):
        calls.clear()
        out = pipe("a cat", steps=steps, sampler=sampler, seed=2, output_type="latent", num_images=2,
                   callback=calls.append, **SIZE).images
        assert [d["i"] for d in calls] == list(range(steps))
        sig = [d["sigma"] for d in calls]
        assert sig == sorted(sig, reverse=True)
        assert sig[0] == pytest.approx(float(sampling.sigmas("normal", steps)[0]))
        assert all(d["x"].shape == d["denoised"].shape == (2, *LATENT) for d in calls)
        torch.testing.assert_close(calls[-1]["denoised"], out, rtol=1e-5, atol=1e-6)  # last step lands on x0


def test_progress_bar_counts_image_steps(pipe, init_image, capsys):
    pipe("a cat", steps=3, num_images=3, batch_size=2, progress=True, output_type="latent", **SIZE)
    err = capsys.readouterr().err
    assert "9/9" in err and "100%" in err
    pipe("a cat", steps=4, strength=0.5, init_image=init_image, progress=True, output_type="latent", **SIZE)
    assert "3/3" in capsys.readouterr().err  # A1111 img2img: int(0.5 * 4) + 1 steps


def test_generate_loads_once_and_checks_first(tiny_sd_dir, monkeypatch):
    from fastdiff import loader

    loads = []
    real = loader.load_pipeline

    def counting(*a, **k):
        loads.append(k["dtype"])
        return real(*a, **k)

    monkeypatch.setattr(loader, "load_pipeline", counting)
    monkeypatch.setattr(loader, "_CACHE", {})
    kw = dict(model=tiny_sd_dir, steps=1, seed=3, output_type="latent", device="cpu", **SIZE)
    a = fastdiff.generate("a cat", **kw)
    b = fastdiff.generate("a cat", **kw)
    assert loads == [torch.float32] and torch.equal(a.images, b.images)
    fastdiff.generate("a cat", dtype="bfloat16", **kw)  # another dtype: loaded again, replacing it
    assert loads == [torch.float32, torch.bfloat16] and len(loader._CACHE) == 1


def test_inpainting_unet_txt2img_matches_diffusers(tmp_path):
    """A 9-channel (inpainting) UNet asked for txt2img paints everything: UNet input
    [latents, mask 1, latents of an all-grey image], what diffusers' StableDiffusionInpaintPipeline
    computes with a full mask. Final latents within 1e-4."""
    import copy

    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline
    from transformers import CLIPTokenizer

    from checkpoints import save_tiny_sd1

    vae = copy.deepcopy(tiny_vae())
    with torch.no_grad():  # a posterior with no spread: diffusers samples it, fastdiff takes the mean
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -30.0
    unet = tiny_unet(in_channels=9, seed=5)
    root = save_tiny_sd1(tmp_path / "inpaint", unet=unet, vae=vae)
    pipe = fastdiff.load(root, device="cpu", dtype=torch.float32)
    assert pipe.unet.config.in_channels == 9
    prompt, seed, n = "a red balloon over a lake", 42, 2
    out = pipe(prompt, steps=10, guidance_scale=7.0, sampler="euler", schedule="normal", seed=seed,
               num_images=n, output_type="latent", **SIZE).images
    ref_pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=real_vocab_clip(), unet=unet,
        scheduler=EulerDiscreteScheduler(timestep_spacing="linspace", **_TRAINING),
        tokenizer=CLIPTokenizer.from_pretrained(f"{root}/tokenizer"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    # The masked image is all zeros: every GroupNorm in the encoder then sees a constant, where
    # rounding noise is amplified by 1/sqrt(eps) (diffusers' own encoder gives latents 1% apart
    # for contiguous and channels-last zeros). So diffusers gets the encoding fastdiff made, as
    # `masked_image_latents`, and this test checks everything after it.
    masked = pipe.encode_images(torch.zeros(1, 3, 32, 32))
    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    with torch.no_grad():
        ref = ref_pipe(prompt, image=grey, mask_image=Image.new("L", (32, 32), 255), strength=1.0,
                       masked_image_latents=masked,
                       num_inference_steps=10, guidance_scale=7.0, num_images_per_prompt=n,
                       latents=seed_noise(seed, n), output_type="latent", **SIZE).images
    assert out.shape == ref.shape == (n, *LATENT)
    assert rel_err(out, ref) <= 1e-4
