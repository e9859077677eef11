"""AutoencoderKL vs diffusers' AutoencoderKL: encode moments, the latent distribution, decode."""
import pytest
import torch

from fastdiff.models import AutoencoderKL
from fastdiff.random_model import randomize_

diffusers = pytest.importorskip("diffusers")

SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
THREE = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
             scaling_factor=0.13025)
NO_ATTN = dict(SMALL, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", "torch")


def rel_err(out, ref):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_pair(cfg, seed=0):
    ref = diffusers.AutoencoderKL(**cfg).eval()
    randomize_(ref, seed)
    ours = AutoencoderKL(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("cfg,hw", [(SMALL, (16, 16)), (THREE, (24, 16)), (NO_ATTN, (16, 8))],
                         ids=["small", "three-blocks", "no-attn-no-quant"])
def test_vae_matches_diffusers(cfg, hw):
    ref, ours = make_pair(cfg)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, *hw, generator=g) * 2 - 1
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    latents = torch.randn(2, 4, hw[0] // f, hw[1] // f, generator=g)
    with torch.no_grad():
        dist = ref.encode(images).latent_dist
        moments = ours.encode(images)
        assert rel_err(moments, dist.parameters) <= 1e-4
        assert rel_err(ours.latent_mean(moments), dist.mean) <= 1e-4
        sample = ours.sample(moments, torch.Generator().manual_seed(7))
        assert rel_err(sample, dist.sample(torch.Generator().manual_seed(7))) <= 1e-4
        assert rel_err(sample, dist.mean) > 1e-3  # the draw is not just the mean

        expect = ref.decode(latents).sample
        out = ours.decode(latents)
    assert expect.abs().mean() > 0.05
    assert rel_err(out, expect) <= 1e-4


def test_vae_scaling_factor_from_config():
    assert AutoencoderKL(SMALL).scaling_factor == 0.18215
    assert AutoencoderKL(THREE).scaling_factor == 0.13025
    assert AutoencoderKL(SMALL).shift_factor == 0.0


def test_vae_mid_attention_has_kv_hook():
    vae = AutoencoderKL(SMALL)
    assert vae.encoder.mid_block.attentions[0].kv_hook is None
    assert vae.decoder.mid_block.attentions[0].kv_hook is None


def test_vae_refuses_unsupported_blocks():
    with pytest.raises(NotImplementedError, match="down_block_types"):
        AutoencoderKL(dict(SMALL, down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D")))


SD_REAL = {  # diffusers' vae/config.json of SD 1.x / 2.x
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def test_vae_real_config_has_diffusers_keys_and_shapes():
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**{k: v for k, v in SD_REAL.items() if not k.startswith("_")})
        ours = AutoencoderKL(SD_REAL)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(ref)
    assert ours.scaling_factor == 0.18215
