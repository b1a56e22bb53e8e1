"""Token n-gram tilt: the hints against a brute-force reference, their causality (a hint depends
only on the tokens before its target), the tilted distribution's normalisation, and the tilt in
the sliding evaluation and in score-first TTT (scored tilted, adapters trained on the model's own
loss)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as T
from helpers import randomized_model, tiny_model_args

pytestmark = pytest.mark.usefixtures("one_thread_math")

CPU = torch.device("cpu")
BOS = 1


def ngram_args(**kw):
    return tiny_model_args(**{**dict(vocab_size=48, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, train_seq_len=32, eval_seq_len=32,
                                     eval_stride=8, eval_batch_seqs=3, attn_backend="math", seed=5, ngram_tilt=True,
                                     ngram_max=6, ngram_min=1, ngram_conf=0.8, ngram_min_count=2, ngram_lift=0.0, ttt_enabled=True, ttt_rank=2,
                                     ttt_chunk=8, ttt_batch_docs=2, ttt_phases=2, ttt_max_seconds=1e9), **kw})


def repetitive_stream(seed, n_docs=8):
    """Documents that reuse phrases of a small pool: many contexts recur, some with another ending."""
    g = torch.Generator().manual_seed(seed)
    pool = [torch.randint(2, 48, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g) for _ in range(6)]
    docs = []
    for _ in range(n_docs):
        parts = [torch.tensor([BOS])]
        for _ in range(int(torch.randint(2, 6, (1,), generator=g))):
            parts.append(pool[int(torch.randint(0, 6, (1,), generator=g))])
            if bool(torch.rand(1, generator=g) < 0.4):
                parts.append(torch.randint(2, 48, (2,), generator=g))
        docs.append(torch.cat(parts))
    return torch.cat(docs + [torch.tensor([BOS])])


def reference_hints(tokens, args, schedule=None):
    """The rule written out: for target k, the longest context tokens[k-n:k] inside its document
    seen at least NGRAM_MIN_COUNT times among the targets k may use: those of earlier phases, and
    those of its phase and lane at earlier steps (no schedule: the targets before it); what
    followed the latest of them, if at least NGRAM_CONF of them went on so. Latest: by phase, then
    (in k's own phase) step, then position."""
    t = tokens.tolist()
    if schedule is None:
        phase, lane, step = list(range(len(t))), [0] * len(t), [0] * len(t)
    else:
        phase, lane, step = (x.tolist() for x in schedule)
    start, doc_start = 0, []
    for i, tok in enumerate(t):
        start = i if tok == BOS else start
        doc_start.append(start)
    out = [-1]
    for k in range(1, len(t)):
        def usable(j):
            return phase[j] < phase[k] or (phase[j] == phase[k] and lane[j] == lane[k] and step[j] < step[k])
        hint = -1
        for n in range(min(args.ngram_max, k - doc_start[k - 1]), args.ngram_min - 1, -1):
            ctx = t[k - n:k]
            ends = sorted((phase[j], step[j] if phase[j] == phase[k] else 0, j) for j in range(n, len(t))
                          if usable(j) and j - n >= doc_start[j - 1] and t[j - n:j] == ctx)
            if len(ends) >= max(1, args.ngram_min_count):
                cand = t[ends[-1][2]]
                if sum(t[j] == cand for _, _, j in ends) >= args.ngram_conf * len(ends):
                    hint = cand
                break
        out.append(hint)
    return torch.tensor(out)


@pytest.mark.parametrize("kw", [{}, dict(ngram_min=2, ngram_max=4), dict(ngram_conf=0.5), dict(ngram_max=1),
                                dict(ngram_min_count=1), dict(ngram_min_count=3)])
def test_hints_equal_the_rule_written_out(kw):
    args = ngram_args(**kw)
    for seed in range(4):
        tokens = repetitive_stream(seed)
        hints = T.ngram_hints(tokens, args)
        assert hints.shape == tokens.shape and int(hints[0]) == -1
        assert torch.equal(hints, reference_hints(tokens, args)), seed
        assert (hints >= 0).sum() > len(tokens) // 10  # the streams do give hints


@pytest.mark.slow
def test_hints_in_ttts_order_equal_the_rule_written_out():
    """With TTT's schedule on one and two ranks, and with random schedules (many ties, lanes)."""
    g = torch.Generator().manual_seed(5)
    for kw in ({}, dict(ngram_min_count=1), dict(ngram_max=3, ngram_conf=0.5)):
        args = ngram_args(**kw)
        for seed in range(3):
            tokens = repetitive_stream(seed)
            randoms = tuple(torch.randint(0, hi, tokens.shape, generator=g) for hi in (4, 3, 6))
            for schedule in (T.ttt_schedule(tokens, args, 1), T.ttt_schedule(tokens, args, 2), randoms):
                hints = T.ngram_hints(tokens, args, schedule)
                assert torch.equal(hints, reference_hints(tokens, args, schedule)), (kw, seed)


@pytest.mark.parametrize("short", [{}, dict(ttt_short_chunk=3, ttt_short_len=20)], ids=["one_lane", "short_lane"])
def test_ttt_schedule_follows_the_lanes(short):
    """ttt_schedule gives each target the phase, rank and step of the chunk that scores it: on one
    rank recorded from a TTT run's monitor (a range's targets share their step; steps count up
    within each phase, a row per document); on two ranks each rank's lane holds its share. With
    the short lane (the 20-, 20- and 12-target documents in chunks of 3), its steps follow the
    other documents' in each phase, as the run scores them."""
    args = ngram_args(ttt_phases=2, ttt_batch_docs=2, **short)
    model = randomized_model(args, seed=1)
    tokens = repetitive_stream(3, n_docs=7)
    luts = T.ByteLUTs(torch.ones(48, dtype=torch.long), torch.zeros(48, dtype=torch.bool), torch.zeros(48, dtype=torch.bool))
    events = []
    T.evaluate_with_ttt(copy.deepcopy(model), tokens, luts, args, T.Run(0, 1, CPU, lambda s: None),
                        monitor=lambda kind, lo, hi: events.append((kind, lo, hi)))
    phase, lane, step = T.ttt_schedule(tokens, args, 1)
    scored = [(lo, hi) for kind, lo, hi in events if kind == "score"]
    assert sorted(k for lo, hi in scored for k in range(lo + 1, hi + 1)) == list(range(1, len(tokens)))
    seen = []
    for lo, hi in scored:  # in the run's order: (phase, step) never goes back
        assert len(set(zip(phase[lo + 1:hi + 1].tolist(), step[lo + 1:hi + 1].tolist()))) == 1
        seen.append((int(phase[lo + 1]), int(step[lo + 1])))
    assert seen == sorted(seen) and seen[0] == (1, 0) and not lane.any()
    assert max(seen.count(v) for v in set(seen)) == args.ttt_batch_docs
    phase2, lane2, step2 = T.ttt_schedule(tokens, args, 2)
    spans = T.document_spans(tokens, BOS)
    for rank in range(2):
        for ph, mine in enumerate(T.ttt_phase_shares(spans, args, T.Run(rank, 2))):
            for s, e in mine:
                assert bool((lane2[s + 1:e + 1] == rank).all()) and bool((phase2[s + 1:e + 1] == ph + 1).all())
    # fewer steps a rank on two (with the short lane here, a 20-target document in chunks of 3 binds)
    assert torch.equal(phase2, phase) and (short or int(step2.max()) < int(step.max()))
    if short:  # per phase and rank, every step of a short document after every step of a long one
        lengths = [e - s for s, e in spans]
        assert sorted(lengths) == [12, 20, 20, 23, 32, 33, 41]
        for ph, ln, st in ((phase, lane, step), (phase2, lane2, step2)):
            for key in set(zip(ph[1:].tolist(), ln[1:].tolist())):
                steps = {True: [], False: []}
                for s, e in spans:
                    if (int(ph[s + 1]), int(ln[s + 1])) == key:
                        steps[e - s <= 20] += st[s + 1:e + 1].tolist()
                assert not steps[True] or not steps[False] or max(steps[False]) < min(steps[True])
                assert steps[True] or key[1] == 1
        assert len([lo for lo, hi in scored if hi - lo <= 3]) > 3


def test_a_hint_depends_only_on_the_tokens_before_its_target():
    """Changing tokens[k:] leaves hints[:k + 1] as they were (hints[k] is for the target tokens[k],
    already unknown to it); the check is sensitive: changing an earlier token changes later hints."""
    args = ngram_args()
    tokens = repetitive_stream(7, n_docs=10)
    hints = T.ngram_hints(tokens, args)
    g = torch.Generator().manual_seed(3)
    for k in torch.randint(1, len(tokens), (25,), generator=g).tolist():
        changed = tokens.clone()
        changed[k:] = torch.randint(2, 48, (len(tokens) - k,), generator=g)
        assert torch.equal(T.ngram_hints(changed, args)[:k + 1], hints[:k + 1]), k
    changed = tokens.clone()
    changed[len(tokens) // 3] = 47 if int(tokens[len(tokens) // 3]) != 47 else 46
    assert not torch.equal(T.ngram_hints(changed, args), hints)


def test_the_tilted_distribution_sums_to_one():
    """exp(-tilted nll) over every possible target sums to 1 for any logits and hint; no hint or
    beta 0 leaves the model's distribution; the hinted token's probability rises."""
    g = torch.Generator().manual_seed(0)
    V = 37
    for beta in (0.0, 1.0, 2.625, 6.0):
        logits = torch.randn(5, V, generator=g) * 3
        hint = torch.tensor([3, -1, 0, 36, 17])
        ys = torch.arange(V)
        nll, tilted = T.tilted_nll(logits[:, None, :].expand(5, V, V), ys[None, :].expand(5, V), hint[:, None].expand(5, V), beta)
        torch.testing.assert_close(torch.exp(-tilted).sum(1), torch.ones(5, dtype=torch.float32), atol=1e-5, rtol=0)
        torch.testing.assert_close(nll, -torch.log_softmax(logits, -1), atol=1e-5, rtol=0)
        torch.testing.assert_close(tilted[1], nll[1])  # no hint
        if beta == 0:
            torch.testing.assert_close(tilted, nll)
        else:
            rows = torch.tensor([0, 2, 3, 4])
            assert bool((tilted[rows, hint[rows]] < nll[rows, hint[rows]]).all())


@pytest.mark.parametrize("lift", [0.3, 0.6, 0.95])
def test_the_lifted_distribution_sums_to_one_and_gives_the_hint_at_least_lift(lift):
    """NGRAM_LIFT: p'(hint) = max(p(hint), lift) exactly, the others scaled alike, the whole summing
    to 1; the fixed beta is ignored; a hint already above `lift` leaves p unchanged."""
    g = torch.Generator().manual_seed(1)
    V = 29
    logits = torch.randn(6, V, generator=g) * 4
    logits[5, 7] = 30.0  # p(hint) ~ 1: stays
    hint = torch.tensor([3, -1, 0, 28, 11, 7])
    ys = torch.arange(V)
    nll, tilted = T.tilted_nll(logits[:, None, :].expand(6, V, V), ys[None, :].expand(6, V), hint[:, None].expand(6, V),
                               2.625, lift)
    p, p2 = torch.exp(-nll).double(), torch.exp(-tilted).double()
    torch.testing.assert_close(p2.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(p2[1], p[1])
    for r in (0, 2, 3, 4, 5):
        h = int(hint[r])
        assert float(p2[r, h]) == pytest.approx(max(float(p[r, h]), lift), abs=1e-5)
        others = torch.arange(V) != h
        ratio = p2[r, others] / p[r, others]
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), atol=1e-4, rtol=1e-4)  # scaled alike
    assert float(p[5, 7]) > 0.99 and torch.allclose(p2[5], p[5], atol=1e-6)


@pytest.mark.parametrize("lift", [0.0, 0.6])
def test_a_certain_hint_leaves_the_adapters_gradients_finite(lift):
    """TTT trains on the untilted half of the stacked (plain, tilted) losses; where the model is sure
    of a hint (p(h) = 1 in float32, its log-odds infinite) the tilt's branch must not turn the zero
    gradient it gets into NaN (it did with NGRAM_LIFT: every proxy TTT score came out NaN)."""
    logits = torch.tensor([[[100.0, -100.0, 0.0], [0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]], requires_grad=True)
    y, hint = torch.tensor([[0, 2, 1]]), torch.tensor([[0, -1, 0]])
    out = torch.stack(T.tilted_nll(logits, y, hint, 1.0, lift))
    assert bool(out.isfinite().all())
    out[0].sum().backward()
    assert bool(logits.grad.isfinite().all())
    ref = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(ref.view(-1, 3), y.view(-1), reduction="sum").backward()
    torch.testing.assert_close(logits.grad, ref.grad)  # the plain loss's own gradient


def test_the_lift_scores_a_hint_the_model_all_but_excludes_exactly():
    """p(hint) ~ e^-100 (no softcap): the lift's closed form gives -log 0.6 for a right hint and
    -log(0.4 p(y) / (1 - p(h))) for a wrong one, where e^beta - 1 would overflow float32."""
    logits = torch.tensor([[[0.0, -100.0, 0.0], [0.0, -100.0, 0.0]]])
    y, hint = torch.tensor([[1, 0]]), torch.tensor([[1, 1]])
    nll, tilted = T.tilted_nll(logits, y, hint, 1.0, 0.6)
    assert bool(tilted.isfinite().all())
    torch.testing.assert_close(tilted, torch.tensor([[-math.log(0.6), -math.log(0.4 * 0.5)]]))


def test_the_scorers_tilt_the_models_logits_with_the_tilt_given():
    """target_nll with hints: (the model's own loss, tilted_nll of its logits) with the beta and
    lift passed, whatever tilt the model's settings name (the model reads none)."""
    args = ngram_args(ngram_beta=5.0, ngram_lift=0.9)
    model = randomized_model(args, seed=1)
    tokens = repetitive_stream(2)[:33]
    x, y = tokens[:-1][None], tokens[1:][None]
    hints = T.ngram_hints(tokens, args)[1:][None]
    for beta, lift in ((1.0, 0.0), (1.0, 0.6)):  # NGRAM_BETA's fixed tilt, then NGRAM_LIFT's
        with torch.no_grad():
            plain = T.target_nll(model, x, y)
            nll, tilted = T.target_nll(model, x, y, hints, beta, lift)
            ref = T.tilted_nll(model(x), y, hints, beta, lift)[1]
        torch.testing.assert_close(plain, model(x, y, reduction="none"), atol=0, rtol=0)
        torch.testing.assert_close(nll, plain, atol=1e-5, rtol=0)
        torch.testing.assert_close(tilted, ref, atol=0, rtol=0)
        assert bool((hints >= 0).any()) and not torch.allclose(tilted, nll)


def tilt_reference(model, tokens, args):
    """Mean tilted nll over all targets, each predicted with its document-masked full past (every
    test stream here is shorter than EVAL_SEQ_LEN)."""
    assert tokens.numel() - 1 <= args.eval_seq_len
    hints = T.ngram_hints(tokens, args)
    x, y = tokens[:-1][None], tokens[1:][None]
    with torch.no_grad():
        return float(T.tilted_nll(model(x), y, hints[1:][None], args.ngram_beta)[1].mean())


def test_sliding_evaluation_scores_the_tilt():
    """evaluate() with the hints = the tilted loss of every target in its full context, and the
    same pass's untilted score = the plain evaluation's; beta 0 = the plain evaluation."""
    args = ngram_args()
    model = randomized_model(args, seed=1)
    tokens = repetitive_stream(4, n_docs=3)[:args.eval_seq_len + 1]
    hints = T.ngram_hints(tokens, args)
    luts = T.ByteLUTs(torch.ones(48, dtype=torch.long), torch.zeros(48, dtype=torch.bool), torch.zeros(48, dtype=torch.bool))
    run = T.Run(0, 1, CPU)
    tilted = T.evaluate(T.make_score_fn(model, CPU, hints, args.ngram_beta, args.ngram_lift), tokens, luts, args.eval_seq_len,
                        args.eval_stride, 2, run)
    assert tilted["val_loss"] == pytest.approx(tilt_reference(model, tokens, args), rel=1e-5)
    plain = T.evaluate(T.make_score_fn(model, CPU), tokens, luts, args.eval_seq_len, args.eval_stride, 2, run)
    beta0 = T.evaluate(T.make_score_fn(model, CPU, hints, 0.0), tokens, luts, args.eval_seq_len, args.eval_stride, 2, run)
    assert beta0["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)
    assert abs(tilted["val_loss"] - plain["val_loss"]) > 1e-3
    assert tilted["untilted_bpb"] == pytest.approx(plain["val_bpb"], rel=1e-9)
    assert plain["untilted_bpb"] == plain["val_bpb"]


def test_ttt_scores_tilted_and_trains_on_the_models_own_loss(monkeypatch):
    """TTT with hints: at lr 0 its score is the sliding evaluation's tilted score; with learning,
    the adapters get the same gradients as without hints (they learn the model, not the tilt),
    while the score differs."""
    long = dict(eval_seq_len=64, train_seq_len=64)  # every document fits a window less a stride:
    args = ngram_args(ttt_lr=0.0, ttt_global_lr=0.0, **long)  # TTT's context = the sliding one's
    model = randomized_model(args, seed=1)
    tokens = repetitive_stream(5, n_docs=6)
    assert max(e - s for s, e in T.document_spans(tokens, BOS)) <= args.eval_seq_len - args.eval_stride
    hints = T.ngram_hints(tokens, args, T.ttt_schedule(tokens, args, 1))  # TTT's order
    luts = T.ByteLUTs(torch.ones(48, dtype=torch.long), torch.zeros(48, dtype=torch.bool), torch.zeros(48, dtype=torch.bool))
    run = T.Run(0, 1, CPU)
    ref = T.evaluate(T.make_score_fn(model, CPU, hints, args.ngram_beta, args.ngram_lift), tokens, luts, args.eval_seq_len, args.eval_stride, 2,
                     T.Run(0, 1, CPU, lambda s: None))
    res = T.evaluate_with_ttt(copy.deepcopy(model), tokens, luts, args, T.Run(0, 1, CPU, lambda s: None), hints=hints)
    assert res["tokens"] == ref["tokens"] and res["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)

    grads = {True: [], False: []}
    step = T.DocAdapters.step
    for with_hints in (True, False):
        def recording(self, **kw):
            grads[with_hints].append([p.grad.clone() for p in self.params])
            return step(self, **kw)
        monkeypatch.setattr(T.DocAdapters, "step", recording)
        out = T.evaluate_with_ttt(copy.deepcopy(model), tokens, luts, ngram_args(ttt_lr=0.01, ttt_global_lr=0.0, **long), run,
                                  hints=hints if with_hints else None)
        grads[with_hints].append(out["val_bpb"])
        if with_hints:
            untilted = out["untilted_bpb"]
    assert len(grads[True]) == len(grads[False]) > 3
    assert untilted == pytest.approx(grads[False][-1], rel=1e-9)  # the tilt's ablation row from the same pass
    for a, b in zip(grads[True][:-1], grads[False][:-1]):
        for ga, gb in zip(a, b):
            assert torch.equal(ga, gb)
    assert abs(grads[True][-1] - grads[False][-1]) > 1e-3


def test_settings_are_checked():
    with pytest.raises(T.ConfigError, match="NGRAM_MAX"):
        ngram_args(ngram_min=4, ngram_max=2).validate(1)
    with pytest.raises(T.ConfigError, match="NGRAM_CONF"):
        ngram_args(ngram_conf=1.5).validate(1)
    with pytest.raises(T.ConfigError, match=r"NGRAM_LIFT=1.0 must be in \[0, 1\)"):
        ngram_args(ngram_lift=1.0).validate(1)


def test_the_fixed_beta_tilt_makes_no_tensor_on_the_scores_device(monkeypatch):
    """TTT captures the tilt in a CUDA graph: a tensor made from the Python beta on the scores'
    device is a host-to-device copy, which a capture refuses. The fixed-beta tilt computes e^beta - 1
    on the host (the same bits as before) and makes nothing on the scores' device."""
    made = []
    for name in ("tensor", "as_tensor", "full", "scalar_tensor"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **kw: (
            made.append((_name, str(kw.get("device", "cpu")))), _real(*a, **kw))[1])
    log_ph, right = torch.zeros(4, device="meta"), torch.zeros(4, device="meta")
    T.tilt_shift(log_ph, right, 2.625)
    assert not [m for m in made if m[1] != "cpu"], made
    lp = -torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 20
    hit = (torch.arange(1000) % 2).float()
    beta = torch.tensor(2.625)
    assert torch.equal(T.tilt_shift(lp, hit, 2.625), torch.log1p(torch.expm1(beta) * lp.exp()) - beta * hit)
