"""Newton-Schulz, ParallelMuon (1 process and 2 gloo processes vs 1 process), Optimizers
(gradient clipping, loss actually falls), and the compile warm-up undo in train()."""
import functools
import math
import re
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import train_gpt as T
from helpers import tiny_model_args
from helpers import tiny_train_args as _train_args

CPU = torch.device("cpu")


def polar(G):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).float()


def cosine(a, b):
    a, b = a.flatten(-2).double(), b.flatten(-2).double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


# ----------------------------------------------------------------------------- Newton-Schulz

@pytest.mark.parametrize("shape", [(4, 128, 32), (4, 32, 128), (2, 96, 256), (2, 256, 96)])
def test_newton_schulz_singular_values_rectangular(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    X = T.newton_schulz(G)
    assert X.shape == G.shape and X.dtype == torch.bfloat16
    s = torch.linalg.svdvals(X.float())
    # measured: all in ~[0.67, 1.14], mean ~0.81-0.84
    assert s.min() > 0.55 and s.max() < 1.25, (s.min(), s.max())
    assert 0.7 < s.mean() < 1.1
    # same singular directions as the exact orthogonal polar factor U V^T
    assert (cosine(X.float(), polar(G)) > 0.97).all()
    # the wide/tall paths agree: NS(G^T) == NS(G)^T exactly (same bf16 computation)
    assert torch.equal(T.newton_schulz(G.mT), X.mT)


def test_newton_schulz_square_and_ill_conditioned():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(4, 64, 64, generator=g)
    s = torch.linalg.svdvals(T.newton_schulz(G).float())
    # square Gaussian matrices have singular values near 0 that 5 steps cannot lift; the bulk is near 1
    assert s.max() < 1.25
    assert (s > 0.5).float().mean() > 0.85
    assert 0.7 < s.mean() < 1.1
    # condition number 1e3: spectrum still squashed into a band below ~1.2
    U, _, Vh = torch.linalg.svd(torch.randn(3, 48, 96, generator=g), full_matrices=False)
    Gi = U @ torch.diag_embed(torch.logspace(0, -3, 48).expand(3, 48)) @ Vh
    si = torch.linalg.svdvals(T.newton_schulz(Gi).float())
    assert si.max() < 1.25 and si.min() > 0.15
    assert (si > 0.5).float().mean() > 0.75


def test_newton_schulz_scale_invariant_and_zero_safe():
    G = torch.randn(3, 40, 72, generator=torch.Generator().manual_seed(1))
    a, b = T.newton_schulz(G, dtype=torch.float32), T.newton_schulz(G * 1000.0, dtype=torch.float32)
    assert (a - b).abs().max() < 1e-4  # float32 rounding only
    z = T.newton_schulz(torch.zeros(2, 8, 16))
    assert torch.isfinite(z.float()).all() and (z == 0).all()  # padded rows of a sharded bank


QUINTIC_COEFFS = ((3.4445, -4.7750, 2.0315),) * 5  # the classic fixed quintic (MUON_NS=quintic, gone: +0.009 bpb)


def test_polar_express_lands_closer_to_one_than_the_quintic():
    G = torch.randn(1, 64, 256, generator=torch.Generator().manual_seed(0))
    dev = {}
    for name, coeffs in (("polar", T.POLAR_EXPRESS_COEFFS), ("quintic", QUINTIC_COEFFS)):
        s = torch.linalg.svdvals(T.newton_schulz(G, coeffs, dtype=torch.float32))
        dev[name] = float((s - 1).abs().median())
        if name == "polar":  # measured: [0.88, 1.12], median |s - 1| 0.08 (quintic: [0.68, 1.13], 0.25)
            assert 0.8 <= s.min() and s.max() <= 1.2, (s.min(), s.max())
    assert dev["polar"] < 0.5 * dev["quintic"], dev
    assert (cosine(T.newton_schulz(G, T.POLAR_EXPRESS_COEFFS, dtype=torch.float32), polar(G)) > 0.99).all()
    # one tuple per iteration; steps beyond the table repeat its last one
    assert T.ns_coeffs(T.Hyperparameters()) == T.POLAR_EXPRESS_COEFFS
    assert T.ns_coeffs(T.Hyperparameters(muon_ns_steps=3)) == T.POLAR_EXPRESS_COEFFS[:3]
    assert T.ns_coeffs(T.Hyperparameters(muon_ns_steps=6))[5] == T.POLAR_EXPRESS_COEFFS[-1]


# ----------------------------------------------------------------------------- ParallelMuon, 1 process

def test_parallel_muon_step_semantics():
    torch.manual_seed(0)
    banks = [torch.nn.Parameter(torch.randn(3, 48, 24)), torch.nn.Parameter(torch.randn(2, 24, 24))]
    before = [p.detach().clone() for p in banks]
    lr, wd, mu = 0.1, 0.5, 0.9
    # no row normalization: the reference below is plain NS(g + mu * buf)
    muon = T.ParallelMuon(banks, lr, wd, T.POLAR_EXPRESS_COEFFS, world_size=1, row_norm=False)
    muon.momentum = mu
    grads = [torch.randn_like(p) for p in banks]
    for p, g in zip(banks, grads):
        p.grad = g.clone()
    muon.launch_grad_sync()
    muon.wait_grad_sync()
    muon.step()
    updates = []
    for p, p0, g in zip(banks, before, grads):
        scale = math.sqrt(max(1.0, p.size(1) / p.size(2)))
        upd = (p0 * (1 - lr * wd) - p.detach()) / (lr * scale)  # = NS(g + mu * buf), buf = g
        updates.append(upd)
        s = torch.linalg.svdvals(upd)
        assert 0.7 < s.mean() < 1.1 and s.max() < 1.25
        assert (cosine(upd, polar(g)) > 0.95).all()  # descent along the orthogonalized gradient
    assert muon.state[banks[0]]["scale"] == pytest.approx(math.sqrt(2.0))
    assert muon.state[banks[1]]["scale"] == 1.0
    # Nesterov momentum: buf = mu * g1 + g2, and the orthogonalized input is g2 + mu * buf
    g2s = [torch.randn_like(p) for p in banks]
    for p, g2 in zip(banks, g2s):
        p.grad = g2.clone()
    before2 = [p.detach().clone() for p in banks]
    muon.launch_grad_sync()
    muon.wait_grad_sync()
    muon.step()
    for p, p0, g1, g2 in zip(banks, before2, grads, g2s):
        scale = math.sqrt(max(1.0, p.size(1) / p.size(2)))
        upd2 = (p0 * (1 - lr * wd) - p.detach()) / (lr * scale)
        buf = g1 * mu + g2
        expect = T.newton_schulz(g2 + mu * buf).float()
        assert (upd2 - expect).norm() / expect.norm() < 0.03  # bf16 rounding only
        plain = T.newton_schulz(buf).float()  # ordinary (non-Nesterov) momentum would give this
        assert (plain - expect).norm() / expect.norm() > 0.1
    # reset() clears momentum: a zero gradient then gives no update but decay
    muon.reset()
    for p in banks:
        p.grad = torch.zeros_like(p)
    before3 = [p.detach().clone() for p in banks]
    muon.launch_grad_sync()
    muon.wait_grad_sync()
    muon.step()
    for p, p0 in zip(banks, before3):
        torch.testing.assert_close(p.detach(), p0 * (1 - lr * wd), atol=0, rtol=0)


def test_parallel_muon_row_norm():
    """MUON_ROW_NORM (MuonEq-R): each row of the Nesterov input is divided by its norm before
    Newton-Schulz, so rows whose gradients are 1000x smaller still get full-size updates."""
    g = torch.Generator().manual_seed(1)
    small_rows = torch.arange(32) % 2 == 1
    grad = torch.randn(2, 32, 48, generator=g) * torch.where(small_rows, 1e-3, 1.0)[None, :, None]
    lr, wd, mu = 0.1, 0.5, 0.9
    ns32 = functools.partial(T.newton_schulz, dtype=torch.float32)
    updates = {}
    for row_norm in (True, False):
        bank = torch.nn.Parameter(torch.randn(2, 32, 48, generator=torch.Generator().manual_seed(2)))
        p0 = bank.detach().clone()
        muon = T.ParallelMuon([bank], lr, wd, T.POLAR_EXPRESS_COEFFS, 1, ns_fn=ns32, row_norm=row_norm)
        muon.momentum = mu
        bank.grad = grad.clone()
        muon.launch_grad_sync()
        muon.wait_grad_sync()
        muon.step()
        updates[row_norm] = (p0 * (1 - lr * wd) - bank.detach()) / lr  # scale 1: 32 rows < 48 columns
    u = grad + mu * grad  # first step: buf = g, Nesterov input g + mu * buf
    expect = ns32(u / (u.norm(dim=-1, keepdim=True) + 1e-7), T.POLAR_EXPRESS_COEFFS)
    torch.testing.assert_close(updates[True], expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(updates[False], ns32(u, T.POLAR_EXPRESS_COEFFS), atol=1e-5, rtol=1e-5)
    ratio = {k: float(v.norm(dim=-1)[:, small_rows].mean() / v.norm(dim=-1)[:, ~small_rows].mean())
             for k, v in updates.items()}
    assert ratio[True] > 0.9 and ratio[False] < 0.4, ratio  # measured: 1.00 and 0.20


# ----------------------------------------------------------------------------- Optimizers, 1 vs 2 processes

def opt_args(**kw):
    return tiny_model_args(**{**dict(vocab_size=64, num_layers=3, train_seq_len=16, eval_seq_len=16,
                                     gptq_calib_len=16, ttt_enabled=False, seed=5, muon_momentum_warmup_frac=0.5,
                                     matrix_lr=0.05, embed_lr=0.05, scalar_lr=0.05), **kw})


def make_batches(args, steps, seqs, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, args.vocab_size, (seqs, args.train_seq_len + 1), generator=g)
        ids[:, 0] = args.bos_id
        out.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return out


def run_steps(args, batches, rank=0, world=1, fp32_ns=False):
    """Build the seeded model, take len(batches) Optimizers steps, this rank using its equal
    share of each global batch. Returns (initial state, final state, grad norms)."""
    model = T.build_model(args, CPU)
    with torch.no_grad():  # give the zero-initialized projections values, so every param gets a gradient
        g = torch.Generator().manual_seed(args.seed)
        for t in (model.qo_bank[args.num_layers:], model.down_bank):
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = T.Optimizers(model, args, world, CPU)
    if fp32_ns:
        opt.muon.ns_fn = functools.partial(T.newton_schulz, dtype=torch.float32)  # tight comparisons
    norms = []
    for step, (x, y) in enumerate(batches):
        opt.set_schedule(1.0 - 0.1 * step, T.schedule_at(args, step / 4).muon_momentum)  # warmed up by step 2
        n = x.size(0) // world
        loss = model(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])
        loss.backward()
        norms.append(opt.step())
        opt.zero_grad()
    return init, {k: v.clone() for k, v in model.state_dict().items()}, norms


DIST_CASES = {  # name -> (args overrides, fp32 Newton-Schulz, steps); default MUON_ROW_NORM
    # the script's bf16 Newton-Schulz: one step (later steps would amplify bf16 rounding
    # differences through Adam's sign-like first updates, see the fp32 cases for several steps;
    # measured at 2 steps: weights off by up to 0.036 = 0.7 lr, like a bug would be)
    "bf16_clipped": (dict(), False, 1),
    "fp32_clipped": (dict(), True, 3),
    "fp32_unclipped": (dict(grad_clip_norm=0.0), True, 3),
}
DIST_SEQS = 8


def _dist_worker(rank, world, init_file, out_prefix):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = {}
        for name, (kw, fp32, steps) in DIST_CASES.items():
            args = opt_args(**kw)
            _, final, norms = run_steps(args, make_batches(args, steps, DIST_SEQS), rank, world, fp32)
            res[name] = (final, norms)
        torch.save(res, f"{out_prefix}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    mp.spawn(_dist_worker, args=(2, str(d / "init"), str(d / "res")), nprocs=2, join=True)
    return [torch.load(str(d / f"res.{r}")) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DIST_CASES))
def test_two_process_step_equals_single_process(two_process_results, case):
    kw, fp32, steps = DIST_CASES[case]
    args = opt_args(**kw)
    init, ref, ref_norms = run_steps(args, make_batches(args, steps, DIST_SEQS), 0, 1, fp32)
    (f0, n0), (f1, n1) = two_process_results[0][case], two_process_results[1][case]
    # every rank ends with identical weights (the all-gathered updates are the same everywhere)
    for k in f0:
        assert torch.equal(f0[k], f1[k]), k
    assert n0 == n1
    # the global grad norm (bank shards + small params) matches the full-batch norm
    np.testing.assert_allclose(n0, ref_norms, rtol=1e-4)
    if args.grad_clip_norm > 0:
        assert min(ref_norms) > args.grad_clip_norm  # clipping really was active
    # tolerance: bf16 Newton-Schulz turns the ~1e-7 fp32 differences of the averaged gradients into
    # occasional bf16 rounding flips, which change its output by ~2% (its own accuracy floor);
    # a wrong shard / scatter / average / gather is off by O(lr) = 0.05 per step, i.e. ~100%.
    # fp32: Adam elements whose gradient is near eps react to summation order (seen: 2.2e-5).
    # The frontier defaults amplify those differences more (mostly QK_GAIN_INIT=5's sharper
    # attention; Polar Express's first coefficient 8.4 vs 3.4 too): measured fp32 max 1.4e-4,
    # relative 3.8e-4 (QK gain 1.5 + quintic, no row norm: 2.7e-5); bf16 1 step: 1.3e-3 and 3.4e-2
    max_tol, rel_tol = (5e-3, 0.1) if not fp32 else (1e-3, 2e-3)
    for k in ref:
        diff = f0[k] - ref[k]
        moved = ref[k] - init[k]
        assert diff.abs().max().item() < max_tol, (k, diff.abs().max().item())
        rel = (diff.norm() / moved.norm().clamp_min(1e-12)).item()
        assert moved.norm() == 0 or rel < rel_tol, (k, rel)
    for k in ("qo_bank", "kv_bank", "up_bank", "down_bank", "tok_emb.weight"):
        moved = (ref[k] - init[k]).abs().max().item()
        assert moved > 0.01, (k, moved)  # every kind of parameter really moved, by O(lr) = 0.05 per step


def test_gradient_clipping_norm_and_coefficient():
    """Optimizers.step returns the global pre-clip norm over banks + all other params."""
    args = opt_args(grad_clip_norm=0.3)
    model = T.build_model(args, CPU)
    opt = T.Optimizers(model, args, 1, CPU)
    x, y = make_batches(args, 1, 4)[0]
    model(x, y).backward()
    expected = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None))
    other_grads = {id(p): p.grad.clone() for p in opt.other_params if p.grad is not None}
    seen = {}
    orig = opt.muon.step
    opt.muon.step = lambda coef=1.0: (seen.__setitem__("coef", coef), orig(coef))[1]
    adam_step = opt.adam.step

    def spy():
        for p in opt.other_params:
            if id(p) in other_grads:
                seen.setdefault("ratios", []).append(
                    float((p.grad.double().norm() / other_grads[id(p)].double().norm().clamp_min(1e-30))))
        return adam_step()
    opt.adam.step = spy
    norm = opt.step()
    assert norm == pytest.approx(expected, rel=1e-5)
    assert norm > 0.3
    assert seen["coef"] == pytest.approx(0.3 / (norm + 1e-6), rel=1e-6)
    nz = [r for r in seen["ratios"] if r > 0]
    assert nz and all(r == pytest.approx(seen["coef"], rel=1e-5) for r in nz)


def _host_clipping_step(opt):
    """Optimizers.step as it was before the clip coefficient moved to the device (kept as the
    reference): the norm read to the host, the coefficient a Python float, applied only when it clips."""
    for p in opt.other_params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    opt.muon.launch_grad_sync()
    finish_small = T.flat_all_reduce_avg([p.grad for p in opt.other_params])
    shards = opt.muon.wait_grad_sync()
    finish_small()
    bank_sq = T._all_reduce_sum(torch.stack([s.float().square().sum() for s in shards]).sum())
    small_sq = sum(p.grad.float().square().sum() for p in opt.other_params)
    norm = float(torch.sqrt(bank_sq + small_sq))
    coef = 1.0
    if opt.args.grad_clip_norm > 0 and norm > opt.args.grad_clip_norm:
        coef = opt.args.grad_clip_norm / (norm + 1e-6)
        for p in opt.other_params:
            p.grad.mul_(coef)
    opt.adam.step()
    opt.muon.step(coef)
    return norm


# CUDA too where there is one: the kernels take a device scalar otherwise than a Python one
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_clip_coefficient_has_the_bits_of_the_hosts(device):
    """On the device, in float64 then float32: the coefficient (and a gradient scaled by it) has the
    bits of the Python float the host computed from float(norm), at and around the clip too."""
    g = torch.Generator().manual_seed(0)
    for clip in (0.3, 1.0, 0.1234567, 5e-4):
        c32 = torch.tensor(clip, dtype=torch.float32)
        near = torch.stack([torch.nextafter(c32, torch.tensor(d)) for d in (0.0, 1e9)] + [c32])
        norms = torch.cat([near, clip * torch.rand(4000, generator=g) * 3, torch.rand(500, generator=g) * 1e4,
                           torch.tensor([0.0, 1e-30, float("inf"), float("nan")])]).float()
        got = T.clip_coefficient(norms.to(device), clip)
        host = [clip / (n + 1e-6) if n > clip else 1.0 for n in norms.tolist()]
        assert got.dtype == torch.float32 and got.device.type == device
        assert torch.equal(got.cpu().view(torch.int32), torch.tensor(host, dtype=torch.float32).view(torch.int32))
        grad = torch.randn(4099, generator=g).to(device)
        for k in range(0, len(host), 97):
            assert torch.equal(grad * got[k], grad * host[k])  # the tensor scalar as the Python one
        assert (got == 1).sum() > 100 and (got < 1).sum() > 100


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip, clipped", [(0.0, None), (1e-3, {6}), (1.7, {1, 2, 3, 4, 5}), (1e6, {0})],
                         ids=["off", "every", "some", "none"])
def test_optimizer_step_has_the_numbers_of_the_host_clipping_step(clip, clipped, device):
    """The device clip coefficient changes nothing: norms and weights to the bit over several steps,
    clipped, unclipped and both (one backward feeds both optimizers the same gradients)."""
    args, dev = opt_args(grad_clip_norm=clip, attn_backend="math"), torch.device(device)
    models = [T.build_model(args, dev) for _ in range(2)]
    opts = [T.Optimizers(m, args, 1, dev) for m in models]
    norms = []
    for k, (x, y) in enumerate(make_batches(args, 6, 4, seed=3)):
        models[0](x.to(dev), y.to(dev)).backward()
        for p, q in zip(*(m.parameters() for m in models)):
            q.grad = None if p.grad is None else p.grad.clone()
        pair = []
        for opt, step in zip(opts, (T.Optimizers.step, _host_clipping_step)):
            opt.set_schedule(1.0 - 0.1 * k, 0.9)
            pair.append(float(step(opt)))
            opt.zero_grad()
        assert pair[0] == pair[1], (k, pair)
        assert all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in models))), k
        norms.append(pair[0])
    assert clipped is None or sum(n > clip for n in norms) in clipped, norms  # "some": both kinds of step


def test_one_host_sync_per_training_step(smoke_dataset, monkeypatch):
    """A training step reads the device once (loss and gradient norm together; one rank's clock needs
    no collective): the script's own reads (item, tolist, float, bool, int) counted per step."""
    data_dir, _, vocab = smoke_dataset
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "__index__", "numpy"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **kw):
            if sys._getframe(1).f_code.co_filename == T.__file__:  # torch's own CPU-side reads aside
                reads.append(_name)
            return _orig(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = {}
    for steps in (3, 7):
        args = _train_args(data_dir, vocab, iterations=steps, warmup_steps=0, ema_horizon=0.2)
        model, opt, loader = _setup(args)
        run = T.Run(0, 1, CPU, lambda m: None)
        reads.clear()
        T.train(args, model, model, opt, loader, run, T.SharedClock(run))
        counts[steps] = list(reads)
    assert len(counts[7]) - len(counts[3]) == 4, counts
    assert counts[7][-7:] == ["tolist"] * 7


# ----------------------------------------------------------------------------- training

def _setup(args):
    files = T.find_shards(args.data_path, "train")
    loader = T.DistributedLoader(files, args.vocab_size, T.Run(0, 1, CPU))
    model = T.build_model(args, CPU)
    opt = T.Optimizers(model, args, 1, CPU)
    return model, opt, loader


def _train_on_smoke(data, vocab, **kw):
    args = _train_args(data, vocab, iterations=50, train_batch_tokens=8 * 64, train_seq_len=64,
                       eval_seq_len=64, eval_stride=32, gptq_calib_len=64, grad_accum_steps=1,
                       muon_momentum_warmup_frac=0.2, embed_lr=0.1, warmdown_frac=0.2, warmup_steps=0, **kw)
    args.validate(1)
    model, opt, loader = _setup(args)
    val = T.load_validation_tokens(data, vocab)
    x, y = val[:16 * 64].view(16, 64), val[1:16 * 64 + 1].view(16, 64)  # held-out text
    with torch.no_grad():
        start = float(model(x, y))
    stats = T.train(args, model, model, opt, loader, T.Run(0, 1, CPU, lambda m: None), T.SharedClock(T.Run(0, 1, CPU)))
    assert stats.steps == 50
    with torch.no_grad():
        end = float(model(x, y))
    return start, end, stats.final_train_loss


@pytest.mark.slow
def test_loss_falls_on_smoke_data(smoke_dataset):
    data, _, vocab = smoke_dataset
    start, end, train_end = _train_on_smoke(data, vocab)
    assert abs(start - math.log(vocab)) < 0.1  # near-uniform predictions at init
    # measured: 6.24 -> ~1.2 (train and held-out)
    assert train_end < 0.5 * start, (start, train_end)
    assert end < 0.5 * start, (start, end)
    # the Muon-trained banks matter: with MATRIX_LR=0 (only embeddings/gains learn) it ends ~1.7
    _, end_frozen, _ = _train_on_smoke(data, vocab, matrix_lr=0.0)
    assert end < end_frozen - 0.2, (end, end_frozen)


def test_train_turns_recurrence_on_late_and_picks_the_qat_clip(smoke_dataset):
    """The compile warm-up runs both depths; the run switches depth recurrence on at
    RECUR_START_FRAC and, when late QAT starts, picks the QAT grid's clip from the byte budget (returned
    for the rate control to start from; the settings stay as they were)."""
    data, _, vocab = smoke_dataset
    args = _train_args(data, vocab, iterations=6, warmup_steps=4, recur_start_frac=0.5, recur_passes=2, warmdown_frac=0.6,
                       qat_start_scale=0.5)
    args.validate(1)
    model, opt, loader = _setup(args)
    assert model.recur_layers == [1]
    budget = int(0.8 * len(T.compress(T.pack_entries(T.quantize_model(model, None, args, args.clip_sigmas), args)[0])))
    seen, orig_step = [], opt.step
    opt.step = lambda: (seen.append((model.recurrence_active, float(model.qat_mix))), orig_step())[1]
    logs = []
    stats = T.train(args, model, model, opt, loader, T.Run(0, 1, CPU, logs.append), T.SharedClock(T.Run(0, 1, CPU)), budget_bytes=budget)
    warm, run = seen[:4], seen[4:]
    assert [a for a, _ in warm] == [False, False, True, True]  # both graphs compiled before the clock
    assert [a for a, _ in run] == [False, False, False, True, True, True]  # progress k / 6 >= 0.5 from step 3
    assert any("depth recurrence on at step 3" in m and "[0, 1, 1, 1]" in m for m in logs), logs
    line = next(m for m in logs if m.startswith("step time:"))  # before and after the switch, from the clock
    assert re.search(r"ms before depth recurrence \(3 steps\), [\d.]+ ms with it \(3 steps(, late QAT's start included)?\)$", line), line
    by_shape = next(m for m in logs if m.startswith("step time by shape:"))  # each shape's steps and ms/step
    assert re.fullmatch(r"step time by shape: 32 [\d.]+ ms \(3 steps\), 32 recurrent [\d.]+ ms \(3 steps\) "
                        r"\(late QAT's start in its shape\)", by_shape), by_shape
    warmup = next(m for m in logs if m.startswith("compile warm-up:"))  # each shape's first (compiling) step
    assert re.search(r"\(first step of each shape: 32 [\d.]+s, 32 recurrent [\d.]+s\)$", warmup), warmup
    assert model.recurrence_active  # the artifact is evaluated with it
    # QAT at step 5 (lr scale (1 - 5/6) / 0.6 < 0.5): a budget below the current size -> a wider clip
    assert stats.qat_step == 5 and [q for _, q in run] == [0.0] * 5 + [1.0]
    assert stats.qat_clip > args.clip_sigmas == T.Hyperparameters().clip_sigmas
    assert float(model.qat_clip) == pytest.approx(stats.qat_clip, rel=1e-6)
    assert any(f"grid clip {stats.qat_clip:.3f} sigmas" in m for m in logs), logs


def test_train_grows_the_context_on_schedule(smoke_dataset):
    """TRAIN_SEQ_SCHEDULE: the compile warm-up runs every (length, depth) shape the schedule takes,
    and only those; the run takes each length from its fraction on, the same tokens per step, and
    logs the switch; the model's RoPE table covers the longest length."""
    data, _, vocab = smoke_dataset
    args = _train_args(data, vocab, iterations=6, warmup_steps=4, train_seq_schedule="16@0,32@0.5",
                       recur_passes=1, recur_start_frac=0.25)
    args.validate(1)
    assert args.train_seq_lens() == [(0.0, 16), (0.5, 32)] and args.longest_train_seq == 32
    assert [args.train_seq_len_at(p) for p in (0.0, 0.49, 0.5, 1.0)] == [16, 16, 32, 32]
    model, opt, loader = _setup(args)
    assert model.rotary.cos.size(0) >= 32
    shapes, orig = [], loader.next_batch
    loader.next_batch = lambda seqs, n: (shapes.append((model.recurrence_active, seqs, n)), orig(seqs, n))[1]
    logs = []
    T.train(args, model, model, opt, loader, T.Run(0, 1, CPU, logs.append), T.SharedClock(T.Run(0, 1, CPU)))
    per_step = [shapes[i:i + 2] for i in range(0, len(shapes), 2)]  # 2 micro-steps a step
    warm, run = per_step[:4], per_step[4:]
    # (16, off) from 0, (16, on) from 0.25, (32, on) from 0.5: no (32, off) in this run
    assert [s[0] for s in warm] == [(False, 8, 16), (False, 8, 16), (True, 8, 16), (True, 4, 32)]
    assert [s[0][1:] for s in run] == [(8, 16)] * 3 + [(4, 32)] * 3  # progress k / 6 >= 0.5 from step 3
    assert {s[0] for s in warm} == {s[0] for s in run}
    assert all(a == b for a, b in per_step) and all(seqs * n == 128 for _, seqs, n in shapes)
    assert any(m.startswith("training context 32 from step 3 ") for m in logs), logs
    assert any("8 seqs x 16 then 4 seqs x 32 from 50%" in m for m in logs), logs


def _snapshot(model, opt, loader):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, len(opt.adam.state),
            [st["buf"].clone() for st in opt.muon.state.values()], loader.stream.state())


@pytest.mark.parametrize("ema", [0.0, 0.2])
def test_compile_warmup_is_undone(smoke_dataset, monkeypatch, ema):
    data, _, vocab = smoke_dataset
    finals = {}
    for warm in (0, 3):
        args = _train_args(data, vocab, iterations=5, warmup_steps=warm, ema_horizon=ema, warmdown_frac=0.6,
                           qat_start_scale=0.5)
        args.validate(1)
        model, opt, loader = _setup(args)
        initial = _snapshot(model, opt, loader)
        calls = {"step": 0, "sync": []}
        orig_step = opt.step

        def counting_step():
            calls["step"] += 1
            return orig_step()
        opt.step = counting_step
        # train() calls _sync(device) right after the warm-up restore: capture the state there
        monkeypatch.setattr(T, "_sync", lambda device: calls["sync"].append(_snapshot(model, opt, loader)))
        stats = T.train(args, model, model, opt, loader, T.Run(0, 1, CPU, lambda m: None), T.SharedClock(T.Run(0, 1, CPU)))
        assert stats.steps == 5 and calls["step"] == 5 + warm
        assert stats.qat_step == 4  # lr scale (1 - 4/5) / 0.6 = 1/3 < 0.5 at step 4
        if warm:
            w_state, n_adam, bufs, pos = calls["sync"][0]
            for k in initial[0]:
                assert torch.equal(w_state[k], initial[0][k]), k
            assert n_adam == 0 and initial[1] == 0
            assert all((b == 0).all() for b in bufs)
            assert pos == initial[3] == (0, 0)
        finals[warm] = ({k: v.clone() for k, v in model.state_dict().items()}, loader.stream.state(),
                        stats.final_train_loss)
        assert any(not torch.equal(finals[warm][0][k], initial[0][k]) for k in initial[0])  # training moved weights
    (s0, pos0, loss0), (s3, pos3, loss3) = finals[0], finals[3]
    assert pos0 == pos3 and pos0 != (0, 0)
    assert pos0 == (0, 5 * 2 * (4 * 32 + 1))  # 5 steps x 2 micro-steps x (4 seqs x 32 + 1) tokens
    assert loss0 == loss3
    for k in s0:
        assert torch.equal(s0[k], s3[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("warmup_steps", [4, 0])
def test_no_graph_is_compiled_on_the_clock_after_the_warm_up(smoke_dataset, warmup_steps):
    """The warm-up compiles every (context, recurrence) shape the schedule takes: the compiled model
    (dynamo, eager backend: no C++ build) compiles nothing more on the clock, and the log says so;
    without the warm-up the same run compiles its shapes on the clock (the count is real)."""
    torch._dynamo.reset()
    data, _, vocab = smoke_dataset
    args = _train_args(data, vocab, iterations=8, warmup_steps=warmup_steps, recur_start_frac=0.5, recur_passes=1,
                       train_seq_schedule="16@0,32@0.25", train_batch_tokens=2 * 4 * 32)
    args.validate(1)
    model, opt, loader = _setup(args)
    compiled = torch.compile(model, backend="eager", dynamic=False)
    logs = []
    T.train(args, model, compiled, opt, loader, T.Run(0, 1, CPU, logs.append), T.SharedClock(T.Run(0, 1, CPU)))
    done = next(m for m in logs if m.startswith("training done:"))
    count = int(re.search(r"(\d+) graphs compiled on the clock$", done).group(1))
    assert (count == 0) if warmup_steps else (count >= 3), done  # 16, 32, 32 recurrent
