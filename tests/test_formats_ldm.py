"""LDM single-file checkpoints: key mapping against diffusers' own converter, architecture
inference, and outputs of diffusers/transformers models loaded with our state dicts."""
from types import SimpleNamespace

import pytest
import torch

from checkpoints import (
    add_ldm_extras, clip_model, clip_state_dict, load_clip, rel_err, save_safetensors,
    sd1_single_file, sd2_single_file, tiny_clip, tiny_openclip, tiny_unet, tiny_vae, unet_to_ldm, vae_to_ldm,
)
from fastdiff.formats import Component, LazyTensor, describe, load_into, open_model, open_vae

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
)


def _same(a: dict, b: dict):
    assert set(a) == set(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------- the test exporter vs diffusers' converter

@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_exporter_inverts_diffusers_converter(family):
    u = tiny_unet(family)
    ldm = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(u.state_dict(), u.config).items()}
    _same(convert_ldm_unet_checkpoint(ldm, dict(u.config)), u.state_dict())


def test_vae_exporter_inverts_diffusers_converter():
    v = tiny_vae()
    ldm = {"first_stage_model." + k: t for k, t in vae_to_ldm(v.state_dict(), v.config).items()}
    _same(convert_ldm_vae_checkpoint(ldm, dict(v.config)), v.state_dict())


# --------------------------------------------------------------------------- single files

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ldm")
    sd1 = add_ldm_extras(sd1_single_file(tiny_unet("sd1"), tiny_vae(), tiny_clip()))
    sd2 = add_ldm_extras(sd2_single_file(tiny_unet("sd2"), tiny_vae(), tiny_openclip()))
    inp = sd2_single_file(tiny_unet("sd2", in_channels=9), tiny_vae(), tiny_openclip())
    paths = {
        "sd1": save_safetensors(sd1, str(d / "sd1.safetensors")),
        "sd2": save_safetensors(sd2, str(d / "sd2.safetensors")),
        "sd2_inpaint": save_safetensors(inp, str(d / "sd2-inpainting.safetensors")),
        "sd1_ckpt": str(d / "sd1.ckpt"),
    }
    torch.save({"state_dict": sd1, "global_step": 470000, "epoch": 6}, paths["sd1_ckpt"])
    return SimpleNamespace(dir=d, ldm={"sd1": sd1, "sd2": sd2, "sd2_inpaint": inp}, **paths)


def _unet_check(src, ref_unet):
    m = UNet2DConditionModel.from_config(src.unet.config)  # built from the *inferred* config
    load_into(m, src.unet)
    cin, ctx = ref_unet.config.in_channels, ref_unet.config.cross_attention_dim
    x, c = torch.randn(2, cin, 8, 8), torch.randn(2, 5, ctx)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        out, ref = m(x, t, c).sample, ref_unet(x, t, c).sample
    assert rel_err(out, ref) <= 1e-6


def _vae_check(vae_component, ref_vae):
    m = AutoencoderKL.from_config(vae_component.config)
    load_into(m, vae_component)
    img, z = torch.randn(1, 3, 16, 16), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert rel_err(m.decode(z).sample, ref_vae.decode(z).sample) <= 1e-6
        assert rel_err(m.encode(img).latent_dist.mean, ref_vae.encode(img).latent_dist.mean) <= 1e-6


@pytest.mark.parametrize("which", ["sd1", "sd1_ckpt"])
def test_sd1_single_file_roundtrip(files, which):
    src = open_model(getattr(files, which))
    assert src.family == "sd1" and src.prediction_type == "epsilon"
    assert src.tokenizer["pad_token_id"] == 49407
    _unet_check(src, tiny_unet("sd1"))
    _vae_check(src.vae, tiny_vae())
    # our key mapping == diffusers' converter on the same file (EMA and buffers ignored)
    ldm = files.ldm["sd1"]
    _same(src.unet.state_dict(), convert_ldm_unet_checkpoint(ldm, src.unet.config))
    _same(src.vae.state_dict(), convert_ldm_vae_checkpoint(ldm, src.vae.config))
    _same(src.text_encoder.state_dict(), convert_ldm_clip_checkpoint(ldm))
    # text encoder: a CLIPTextModel from the inferred config gives the original's outputs
    te = load_clip(clip_model(src.text_encoder.config), src.text_encoder.state_dict())
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        out, ref = te(ids).last_hidden_state, tiny_clip()(ids).last_hidden_state
    assert rel_err(out, ref) <= 1e-6


def test_sd2_single_file_roundtrip(files):
    src = open_model(files.sd2)
    assert src.family == "sd2" and src.prediction_type == "v_prediction"
    assert src.tokenizer["pad_token_id"] == 0
    cfg = src.unet.config
    assert cfg["use_linear_projection"] and cfg["attention_head_dim"] == [1, 2, 2]
    assert cfg["transformer_layers_per_block"] == 2 and cfg["layers_per_block"] == 2
    _unet_check(src, tiny_unet("sd2"))
    _vae_check(src.vae, tiny_vae())

    tcfg = src.text_encoder.config
    assert tcfg["num_hidden_layers"] == 3 and tcfg["hidden_act"] == "gelu" and tcfg["num_attention_heads"] == 2
    # key mapping vs diffusers' converter, which hard-codes dropping resblocks.23 (ViT-H): drop our
    # tiny tower's last block (3) from its output the same way, and its text_projection
    ref = convert_open_clip_checkpoint(SimpleNamespace(config=SimpleNamespace(hidden_size=128)), files.ldm["sd2"])
    ref = {k: v for k, v in ref.items() if ".layers.3." not in k and k != "text_projection.weight"}
    _same(src.text_encoder.state_dict(), ref)
    # the q/k/v split is lazy: row slices of the fused in_proj, nothing read yet
    q = src.text_encoder["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, LazyTensor) and q.rows == (0, 128) and q.shape == (128, 128)

    # OpenCLIP penultimate layer + ln_final == 23-of-24-layer CLIPTextModel's last_hidden_state
    # (which already has final_layer_norm applied)
    te = load_clip(clip_model(tcfg), src.text_encoder.state_dict())
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        out = te(ids).last_hidden_state
        ref = tiny_openclip().penultimate(ids)
        full = te(ids, output_hidden_states=True).hidden_states[-1]  # pre-LN output of layer 3
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(full, ref) > 1e-2  # the test can tell pre- and post-LN apart


def test_describe_sd1_and_sd2(files):
    d1 = describe(files.sd1)
    assert "SD 1.x" in d1 and "epsilon" in d1 and "in-channels 4," in d1
    assert "widths [32, 64, 64]" in d1 and "layers per block 2" in d1 and "heads 8" in d1
    assert "context dim 64" in d1 and "CLIP 3 layers, width 64" in d1 and "float32" in d1
    d2 = describe(files.sd2)
    assert "SD 2.x" in d2 and "v_prediction" in d2 and "SD 2.x default rule" in d2
    assert "linear proj_in" in d2 and "OpenCLIP" in d2 and "3 layers, width 128" in d2 and "pads with id 0" in d2
    d2e = describe(files.sd2, config={"prediction_type": "epsilon"})
    assert "prediction:  epsilon (explicit config)" in d2e


def test_describe_inpainting(files):
    d = describe(files.sd2_inpaint)
    assert "in-channels 9 (inpainting)" in d and "SD 2.x" in d and "prediction:  epsilon" in d
    src = open_model(files.sd2_inpaint)
    _unet_check(src, tiny_unet("sd2", in_channels=9))


def test_prediction_from_sibling_yaml(files, tmp_path):
    import shutil

    p = str(tmp_path / "base.safetensors")
    shutil.copy(files.sd2, p)
    (tmp_path / "base.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert open_model(p).prediction_type == "epsilon"
    (tmp_path / "base.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    src = open_model(p)
    assert src.prediction_type == "v_prediction" and "base.yaml" in src.prediction_rule
    # explicit config beats the yaml
    assert open_model(p, config={"prediction_type": "epsilon"}).prediction_type == "epsilon"


def test_explicit_config_overrides_inference(files):
    src = open_model(files.sd1, config={"unet": {"attention_head_dim": 4, "sample_size": 32},
                                        "text_encoder": {"num_attention_heads": 4}})
    assert src.unet.config["attention_head_dim"] == 4 and src.unet.config["sample_size"] == 32
    assert src.text_encoder.config["num_attention_heads"] == 4
    assert src.unet.config["layers_per_block"] == 2  # the rest is still inferred


def test_old_clip_layout_and_position_ids(tmp_path):
    """Very old SD 1.x files: CLIP keys without `text_model.` and a stored position_ids buffer."""
    sd = sd1_single_file(tiny_unet("sd1"), tiny_vae(), tiny_clip())
    old = {}
    for k, v in sd.items():
        old[k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")] = v
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(16)[None]
    p = save_safetensors(old, str(tmp_path / "old.safetensors"))
    src = open_model(p)
    assert set(src.text_encoder.keys()) == set(clip_state_dict(tiny_clip()))
    _same(src.text_encoder.state_dict(), clip_state_dict(tiny_clip()))


def test_unet_only_file_family_from_shapes(tmp_path):
    u = tiny_unet("sd2")
    sd = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(u.state_dict(), u.config).items()}
    src = open_model(save_safetensors(sd, str(tmp_path / "unet.safetensors")))
    assert src.family == "sd2" and src.text_encoder is None and src.vae is None
    assert "none in file" in describe(str(tmp_path / "unet.safetensors"))


# ------------------------------------------------------------------------------ standalone VAE

@pytest.mark.parametrize("layout", ["ldm-safetensors", "ldm-prefixed-pt", "diffusers-safetensors", "diffusers-old-names"])
def test_standalone_vae(files, tmp_path, layout):
    ref = tiny_vae(seed=11)
    sd = ref.state_dict()
    if layout == "ldm-safetensors":
        p = save_safetensors(vae_to_ldm(sd, ref.config), str(tmp_path / "vae.safetensors"))
    elif layout == "ldm-prefixed-pt":
        p = str(tmp_path / "vae.pt")
        ldm = {"first_stage_model." + k: v for k, v in vae_to_ldm(sd, ref.config).items()}
        ldm["model_ema.decay"] = torch.tensor(0.999)
        torch.save({"state_dict": ldm}, p)
    elif layout == "diffusers-safetensors":
        p = save_safetensors(sd, str(tmp_path / "vae.safetensors"))
    else:  # diffusers < 0.14 attention names
        ren = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        old = {}
        for k, v in sd.items():
            for a, b in ren.items():
                k = k.replace(f"attentions.0.{a}.", f"attentions.0.{b}.")
            old[k] = v
        p = save_safetensors(old, str(tmp_path / "vae.safetensors"))
    vae = open_vae(p)
    assert isinstance(vae, Component) and vae.config["latent_channels"] == 4
    _vae_check(vae, ref)
    src = open_model(files.sd1).with_vae(vae)
    _vae_check(src.vae, ref)
    assert any("VAE replaced" in n for n in src.notes)


def test_vae_without_mid_attention(tmp_path):
    """diffusers' mid_block_add_attention=False VAEs (fastdiff's shapes model) export without the
    mid-block attention keys; the loader reads that off the keys, for files and whole models."""
    from checkpoints import tiny_vae_config
    from fastdiff.random_model import randomize_

    ref = randomize_(AutoencoderKL(**tiny_vae_config(), mid_block_add_attention=False), 12)
    assert not any(".attentions." in k for k in ref.state_dict())
    vae = open_vae(save_safetensors(vae_to_ldm(ref.state_dict(), ref.config), str(tmp_path / "vae.safetensors")))
    assert vae.config["mid_block_add_attention"] is False
    _vae_check(vae, ref)
    assert open_vae(save_safetensors(tiny_vae().state_dict(), str(tmp_path / "with.safetensors"))).config[
        "mid_block_add_attention"] is True


# ---------------------------------------------------------------------------------- load_into

def test_load_into_converts_dtype_and_materialises_meta(files):
    src = open_model(files.sd1)
    with torch.device("meta"):
        m = AutoencoderKL.from_config(src.vae.config)
    load_into(m, src.vae, device="cpu", dtype=torch.float16)
    p = dict(m.named_parameters())
    assert all(t.device.type == "cpu" and t.dtype == torch.float16 for t in p.values())
    ref = src.vae["decoder.conv_in.weight"].load()
    assert torch.equal(p["decoder.conv_in.weight"], ref.half())
    # in-place path: same device/dtype as the module
    m2 = AutoencoderKL.from_config(src.vae.config)
    before = m2.decoder.conv_in.weight
    load_into(m2, src.vae)
    assert m2.decoder.conv_in.weight is before and torch.equal(before, ref)
