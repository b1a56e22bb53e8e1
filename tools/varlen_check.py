"""First GPU check of the varlen attention path (train_gpt's FA3/FA4 providers): outputs and
gradients against SDPA with the dense document mask, one graph under torch.compile(fullgraph),
a CUDA graph capture, and forward+backward times of the segment buffer sizes (exact count,
the default cap, B*T) beside FlexAttention.
    ATTN_BACKEND=fa4 python3 tools/varlen_check.py     (auto | fa3 | fa4; B=48 T=2048 by default)
On CPU (no FlashAttention) it runs the same checks, small, with the pure-torch reference
provider of tools/varlen_reference.py."""
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt as T  # noqa: E402

cuda = torch.cuda.is_available()
dev = torch.device("cuda" if cuda else "cpu")
B, Tn = int(os.environ.get("B", 48 if cuda else 2)), int(os.environ.get("T", 2048 if cuda else 64))
H, Hkv, D, BOS = 8, 4, 64, 1
dtype = torch.bfloat16 if cuda else torch.float32
backend = "inductor" if cuda else "aot_eager"  # CPU: no C++ builds
if cuda:
    attention, description = T.choose_attention(os.environ.get("ATTN_BACKEND", "auto"), dev, doc_mask=True)
    print("backend:", description)
    assert isinstance(attention, T.VarlenAttention), "no FlashAttention provider: nothing to check"
else:
    from varlen_reference import REFERENCE_VARLEN
    attention = T.VarlenAttention(REFERENCE_VARLEN)
    print("backend: varlen:ref (CPU stand-in)")

g = torch.Generator(device=dev).manual_seed(0)
ids = torch.randint(2, 8192, (B, Tn), device=dev, generator=g)
ids[torch.rand(B, Tn, device=dev, generator=g) < 4 / Tn] = BOS  # ~4 documents per row
ids[:, 0] = BOS
q0 = torch.randn(B, Tn, H, D, device=dev, dtype=dtype, generator=g)
k0, v0 = (torch.randn(B, Tn, Hkv, D, device=dev, dtype=dtype, generator=g) for _ in range(2))
dout = torch.randn(B, Tn, H, D, device=dev, dtype=dtype, generator=g)
segments = int(B + ((ids == BOS)[:, 1:]).sum())
print(f"{B} x {Tn} tokens, {segments} segments, buffer {attention.mask(ids, BOS, True).cu_seqlens.numel() - 1} by default")


def fwd_bwd(attn):
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    out = attn(q, k, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def varlen(max_segments=None):
    def attn(q, k, v):
        mask = T.VarlenMask(T.varlen_segments(ids, BOS, True, max_segments), Tn)
        return attention(q, k, v, mask)
    return attn


def dense(q, k, v):
    doc = torch.cumsum((ids == BOS).int(), 1)
    mask = ((doc[:, :, None] == doc[:, None, :]) & torch.ones(Tn, Tn, dtype=torch.bool, device=dev).tril())[:, None]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)


got, want = fwd_bwd(varlen()), fwd_bwd(dense)
for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    err = (a.float() - b.float()).abs()
    print(f"{name}: max |varlen - dense SDPA| {err.max():.4f}, mean {err.mean():.2e}, |dense| mean {b.float().abs().mean():.3f}")

compiled = torch.compile(varlen(), fullgraph=True, backend=backend)  # fails on a graph break
diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(fwd_bwd(compiled), got)]
print(f"torch.compile(fullgraph=True): one graph; max |compiled - eager| out, dq, dk, dv: {diffs}"
      " (the backward's dq accumulation may use atomics: not bitwise)")
assert diffs[0] == 0 and max(diffs) < 0.05, "compiled varlen differs from eager"

if cuda:  # no host sync in segments + forward (warm: the kernels are compiled already)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            varlen()(q0, k0, v0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = varlen()(q0, k0, v0)
        graph.replay()
    assert torch.equal(out, got[0]), "CUDA graph replay differs"
    print("CUDA graph capture of segments + forward: replays the same output")


def ms(attn, reps=20):
    for _ in range(3):
        fwd_bwd(attn)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fwd_bwd(attn)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


for label, cap in (("exact count", segments), ("default cap", None), ("B*T", B * Tn)):
    print(f"varlen forward+backward, {label} segments: {ms(torch.compile(varlen(cap), fullgraph=True, backend=backend)):.2f} ms")
if cuda and T.flex_attention is not None:
    doc = torch.cumsum((ids == BOS).int(), 1)
    block = T.create_block_mask(lambda b, h, q, kv: (q >= kv) & (doc[b, q] == doc[b, kv]), B, None, Tn, Tn, device=dev)
    flex = torch.compile(lambda q, k, v: T.flex_attention(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=block,
                                                          enable_gqa=True).transpose(1, 2))
    print(f"FlexAttention forward+backward (block mask given): {ms(flex):.2f} ms")
