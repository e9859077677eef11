"""fastdiff.ops routing: which path FASTDIFF_OPS picks, fallbacks and their logged reasons, and
that the torch implementations agree with the kernels' fp64 references (the op semantics)."""
import logging
import os

import pytest
import torch

from fastdiff import ops

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (CPU)")


def _inputs(op, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    if op == "attention":
        return (r(1, 2, 9, 40), r(1, 2, 77, 40), r(1, 2, 77, 40)), {}
    if op == "group_norm":
        return (r(1, 20, 3, 3), 2, r(20), r(20)), {"eps": 1e-5, "silu": True}
    if op == "layer_norm":
        return (r(2, 5, 24), r(24), r(24)), {}
    if op == "geglu":
        return (r(2, 5, 24),), {}
    if op == "lincomb":
        return ([0.5, -2.0, 1.5], [r(2, 4, 3, 3), r(2, 4, 3, 3), r(2, 4, 3, 3)]), {}
    raise KeyError(op)


OPS = ["attention", "group_norm", "layer_norm", "geglu", "lincomb"]


def test_kernel_table_names_each_kernel_op():
    assert sorted(ops.KERNELS) == sorted(OPS)


def _fp64_ref(op, args, kwargs):
    import importlib

    mod = importlib.import_module(ops.KERNELS[op])
    return getattr(mod, f"{op}_ref")(*args, **kwargs)


@pytest.fixture
def spy(monkeypatch):
    """Counts calls into each kernel module's entry point."""
    import importlib

    calls = []
    for op in OPS:
        mod = importlib.import_module(ops.KERNELS[op])
        real = getattr(mod, op)

        def wrapper(*a, _real=real, _op=op, **k):
            calls.append(_op)
            return _real(*a, **k)

        monkeypatch.setattr(mod, op, wrapper)
    return calls


def _rel(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("op", OPS)
def test_torch_matches_fp64_reference(op):
    args, kwargs = _inputs(op)
    assert _rel(getattr(ops, f"{op}_torch")(*args, **kwargs), _fp64_ref(op, args, kwargs)) <= 1e-5


@pytest.mark.parametrize("op", OPS)
def test_mode_torch_never_calls_kernels(op, spy, monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", "torch")
    args, kwargs = _inputs(op)
    out = getattr(ops, op)(*args, **kwargs)
    assert spy == []
    assert _rel(out, _fp64_ref(op, args, kwargs)) <= 1e-5


@pytest.mark.parametrize("op", OPS)
def test_mode_auto_on_cpu_uses_reference(op, spy, monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", "auto")
    args, kwargs = _inputs(op)
    getattr(ops, op)(*args, **kwargs)
    assert spy == []


@needs_interpreter
@pytest.mark.parametrize("op", OPS)
def test_mode_triton_on_cpu_uses_interpreter(op, spy, monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", "triton")
    args, kwargs = _inputs(op)
    out = getattr(ops, op)(*args, **kwargs)
    assert spy == [op]
    assert _rel(out, _fp64_ref(op, args, kwargs)) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", OPS)
def test_mode_auto_on_cuda_uses_kernel(op, spy, monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", "auto")
    args, kwargs = _inputs(op, device="cuda")
    if op == "lincomb":
        args = (args[0], [t.cuda() for t in args[1]])
    out = getattr(ops, op)(*args, **kwargs)
    assert spy == [op]
    assert _rel(out.cpu(), _fp64_ref(op, args, kwargs).cpu()) <= 1e-5


def test_bad_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", "fast")
    with pytest.raises(ValueError, match="FASTDIFF_OPS"):
        ops.geglu(torch.randn(2, 4))


def test_geglu_odd_width_is_an_error():
    with pytest.raises(ValueError, match="odd"):
        ops.geglu(torch.randn(2, 5))


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.geglu(torch.randn(2, 4))


FALLBACKS = [
    # (op, args builder, expected words in the logged reason)
    ("geglu", lambda: ((torch.randn(2, 6, dtype=torch.float64),), {}), "dtype"),
    ("geglu", lambda: ((torch.randn(0, 6),), {}), "empty"),
    ("attention", lambda: ((torch.randn(1, 1, 4, 512),) * 3, {}), "head dim"),
    ("attention", lambda: ((torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 16)), {}),
     "shapes"),
    ("layer_norm", lambda: ((torch.randn(2, 8, dtype=torch.float64), None, None), {}), "dtype"),
    ("group_norm", lambda: ((torch.randn(1, 4, 2, 2, dtype=torch.float64), 2, None, None), {}), "dtype"),
    ("lincomb", lambda: (([1.0, 2.0], [torch.randn(4), torch.randn(8)[::2]]), {}), "non-contiguous"),
    ("lincomb", lambda: (([1.0] * 6, [torch.randn(4)] * 6), {}), "terms"),
    ("geglu", lambda: ((torch.randn(2, 6, requires_grad=True),), {}), "autograd"),
]


@needs_interpreter
@pytest.mark.parametrize("op,build,why", FALLBACKS, ids=[f"{o}-{w}" for o, _, w in FALLBACKS])
def test_fallback_reason_is_logged(op, build, why, spy, monkeypatch, caplog):
    monkeypatch.setenv("FASTDIFF_OPS", "triton")
    args, kwargs = build()
    with caplog.at_level(logging.DEBUG, logger="fastdiff.ops"):
        out = getattr(ops, op)(*args, **kwargs)
    assert spy == []
    msgs = [r.getMessage() for r in caplog.records if r.name == "fastdiff.ops"]
    assert any(op in m and why in m for m in msgs), msgs
    ref = getattr(ops, f"{op}_torch")(*args, **kwargs)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("mode", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_out_arguments(mode, monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", mode)
    (q, k, v), _ = _inputs("attention")
    out = torch.full((1, 9, 2, 40), float("nan"))
    o = ops.attention(q, k, v, out=out)
    assert o.data_ptr() == out.data_ptr() and o.shape == q.shape
    assert _rel(o, _fp64_ref("attention", (q, k, v), {})) <= 1e-5

    (cs, ts), _ = _inputs("lincomb")
    x0 = ts[0].clone()
    ops.lincomb(cs, ts, out=ts[0])  # in place
    assert _rel(ts[0], _fp64_ref("lincomb", (cs, [x0] + ts[1:]), {})) <= 1e-5


@pytest.mark.parametrize("mode", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_lincomb_tensor_coefficients(mode, monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", mode)
    (cs, ts), _ = _inputs("lincomb")
    coeffs = torch.tensor(cs + [9.0], dtype=torch.float32)  # longer than needed is fine
    assert _rel(ops.lincomb(coeffs, ts), _fp64_ref("lincomb", (cs, ts), {})) <= 1e-5
    with pytest.raises(ValueError, match="coefficients"):
        ops.lincomb([1.0], ts)
