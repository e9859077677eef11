"""UNet2DCondition vs diffusers' UNet2DConditionModel: same state_dict (strict), same outputs.

Reduced widths so the suite runs on CPU in seconds. Every parameter is re-randomised: diffusers
zero-initialises conv_out and proj_out, which would let a broken block pass.
"""
import math

import pytest
import torch
from torch import nn

from fastdiff import ops
from fastdiff.models import UNet2DCondition
from fastdiff.random_model import randomize_

diffusers = pytest.importorskip("diffusers")

SD1 = dict(  # 8 heads (attention_head_dim is a head count), conv proj_in/proj_out
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
SD2 = dict(  # per-block heads giving a head size of 16 (SD 2.x: [5, 10, 20, 20] -> 64), linear proj
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48, attention_head_dim=[2, 4, 4], use_linear_projection=True, upcast_attention=True,
    norm_num_groups=8,
)
INPAINT = dict(SD1, in_channels=9)


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", "torch")


def rel_err(out, ref):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_pair(cfg, seed=0):
    ref = diffusers.UNet2DConditionModel(**cfg).eval()
    randomize_(ref, seed)
    ours = UNet2DCondition(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize(
    "cfg,hw",
    [(SD1, (16, 16)), (SD2, (16, 16)), (SD2, (13, 10)), (INPAINT, (16, 8))],
    ids=["sd1", "sd2", "sd2-odd-size", "inpaint"],
)
def test_unet_matches_diffusers(cfg, hw):
    ref, ours = make_pair(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg["in_channels"], *hw, generator=g)
    ctx = torch.randn(2, 7, cfg["cross_attention_dim"], generator=g)
    t = torch.tensor([37.5, 901.0])
    with torch.no_grad():
        expect = ref(x, t, ctx).sample
        out = ours(x, t, ctx)
    assert expect.abs().mean() > 0.1  # a real signal, not a zero-initialised output
    assert rel_err(out, expect) <= 1e-4


def test_unet_head_counts_follow_diffusers():
    ours = UNet2DCondition(SD2)
    heads = [b.attentions[0].transformer_blocks[0].attn1.heads for b in ours.down_blocks if len(b.attentions)]
    assert heads == [2, 4]
    assert ours.mid_block.attentions[0].transformer_blocks[0].attn2.dim_head == 16
    sd1 = UNet2DCondition(SD1)
    assert {a.heads for a in sd1.attention_modules()} == {8}


def test_unet_timestep_forms():
    _, ours = make_pair(SD1, seed=3)
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 5, 32)
    with torch.no_grad():
        full = ours(x, torch.tensor([250.0, 250.0]), ctx)
        for t in (250.0, 250, torch.tensor(250.0), torch.tensor(250, dtype=torch.int64)):
            assert rel_err(ours(x, t, ctx), full) <= 1e-6
        assert rel_err(ours(x, 251.0, ctx), full) > 1e-4  # the timestep does matter


class HypernetLike(nn.Module):
    """A1111 hypernetwork shape: residual MLPs on the context, one for k and one for v."""

    def __init__(self, dim, seed):
        super().__init__()
        self.k = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.v = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        randomize_(self, seed)

    def forward(self, ctx):
        return ctx + self.k(ctx), ctx + self.v(ctx)


class HookedProcessor:
    """diffusers attention processor computing k = to_k(h_k(ctx)), v = to_v(h_v(ctx)) by hand."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        ctx_k, ctx_v = self.hook(ctx)
        B, L, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx_k), attn.to_v(ctx_v)
        H = attn.heads
        D = q.shape[-1] // H
        q, k, v = (t.view(B, -1, H, D).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)
        out = (w @ v).transpose(1, 2).reshape(B, L, H * D)
        return attn.to_out[1](attn.to_out[0](out))


def test_kv_hook_matches_manual_reference():
    ref, ours = make_pair(SD1, seed=5)
    # one cross-attention (context dim 32) and one self-attention (hidden dim 32)
    names = ["down_blocks.0.attentions.1.transformer_blocks.0.attn2",
             "up_blocks.1.attentions.0.transformer_blocks.0.attn1"]
    hooks = [HypernetLike(32, seed=10), HypernetLike(32, seed=11)]
    for name, hook in zip(names, hooks):
        ref.get_submodule(name).set_processor(HookedProcessor(hook))
        ours.get_submodule(name).kv_hook = hook

    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([10.0, 600.0])
    with torch.no_grad():
        expect = ref(x, t, ctx).sample
        out = ours(x, t, ctx)
        for name in names:
            ours.get_submodule(name).kv_hook = None
        plain = ours(x, t, ctx)
    assert rel_err(out, expect) <= 1e-4
    assert rel_err(plain, expect) > 1e-2  # the hooks changed the output: the test can fail
    # hooks stay out of the module tree: the state_dict keys are still diffusers'
    ours.get_submodule(names[0]).kv_hook = hooks[0]
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert all(a.kv_hook is None for a in UNet2DCondition(SD1).attention_modules())


def test_unet_uses_the_op_table(monkeypatch):
    calls = {"attention": 0, "group_norm": 0, "group_norm_silu": 0, "layer_norm": 0, "geglu": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            if name == "group_norm" and kwargs.get("silu"):
                calls["group_norm_silu"] += 1
            return fn(*args, **kwargs)
        return wrapped

    for name in ("attention", "group_norm", "layer_norm", "geglu"):
        monkeypatch.setattr(ops, name, counting(name, getattr(ops, name)))
    _, ours = make_pair(SD1)
    with torch.no_grad():
        ours(torch.randn(1, 4, 8, 8), 1.0, torch.randn(1, 3, 32))
    # 2 down + 1 mid + 3 up transformers, each with self- and cross-attention
    n_attn = len(ours.attention_modules())
    assert calls["attention"] == n_attn == 12
    assert calls["layer_norm"] == 3 * n_attn // 2
    assert calls["geglu"] == n_attn // 2
    n_resnets = sum(1 for m in ours.modules() if type(m).__name__ == "ResnetBlock2D")
    # two GroupNorm+SiLU per resnet plus conv_norm_out; plain GroupNorm in each transformer
    assert calls["group_norm_silu"] == 2 * n_resnets + 1
    assert calls["group_norm"] == calls["group_norm_silu"] + n_attn // 2


@pytest.mark.parametrize("key,value", [("addition_embed_type", "text_time"), ("class_embed_type", "timestep"),
                                       ("only_cross_attention", True), ("resnet_time_scale_shift", "scale_shift")])
def test_unet_refuses_unsupported_options(key, value):
    with pytest.raises(NotImplementedError, match=key):
        UNet2DCondition(dict(SD1, **{key: value}))


def test_unet_ignores_unknown_keys():
    UNet2DCondition(dict(SD1, _class_name="UNet2DConditionModel", _diffusers_version="0.6.0",
                         dropout=0.0, mid_block_only_cross_attention=None, some_future_key=1))


@pytest.mark.cuda
def test_unet_fp16_on_cuda_tracks_fp64():
    """fp16 on the GPU (Triton kernels): no further from an fp64 reference than diffusers' fp16."""
    ref, ours = make_pair(SD2)
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 48, generator=g)
    t = torch.tensor([37.0, 901.0])
    with torch.no_grad():
        gold = ours.double()(x.double(), t, ctx.double())
        ours = ours.to("cuda", torch.float16)
        ref = ref.to("cuda", torch.float16)
        xc, ctxc, tc = x.cuda().half(), ctx.cuda().half(), t.cuda()
        ours_err = rel_err(ours(xc, tc, ctxc).cpu(), gold)
        ref_err = rel_err(ref(xc, tc, ctxc).sample.cpu(), gold)
    assert ours_err <= max(2 * ref_err, 2e-3)


# The real configs (diffusers' config.json of SD 1.5 and SD 2.1), built on the meta device: same
# parameter names and shapes as diffusers, no memory, no forward.
SD15_REAL = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_REAL = dict(
    SD15_REAL, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
    upcast_attention=True, sample_size=96, dual_cross_attention=False, num_class_embeds=None,
    only_cross_attention=False, resnet_time_scale_shift="default", class_embed_type=None,
)


@pytest.mark.parametrize("cfg,n_params", [(SD15_REAL, 859_520_964), (SD21_REAL, None),
                                          (dict(SD15_REAL, in_channels=9), None)],
                         ids=["sd15", "sd21", "sd15-inpaint"])
def test_unet_real_config_has_diffusers_keys_and_shapes(cfg, n_params):
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        ours = UNet2DCondition(cfg)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(ref)
    if n_params is not None:
        assert sum(p.numel() for p in ours.parameters()) == n_params
    if cfg is SD21_REAL:  # head size 64 everywhere
        assert {a.dim_head for a in ours.attention_modules()} == {64}
    else:
        assert {a.heads for a in ours.attention_modules()} == {8}
