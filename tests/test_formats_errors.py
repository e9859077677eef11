"""Untrusted input: every bad file gives a FormatError naming the file / key / shapes, and a
pickle that wants to run code is refused without running anything."""
import os
import pickle

import pytest
import torch

from checkpoints import save_safetensors, sd1_single_file, tiny_clip, tiny_unet, tiny_vae
from fastdiff.formats import (
    Component, FormatError, LazyTensor, TensorFile, load_embedding, load_into, open_model, open_vae, read_hypernetwork,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("err") / "sd1.safetensors"
    return save_safetensors(sd1_single_file(tiny_unet("sd1"), tiny_vae(), tiny_clip()), str(p))


def test_evil_pickles_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    # a torch.save zip checkpoint, a legacy raw pickle, and an evil object hidden in a state dict
    zip_ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.ones(1)}, "payload": _Evil(marker)}, zip_ckpt)
    raw = tmp_path / "raw.pt"
    with open(raw, "wb") as f:
        pickle.dump({768: [_Evil(marker), {}]}, f, protocol=2)
    for fn, path in ((open_model, zip_ckpt), (open_vae, zip_ckpt), (read_hypernetwork, raw),
                     (load_embedding, raw), (load_embedding, zip_ckpt)):
        with pytest.raises(FormatError) as e:
            fn(str(path))
        msg = str(e.value)
        assert str(path) in msg and "refusing to load" in msg and "system" in msg, msg
    assert not marker.exists()


def test_truncated_files(sd1_file, tmp_path):
    data = open(sd1_file, "rb").read()
    t = tmp_path / "cut.safetensors"
    t.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"cut\.safetensors.*(truncated|corrupt)"):
        open_model(str(t))
    t2 = tmp_path / "hdr.safetensors"
    t2.write_bytes(data[:100])
    with pytest.raises(FormatError, match=r"hdr\.safetensors: truncated safetensors"):
        open_model(str(t2))
    ck = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.a": torch.randn(64, 64)}}, ck)
    raw = ck.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(raw[: len(raw) - 200])
    with pytest.raises(FormatError, match=r"cut\.ckpt: cannot read PyTorch file"):
        open_model(str(cut))


def test_wrong_file_types(tmp_path):
    png = tmp_path / "model.safetensors"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    with pytest.raises(FormatError, match=r"model\.safetensors is a PNG image"):
        open_model(str(png))
    txt = tmp_path / "model.ckpt"
    txt.write_text("hello, this is not a checkpoint at all")
    with pytest.raises(FormatError, match=r"model\.ckpt: not a safetensors, PyTorch or pickle file"):
        open_model(str(txt))
    empty = tmp_path / "e.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(FormatError, match="empty"):
        open_model(str(empty))
    with pytest.raises(FormatError, match="no such file"):
        open_model(str(tmp_path / "missing.safetensors"))
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(FormatError, match="model_index.json"):
        open_model(str(tmp_path / "plain_dir"))


def test_other_model_families_refused(tmp_path):
    sdxl = save_safetensors({"conditioner.embedders.0.transformer.x": torch.ones(2),
                             "model.diffusion_model.input_blocks.0.0.weight": torch.ones(2)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(FormatError, match="SDXL"):
        open_model(sdxl)
    lora = save_safetensors({"lora_unet_down_blocks_0.alpha": torch.ones(1)}, str(tmp_path / "l.safetensors"))
    with pytest.raises(FormatError, match="LoRA"):
        open_model(lora)
    vae = save_safetensors({"encoder.down.0.block.0.conv1.weight": torch.ones(1)}, str(tmp_path / "v.safetensors"))
    with pytest.raises(FormatError, match="standalone VAE"):
        open_model(vae)
    junk = save_safetensors({"foo.bar": torch.ones(1)}, str(tmp_path / "j.safetensors"))
    with pytest.raises(FormatError, match=r"j\.safetensors: no model\.diffusion_model"):
        open_model(junk)
    with pytest.raises(FormatError, match="not a VAE"):
        open_vae(junk)


def test_unknown_unet_key_named(sd1_file, tmp_path):
    tf = TensorFile(sd1_file)
    sd = {k: tf.get(k) for k in tf.keys()}
    sd["model.diffusion_model.input_blocks.1.7.weird.weight"] = torch.ones(3)
    p = save_safetensors(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(FormatError, match=r"input_blocks\.1\.7\.weird\.weight"):
        open_model(p)


def _vae_module(src):
    m = AutoencoderKL.from_config(src.vae.config)
    torch.nn.init.normal_(m.decoder.conv_in.weight)
    return m


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_untouched(m, snap):
    now = m.state_dict()
    assert all(torch.equal(now[k], snap[k]) for k in snap)


def test_load_into_missing_unexpected_shape(sd1_file):
    src = open_model(sd1_file)
    vae = src.vae
    m = _vae_module(src)
    snap = _snapshot(m)

    missing = Component("vae", vae.config, {k: v for k, v in vae.tensors.items() if k != "decoder.conv_in.bias"}, "f.safetensors")
    with pytest.raises(FormatError, match=r"f\.safetensors: vae .*1 missing keys: decoder\.conv_in\.bias"):
        load_into(m, missing)
    _assert_untouched(m, snap)

    extra = Component("vae", vae.config, dict(vae.tensors, **{"decoder.bogus.weight": vae["decoder.conv_in.bias"]}), "f")
    with pytest.raises(FormatError, match=r"1 unexpected keys: decoder\.bogus\.weight"):
        load_into(m, extra)
    _assert_untouched(m, snap)

    # shape mismatch: a different tensor under the name, found late in iteration order
    t = dict(vae.tensors)
    t["post_quant_conv.weight"] = vae["decoder.conv_in.weight"]
    with pytest.raises(FormatError, match=r"post_quant_conv\.weight: expected \[4, 4, 1, 1\], found \[64, 4, 3, 3\]"):
        load_into(m, Component("vae", vae.config, t, "f"))
    _assert_untouched(m, snap)

    # a mismatch on a UNet from another family: everything named, nothing written
    from diffusers import UNet2DConditionModel
    from checkpoints import tiny_unet_config

    u = UNet2DConditionModel(**tiny_unet_config("sd2"))
    usnap = _snapshot(u)
    with pytest.raises(FormatError) as e:
        load_into(u, src.unet)
    assert "shape mismatch" in str(e.value) or "missing keys" in str(e.value)
    _assert_untouched(u, usnap)


def test_load_into_rejects_integer_tensor_for_float(sd1_file, tmp_path):
    src = open_model(sd1_file)
    p = save_safetensors({"x": torch.ones(4, 4, 1, 1, dtype=torch.int64)}, str(tmp_path / "i.safetensors"))
    t = dict(src.vae.tensors)
    t["post_quant_conv.weight"] = LazyTensor(TensorFile(p), "x")
    with pytest.raises(FormatError, match=r"post_quant_conv\.weight: expected a floating-point tensor, found torch.int64"):
        load_into(_vae_module(src), Component("vae", src.vae.config, t, "f"))
