"""Helpers shared by the test modules (importable: conftest puts tests/ on sys.path)."""
import math
import os

import torch

import train_gpt as T

# the tiny CPU model the tests share; each module sets what its tests need on top
TINY_MODEL = dict(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0, rope_dims=8, recur_passes=0, compile="0",
                  train_seq_schedule="")


def tiny_model_args(**kw):
    """Settings of a tiny CPU model: TINY_MODEL, then `kw`."""
    return T.Hyperparameters(**{**TINY_MODEL, **kw})


def randomized_model(args, seed=0, emb_std=0.1):
    """A CPU model with every parameter non-trivial: the default init zeroes the output
    projections and the MLP down bank, which would hide attention
    (and make context irrelevant)."""
    model = T.build_model(args, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3:  # banks: (n, out, in)
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.size(-1)))
            elif name == "tok_emb.weight":
                p.copy_(torch.randn(p.shape, generator=g) * emb_std)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _reference_scores(q, k, cu, max_seqlen, scale):
    """float64 scores (H, Nq, Nk) of varlen attention, -inf outside each query's segment's causal
    past; also the keys repeated to the query heads. Checks the kernels' contract on cu."""
    N, H, _ = q.shape
    assert cu.dtype == torch.int32 and cu.dim() == 1 and int(cu[0]) == 0 and int(cu[-1]) == N
    assert bool((cu.diff() >= 0).all()) and int(cu.diff().max()) <= max_seqlen
    pos = torch.arange(N)
    seg = torch.searchsorted(cu.long(), pos, right=True) - 1  # the last start <= pos (empty ones skipped)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    kh = k.double().repeat_interleave(H // k.size(1), dim=1)  # query head h reads kv head h // (H/Hkv)
    s = torch.einsum("qhd,khd->hqk", q.double(), kh) * scale
    return s.masked_fill(~allowed, float("-inf")), kh


def _reference_forward(q, k, v, cu, max_seqlen, scale):
    s, _ = _reference_scores(q, k, cu, max_seqlen, scale)
    lse = torch.logsumexp(s, -1)
    vh = v.double().repeat_interleave(q.size(1) // v.size(1), dim=1)
    out = torch.einsum("hqk,khd->qhd", torch.exp(s - lse[..., None]), vh)
    return out.to(q.dtype), lse.float()


def _reference_backward(dout, q, k, v, out, lse, cu, max_seqlen, scale):
    """FlashAttention's backward from the saved lse: dS = P * (dP - rowsum(dO * O))."""
    s, kh = _reference_scores(q, k, cu, max_seqlen, scale)
    H, Hkv = q.size(1), k.size(1)
    p = torch.exp(s - lse.double()[..., None])
    do, o = dout.double(), out.double()
    vh = v.double().repeat_interleave(H // Hkv, dim=1)
    dvh = torch.einsum("hqk,qhd->khd", p, do)
    ds = p * (torch.einsum("qhd,khd->hqk", do, vh) - (do * o).sum(-1).T[..., None])
    dq = torch.einsum("hqk,khd->qhd", ds, kh) * scale
    dkh = torch.einsum("hqk,qhd->khd", ds, q.double()) * scale

    def per_kv_head(g):  # sum over the query heads that share a kv head
        return g.view(g.size(0), Hkv, H // Hkv, g.size(-1)).sum(2)
    return dq.to(q.dtype), per_kv_head(dkh).to(k.dtype), per_kv_head(dvh).to(v.dtype)


# pure-torch stand-in for FlashAttention's varlen kernels, plugged in like FA3/FA4
REFERENCE_VARLEN = T.VarlenProvider("ref", _reference_forward, _reference_backward)


def use_varlen(monkeypatch, provider=REFERENCE_VARLEN):
    """Make `provider` the attention backend (undone with the monkeypatch)."""
    monkeypatch.setattr(T, "_VARLEN", provider)
    monkeypatch.setattr(T, "_ATTN_BACKEND", "varlen:" + provider.name)


def script_env(**kw):
    """The environment of a CPU run of train_gpt.py (or a tool) in a subprocess: the caller's, without
    its distributed variables or any setting, one thread, no compile; then `kw` (as strings)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    for f in T.Hyperparameters.__dataclass_fields__:
        env.pop(f.upper(), None)
    env.update(OMP_NUM_THREADS="1", DEVICE="cpu", COMPILE="0", PYTHONDONTWRITEBYTECODE="1")
    env.update({k: str(v) for k, v in kw.items()})
    return env
