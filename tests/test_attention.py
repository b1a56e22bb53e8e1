"""Varlen (FlashAttention) document-masked attention on CPU: segment starts, the custom op with a
pure-torch reference provider against the dense-mask math path (forward and backward), one graph
under torch.compile, provider errors, the FA3/FA4 adapters' calls, and the backend choice."""
import dataclasses
import os
import sys
import types

import numpy as np
import pytest
import torch

import smoke_data
import train_gpt as T
from helpers import (REFERENCE_VARLEN, _reference_backward, _reference_forward, randomized_model, tiny_model_args,
                     tiny_xsa_args, use_varlen)

CPU = torch.device("cpu")
BOS = 1
pytestmark = pytest.mark.usefixtures("one_thread_math")
SELF_CHECK = T.varlen_self_check


@pytest.fixture(autouse=True)
def no_self_check_on_the_pretend_gpu(monkeypatch):
    """Tests resolve backends for torch.device("cuda") without one: the self-check, which runs the
    provider on the device, is tested on its own below."""
    monkeypatch.setattr(T, "varlen_self_check", lambda provider, device: None)


def rows_with_documents(B=3, Tn=16, seed=0):
    """Row 0: BOS at 0 and 9; row 1: no BOS; row 2: BOS at 5, 6 (a one-token document) and at the
    last position; other tokens never BOS."""
    ids = torch.randint(2, 50, (B, Tn), generator=torch.Generator().manual_seed(seed))
    ids[0, [0, 9]] = BOS
    ids[2, [5, 6, Tn - 1]] = BOS
    return ids


def qkv(N, H, Hkv, D=8, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, H, D, generator=g, dtype=dtype)
    k = torch.randn(N, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(N, Hkv, D, generator=g, dtype=dtype)
    return q, k, v


# ----------------------------------------------------------------------------- segment starts

def test_varlen_segments_hand_made():
    ids = torch.tensor([[BOS, 5, 6, 7, 8, BOS, 9, 9],  # BOS at the row start and inside
                        [3, 4, 5, 6, 7, 8, 9, 10],  # no BOS: the row is one segment
                        [2, 3, 4, 5, 6, BOS, BOS, BOS]])  # one-token documents, one at the row end
    N = ids.numel()
    cu = T.varlen_segments(ids, BOS, doc_mask=True)
    starts = [0, 5, 8, 16, 21, 22, 23]  # rows start at 0, 8, 16; a BOS at a row start counts once
    assert cu.dtype == torch.int32 and cu.shape == (N + 1,)  # small batch: exact, room for every token
    assert cu.tolist() == starts + [N] * (N + 1 - len(starts))
    assert T.varlen_segments(ids, BOS, doc_mask=False).tolist() == [0, 8, 16, 24]
    # a fixed smaller buffer: the same starts, padded with the total
    assert T.varlen_segments(ids, BOS, True, max_segments=7).tolist() == starts + [N]
    # over the cap, the last BOS starts go, never a row start
    assert T.varlen_segments(ids, BOS, True, max_segments=5).tolist() == [0, 5, 8, 16, 21, N]
    assert T.varlen_segments(ids, BOS, True, max_segments=3).tolist() == [0, 8, 16, N]
    with pytest.raises(ValueError, match="max_segments=2 must be in 3..24"):
        T.varlen_segments(ids, BOS, True, max_segments=2)


def test_varlen_segments_default_cap():
    """Large batches get B + B*T/128 segments (the kernels launch work per segment), small ones
    room for every token."""
    ids = torch.full((48, 2048), 7)
    ids[:, ::512] = BOS
    cu = T.varlen_segments(ids, BOS, True)
    assert cu.numel() == 48 + 48 * 2048 // 128 + 1
    assert cu.tolist() == list(range(0, 48 * 2048, 512)) + [48 * 2048] * (cu.numel() - 48 * 4)
    assert T.varlen_segments(torch.full((2, 40), 7), BOS, True).numel() == 81


def test_varlen_capacity_keeps_every_document_start_of_the_validation_split():
    """A validation split with a dense run of short documents (40 in one 2,048-token window, more
    than the default's 16 per row): size_for makes room, and a batch of its densest windows keeps
    every BOS split (the default, training's, drops some)."""
    attention = T.VarlenAttention(REFERENCE_VARLEN)
    g = torch.Generator().manual_seed(0)
    val = torch.randint(2, 60, (40_000,), generator=g)
    val[::700] = BOS
    val[10_000:10_000 + 40 * 50:50] = BOS  # 40 documents of 50 tokens
    rows = torch.stack([val[10_000 + i:10_000 + i + 2048] for i in range(0, 48 * 7, 7)])
    exact = T.varlen_segments(rows, BOS, True, max_segments=rows.numel())
    need = int((exact < rows.numel()).sum())
    assert attention.mask(rows, BOS, True).cu_seqlens.tolist()[:need] != exact.tolist()[:need]  # drops splits
    assert attention.size_for(val, BOS, 2048) == 40 == attention.bos_per_row
    cu = attention.mask(rows, BOS, True).cu_seqlens
    assert cu.tolist()[:need] == exact.tolist()[:need] and (cu[need:] == rows.numel()).all()


@pytest.mark.slow
def test_varlen_segments_compile_without_host_sync():
    """fullgraph=True fails on any graph break: an .item(), a nonzero() or a size read from the data."""
    ids = rows_with_documents()
    compiled = torch.compile(lambda x: T.varlen_segments(x, BOS, True, max_segments=20), backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(ids), T.varlen_segments(ids, BOS, True, max_segments=20))
    ids2 = rows_with_documents(seed=5)
    ids2[1, 3] = BOS  # other documents, same shapes: same graph, new starts
    assert torch.equal(compiled(ids2), T.varlen_segments(ids2, BOS, True, max_segments=20))


# ----------------------------------------------------------------------------- the op vs today's path

def dense_math(q, k, v, ids, doc_mask=True):
    """Today's document-masked attention: the dense (B,1,T,T) mask and math attention (its softmax
    in float32: the comparisons in float64 agree to ~1e-7)."""
    B, Tn = ids.shape
    math_attention = T.MathAttention()
    mask = math_attention.mask(ids, BOS, doc_mask)
    out = math_attention(*(t.view(B, Tn, *t.shape[1:]) for t in (q, k, v)), mask)
    return out.reshape(B * Tn, *out.shape[2:])


@pytest.mark.parametrize("H,Hkv", [(8, 4), (4, 4), (6, 1)])
@pytest.mark.parametrize("doc_mask", [True, False])
def test_varlen_matches_dense_math_forward_and_backward(H, Hkv, doc_mask):
    ids = rows_with_documents()
    B, Tn = ids.shape
    q, k, v = (t.requires_grad_() for t in qkv(B * Tn, H, Hkv))
    dout = torch.randn(B * Tn, H, q.size(-1), generator=torch.Generator().manual_seed(2), dtype=q.dtype)
    want = dense_math(q, k, v, ids, doc_mask)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    varlen = T.VarlenAttention(REFERENCE_VARLEN)
    mask = varlen.mask(ids, BOS, doc_mask)  # the model's path: mask, then the attention
    assert isinstance(mask, T.VarlenMask) and mask.max_seqlen == Tn
    got = varlen(*(t.view(B, Tn, *t.shape[1:]) for t in (q, k, v)), mask).reshape(B * Tn, H, -1)
    got_grads = torch.autograd.grad(got, (q, k, v), dout)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5)
    # the masks really differ: across a BOS, plain causal attention gives another output
    if doc_mask:
        assert (got - dense_math(q, k, v, ids, doc_mask=False)).abs().max() > 0.1


def test_varlen_model_matches_math(monkeypatch):
    """The tiny model (4 query / 2 KV heads): logits and parameter gradients of the varlen path
    equal the math path's."""
    args = tiny_xsa_args()
    model = randomized_model(args, seed=8, emb_std=0.15)
    assert args.bos_id == BOS
    ids = rows_with_documents(Tn=32, seed=4)
    y = torch.roll(ids, -1, 1)
    out = {}
    for name in ("math", "varlen"):
        if name == "varlen":
            use_varlen(monkeypatch, model)
        assert model.attention.name == {"math": "math", "varlen": "varlen:ref"}[name]
        model.zero_grad()
        loss = model(ids, y)
        loss.backward()
        out[name] = (model(ids).detach(), model.qo_bank.grad.clone(), model.kv_bank.grad.clone())
    for a, b in zip(out["varlen"], out["math"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_model_is_one_graph_and_uses_the_capacity_it_is_given(monkeypatch):
    """The model holding a varlen attention compiles to one graph (fullgraph: its attention, the
    layers' context and the op trace through) with the eager model's loss and gradients; a capacity
    set afterwards (evaluation's, size_for) reaches the compiled model: its segment buffer grows,
    and the documents it dropped start again."""
    args = tiny_model_args(vocab_size=64, train_seq_len=160, eval_seq_len=160)
    model = randomized_model(args, seed=8, emb_std=0.15)
    sizes = []

    def recording(q, k, v, cu, *rest):
        sizes.append(cu.numel() - 1)
        return _reference_forward(q, k, v, cu, *rest)
    attention = use_varlen(monkeypatch, model, REFERENCE_VARLEN._replace(name="sizes", forward=recording))
    ids = torch.full((2, 160), BOS)
    ids[:, 1::40] = 7  # 312 segments in 320 tokens: more than the default's 258
    y = torch.randint(2, 60, ids.shape, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    losses, grads = [], []
    for run in (compiled, model, compiled):
        if len(losses) == 2:
            assert attention.size_for(ids.flatten(), BOS, 160) == 156
        model.zero_grad()
        loss = run(ids, y)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.kv_bank.grad.clone())
    # per layer: the compiled graph, the eager model, the compiled graph recompiled (2 + 2 x 156 segments)
    assert sizes == [258] * 4 + [314] * 2
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-6)
    assert abs(float(losses[2] - losses[0])) > 1e-4  # the dropped documents' starts are back


@pytest.mark.slow
def test_varlen_op_keeps_one_graph():
    """torch.compile(fullgraph=True) of segments + op + backward: the custom op (fake kernels,
    registered backward) traces as one node, no graph break."""
    kernel = T.register_varlen_kernel(REFERENCE_VARLEN)
    ids = rows_with_documents()
    B, Tn = ids.shape
    q, k, v = qkv(B * Tn, 8, 4, dtype=torch.float32)

    def f(q, k, v, ids):
        cu = T.varlen_segments(ids, BOS, True)
        return (T.varlen_attention(q, k, v, cu, Tn, kernel) ** 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    got = compiled(*ins, ids)
    got.backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    want = f(*ref, ids)
    want.backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(ins, ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_varlen_fake_kernels_match_the_real_ones():
    """torch.library's own checks of the ops (schema, fake vs real outputs, autograd registration)."""
    kernel = T.register_varlen_kernel(REFERENCE_VARLEN)
    ids = rows_with_documents()
    q, k, v = (t.requires_grad_() for t in qkv(ids.numel(), 8, 4, dtype=torch.float32))
    cu = T.varlen_segments(ids, BOS, True)
    torch.library.opcheck(T._varlen_fwd, (q, k, v, cu, ids.size(1), kernel),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------------- provider errors

@pytest.mark.parametrize("bad,pattern", [
    ("out", r"provider bad: forward output 0 is \(48, 4, 8\) torch.float32, expected \(48, 8, 8\)"),
    ("lse", r"provider bad: forward output 1 is \(48, 8\) torch.float32, expected \(8, 48\)"),
    ("dk", r"provider bad: backward output 1 is \(48, 8, 8\) torch.float32, expected \(48, 4, 8\)"),
])
def test_bad_provider_is_a_clear_error(bad, pattern):
    def forward(q, k, v, cu, max_seqlen, scale):
        out, lse = _reference_forward(q, k, v, cu, max_seqlen, scale)
        return (out[:, :k.size(1)] if bad == "out" else out), (lse.T if bad == "lse" else lse)

    def backward(*a):
        dq, dk, dv = _reference_backward(*a)
        return dq, (dk.repeat_interleave(2, 1) if bad == "dk" else dk), dv
    kernel = T.register_varlen_kernel(T.VarlenProvider("bad", forward, backward))
    ids = rows_with_documents()
    q, k, v = (t.requires_grad_() for t in qkv(ids.numel(), 8, 4, dtype=torch.float32))
    with pytest.raises(RuntimeError, match=pattern):
        T.varlen_attention(q, k, v, T.varlen_segments(ids, BOS, True), ids.size(1), kernel).sum().backward()


def test_an_unregistered_kernel_is_a_clear_error():
    ids = rows_with_documents()
    q, k, v = qkv(ids.numel(), 8, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="varlen attention without a provider: no kernel 'nowhere' is registered"):
        T.varlen_attention(q, k, v, T.varlen_segments(ids, BOS, True), ids.size(1), "nowhere")


# ----------------------------------------------------------------------------- the FA3 / FA4 adapters

def _fake_fa_modules(monkeypatch, calls):
    """Stand-ins for flash_attn.cute.interface (FA4 4.0.0b36's signatures, abridged: no **kwargs, so
    a wrong argument name fails) and two builds of FA3's flash_attn_interface, computing with the
    reference; they record how they are called."""
    def fa4_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                max_seqlen_q=None, max_seqlen_k=None, min_seqlen_k=None, page_table=None, softmax_scale=None,
                causal=False, softcap=None, window_size_left=None, window_size_right=None, return_lse=False):
        calls.append(("fa4_fwd", causal, return_lse, max_seqlen_q, max_seqlen_k, cu_seqlens_q is cu_seqlens_k))
        out, lse = _reference_forward(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale)
        return out, (lse if return_lse else None), None, None, None

    def fa4_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, window_size_left=None,
                window_size_right=None, m_block_size=64, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None,
                seqused_k=None, max_seqlen_q=None, max_seqlen_k=None, deterministic=False):
        calls.append(("fa4_bwd", causal, max_seqlen_q))
        return _reference_backward(dout, q, k, v, out, lse, cu_seqlens_q, max_seqlen_q, softmax_scale)

    def fa3_into(dout, q, k, v, out, lse, cu, max_seqlen, dq, dk, dv, scale):  # FA3 writes the gradients
        for buf, g in zip((dq, dk, dv), _reference_backward(dout, q, k, v, out, lse, cu, max_seqlen, scale)):
            buf.copy_(g)

    # FA3, older build: every parameter up to `causal` positional without default, window as a tuple
    def fa3_old_fwd(q, k, v, k_new, v_new, qv, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q,
                    seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k, rotary_cos,
                    rotary_sin, q_descale, k_descale, v_descale, softmax_scale, causal, window_size=(-1, -1),
                    softcap=0.0, num_splits=1, pack_gqa=None, sm_margin=0):
        assert k_new is None and page_table is None and window_size == (-1, -1)
        calls.append(("fa3_old_fwd", causal))
        return (*_reference_forward(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale), None, None)

    def fa3_old_bwd(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k, max_seqlen_q,
                    max_seqlen_k, dq, dk, dv, softmax_scale, causal, window_size=(-1, -1), softcap=0.0,
                    deterministic=False, sm_margin=0):
        calls.append(("fa3_old_bwd", causal))
        fa3_into(dout, q, k, v, out, softmax_lse, cu_seqlens_q, max_seqlen_q, dq, dk, dv, softmax_scale)
        return dq, dk, dv, None

    # FA3, newer build (torch custom ops): defaults everywhere, `is_causal` in the backward, which
    # writes dq, dk, dv and returns only softmax_d
    def fa3_new_fwd(q, k, v, k_new=None, v_new=None, qv=None, out=None, cu_seqlens_q=None, cu_seqlens_k=None,
                    cu_seqlens_k_new=None, seqused_q=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
                    softmax_scale=None, causal=False, window_size_left=-1, window_size_right=-1):
        calls.append(("fa3_new_fwd", causal))
        return (*_reference_forward(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale), None, None)

    def fa3_new_bwd(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None, sequed_q=None,
                    sequed_k=None, max_seqlen_q=None, max_seqlen_k=None, dq=None, dk=None, dv=None,
                    softmax_scale=None, is_causal=False, window_size_left=-1, window_size_right=-1):
        calls.append(("fa3_new_bwd", is_causal))
        fa3_into(dout, q, k, v, out, softmax_lse, cu_seqlens_q, max_seqlen_q, dq, dk, dv, softmax_scale)
        return torch.zeros(1)

    fa4 = types.ModuleType("flash_attn.cute.interface")
    fa4._flash_attn_fwd, fa4._flash_attn_bwd = fa4_fwd, fa4_bwd
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = fa4
    for name, mod in (("flash_attn", types.ModuleType("flash_attn")), ("flash_attn.cute", cute),
                      ("flash_attn.cute.interface", fa4)):
        monkeypatch.setitem(sys.modules, name, mod)
    builds = {}
    for build, fwd, bwd in (("old", fa3_old_fwd, fa3_old_bwd), ("new", fa3_new_fwd, fa3_new_bwd)):
        builds[build] = types.ModuleType("flash_attn_interface")
        builds[build]._flash_attn_forward, builds[build]._flash_attn_backward = fwd, bwd
    return builds


@pytest.mark.parametrize("which", ["fa4", "fa3-old", "fa3-new"])
def test_fa_adapters_call_the_kernels_right(monkeypatch, which):
    calls = []
    fa3_builds = _fake_fa_modules(monkeypatch, calls)
    if which.startswith("fa3"):
        monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3_builds[which[4:]])
    monkeypatch.setattr(T, "_VARLEN_PROVIDERS", {})
    name = which[:3]
    attention, description = T.choose_attention(name, torch.device("cuda"), doc_mask=True)
    assert description == attention.name == f"varlen:{name}" and attention.kernel == name
    ids = rows_with_documents()
    q, k, v = (t.requires_grad_() for t in qkv(ids.numel(), 8, 4))
    dout = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(3))
    cu = T.varlen_segments(ids, BOS, True)
    out = T.varlen_attention(q, k, v, cu, ids.size(1), attention.kernel)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = dense_math(q, k, v, ids)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
    for g, w in zip(grads, torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5)
    assert [c[:2] for c in calls] == [(f"{which.replace('-', '_')}_fwd", True), (f"{which.replace('-', '_')}_bwd", True)]
    if name == "fa4":
        assert calls[0] == ("fa4_fwd", True, True, ids.size(1), ids.size(1), True) and calls[1][2] == ids.size(1)


def test_fa3_build_without_the_calls_is_not_usable(monkeypatch):
    mod = types.ModuleType("flash_attn_interface")
    mod._flash_attn_forward = lambda q, k, v, causal=False: None  # no cu_seqlens: another API
    mod._flash_attn_backward = lambda *a: None
    monkeypatch.setitem(sys.modules, "flash_attn_interface", mod)
    monkeypatch.setattr(T, "_VARLEN_PROVIDERS", {})
    with pytest.raises(T.ConfigError, match=r"ATTN_BACKEND=fa3 but flash_attn_interface \(FlashAttention-3\) "
                                            r"is not usable: TypeError: .*lacks \['cu_seqlens_k'"):
        T.need_varlen_provider("fa3")


# ----------------------------------------------------------------------------- backend choice

def test_backend_resolution(monkeypatch):
    cuda = torch.device("cuda")  # choose_attention only reads its type
    attention, description = T.choose_attention("auto", CPU, doc_mask=True)
    assert description == "math" and type(attention) is T.MathAttention
    fa3, fa4 = REFERENCE_VARLEN._replace(name="fa3"), REFERENCE_VARLEN._replace(name="fa4")
    for providers, doc_mask, want in (
            ({"fa3": fa3, "fa4": fa4}, True, "varlen:fa3"),
            ({"fa3": "ModuleNotFoundError: no", "fa4": fa4}, True, "varlen:fa4"),
            ({"fa3": fa3, "fa4": "ModuleNotFoundError: no"}, False, "varlen:fa3"),
            ({"fa3": "ModuleNotFoundError: no", "fa4": "ModuleNotFoundError: no"}, True, "flex"),
            ({"fa3": "ModuleNotFoundError: no", "fa4": "ModuleNotFoundError: no"}, False, "sdpa")):
        monkeypatch.setattr(T, "_VARLEN_PROVIDERS", dict(providers))
        attention, description = T.choose_attention("auto", cuda, doc_mask)
        assert description == want == attention.name
        if want.startswith("varlen"):
            assert T._VARLEN_KERNELS[attention.kernel] is providers[want[7:]]  # what the ops will run
        else:
            assert type(attention) is {"flex": T.FlexAttention, "sdpa": T.SdpaAttention}[want]
        ids = rows_with_documents()
        assert isinstance(attention.mask(ids, BOS, doc_mask), T.VarlenMask) == want.startswith("varlen")
    monkeypatch.setattr(T, "_VARLEN_PROVIDERS", {"fa3": "ModuleNotFoundError: no", "fa4": fa4})
    assert T.choose_attention("fa4", cuda, True)[1] == "varlen:fa4"
    assert T.choose_attention("fa4", CPU, True)[1] == "math"  # importable, but no kernel on CPU
    assert type(T.choose_attention("sdpa", cuda, True)[0]) is T.SdpaAttention
    assert type(T.choose_attention("math", cuda, True)[0]) is T.MathAttention
    with pytest.raises(T.ConfigError, match="ATTN_BACKEND=fa3 but flash_attn_interface .* not usable: "
                                            "ModuleNotFoundError: no"):
        T.choose_attention("fa3", cuda, True)


def test_the_model_holds_its_attention(monkeypatch):
    """build_model gives the model the attention it is handed, else ATTN_BACKEND's for the device
    (math on CPU); the attention adds nothing to the state_dict."""
    args = tiny_model_args(vocab_size=64)
    plain = T.build_model(args, CPU)
    assert type(plain.attention) is T.MathAttention
    varlen = T.VarlenAttention(REFERENCE_VARLEN)
    held = T.build_model(args, CPU, varlen)
    assert held.attention is varlen
    assert list(held.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(held.state_dict().values(), plain.state_dict().values()))
    monkeypatch.setattr(T, "_VARLEN_PROVIDERS", {"fa3": REFERENCE_VARLEN._replace(name="fa3")})
    assert T.build_model(dataclasses.replace(args, attn_backend="fa3"), CPU).attention.name == "math"


@pytest.mark.parametrize("name,module", [("fa3", "flash_attn_interface"), ("fa4", "flash_attn.cute")])
def test_unimportable_provider_is_a_config_error(monkeypatch, name, module):
    monkeypatch.setattr(T, "_VARLEN_PROVIDERS", {})
    monkeypatch.setitem(sys.modules, module, None)  # import fails, whatever is installed
    if name == "fa4":
        monkeypatch.setitem(sys.modules, "flash_attn", None)
    args = T.Hyperparameters(attn_backend=name)
    with pytest.raises(T.ConfigError, match=f"ATTN_BACKEND={name} but {module} .* is not usable: ModuleNotFoundError"):
        args.validate(8)
    with pytest.raises(T.ConfigError, match=f"ATTN_BACKEND={name} but {module}"):
        T.choose_attention(name, CPU, True)  # eval-only runs skip validate()


def test_self_check_passes_a_right_provider_and_names_what_a_wrong_one_gets_wrong():
    assert SELF_CHECK(REFERENCE_VARLEN, CPU) is None

    def scaled_dq(*a):
        dq, dk, dv = _reference_backward(*a)
        return 1.5 * dq, dk, dv
    assert "its dq differs from math attention's by 0.5" in SELF_CHECK(REFERENCE_VARLEN._replace(backward=scaled_dq), CPU)

    def no_gqa(q, k, v, cu, max_seqlen, scale):  # treats k, v as if they had the query heads
        return _reference_forward(q, k.repeat(1, 2, 1), v.repeat(1, 2, 1), cu, max_seqlen, scale)
    assert "its out differs" in SELF_CHECK(REFERENCE_VARLEN._replace(forward=no_gqa), CPU)

    def other_call(*a):
        raise TypeError("_flash_attn_forward() got an unexpected keyword argument 'causal'")
    assert SELF_CHECK(REFERENCE_VARLEN._replace(forward=other_call), CPU) == \
        "TypeError: _flash_attn_forward() got an unexpected keyword argument 'causal'"


def test_auto_passes_over_a_provider_that_fails_its_self_check(monkeypatch):
    fa3, fa4 = REFERENCE_VARLEN._replace(name="fa3"), REFERENCE_VARLEN._replace(name="fa4")
    monkeypatch.setattr(T, "_VARLEN_PROVIDERS", {"fa3": fa3, "fa4": fa4})
    monkeypatch.setattr(T, "varlen_self_check", lambda p, d: "its dq differs" if p.name == "fa3" else None)
    cuda = torch.device("cuda")
    attention, description = T.choose_attention("auto", cuda, True)
    assert description == "varlen:fa4 (fa3 failed its self-check: its dq differs)"
    assert attention.name == "varlen:fa4" and T._VARLEN_KERNELS[attention.kernel] is fa4
    monkeypatch.setattr(T, "varlen_self_check", lambda p, d: "its dq differs")
    attention, description = T.choose_attention("auto", cuda, True)
    assert description.startswith("flex (fa3 failed") and type(attention) is T.FlexAttention
    with pytest.raises(T.ConfigError, match="ATTN_BACKEND=fa4: flash_attn.cute .* failed its self-check: its dq"):
        T.choose_attention("fa4", cuda, True)


def test_varlen_room_for_the_global_pass_rows():
    """TTT's global pass packs short documents densely: inside room_for those rows keep every
    document start; the capacity is restored afterwards."""
    attention = T.VarlenAttention(REFERENCE_VARLEN, bos_per_row=3)
    rows = torch.full((8, 2048), 7)
    rows[:, ::40] = BOS  # 52 documents per row, far more than 3 or the default's 16
    exact = T.varlen_segments(rows, BOS, True, max_segments=rows.numel())
    need = int((exact < rows.numel()).sum())
    assert attention.mask(rows, BOS, True).cu_seqlens.tolist()[:need] != exact.tolist()[:need]
    with attention.room_for(rows, BOS):
        assert attention.bos_per_row == 51
        assert attention.mask(rows, BOS, True).cu_seqlens.tolist()[:need] == exact.tolist()[:need]
    assert attention.bos_per_row == 3
    with T.MathAttention().room_for(rows, BOS):  # dense masks: nothing to make room in
        pass



# ----------------------------------------------------------------------------- training vs validation

def _varlen_run(args, monkeypatch):
    """A training run (train_and_score) attending through the reference varlen kernels -> (the
    segment count of every training forward, the log). Training is the run's forwards before the
    artifact is written."""
    sizes, logs, phase = [], [], ["training"]

    def forward(q, k, v, cu, *rest):
        if phase[0] == "training":
            sizes.append(cu.numel() - 1)
        return _reference_forward(q, k, v, cu, *rest)
    provider = REFERENCE_VARLEN._replace(name="counted", forward=forward)
    monkeypatch.setattr(T, "choose_attention", lambda *a: (T.VarlenAttention(provider), "varlen:counted"))
    write = T.quantize_and_write

    def written(*a, **kw):
        out = write(*a, **kw)
        phase[0] = "scoring"
        return out
    monkeypatch.setattr(T, "quantize_and_write", written)
    paths = {k: os.path.join(args.out_dir, n) for k, n in T.run_file_names(args, args.run_id).items()}
    T.train_and_score(args, T.Run(0, 1, CPU, logs.append), paths, 0.0)
    return sizes, logs


@pytest.mark.slow
def test_training_segments_do_not_depend_on_the_validation_tokens(smoke_dataset, tmp_path, monkeypatch):
    """Two runs that differ only in their validation split, one of them all short documents: their
    training batches get the same segments (the capacity sized from the validation tokens was
    training's too: 272 segments per batch with one split, 544 with the other) and they write the
    same artifact; the evaluation's capacity is sized after the artifact is written."""
    data_dir, tok, vocab = smoke_dataset
    val = np.array(T.load_shard(T.find_shards(data_dir, "val")[0], vocab))
    dense = tmp_path / "dense_data"
    dense.mkdir()
    for f in T.find_shards(data_dir, "train"):
        os.symlink(f, dense / os.path.basename(f))
    val[::2] = BOS  # documents of 2 tokens
    smoke_data.write_shard(str(dense / "fineweb_val_000000.bin"), val)
    runs = {}
    # the dense split is no tokenizer's text: the data check would refuse it (not what this test is about)
    monkeypatch.setattr(T, "check_data_fits_tokenizer", lambda *a, **k: None)
    for name, path in (("plain", data_dir), ("dense", str(dense))):
        out = tmp_path / f"{name}_out"
        out.mkdir()
        args = tiny_model_args(vocab_size=vocab, data_path=path, tokenizer_path=tok, out_dir=str(out), run_id="t",
                               train_seq_len=64, train_batch_tokens=1024, grad_accum_steps=1, iterations=2,
                               max_wallclock_seconds=0, warmup_steps=1, eval_seq_len=64, eval_stride=32,
                               eval_batch_seqs=8, val_tokens_limit=512, gptq_calib_seqs=4, gptq_calib_len=64,
                               gptq_block=32, seed=1, ttt_enabled=False, skip_sliding_eval=True)
        runs[name] = _varlen_run(args, monkeypatch) + ((out / "final_model_t.int6.ptz").read_bytes(),)
    (plain, plain_log, plain_artifact), (dense, dense_log, dense_artifact) = runs["plain"], runs["dense"]
    # training's 16 rows of 64: 16 + VARLEN_MIN_EXTRA, whatever validation holds; GPTQ's 4 rows: a start at every token
    assert set(plain) == {16 + 256, 4 * 64}
    assert dense == plain and dense_artifact == plain_artifact
    rooms = []
    for log in (plain_log, dense_log):
        room = [i for i, line in enumerate(log) if line.startswith("varlen attention: room for ")]
        artifact = [i for i, line in enumerate(log) if line.startswith("artifact: ")]
        assert len(room) == 1 and room[0] > artifact[0]  # sized for the evaluation, after the artifact
        rooms.append(int(log[room[0]].split()[4]))
    assert rooms[0] < 32 <= rooms[1]  # every other token a BOS: 32 or more in 64 tokens
