"""Ahead-of-time compile of every kernel for sm_80 and sm_90 with the GPU-path configs.

The interpreter runs the kernels' Python, not Triton's compiler, so a kernel can pass every
CPU test and still fail to compile for a GPU. Triton ships ptxas, so the full GPU compile
(TTIR -> PTX -> cubin) runs on a machine without one. It runs in a subprocess without
TRITON_INTERPRET (kernels imported under the interpreter cannot be compiled) and is skipped
where Triton's ptxas is missing.
"""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    r"""
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastdiff.triton_kernels import attention as A, group_norm as G, layer_norm as L
    from fastdiff.triton_kernels import geglu as E, lincomb as C

    arch = int(sys.argv[1])
    fails = []

    def comp(tag, fn, sig, consts, warps=4, stages=3, smem_limit=None):
        sig = dict(sig)
        sig.update({k: "constexpr" for k in consts})
        try:
            c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": warps, "num_stages": stages})
            if smem_limit is not None and c.metadata.shared > smem_limit:
                fails.append(f"{tag}: {c.metadata.shared} bytes of shared memory > {smem_limit}")
        except Exception as e:
            fails.append(f"{tag}: {type(e).__name__}: {str(e)[:300]}")

    attn_names = A._attn_fwd.fn.arg_names
    for dt, bd in (("fp16", 64), ("fp16", 256), ("bf16", 128), ("fp32", 64)):
        sig = {n: "i32" for n in attn_names if n not in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "IEEE")}
        sig.update(q="*" + dt, k="*" + dt, v="*" + dt, o="*" + dt, qk_scale="fp32")
        # the smallest config must always fit, so autotuning always has a candidate
        cfg = A._configs()[-1]
        consts = dict(BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"], BLOCK_D=bd,
                      IEEE=dt == "fp32")
        comp(f"attention {dt} D{bd} smallest", A._attn_fwd.fn, sig, consts, cfg.num_warps,
             cfg.num_stages, smem_limit=99 * 1024)
        if dt == "fp16":
            cfg = A._configs()[0]
            consts.update(BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"])
            comp(f"attention {dt} D{bd} largest", A._attn_fwd.fn, sig, consts, cfg.num_warps, cfg.num_stages)
    for dt in ("fp16", "fp32"):
        p = "*" + dt
        i = "i32"
        comp(f"gn stats {dt}", G._gn_stats,
             dict(x=p, mean_out="*fp32", m2_out="*fp32", cnt_out="*fp32", sxb=i, sxc=i, sxs=i, G=i,
                  CPG=i, HW=i, CHUNK=i, S=i), dict(BLOCK_C=16, BLOCK_S=256), warps=8)
        comp(f"gn apply {dt}", G._gn_apply,
             dict(x=p, y=p, w="*fp32", bias="*fp32", mean_in="*fp32", m2_in="*fp32", cnt_in="*fp32",
                  sxb=i, sxc=i, sxs=i, syb=i, syc=i, sys=i, G=i, CPG=i, HW=i, CHUNK=i, S=i, eps="fp32"),
             dict(HAS_W=True, HAS_B=True, SILU=True, BLOCK_C=16, BLOCK_S=256, BLOCK_P=64), warps=8)
        comp(f"layer_norm {dt}", L._ln_fwd,
             dict(x=p, y=p, w=p, b=p, M=i, N=i, sxm=i, sym=i, eps="fp32"),
             dict(HAS_W=True, HAS_B=True, ROWS=4, BLOCK_N=1024), warps=8)
        comp(f"geglu {dt}", E._geglu_fwd, dict(x=p, y=p, n_out=i, D=i, sxm=i), dict(BLOCK=1024))
        for ptr in (False, True):
            comp(f"lincomb {dt} ptr={ptr}", C._lincomb,
                 dict(o=p, t0=p, t1=p, t2=p, t3=p, t4=p, c0="fp32", c1="fp32", c2="fp32", c3="fp32",
                      c4="fp32", cp="*fp32", numel=i), dict(N=5, COEF_PTR=ptr, BLOCK=1024))
    print("\n".join(fails) if fails else "ok")
    sys.exit(1 if fails else 0)
    """
)


def _ptxas_available():
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        return os.path.exists(path) or bool(os.environ.get("TRITON_PTXAS_PATH"))
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas not found")
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu(arch):
    # A subprocess: this process imported the kernels as interpreted functions.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a Triton 3.9 notice; same default
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(arch)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
