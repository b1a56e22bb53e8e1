"""Fused LeakyReLU(slope)^2 MLP (own Triton kernel) vs the plain PyTorch path.

MLP: h = x @ W_up.T, u = leaky_relu(h, slope)^2, out = u @ W_down.T.  FusedMLP runs the
up-projection as one Triton matmul whose epilogue writes u and the pre-activation h (bf16), and
in backward the same kernel (FWD=False) computes grad_out @ W_down with the derivative epilogue
grad_h = acc * 2*leaky(h)*(1 if h > 0 else slope) = acc * 2h * (1 if h > 0 else slope^2), so
grad_u is never written.  The other four matmuls are torch (cuBLAS).

  python3 tools/mlp_bench.py --check   CPU, TRITON_INTERPRET=1: forward + all grads vs plain path
                                       on small odd shapes (fp32, bf16); then runs --nogpu; non-zero
                                       exit on any mismatch / failure
  python3 tools/mlp_bench.py --nogpu   CPU, no interpreter: compile the kernel for sm_90a (regs, spills,
                                       smem per config) and check torch.compile(fullgraph=True) traces
                                       FusedMLP fwd + bwd with the kernel as one graph node each
  python3 tools/mlp_bench.py           CUDA: M=96*2048, K=512, N=2048 bf16; agreement, per-config
                                       kernel times, fwd+bwd ms of plain (compiled) vs fused
"""
import os
import sys

if "--check" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the triton import
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# ---- kernel + Function (what a merge into train_gpt.py would add; not merged: slower) ----
@triton.jit
def _mm_act(a, b, c, h, M, N, K: tl.constexpr, sam, sak, sbk, sbn, SLOPE: tl.constexpr, FWD: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GM: tl.constexpr):
    # c = act(a @ b); a: (M, K), b: (K, N) strided; c, h: contiguous (M, N). Grouped tile order.
    # K is constexpr (= model_dim in both modes): static trip count; the 3.6 interpreter also can't
    # range() over a runtime int with numpy 2.4.
    pid, nm, nn = tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN)
    g0 = pid // (GM * nn) * GM
    gs = min(nm - g0, GM)
    pm, pn = g0 + pid % (GM * nn) % gs, pid % (GM * nn) // gs
    rm, rn, rk = pm * BM + tl.arange(0, BM), pn * BN + tl.arange(0, BN), tl.arange(0, BK)
    ap = a + (rm % M)[:, None] * sam + rk[None, :] * sak  # wrapped rows/cols: loads stay in bounds
    bp = b + rk[:, None] * sbk + (rn % N)[None, :] * sbn
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        acc = tl.dot(tl.load(ap, mask=rk[None, :] < K - k, other=0.0),
                     tl.load(bp, mask=rk[:, None] < K - k, other=0.0), acc)
        ap += BK * sak
        bp += BK * sbk
    off, msk = rm[:, None].to(tl.int64) * N + rn[None, :], (rm[:, None] < M) & (rn[None, :] < N)
    if FWD:  # acc = h: write u = leaky(h)^2 and h
        y = tl.where(acc > 0, acc, SLOPE * acc)
        tl.store(h + off, acc.to(h.dtype.element_ty), mask=msk)
        tl.store(c + off, (y * y).to(c.dtype.element_ty), mask=msk)
    else:  # acc = grad_u: write grad_h
        z = tl.load(h + off, mask=msk, other=0.0).to(tl.float32)
        tl.store(c + off, (acc * 2 * z * tl.where(z > 0, 1.0, SLOPE * SLOPE)).to(c.dtype.element_ty), mask=msk)


CFG = {m: dict(BM=128, BN=128, BK=64, GM=8, num_warps=8, num_stages=4) for m in (True, False)}


def mm_act(a, b, h, slope, fwd):
    """fwd: returns leaky(a@b)^2 and fills h with a@b; else returns (a@b) * act'(h)."""
    (M, K), N, cfg = a.shape, b.shape[1], CFG[fwd]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    _mm_act[grid](a, b, c, h, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), slope, fwd, **cfg)
    return c


class FusedMLP(torch.autograd.Function):
    """out = leaky_relu(x @ wu.T, slope)^2 @ wd.T; x: (..., K), wu: (N, K), wd: (D, N), same dtype."""

    @staticmethod
    def forward(ctx, x, wu, wd, slope):
        x2 = x.reshape(-1, x.shape[-1])
        h = torch.empty(x2.shape[0], wu.shape[0], device=x.device, dtype=x.dtype)
        u = mm_act(x2, wu.T, h, slope, True)
        ctx.save_for_backward(x2, wu, wd, h, u)
        ctx.slope, ctx.xs = slope, x.shape
        return F.linear(u, wd).view(*x.shape[:-1], wd.shape[0])

    @staticmethod
    def backward(ctx, go):
        x2, wu, wd, h, u = ctx.saved_tensors
        go = go.reshape(-1, go.shape[-1])
        gh = mm_act(go, wd, h, ctx.slope, False)
        return (gh @ wu).view(ctx.xs), gh.T @ x2, go.T @ u, None
# ---- end of kernel + Function ----

# configs timed by the GPU benchmark (and compiled for sm_90a by --check)
SWEEP = [dict(BM=128, BN=128, BK=64, GM=8, num_warps=8, num_stages=4),
         dict(BM=128, BN=128, BK=64, GM=8, num_warps=8, num_stages=3),
         dict(BM=128, BN=128, BK=64, GM=8, num_warps=4, num_stages=4),
         dict(BM=128, BN=256, BK=64, GM=8, num_warps=8, num_stages=3)]


def plain(x, wu, wd, slope):
    return F.linear(F.leaky_relu(F.linear(x, wu), slope).square(), wd)


def fused(x, wu, wd, slope):
    return FusedMLP.apply(x, wu, wd, slope)


def fwd_bwd(f, x, wu, wd, go, slope=0.5):
    """(out, grad_x, grad_wu, grad_wd) of f on fresh leaves."""
    x, wu, wd = (t.detach().requires_grad_() for t in (x, wu, wd))
    out = f(x, wu, wd, slope)
    return (out.detach(), *torch.autograd.grad(out, (x, wu, wd), go, allow_unused=True))


def rel_errs(a, b):
    return [((p.double() - q.double()).abs().max() / q.double().abs().max()).item() for p, q in zip(a, b)]


def _patch_interpreter_bf16_dot():
    """Triton 3.6's interpreter multiplies bf16 tiles as their raw uint16 bits; upcast them first."""
    from triton.runtime.interpreter import InterpreterBuilder as B
    dot = B.create_dot
    up = lambda s, t: s.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t
    B.create_dot = lambda s, a, b, *r: dot(s, up(s, a), up(s, b), *r)


def sm90(M=96 * 2048, K=512, N=2048):
    """Compile both kernel modes for sm_90a with the launch-time specialisations of the benchmark shapes
    (ptxas included with triton; no GPU needed): shared memory, registers, spills."""
    import itertools
    import re
    import subprocess
    import tempfile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fd, ptx = tempfile.mkstemp(suffix=".ptx")
    os.close(fd)
    fn, bad = _mm_act, 0
    for (fwd, strides), c in itertools.product(((True, (K, 1, 1, K)), (False, (K, 1, N, 1))), SWEEP):
        cfg = dict(c)  # strides: sam sak sbk sbn; 1 -> constexpr like the launcher
        opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        vals = dict(zip(fn.arg_names, (0, 0, 0, 0, M, N, K, *strides, 0.5, fwd)), **cfg)
        const = {k: v for k, v in vals.items() if k in ("K", "SLOPE", "FWD", *cfg) or v == 1}
        sig = {k: "constexpr" if k in const else "*bf16" if i < 4 else "i32" for i, k in enumerate(fn.arg_names)}
        div = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(fn.arg_names) if k not in const}
        try:
            kern = triton.compile(ASTSource(fn, sig, const, div), target=GPUTarget("cuda", 90, 32), options=opts)
            open(ptx, "w").write(kern.asm["ptx"])
            v = subprocess.run([triton.knobs.nvidia.ptxas.path, "--gpu-name=sm_90a", "-v", ptx, "-o", os.devnull],
                               capture_output=True, text=True).stderr
            regs, spill = re.findall(r"Used (\d+) registers", v), re.findall(r"(\d+) bytes spill stores", v)
            print(f"sm_90a {'fwd' if fwd else 'bwd'} {c}: shared {kern.metadata.shared} B, "
                  f"regs {','.join(regs)}, spill stores {','.join(spill)} B, wgmma {'wgmma' in kern.asm['ptx']}")
        except Exception as ex:
            bad = 1
            print(f"sm_90a {'fwd' if fwd else 'bwd'} compile FAILED: {type(ex).__name__}: {str(ex)[:300]}")
    os.remove(ptx)
    return bad


def trace():
    """torch.compile(fullgraph=True) traces FusedMLP fwd + bwd with the kernel as a graph node (CPU, no
    interpreter: the kernel is not run, the captured graphs are only inspected)."""
    import torch.utils._triton as ut
    from torch._dynamo.backends.common import aot_autograd
    ut.has_triton = lambda: True  # dynamo handles user Triton kernels only when it sees a GPU
    torch._functorch.config.force_non_lazy_backward_lowering = True
    n, err = [], ""
    cap = lambda gm, _: n.append(sum("triton_kernel_wrapper" in str(nd.target) for nd in gm.graph.nodes)) or gm
    x, wu, wd = (torch.randn(*s, requires_grad=True) for s in ((2, 33, 48), (80, 48), (48, 80)))
    try:
        torch.compile(fused, backend=aot_autograd(fw_compiler=cap, bw_compiler=cap), fullgraph=True)(x, wu, wd, 0.5)
    except Exception as ex:  # running the captured graph needs a GPU; tracing errors surface as n != [1, 1]
        err = f"{type(ex).__name__}: {str(ex).splitlines()[0][:150]}"
    print(f"torch.compile(fullgraph=True) trace: Triton kernel nodes fwd/bwd = {n}" + ("" if n else f" ({err})"))
    return int(n != [1, 1])


def check():
    _patch_interpreter_bf16_dot()
    for m in CFG:
        CFG[m] = dict(BM=32, BN=32, BK=32, GM=2)  # small tiles: partial tiles in M, N and K, >1 group
    torch.manual_seed(0)
    bad = 0
    cases = [((67,), 48, 80, torch.float32, 0.5), ((67,), 48, 80, torch.bfloat16, 0.5),
             ((3, 23), 48, 80, torch.bfloat16, 0.5), ((5, 7), 40, 72, torch.float32, 0.3)]
    print("max |err| / max |ref| for out, grad_x, grad_W_up, grad_W_down")
    for lead, K, N, dt, slope in cases:
        x, go = torch.randn(*lead, K), torch.randn(*lead, K)
        wu, wd = torch.randn(N, K) / K**0.5, torch.randn(K, N) / N**0.5
        ref = fwd_bwd(plain, *(t.double() for t in (x, wu, wd, go)), slope)
        args = [t.to(dt) for t in (x, wu, wd, go)]
        p, f = fwd_bwd(plain, *args, slope), fwd_bwd(fused, *args, slope)
        e, ep, ef = rel_errs(f, p), rel_errs(p, ref), rel_errs(f, ref)
        tol = 1e-4 if dt == torch.float32 else 2e-2
        ok = all(v < tol for v in e) and all(f[i].shape == p[i].shape for i in range(4))
        bad += not ok
        fmt = lambda v: " ".join(f"{t:.1e}" for t in v)
        print(f"{'ok ' if ok else 'BAD'} x{tuple(x.shape)} N={N} {str(dt)[6:]:8s} slope={slope}: fused-plain "
              f"{fmt(e)} | plain-fp64 {fmt(ep)} | fused-fp64 {fmt(ef)} (tol {tol:.0e})")
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # stderr: mutation-analysis noise
    bad += subprocess.run([sys.executable, __file__, "--nogpu"], env=env, stderr=subprocess.DEVNULL).returncode != 0
    print("PASS" if not bad else f"FAIL ({bad} case(s))")
    return int(bad > 0)


def bench(fn, n=20, warm=5):
    for _ in range(warm):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


def gpu(M=96 * 2048, K=512, N=2048, dev="cuda"):
    slope, bf = 0.5, torch.bfloat16
    torch.manual_seed(0)
    x, go = torch.randn(M, K, device=dev, dtype=bf), torch.randn(M, K, device=dev, dtype=bf)
    wu = (torch.randn(N, K, device=dev) / K**0.5).to(bf)
    wd = (torch.randn(K, N, device=dev) / N**0.5).to(bf)
    print(f"{torch.cuda.get_device_name()}  M={M} K={K} N={N} bf16, triton {triton.__version__}, torch {torch.__version__}")
    # kernel configs: fused kernel alone vs the cuBLAS matmul it replaces
    h = torch.empty(M, N, device=dev, dtype=bf)
    tf = lambda ms: 2 * M * N * K / ms / 1e9
    for fwd, a, b, name in ((True, x, wu.T, "up fwd: x@Wu.T -> u,h"), (False, go, wd, "bwd: go@Wd * act'(h)")):
        t_ref = bench(lambda: a @ b)
        print(f"{name:24s} cuBLAS matmul only {t_ref:.3f} ms ({tf(t_ref):.0f} TFLOP/s)")
        best = None
        for cfg in SWEEP:
            CFG[fwd] = cfg
            try:
                t = bench(lambda: mm_act(a, b, h, slope, fwd))
            except Exception as ex:
                print(f"  {cfg}: failed {type(ex).__name__}")
                continue
            print(f"  fused {cfg}: {t:.3f} ms ({tf(t):.0f} TFLOP/s, x{t / t_ref:.2f} of cuBLAS)")
            best = min(best or (t, cfg), (t, cfg), key=lambda v: v[0])
        CFG[fwd] = best[1]
        print(f"  -> using {best[1]}")
    # (a) agreement
    p, f = fwd_bwd(plain, x, wu, wd, go), fwd_bwd(fused, x, wu, wd, go)
    e = rel_errs(f, p)
    print("fused vs plain max|err|/max|ref| (out, gx, gWu, gWd): " + " ".join(f"{v:.1e}" for v in e)
          + ("" if max(e) < 2e-2 else "  <-- MISMATCH"))
    del p, f
    # (b) fwd+bwd timings
    comp = lambda fn, **kw: torch.compile(fn, dynamic=False, **kw)
    variants = [("plain eager", plain), ("plain compiled", comp(plain)), ("fused eager", fused)]
    try:
        cf = comp(fused, fullgraph=True)
        fwd_bwd(cf, x, wu, wd, go)
        variants.append(("fused compiled fullgraph", cf))
    except Exception as ex:
        print(f"fused fullgraph compile failed: {type(ex).__name__}: {str(ex)[:300]}")
        torch._dynamo.reset()
        variants.append(("fused compiled (graph breaks)", comp(fused)))
    up = lambda x, wu, wd, s: F.linear(x, wu)
    variants.append(("up-proj matmul alone", up))
    res = {}
    for name, fn in variants:
        g = go if fn is not up else torch.randn(M, N, device=dev, dtype=bf)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            res[name] = t = bench(lambda: fwd_bwd(fn, x, wu, wd, g))
        except Exception as ex:
            print(f"{name:30s} failed: {type(ex).__name__}: {str(ex)[:200]}")
            continue
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        print(f"{name:30s} fwd+bwd {t:7.3f} ms  x{t / res['plain compiled']:.3f} of plain compiled"
              if "plain compiled" in res else f"{name:30s} fwd+bwd {t:7.3f} ms", f" (peak +{peak:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(check() if "--check" in sys.argv else (sm90() | trace()) if "--nogpu" in sys.argv else gpu())
