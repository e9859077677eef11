"""A1111 / NovelAI hypernetworks against a reference written from h(x) = x + mlp(x) * strength,
with files built by hand in A1111's layout (module indices counted as its Sequential does):
formats.read_hypernetwork reads them into plain data, models.hypernetwork builds the modules,
addons.load_hypernetwork does both."""
import pytest
import torch
import torch.nn.functional as F

from checkpoints import rel_err
from fastdiff.addons import load_hypernetwork
from fastdiff.formats import FormatError, HypernetworkFile, read_hypernetwork
from fastdiff.formats.hypernetwork import expected_shapes
from fastdiff.models.hypernetwork import Hypernetwork, HypernetworkModule, HypernetworkStack

G = torch.Generator().manual_seed(0)


def _lin(i, o):
    return {"weight": torch.randn(o, i, generator=G) / i ** 0.5, "bias": 0.1 * torch.randn(o, generator=G)}


def _ln(d):
    return {"weight": 1 + 0.1 * torch.randn(d, generator=G), "bias": 0.1 * torch.randn(d, generator=G)}


def a1111_deep_module(d):
    """layer_structure [1, 2, 2, 1], relu, layer norm, use_dropout + last_layer_dropout, no output
    activation. A1111's Sequential: 0 Linear, 1 ReLU, 2 LN, 3 Dropout, 4 Linear, 5 ReLU, 6 LN,
    7 Dropout, 8 Linear, 9 LN."""
    parts = {0: _lin(d, 2 * d), 2: _ln(2 * d), 4: _lin(2 * d, 2 * d), 6: _ln(2 * d), 8: _lin(2 * d, d), 9: _ln(d)}
    return {f"linear.{i}.{n}": t for i, p in parts.items() for n, t in p.items()}


def ref_deep(x, sd, s):
    h = F.relu(F.linear(x, sd["linear.0.weight"], sd["linear.0.bias"]))
    h = F.layer_norm(h, h.shape[-1:], sd["linear.2.weight"], sd["linear.2.bias"])
    h = F.relu(F.linear(h, sd["linear.4.weight"], sd["linear.4.bias"]))
    h = F.layer_norm(h, h.shape[-1:], sd["linear.6.weight"], sd["linear.6.bias"])
    h = F.linear(h, sd["linear.8.weight"], sd["linear.8.bias"])
    h = F.layer_norm(h, h.shape[-1:], sd["linear.9.weight"], sd["linear.9.bias"])
    return x + h * s


def a1111_tanh_module(d):
    """layer_structure [1, 2, 1], tanh with activate_output: 0 Linear, 1 Tanh, 2 Linear, 3 Tanh."""
    parts = {0: _lin(d, 2 * d), 2: _lin(2 * d, d)}
    return {f"linear.{i}.{n}": t for i, p in parts.items() for n, t in p.items()}


def ref_tanh(x, sd, s):
    h = torch.tanh(F.linear(x, sd["linear.0.weight"], sd["linear.0.bias"]))
    return x + torch.tanh(F.linear(h, sd["linear.2.weight"], sd["linear.2.bias"])) * s


def nai_module(d):
    a, b = _lin(d, 2 * d), _lin(2 * d, d)
    return {"linear1.weight": a["weight"], "linear1.bias": a["bias"], "linear2.weight": b["weight"], "linear2.bias": b["bias"]}


def ref_nai(x, sd, s):
    h = F.linear(F.linear(x, sd["linear1.weight"], sd["linear1.bias"]), sd["linear2.weight"], sd["linear2.bias"])
    return x + h * s


@pytest.fixture(scope="module")
def hn_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hn")
    deep = {dim: (a1111_deep_module(dim), a1111_deep_module(dim)) for dim in (32, 64)}
    f1 = d / "deep.pt"
    torch.save({**{k: list(v) for k, v in deep.items()}, "step": 1000, "name": "deepnet",
                "layer_structure": [1, 2, 2, 1], "activation_func": "relu", "is_layer_norm": True,
                "weight_initialization": "Normal", "use_dropout": True, "last_layer_dropout": True,
                "activate_output": False, "sd_checkpoint": None, "sd_checkpoint_name": None}, f1)
    tanh = {32: (a1111_tanh_module(32), a1111_tanh_module(32))}
    f2 = d / "tanh.pt"
    torch.save({32: list(tanh[32]), "layer_structure": [1, 2, 1], "activation_func": "tanh",
                "is_layer_norm": False, "activate_output": True, "use_dropout": False,
                "dropout_structure": [0, 0, 0]}, f2)
    nai = {32: (nai_module(32), nai_module(32)), 64: (nai_module(64), nai_module(64))}
    f3 = d / "anime_2.pt"
    torch.save({k: list(v) for k, v in nai.items()}, f3)
    return {"deep": (str(f1), deep, ref_deep), "tanh": (str(f2), tanh, ref_tanh), "nai": (str(f3), nai, ref_nai)}


@pytest.mark.parametrize("which", ["deep", "tanh", "nai"])
@pytest.mark.parametrize("strength", [1.0, 0.35])
def test_matches_formula(hn_files, which, strength):
    path, mods, ref = hn_files[which]
    hn = load_hypernetwork(path, strength=strength)
    assert isinstance(hn, Hypernetwork) and not hn.training
    assert all(not p.requires_grad for p in hn.parameters())
    for dim, (sk, sv) in mods.items():
        ctx = torch.randn(2, 7, dim)
        k, v = hn(ctx)
        assert rel_err(k, ref(ctx, sk, strength)) <= 1e-6
        assert rel_err(v, ref(ctx, sv, strength)) <= 1e-6
        assert rel_err(k, ctx) > 1e-3 and rel_err(k, v) > 1e-3  # the modules do something, and differ
    ctx = torch.randn(2, 7, 48)  # no module for this width: identity
    k, v = hn(ctx)
    assert k is ctx and v is ctx


def test_names_and_info(hn_files):
    assert load_hypernetwork(hn_files["deep"][0]).name == "deepnet"
    nai = load_hypernetwork(hn_files["nai"][0])
    assert nai.name == "anime_2" and nai.info["format"] == "NovelAI" and nai.dims == [32, 64]


def test_strength_change_without_reload(hn_files):
    path, mods, ref = hn_files["deep"]
    hn = load_hypernetwork(path)
    ctx = torch.randn(1, 5, 64)
    for s in (1.0, 0.5, 0.0, 1.5):
        hn.strength = s
        k, _ = hn(ctx)
        assert rel_err(k, ref(ctx, mods[64][0], s)) <= 1e-6 if s else torch.equal(k, ctx)


def test_stack_applies_in_order(hn_files):
    (p1, m1, r1), (p2, m2, r2) = hn_files["deep"], hn_files["nai"]
    stack = HypernetworkStack([load_hypernetwork(p1), load_hypernetwork(p2, strength=0.7)])
    ctx = torch.randn(2, 5, 32)
    k, v = stack(ctx)
    ref_k = r2(r1(ctx, m1[32][0], 1.0), m2[32][0], 0.7)
    ref_v = r2(r1(ctx, m1[32][1], 1.0), m2[32][1], 0.7)
    assert rel_err(k, ref_k) <= 1e-6 and rel_err(v, ref_v) <= 1e-6
    # order matters: the reverse composition is measurably different
    assert rel_err(k, r1(r2(ctx, m2[32][0], 0.7), m1[32][0], 1.0)) > 1e-4
    stack.set_strength("deepnet", 0.0)
    k, _ = stack(ctx)
    assert rel_err(k, r2(ctx, m2[32][0], 0.7)) <= 1e-6
    # width served by the second only
    ctx64 = torch.randn(1, 3, 64)
    stack[1].strength = 1.0
    k, _ = stack(ctx64)
    assert rel_err(k, r2(ctx64, m2[64][0], 1.0)) <= 1e-6


def test_kv_hook_dtype_roundtrip(hn_files):
    hn = load_hypernetwork(hn_files["nai"][0])
    ctx = torch.randn(1, 4, 32, dtype=torch.float64)
    k, v = hn(ctx)
    assert k.dtype == torch.float64


def test_bad_hypernetworks(tmp_path):
    p = tmp_path / "bad.pt"
    sd = a1111_tanh_module(32)
    torch.save({32: [sd, sd], "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": True,
                "activate_output": False}, p)
    with pytest.raises(FormatError, match=r"bad\.pt: width 32 k-module: keys do not match.*missing \['linear\.3\.bias'"):
        load_hypernetwork(str(p))
    sd2 = dict(sd, **{"linear.0.weight": torch.randn(64, 31)})
    torch.save({32: [sd2, sd2], "layer_structure": [1, 2, 1], "activation_func": "tanh", "activate_output": True}, p)
    with pytest.raises(FormatError, match=r"linear\.0\.weight: expected \[64, 32\], found \[64, 31\]"):
        load_hypernetwork(str(p))
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}}, p)
    with pytest.raises(FormatError, match="not a hypernetwork"):
        load_hypernetwork(str(p))
    torch.save({32: [sd, sd], "activation_func": "frobnicate"}, p)
    with pytest.raises(FormatError, match="unsupported activation"):
        load_hypernetwork(str(p))


@pytest.mark.parametrize("which", ["deep", "tanh", "nai"])
def test_reader_returns_plain_data(hn_files, which):
    path, mods, _ = hn_files[which]
    f = read_hypernetwork(path)
    assert isinstance(f, HypernetworkFile) and f.dims == sorted(mods)
    for dim, pair in f.state_dicts.items():
        assert all(isinstance(sd, dict) and all(isinstance(t, torch.Tensor) for t in sd.values()) for sd in pair)
        assert all(not isinstance(x, torch.nn.Module) for x in (*pair, f.config))
    assert f.num_params() == sum(p.numel() for p in load_hypernetwork(path).parameters())
    assert read_hypernetwork(path, name="other").name == "other"


CONFIGS = [
    dict(layer_structure=[1, 2, 1], activation_func=None, is_layer_norm=False, activate_output=True,
         dropout_structure=[0, 0, 0]),
    dict(layer_structure=[1, 2, 1], activation_func="linear", is_layer_norm=True, activate_output=True,
         dropout_structure=[0, 0.3, 0]),
    dict(layer_structure=[1, 2, 2, 1], activation_func="relu", is_layer_norm=True, activate_output=False,
         dropout_structure=[0, 0.3, 0.3, 0]),
    dict(layer_structure=[1, 1.5, 3, 1], activation_func="swish", is_layer_norm=False, activate_output=True,
         dropout_structure=[0, 0, 0.3, 0]),
    dict(layer_structure=[1, 3, 1], activation_func="mish", is_layer_norm=True, activate_output=False,
         dropout_structure=[0, 0, 0]),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_reader_layout_matches_the_module(cfg):
    """The reader's A1111 index counting and the module's Sequential agree key for key."""
    mod = HypernetworkModule(32, cfg["layer_structure"], cfg["activation_func"], cfg["is_layer_norm"],
                             cfg["activate_output"], cfg["dropout_structure"])
    assert expected_shapes(32, cfg) == {k: tuple(v.shape) for k, v in mod.state_dict().items()}


def test_strength_is_held_by_the_hypernetwork_only(hn_files):
    path, mods, ref = hn_files["deep"]
    hn = load_hypernetwork(path, strength=0.5)
    mk = hn.layers["64"][0]
    assert not hasattr(mk, "strength")
    ctx = torch.randn(1, 5, 64)
    assert rel_err(mk(ctx, 0.25), ref(ctx, mods[64][0], 0.25)) <= 1e-6
    k, _ = hn.apply_kv(ctx, ctx, 0.25)  # an explicit strength wins over hn.strength
    assert rel_err(k, ref(ctx, mods[64][0], 0.25)) <= 1e-6
    k, _ = hn.apply_kv(ctx, ctx, torch.tensor(0.75))  # a 0-dim tensor, as under a CUDA graph
    assert rel_err(k, ref(ctx, mods[64][0], 0.75)) <= 1e-6
    k, _ = hn(ctx)  # no strength given: the hypernetwork's own
    assert rel_err(k, ref(ctx, mods[64][0], 0.5)) <= 1e-6
