"""diffusers pipeline folders: configs, scheduler prediction type, tokenizer padding, weights."""
import json
import os

import pytest
import torch

from checkpoints import (
    clip_model, clip_state_dict, rel_err, save_diffusers_folder, tiny_clip, tiny_clip_config,
    tiny_unet, tiny_vae,
)
from fastdiff.formats import FormatError, describe, load_into, open_model

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402


def _check_all(src, unet, vae, clip):
    m = UNet2DConditionModel.from_config(src.unet.config)
    load_into(m, src.unet)
    x, c, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, unet.config.cross_attention_dim), torch.tensor([321])
    with torch.no_grad():
        assert rel_err(m(x, t, c).sample, unet(x, t, c).sample) <= 1e-6
    v = AutoencoderKL.from_config(src.vae.config)
    load_into(v, src.vae)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert rel_err(v.decode(z).sample, vae.decode(z).sample) <= 1e-6
    te = clip_model(src.text_encoder.config)
    load_into(te, _unprefixed(src.text_encoder, te))
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert rel_err(te(ids).last_hidden_state, clip(ids).last_hidden_state) <= 1e-6


def _unprefixed(comp, model):
    """Our names carry `text_model.` (the contract, and what files hold); transformers >= 5's
    CLIPTextModel module tree does not, so the stand-in gets a renamed view."""
    from fastdiff.formats import Component

    if any(k.startswith("text_model.") for k in model.state_dict()):
        return comp
    return Component(comp.name, comp.config, {k.removeprefix("text_model."): v for k, v in comp.tensors.items()},
                     comp.origin)


def test_sd1_folder_safetensors(tmp_path):
    root = save_diffusers_folder(str(tmp_path / "sd1"), tiny_unet("sd1"), tiny_vae(), tiny_clip())
    src = open_model(root)
    assert src.format == "diffusers folder" and src.family == "sd1"
    assert src.prediction_type == "epsilon" and src.tokenizer["pad_token_id"] == 49407
    assert src.tokenizer["path"] == os.path.join(root, "tokenizer")
    assert "text_model.embeddings.token_embedding.weight" in src.text_encoder
    _check_all(src, tiny_unet("sd1"), tiny_vae(), tiny_clip())
    d = describe(root)
    assert "diffusers folder" in d and "SD 1.x" in d and "scheduler_config.json" in d


def test_sd2_folder_bin_v_prediction(tmp_path):
    clip2 = clip_model(tiny_clip_config(width=128, act="gelu"), seed=9)
    root = save_diffusers_folder(str(tmp_path / "sd2"), tiny_unet("sd2"), tiny_vae(), clip2,
                                 prediction_type="v_prediction", family="sd2", use_bin=True, strip_text_prefix=True)
    assert os.path.isfile(os.path.join(root, "unet", "diffusion_pytorch_model.bin"))
    src = open_model(root)
    assert src.family == "sd2" and src.prediction_type == "v_prediction" and src.tokenizer["pad_token_id"] == 0
    # the un-prefixed transformers-5 layout is read under the usual names
    assert set(src.text_encoder.keys()) == set(clip_state_dict(clip2))
    _check_all(src, tiny_unet("sd2"), tiny_vae(), clip2)
    assert open_model(root, config={"prediction_type": "epsilon"}).prediction_type == "epsilon"


def test_sharded_and_fp16_variant(tmp_path):
    root = save_diffusers_folder(str(tmp_path / "m"), tiny_unet("sd1"), tiny_vae(), tiny_clip())
    from safetensors.torch import save_file

    # unet as two shards with an index; vae as an fp16 variant only
    ud = os.path.join(root, "unet")
    sd = tiny_unet("sd1").state_dict()
    os.remove(os.path.join(ud, "diffusion_pytorch_model.safetensors"))
    keys = sorted(sd)
    half = len(keys) // 2
    wm = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        fn = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, os.path.join(ud, fn))
        wm.update({k: fn for k in part})
    with open(os.path.join(ud, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": wm}, f)
    vd = os.path.join(root, "vae")
    vsd = tiny_vae().state_dict()
    os.remove(os.path.join(vd, "diffusion_pytorch_model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in vsd.items()}, os.path.join(vd, "diffusion_pytorch_model.fp16.safetensors"))
    src = open_model(root)
    assert set(src.unet.keys()) == set(sd)
    assert src.vae["decoder.conv_in.weight"].dtype == torch.float16
    v = AutoencoderKL.from_config(src.vae.config)
    load_into(v, src.vae)  # fp16 on disk -> the module's fp32
    assert v.decoder.conv_in.weight.dtype == torch.float32
    assert torch.equal(v.decoder.conv_in.weight, vsd["decoder.conv_in.weight"].half().float())


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="without model_index.json"):
        open_model(str(tmp_path / "empty"))
    root = save_diffusers_folder(str(tmp_path / "m"), tiny_unet("sd1"), tiny_vae(), tiny_clip())
    os.remove(os.path.join(root, "vae", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(FormatError, match=r"vae: no weights found"):
        open_model(root)
    root2 = save_diffusers_folder(str(tmp_path / "m2"), tiny_unet("sd1"), tiny_vae(), tiny_clip())
    with open(os.path.join(root2, "unet", "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(FormatError, match=r"unet/config.json: not valid JSON"):
        open_model(root2)
