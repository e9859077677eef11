"""`fastdiff generate | info | --help` on a tiny model: the installed CLI run as a subprocess,
and its argument errors in-process (exit 2, one line naming the bad value, no traceback, and
nothing loaded or written)."""
import hashlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff import cli


def fastdiff_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fastdiff", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def hn_file(tmp_path_factory):
    g = torch.Generator().manual_seed(1)

    def module(d):
        return {"linear1.weight": torch.randn(2 * d, d, generator=g) / d ** 0.5, "linear1.bias": torch.zeros(2 * d),
                "linear2.weight": torch.randn(d, 2 * d, generator=g) / (2 * d) ** 0.5, "linear2.bias": torch.zeros(d)}

    path = tmp_path_factory.mktemp("cli_hn") / "clihn.pt"
    torch.save({64: [module(64), module(64)]}, path)
    return str(path)


def test_generate_writes_pngs_with_parameters(tiny_sd_dir, hn_file, tmp_path):
    out = tmp_path / "out"
    prompt = "a red (balloon:1.2), at night"
    r = fastdiff_cli("generate", prompt, "--model", tiny_sd_dir, "--negative", "blurry", "--steps", 2, "--cfg", 6,
                     "--sampler", "euler", "--schedule", "karras", "--seed", 5, "--size", "32x24", "--num", 2,
                     "--hypernetwork", f"{hn_file}:0.5", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    paths = r.stdout.split()
    assert paths == [str(out / "5.png"), str(out / "6.png")]
    assert "4/4" in r.stderr and "100%" in r.stderr  # the progress bar: 2 images x 2 steps
    unet_file = f"{tiny_sd_dir}/unet/diffusion_pytorch_model.safetensors"
    model_hash = hashlib.sha256(open(unet_file, "rb").read()).hexdigest()[:10]
    # The same call through the API gives the same pixels: every option reached generate().
    ref = fastdiff.generate(prompt, model=tiny_sd_dir, negative_prompt="blurry", steps=2, guidance_scale=6.0,
                            sampler="euler", schedule="karras", seed=5, width=32, height=24, num_images=2,
                            hypernetworks=[(hn_file, 0.5)], device="cpu")
    for path, seed, want in zip(paths, (5, 6), ref.images):
        with Image.open(path) as img:
            assert img.size == (32, 24) and img.mode == "RGB"
            assert np.array_equal(np.asarray(img), np.asarray(want))
            text = img.text["parameters"]
        first, neg, last = text.split("\n")
        assert first == prompt and neg == "Negative prompt: blurry"
        for field in ("Steps: 2", "Sampler: Euler", "Schedule type: Karras", "CFG scale: 6.0", f"Seed: {seed}",
                      "Size: 32x24", f"Model hash: {model_hash}", "Model: tiny-sd1", 'Hypernetworks: "clihn:0.5"'):
            assert field in last.split(", "), (field, last)


def test_generate_bad_argument_subprocess(tiny_sd_dir, tmp_path):
    r = fastdiff_cli("generate", "a cat", "--model", tiny_sd_dir, "--size", "33x32", "--out", tmp_path / "out",
                     cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "fastdiff generate: error: width must be a positive multiple of 8, got 33"
    assert not (tmp_path / "out").exists()


def _cmyk_file(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (1, 2, 3, 4)).save(path)
    return path


BAD_ARGS = [
    (["--size", "33x32"], r"width must be a positive multiple of 8, got 33"),
    (["--size", "32x12"], r"height must be a positive multiple of 8, got 12"),
    (["--steps", "0"], r"steps must be an integer >= 1, got 0"),
    (["--sampler", "eulr"], r"unknown sampler 'eulr'; valid: euler, euler_ancestral, "),
    (["--schedule", "cosine"], r"unknown schedule 'cosine'"),
    (["--strength", "1.5", "--init-image", "{cmyk}"], r"strength must be in \(0, 1\], got 1\.5"),
    (["--strength", "0"], r"strength must be in \(0, 1\], got 0\.0"),
    (["--init-image", "{cmyk}"], r"init image has mode 'CMYK'"),
    (["--init-image", "{tmp}/none.png"], r"init image .*none\.png does not exist"),
    (["--hypernetwork", "{tmp}/missing.pt:0.5"], r"hypernetwork .*missing\.pt does not exist"),
    (["--hypernetwork", "{tmp}/missing.pt"], r"hypernetwork .*missing\.pt does not exist"),
    (["--embedding", "{tmp}/missing-emb.pt"], r"embedding .*missing-emb\.pt does not exist"),
    (["--num", "0"], r"num_images must be an integer >= 1, got 0"),
    (["--seed", "-5"], r"seed must be .*got -5"),
    (["--out", "{tmp}/file.txt"], r"--out .*file\.txt is not a folder"),
]


@pytest.mark.parametrize("argv,msg", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_generate_bad_arguments(tiny_sd_dir, tmp_path, monkeypatch, capsys, argv, msg):
    from fastdiff import loader

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loader, "load_pipeline", no_load)
    monkeypatch.setattr(loader, "_CACHE", {})
    (tmp_path / "file.txt").write_text("x")
    argv = [a.format(tmp=tmp_path, cmyk=_cmyk_file(tmp_path)) for a in argv]
    out = tmp_path / "out"
    code = cli.main(["generate", "a cat", "--model", tiny_sd_dir, "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert re.fullmatch(r"fastdiff generate: error: " + msg + r".*\n", err), err
    assert not out.exists()


def test_generate_missing_model(tmp_path, capsys):
    missing = tmp_path / "no-model.safetensors"
    assert cli.main(["generate", "a cat", "--model", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"fastdiff generate: error: model {missing} does not exist\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when there is no CUDA device")
def test_generate_unusable_device(tiny_sd_dir, tmp_path, capsys):
    for device, msg in (("cuda", "no CUDA device"), ("bogus", "device 'bogus'")):
        assert cli.main(["generate", "a cat", "--model", tiny_sd_dir, "--device", device, "--size", "32x32",
                         "--steps", "1", "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastdiff generate: error: ") and msg in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv,msg", [
    (["--size", "abc"], "argument --size: size must look like 512x512, got 'abc'"),
    (["--steps", "two"], "argument --steps: invalid int value: 'two'"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
])
def test_generate_unparsable_arguments(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "a cat", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_info(tiny_sd_dir, hn_file, tmp_path):
    r = fastdiff_cli("info", tiny_sd_dir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(":", 1) for line in r.stdout.splitlines())
    assert lines["family"].strip() == "SD 1.x" and lines["prediction"].strip().startswith("epsilon")
    assert "widths [32, 64, 64]" in lines["unet"] and "context dim 64" in lines["unet"]
    assert "vocab 49408" in lines["text"] and "max length 77" in lines["text"]
    assert "latent channels 4" in lines["vae"]


def test_info_add_ons_and_errors(tiny_sd_dir, hn_file, tmp_path, capsys):
    emb = tmp_path / "my-style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(3, 64)}}, emb)
    assert cli.main(["info", hn_file]) == 0
    out = capsys.readouterr().out
    assert "hypernetwork (NovelAI)" in out and "name:        clihn" in out and "widths:      [64]" in out
    assert cli.main(["info", str(emb)]) == 0
    out = capsys.readouterr().out
    assert "textual-inversion embedding" in out and "my-style" in out and "3 x 64" in out
    assert cli.main(["info", f"{tiny_sd_dir}/vae"]) == 0
    assert "VAE (KL)" in capsys.readouterr().out
    for path, msg in ((tmp_path / "nothing", "no such file or directory"),
                      (_cmyk_file(tmp_path), "not a weight file")):
        assert cli.main(["info", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastdiff info: error: {path}") and msg in err and err.count("\n") == 1


def test_help(tmp_path):
    r = fastdiff_cli("generate", "--help", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: fastdiff generate")
    for option in ("--model", "--negative", "--steps", "--cfg", "--sampler", "--schedule", "--seed", "--size",
                   "--num", "--hypernetwork PATH[:STRENGTH]", "--out"):
        assert option in r.stdout, option
    r = fastdiff_cli("info", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "hypernetwork" in r.stdout
