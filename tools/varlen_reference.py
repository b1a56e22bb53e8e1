"""A pure-torch stand-in for FlashAttention's varlen kernels (float64 reference forward and
backward from the saved log-sum-exp), plugged in like FA3/FA4: the tests' reference provider and
tools/varlen_check.py's on CPU. The importer puts the repository root on sys.path."""
import torch

import train_gpt as T


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
