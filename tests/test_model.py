"""Attention backends vs an independent reference, full-model backend agreement, causality,
and XSA."""
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

import train_gpt as T
from helpers import randomized_model
from helpers import tiny_xsa_args as tiny_args

CPU = torch.device("cpu")




def reference_attention(q, k, v):
    """Plain causal softmax attention with GQA (query head h uses kv head h // (H/Hkv))."""
    B, Tn, H, D = q.shape
    rep = H // k.size(2)
    kv_of = torch.arange(H) // rep
    k, v = k[:, :, kv_of].double(), v[:, :, kv_of].double()
    s = torch.einsum("bthd,bshd->bhts", q.double(), k) / math.sqrt(D)
    future = torch.arange(Tn)[None, :] > torch.arange(Tn)[:, None]
    p = s.masked_fill(future, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (6, 1)])
def test_causal_attention_backends_match_reference(H, Hkv):
    g = torch.Generator().manual_seed(H * 10 + Hkv)
    B, Tn, D = 2, 19, 16
    q = torch.randn(B, Tn, H, D, generator=g) * 2
    k = torch.randn(B, Tn, Hkv, D, generator=g) * 2
    v = torch.randn(B, Tn, Hkv, D, generator=g)
    ref = reference_attention(q, k, v).float()
    outs = {}
    for name in ("math", "sdpa"):
        outs[name] = T.ATTENTIONS[name]()(q, k, v)
        assert outs[name].shape == (B, Tn, H, D)
        torch.testing.assert_close(outs[name], ref, atol=2e-5, rtol=1e-4)
    # first position attends only to itself: output = its (kv-group's) value
    torch.testing.assert_close(outs["math"][:, 0], v[:, 0, torch.arange(H) // (H // Hkv)], atol=1e-6, rtol=0)
    # the reference really is sensitive to the GQA head mapping (so the comparison means something)
    if 1 < Hkv < H:
        wrong = reference_attention(q, k[:, :, [1, 0]], v[:, :, [1, 0]]).float()
        assert (wrong - ref).abs().max() > 0.1


def test_model_logits_math_vs_sdpa():
    args = tiny_args()
    model = randomized_model(args, emb_std=0.15)
    ids = torch.randint(0, args.vocab_size, (3, 32), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = args.bos_id
    ids[1, 10] = args.bos_id
    assert model.attention.name == "math"  # a CPU model's
    with torch.no_grad():
        lm = model(ids)
        model.attention = T.SdpaAttention()
        ls = model(ids)
        model.attention = T.MathAttention()
    assert lm.shape == (3, 32, args.vocab_size) and lm.dtype == torch.float32
    assert lm.std() > 1.0  # non-trivial logits
    torch.testing.assert_close(lm, ls, atol=2e-4, rtol=1e-4)
    # losses (mean and per-token) agree too and match a manual cross-entropy
    y = torch.roll(ids, -1, 1)
    with torch.no_grad():
        per = model(ids, y, reduction="none")
        mean = model(ids, y)
    assert per.shape == ids.shape
    manual = -torch.log_softmax(lm, -1).gather(-1, y[..., None]).squeeze(-1)
    torch.testing.assert_close(per, manual, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mean, manual.mean(), atol=1e-5, rtol=1e-5)
    assert (lm.abs() <= args.logit_softcap).all()


def test_model_is_causal():
    args = tiny_args()
    model = randomized_model(args, seed=4, emb_std=0.15)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab_size, (2, 32), generator=g)
    ids2 = ids.clone()
    ids2[:, 20:] = torch.randint(0, args.vocab_size, (2, 12), generator=g)
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    torch.testing.assert_close(a[:, :20], b[:, :20], atol=1e-5, rtol=1e-5)
    assert (a[:, 20:] - b[:, 20:]).abs().amax() > 0.1


def test_embedding_does_not_cross_bos():
    args = tiny_args()
    model = randomized_model(args, seed=5, emb_std=0.15)
    ids = torch.tensor([[5, 9, args.bos_id, 7, 8], [6, 3, args.bos_id, 7, 8]])
    with torch.no_grad():
        x = model.embed(ids)
    # BOS position: smear does not see the previous token
    torch.testing.assert_close(x[0, 2], x[1, 2], atol=1e-6, rtol=0)
    torch.testing.assert_close(x[0, 3:], x[1, 3:], atol=1e-6, rtol=0)
    assert (x[0, 1] - x[1, 1]).abs().max() > 1e-3  # ordinary tokens do depend on their own id/prev


def test_xsa_removes_own_value_component():
    """In XSA layers each head's attention output is orthogonal to its own token's value."""
    # QK gain 1.5, not the default 5: sharper attention puts almost all weight on the token
    # itself at some early positions, where XSA then leaves ~1e-7 and the cosine is noise
    args = tiny_args(attn_gate_width=0, qk_gain_init=1.5)
    model = randomized_model(args, seed=6, emb_std=0.15)
    L, H, Hkv, D = args.num_layers, args.num_heads, args.num_kv_heads, args.head_dim
    caps = {}
    model._capture = lambda layer, kind, x: caps.__setitem__((layer, kind), x.detach().clone())
    # no BOS in the ids: with DOC_MASK a BOS starts a new document and attends only to itself
    # (its XSA output is ~0, so its cosine is noise); the only document start is position 0
    ids = torch.randint(args.bos_id + 1, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids)
    model._capture = None
    for layer in range(L):
        h = caps[(layer, "qkv")]
        v = (h @ model.kv_bank[L + layer].T).view(2, 24, Hkv, D)
        y = caps[(layer, "out")].view(2, 24, Hkv, H // Hkv, D)
        cos = (y * torch.nn.functional.normalize(v, dim=-1)[:, :, :, None]).sum(-1) / y.norm(dim=-1)
        uses_xsa = layer >= L - args.xsa_layers
        assert model.blocks[layer].use_xsa == uses_xsa
        if uses_xsa:
            # position 0 attends only to itself, so XSA leaves nothing there
            assert y[:, 0].abs().max() < 1e-5 * y[:, 1:].abs().max()
            assert cos[:, 1:].abs().max() < 1e-4
        else:
            assert cos[:, 1:].abs().max() > 0.1
            torch.testing.assert_close(y[:, 0], v[:, 0, :, None].expand_as(y[:, 0]), atol=1e-5, rtol=1e-5)


def test_param_groups_partition_parameters():
    args = tiny_args()
    model = T.build_model(args, CPU)
    banks, tables, scalars = model.param_groups()
    assert [tuple(p.shape) for p in banks] == [(6, 64, 64), (6, 32, 64), (3, 128, 64), (3, 64, 128)]
    ids = [id(p) for grp in (banks, tables, scalars) for p in grp]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.dim() <= 2 for p in scalars) and all(p.dim() == 2 for p in tables)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in tables] == ["tok_emb.weight"]


def test_build_model_is_seeded():
    a = T.build_model(tiny_args(), CPU).state_dict()
    b = T.build_model(tiny_args(), CPU).state_dict()
    c = T.build_model(tiny_args(seed=4), CPU).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["qo_bank"], c["qo_bank"])


# ----------------------------------------------------------------------------- document masking

def reference_doc_mask(ids, bos_id):
    """(B,1,T,T): query i may attend key j iff j <= i and no BOS in j+1..i (same document)."""
    B, Tn = ids.shape
    m = torch.zeros(B, 1, Tn, Tn, dtype=torch.bool)
    for b in range(B):
        for i in range(Tn):
            for j in range(i + 1):
                m[b, 0, i, j] = not (ids[b, j + 1:i + 1] == bos_id).any()
    return m


def test_attention_mask_is_causal_and_stops_at_bos():
    math_attention = T.MathAttention()
    ids = torch.randint(2, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    ids[0, [0, 5, 6]] = 1  # two BOS in a row: a one-token document
    ids[1, 0] = 1
    ids[2, 4] = 1  # text before the first BOS (a window starting mid-document) is a document too
    mask = math_attention.mask(ids, 1, doc_mask=True)
    assert mask.dtype == torch.bool and mask.shape == (3, 1, 12, 12)
    assert torch.equal(mask, reference_doc_mask(ids, 1))
    assert not mask.triu(1).any()  # causal
    assert mask.diagonal(dim1=-2, dim2=-1).all()  # every token sees itself
    assert not mask[0, 0, 5:, :5].any() and not mask[0, 0, 6:, 5].any()  # nothing crosses a BOS
    assert torch.equal(mask[1, 0], torch.ones(12, 12, dtype=torch.bool).tril())  # one document: plain causal
    assert math_attention.mask(ids, 1, doc_mask=False) is None  # plain causal needs no mask


def test_doc_mask_logits_equal_separate_documents():
    """[BOS a b c BOS d e f] in one row gives each document's logits as if run alone (math
    backend, float32); without DOC_MASK the second document sees the first."""
    args = tiny_args()
    assert args.doc_mask
    model = randomized_model(args, seed=7, emb_std=0.15)
    bos = args.bos_id
    doc1, doc2 = [bos, 5, 9, 17, 3, 40], [bos, 22, 8, 31, 12]
    both = torch.tensor([doc1 + doc2])
    with torch.no_grad():
        joint = model(both)
        alone = torch.cat([model(torch.tensor([doc1])), model(torch.tensor([doc2]))], dim=1)
        model.args = dataclasses.replace(args, doc_mask=False)  # the model reads its settings at every forward
        try:
            unmasked = model(both)
        finally:
            model.args = args
    assert joint.abs().amax() > 1.0  # non-trivial logits
    torch.testing.assert_close(joint, alone, atol=1e-5, rtol=0)
    n1 = len(doc1)
    torch.testing.assert_close(unmasked[:, :n1], joint[:, :n1], atol=1e-5, rtol=0)  # causal anyway
    assert (unmasked[:, n1:] - joint[:, n1:]).abs().amax() > 0.1


def _flex_runs_on_cpu():
    if T.flex_attention is None:
        return "torch.nn.attention.flex_attention is not importable"
    try:
        q = torch.randn(1, 2, 8, 4)
        bm = T.create_block_mask(lambda b, h, qi, kv: qi >= kv, 1, None, 8, 8, device="cpu")
        T.flex_attention(q, q, q, block_mask=bm)
    except Exception as e:  # noqa: BLE001 - any failure: this torch cannot run it on CPU
        return f"FlexAttention does not run on CPU in torch {torch.__version__}: {type(e).__name__}: {e}"
    return None


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_backend_matches_math_with_doc_mask(monkeypatch):
    """Flex runs inside compiled graphs with gradients only (training): posed here by patching
    is_compiling; without it (eager TTT, no grad) the dense mask is used."""
    reason = _flex_runs_on_cpu()
    if reason:
        pytest.skip(reason)
    args = tiny_args()
    model = randomized_model(args, seed=8, emb_std=0.15)
    ids = torch.randint(2, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(4))
    ids[:, 0] = args.bos_id
    ids[0, [9, 10, 21]] = args.bos_id
    ids[1, 17] = args.bos_id
    logits = {}
    flex = T.FlexAttention()
    assert isinstance(flex.mask(ids, args.bos_id, doc_mask=True), torch.Tensor)  # eager: dense
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    model.requires_grad_(False)  # grad mode on (flex's condition), but no backward: CPU flex has none
    for name in ("math", "flex"):
        model.attention = T.ATTENTIONS[name]()
        mask = model.attention.mask(ids, args.bos_id, doc_mask=True)
        assert mask is not None and isinstance(mask, torch.Tensor) == (name == "math")  # flex: a BlockMask
        logits[name] = model(ids).detach()
    torch.testing.assert_close(logits["flex"], logits["math"], atol=1e-4, rtol=1e-4)
    # the attention itself, GQA included, against the dense reference mask
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 32, 4, 8, generator=g)
    k, v = torch.randn(2, 32, 2, 8, generator=g), torch.randn(2, 32, 2, 8, generator=g)
    out_flex = flex(q, k, v, flex.mask(ids, args.bos_id, True))
    out_math = T.MathAttention()(q, k, v, reference_doc_mask(ids, args.bos_id))
    torch.testing.assert_close(out_flex, out_math, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- depth recurrence

def record_blocks(model, events):
    """Make every block append ("block", layer, input, output, mlp_out) to `events` when it runs."""
    for blk in model.blocks:
        def forward(x, *rest, blk=blk, orig=blk.forward):
            out, m = orig(x, *rest)
            events.append(("block", blk.layer, x, out, m))
            return out, m
        blk.forward = forward


def test_layer_order_with_and_without_recurrence():
    args = tiny_args(num_layers=11, model_dim=32, num_heads=2, num_kv_heads=1, recur_passes=2)
    assert args.recur_layers == "auto" and args.recur_layer_list() == [3, 4, 5] and args.recur_passes == 2
    model = T.build_model(args, CPU)
    assert model.recurrence_active  # evaluation (and a built model) runs the recurrence
    assert model.layer_order() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    model.recurrence_active = False
    assert model.layer_order() == list(range(11))
    off = T.build_model(tiny_args(num_layers=11, model_dim=32, num_heads=2, num_kv_heads=1, recur_layers=""), CPU)
    assert off.layer_order() == list(range(11)) and not off.recurrence_active
    assert tiny_args(recur_layers="1", recur_passes=1).recur_layer_list() == [1]
    assert tiny_args(recur_passes=0).recur_layer_list() == []


def test_recurrence_changes_logits_and_keeps_unet_pairs(monkeypatch):
    """Recurrence changes the function; the U-Net skips pair the same layers in both modes, each
    encoder layer's last pass pushing exactly once and each decoder layer popping on its last pass."""
    args = tiny_args(num_layers=11, model_dim=32, num_heads=2, num_kv_heads=1, recur_passes=2)
    model = randomized_model(args, seed=9, emb_std=0.15)
    with torch.no_grad():
        model.skip_weights.fill_(1.0)  # then the skip handed to lerp is the pushed tensor itself
    events = []
    record_blocks(model, events)
    lerp = torch.lerp
    monkeypatch.setattr(torch, "lerp", lambda a, b, w: (events.append(("skip", b)), lerp(a, b, w))[1])
    ids = torch.randint(2, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(6))
    ids[:, 0] = args.bos_id
    logits, pairs = {}, {}
    for active in (True, False):
        events.clear()
        model.recurrence_active = active
        with torch.no_grad():
            logits[active] = model(ids)
        blocks = [(k, e) for k, e in enumerate(events) if e[0] == "block"]
        assert [e[1] for _, e in blocks] == model.layer_order()
        last = {e[1]: k for k, e in blocks}  # event index of each layer's last pass
        pairs[active] = []
        for k, e in enumerate(events):
            if e[0] != "skip":
                continue
            consumer = next(b for kb, b in blocks if kb > k)[1]
            producers = [(kb, b[1]) for kb, b in blocks if kb < k and torch.equal(b[3], e[1])]
            assert len(producers) == 1
            kp, producer = producers[0]
            assert kp == last[producer] and k < last[consumer]  # last passes only
            pairs[active].append((consumer, producer))
    assert pairs[True] == pairs[False] == [(5, 4), (6, 3), (7, 2), (8, 1), (9, 0)]
    assert (logits[True] - logits[False]).abs().amax() > 0.1


# ----------------------------------------------------------------------------- parallel lanes

def test_parallel_layers_mlp_reads_attention_input_and_lane_mix():
    args = tiny_args(parallel_from=1, recur_passes=2)  # layers 1, 2 parallel; layer 1 also recurrent (3 passes)
    model = randomized_model(args, seed=10, emb_std=0.15)
    assert [b.parallel for b in model.blocks] == [False, True, True] and model.layer_order() == [0, 1, 1, 1, 2]
    caps, events = {}, []
    model._capture = lambda layer, kind, x: caps.setdefault((layer, kind), []).append(x.clone())
    record_blocks(model, events)
    ids = torch.randint(2, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    ids[:, 0] = args.bos_id
    with torch.no_grad():
        h = model.hidden(ids)
    model._capture = None
    for layer, passes in ((0, 1), (1, 3), (2, 1)):
        assert len(caps[(layer, "qkv")]) == len(caps[(layer, "up")]) == passes
        for a, b in zip(caps[(layer, "qkv")], caps[(layer, "up")]):
            assert a.shape == b.shape == (2, 16, args.model_dim)
            assert torch.equal(a, b) == (layer >= 1), layer  # the same normed input, for parallel layers only
    # the end: stream + lane_mix * (sum of every parallel pass's MLP output), then RMSNorm
    lane = sum(e[4] for e in events if e[1] >= 1)
    assert sum(e[1] >= 1 for e in events) == 4 and lane.shape == (2, 16, args.model_dim)
    assert model.lane_mix.abs().amax() > 0.1
    torch.testing.assert_close(h, T.rms_norm(events[-1][3] + model.lane_mix * lane), atol=1e-5, rtol=1e-5)
    assert not hasattr(T.build_model(tiny_args(), CPU), "lane_mix")  # PARALLEL_FROM >= NUM_LAYERS: off


def test_full_stack_trains_on_a_fixed_batch():
    """Every new piece on (skip gates, parallel lanes, recurrence, attention gate, document mask,
    Polar Express, MuonEq-R): a few steps on one batch lower its loss, and every new parameter learns."""
    args = tiny_args(num_layers=4, parallel_from=1, recur_layers="1,2", recur_passes=2, eval_stride=16, matrix_lr=0.05,
                     embed_lr=0.05, scalar_lr=0.05)
    assert args.skip_gates and args.attn_gate_width > 0 and args.doc_mask
    assert args.muon_row_norm
    args.validate(1)
    model = T.build_model(args, CPU)
    assert model.layer_order() == [0, 1, 2, 1, 2, 1, 2, 3]
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = T.Optimizers(model, args, 1, CPU)
    opt.set_schedule(1.0, args.muon_momentum)
    ids = torch.randint(2, args.vocab_size, (4, 33), generator=torch.Generator().manual_seed(8))
    ids[:, 0] = args.bos_id
    ids[:2, 15] = args.bos_id
    x, y = ids[:, :-1], ids[:, 1:]
    losses = []
    for _ in range(12):
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.3 * losses[0], losses  # measured: 4.16 -> 0.17
    for name in ("skip_gates", "lane_mix", "blocks.1.attn_gate", "blocks.3.attn_gate"):
        assert (dict(model.named_parameters())[name] - init[name]).abs().amax() > 1e-3, name


# ----------------------------------------------------------------------------- attention gate

def test_zero_attention_gate_is_identity_and_gate_scales_heads():
    args = tiny_args()
    assert args.attn_gate_width == 12
    gated = randomized_model(args, seed=11, emb_std=0.15)
    with torch.no_grad():
        for blk in gated.blocks:
            blk.attn_gate.zero_()  # its init: every head's gate 2 * sigmoid(0) = 1
    plain = T.build_model(tiny_args(attn_gate_width=0), CPU).eval()
    assert not any("attn_gate" in n for n, _ in plain.named_parameters())
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "attn_gate" not in k}, strict=True)
    ids = torch.randint(2, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(9))
    ids[:, 0] = args.bos_id
    with torch.no_grad():
        assert torch.equal(gated(ids), plain(ids))
    # a non-zero gate: layer 0's attention output per head times 2 sigmoid(0.5 W h[..., :width])
    W = torch.randn(args.num_heads, 12, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        gated.blocks[0].attn_gate.copy_(W)
    caps = {}
    for m in (gated, plain):
        m._capture = lambda layer, kind, x, m=m: caps.setdefault((id(m), layer, kind), x.clone())
        with torch.no_grad():
            caps[id(m)] = m(ids)
        m._capture = None
    h = caps[(id(plain), 0, "qkv")]
    gate = 2 * torch.sigmoid(0.5 * h[..., :12] @ W.T)  # (B, T, H)
    assert gate.min() < 0.5 and gate.max() > 1.5
    y_plain = caps[(id(plain), 0, "out")].view(2, 24, args.num_heads, args.head_dim)
    y_gated = caps[(id(gated), 0, "out")].view(2, 24, args.num_heads, args.head_dim)
    torch.testing.assert_close(y_gated, y_plain * gate[..., None], atol=1e-5, rtol=1e-5)
    assert (caps[id(gated)] - caps[id(plain)]).abs().amax() > 0.1


@pytest.mark.slow
def test_inductor_mix_order_reduction_off_unless_set():
    """Importing train_gpt turns Inductor's mix-order reduction off (a 12 ms kernel per micro-step
    on H200); an explicit TORCHINDUCTOR_MIX_ORDER_REDUCTION still wins."""
    import torch._inductor.config as inductor_config
    if not hasattr(inductor_config.triton, "mix_order_reduction"):
        pytest.skip("this torch has no mix-order reduction")
    code = "import train_gpt, torch._inductor.config as c; print(c.triton.mix_order_reduction)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for preset, want in ((None, "False"), ("1", "True")):
        env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_MIX_ORDER_REDUCTION"}
        if preset is not None:
            env["TORCHINDUCTOR_MIX_ORDER_REDUCTION"] = preset
        out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == want, (preset, out.stdout)


# ----------------------------------------------------------------------------- XSA gate

def gated_and_plain_xsa(seed=11, **kw):
    """A randomized model with XSA_GATE (every alpha zeroed: its init) and the same model without it."""
    gated = randomized_model(tiny_args(xsa_gate=True, **kw), seed=seed, emb_std=0.15)
    with torch.no_grad():
        for blk in gated.blocks:
            if blk.use_xsa:
                blk.xsa_gate.zero_()  # randomized_model perturbed it
    plain = T.build_model(tiny_args(**kw), CPU).eval()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "xsa_gate" not in k}, strict=True)
    return gated, plain


def test_zero_xsa_gate_is_bit_identical_to_plain_xsa():
    """At alpha = 0 (its init) the gate 1 + tanh(alpha) is exactly 1: the logits and every other
    parameter's gradient are those of the model without the gate, bit for bit; the gate's own
    gradient is not zero (it learns)."""
    gated, plain = gated_and_plain_xsa()
    assert [hasattr(b, "xsa_gate") for b in gated.blocks] == [b.use_xsa for b in gated.blocks] == [False, True, True]
    assert not any("xsa_gate" in n for n, _ in plain.named_parameters())
    ids = torch.randint(2, gated.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(9))
    ids[:, 0], ids[1, 10] = gated.args.bos_id, gated.args.bos_id
    targets = torch.roll(ids, -1, 1)
    for m in (gated, plain):
        m.zero_grad()
        m(ids, targets).backward()
    with torch.no_grad():
        assert torch.equal(gated(ids), plain(ids))
    grads = {n: p.grad for n, p in gated.named_parameters()}
    for n, p in plain.named_parameters():
        assert torch.equal(grads[n], p.grad), n
    for layer in (1, 2):
        assert gated.blocks[layer].xsa_gate.grad.abs().min() > 0, layer


def test_xsa_gate_scales_each_heads_subtraction():
    """With alpha != 0, XSA subtracts (1 + tanh(alpha_h)) times head h's component along its own
    token's value (its kv head h // (H / Hkv)): against a direct computation from the layer's raw
    attention output (the same weights with XSA off in that layer)."""
    gated, plain = gated_and_plain_xsa(attn_gate_width=0)
    alpha = torch.tensor([-1.5, -0.3, 0.4, 2.0])  # gates 0.09, 0.71, 1.38, 1.96
    with torch.no_grad():
        gated.blocks[1].xsa_gate.copy_(alpha)
    raw = T.build_model(tiny_args(attn_gate_width=0, xsa_layers=1), CPU).eval()  # layer 1 without XSA
    raw.load_state_dict(plain.state_dict(), strict=True)
    ids = torch.randint(2, gated.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(9))
    caps = {}
    for m in (gated, plain, raw):
        m._capture = lambda layer, kind, x, m=m: caps.setdefault((id(m), layer, kind), x.clone())
        with torch.no_grad():
            caps[id(m)] = m(ids)
        m._capture = None
    L, H, Hkv, D = gated.args.num_layers, gated.args.num_heads, gated.args.num_kv_heads, gated.args.head_dim
    h = caps[(id(raw), 1, "qkv")]
    torch.testing.assert_close(h, caps[(id(gated), 1, "qkv")], atol=0, rtol=0)  # layer 0 is the same
    vh = torch.nn.functional.normalize((h @ gated.kv_bank[L + 1].T).view(2, 24, Hkv, D), dim=-1)
    vh = vh.repeat_interleave(H // Hkv, dim=2)  # head h's kv head
    y = caps[(id(raw), 1, "out")].view(2, 24, H, D)
    gate = 1 + torch.tanh(alpha)
    direct = y - gate[:, None] * (y * vh).sum(-1, keepdim=True) * vh
    torch.testing.assert_close(caps[(id(gated), 1, "out")].view(2, 24, H, D), direct, atol=1e-5, rtol=1e-5)
    plain_xsa = caps[(id(plain), 1, "out")].view(2, 24, H, D)
    torch.testing.assert_close(plain_xsa, y - (y * vh).sum(-1, keepdim=True) * vh, atol=1e-5, rtol=1e-5)
    assert (caps[id(gated)] - caps[id(plain)]).abs().amax() > 0.01


def test_xsa_gate_is_a_scalar_gain_packed_in_fp16():
    """The gate's alpha: one per head of each XSA layer, in the scalar Adam group, an fp16 entry
    of the artifact (2 bytes per head)."""
    args = tiny_args(xsa_gate=True)
    model = T.build_model(args, CPU)
    banks, tables, scalars = model.param_groups()
    gates = [b.xsa_gate for b in model.blocks if b.use_xsa]
    assert len(gates) == 2 and all(any(g is p for p in scalars) for g in gates)
    entries = T.quantize_model(model, None, args, args.clip_sigmas)
    for layer in (1, 2):
        e = entries[f"blocks.{layer}.xsa_gate"]
        assert e.kind == "float" and e.value.dtype == torch.float16 and e.value.shape == (args.num_heads,)
    with pytest.raises(T.ConfigError, match="XSA_GATE=1 gates XSA, which XSA_LAYERS=0 turns off"):
        T.Hyperparameters(xsa_gate=True, xsa_layers=0).validate(1)


# ----------------------------------------------------------------------------- MLP activation

def mlp_activation(model, z, compile_backend=None):
    """u = the MLP activation of layer 0's Block.forward at pre-activations `z`: the block runs with
    a zero up-projection and `z` added by the adapt hook (TTT's), so the activation reads exactly
    `z`; u comes back through the capture hook (GPTQ's). Optionally under torch.compile."""
    w = model.layer_weights(model.banks(), 0)._replace(up=torch.zeros_like(model.up_bank[0]))
    x = torch.randn(1, z.size(1), model.args.model_dim, generator=torch.Generator().manual_seed(1))

    def run(z):
        seen = {}
        ctx = T.LayerContext(model.rotary, model.attention, lambda layer, kind, t: seen.setdefault(kind, t),
                             lambda layer, kind, inp, y: y + z if kind == "up" else y)
        model.blocks[0](x, x, w, ctx, None)
        return seen["down"]
    return (run if compile_backend is None else torch.compile(run, backend=compile_backend))(z)


def check_mlp_activation_gradient(slope, backends):
    """Block.forward's activation at slope `slope`, on each of `backends` (None: eager): its value
    LeakyReLU(z, slope)^2, its derivative 2 z for z > 0 and 2 slope^2 z for z < 0, the same as
    autograd's of a plain reference."""
    model = T.build_model(tiny_args(leaky_slope=slope), CPU)
    z0 = torch.randn(1, 16, model.args.mlp_hidden, generator=torch.Generator().manual_seed(2))
    assert (z0 > 0).any() and (z0 < 0).any() and (z0 != 0).all()
    analytic = torch.where(z0 > 0, 2 * z0, 2 * slope ** 2 * z0)
    ref = z0.clone().requires_grad_()
    torch.where(ref > 0, ref, slope * ref).square().sum().backward()
    torch.testing.assert_close(ref.grad, analytic, atol=1e-6, rtol=1e-6)
    for backend in backends:
        z = z0.clone().requires_grad_()
        u = mlp_activation(model, z, backend)
        torch.testing.assert_close(u, torch.where(z0 > 0, z0, slope * z0).square(), atol=1e-6, rtol=1e-6)
        (grad,) = torch.autograd.grad(u.sum(), z)
        torch.testing.assert_close(grad, analytic, atol=1e-6, rtol=1e-6, msg=f"backend {backend}")
        torch.testing.assert_close(grad, ref.grad, atol=1e-6, rtol=1e-6, msg=f"backend {backend}")


@pytest.mark.parametrize("slope", [0.3, 0.5])
def test_mlp_activation_gradient_follows_the_slope(slope):
    """LEAKY_SLOPE reaches the MLP's activation and its derivative (eager)."""
    check_mlp_activation_gradient(slope, [None])


@pytest.mark.slow
@pytest.mark.parametrize("slope", [0.3, 0.5])
def test_compiled_mlp_activation_gradient_follows_the_slope(slope):
    """Compiled, AOTAutograd with and without Inductor's decompositions (what Inductor lowers): no
    kernel hard-codes the slope or its derivative. (Inductor itself on CPU: the same, but a C++
    build of ~35 s.)"""
    check_mlp_activation_gradient(slope, ["aot_eager", "aot_eager_decomp_partition"])
