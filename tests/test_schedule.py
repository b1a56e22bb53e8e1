"""The schedule follows the run's length (fractions of its time budget), and every rank takes
every decision from one clock: rank 0's, shared in the per-step collective."""
import datetime
import itertools
import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as T
from helpers import randomized_model, tiny_quant_args, tiny_train_args

CPU = torch.device("cpu")


def schedule_curve(total_steps: int, step_ms: float):
    """(lr scale, Muon momentum, EMA decay) at every step of a time-bound run of `total_steps`
    steps at a constant step time, with the default settings."""
    args = T.Hyperparameters(compile="0")
    budget = total_steps * step_ms / 1000
    model = T.build_model(T.Hyperparameters(num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=8,
                                            vocab_size=64, compile="0"), CPU)
    opt = T.Optimizers(model, args, 1, CPU)
    out = []
    for k in range(total_steps):
        p = T.run_progress(args, k, k * step_ms / 1000, budget)
        scale = T.lr_scale_at(args, p)
        opt.set_schedule(scale, p)
        p_next = T.run_progress(args, k + 1, (k + 1) * step_ms / 1000, budget)
        out.append((scale, opt.muon.momentum, math.exp(-(p_next - p) / args.ema_horizon)))
    return out


def test_schedule_has_the_record_shape_at_6900_steps_and_the_same_at_950():
    args = T.Hyperparameters()
    big, small = schedule_curve(6900, 86.7), schedule_curve(950, 587.7)
    for curve, n in ((big, 6900), (small, 950)):
        first_warmdown = next(k for k, c in enumerate(curve) if c[0] < 1.0)
        momentum_done = next(k for k, c in enumerate(curve) if c[1] >= args.muon_momentum - 1e-12)
        floor_from = next(k for k, c in enumerate(curve) if c[0] <= args.min_lr_scale)
        # warm-down over the last WARMDOWN_FRAC of the run, linear towards 0 and floored at
        # MIN_LR_SCALE; momentum warmed up over the first MUON_MOMENTUM_WARMUP_FRAC
        assert abs(first_warmdown - (1 - args.warmdown_frac) * n) <= 1, (n, first_warmdown)
        assert abs(floor_from - (1 - args.warmdown_frac * args.min_lr_scale) * n) <= 1, (n, floor_from)
        assert abs(momentum_done - args.muon_momentum_warmup_frac * n) <= 1, (n, momentum_done)
        assert curve[0][0] == 1.0 and curve[-1][0] == args.min_lr_scale
        assert curve[0][1] == pytest.approx(args.muon_momentum_start) and curve[-1][1] == args.muon_momentum
        mid = int((1 - args.warmdown_frac / 2) * n)  # half-way through the warm-down: scale 1/2
        assert curve[mid][0] == pytest.approx(0.5, abs=2 / (args.warmdown_frac * n))
    # the same shape: the curves agree at every fraction of the run
    for frac in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99):
        b, s = big[int(frac * 6900)], small[int(frac * 950)]
        assert b[0] == pytest.approx(s[0], abs=3e-3) and b[1] == pytest.approx(s[1], abs=1e-3), frac
    # EMA: record B's per-step decay 0.997 at 8 GPUs' step time; at one GPU's 7x longer steps the
    # average still spans the same 5 % of the run (0.979 per step, not 0.997)
    assert big[100][2] == pytest.approx(0.99710, abs=2e-5)
    assert small[100][2] == pytest.approx(math.exp(-1 / (0.05 * 950)), abs=1e-6)
    assert (1 - small[100][2]) * 950 == pytest.approx((1 - big[100][2]) * 6900, rel=0.01)


def test_progress_takes_the_binding_limit():
    args = T.Hyperparameters(iterations=100)
    assert T.run_progress(args, 50, 10.0, 100.0) == 0.5  # steps bind
    assert T.run_progress(args, 5, 60.0, 100.0) == 0.6  # the clock binds
    assert T.run_progress(T.Hyperparameters(iterations=0), 5, 60.0, 0.0) == 0.0
    assert T.run_progress(args, 500, 0.0, 0.0) == 1.0
    assert T.lr_scale_at(T.Hyperparameters(min_lr_scale=0.1), 0.999) == 0.1


def _clock_worker(rank, world, init_file, data_dir, vocab, out_prefix):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        args = tiny_train_args(data_dir, vocab, iterations=0, max_wallclock_seconds=4.0, gptq_reserve_seconds=1.0,
                           warmdown_frac=0.6, qat_start_scale=0.5, ema_horizon=0.1, muon_momentum_warmup_frac=0.3,
                           warmup_steps=0, train_seq_schedule="16@0,32@0.5")
        files = T.find_shards(args.data_path, "train")
        loader = T.DistributedLoader(files, vocab, T.Run(rank, world, CPU))
        lengths, next_batch = [], loader.next_batch
        loader.next_batch = lambda seqs, n: (lengths.append(n), next_batch(seqs, n))[1]
        model = T.build_model(args, CPU)
        opt = T.Optimizers(model, args, world, CPU)
        seen = []
        orig = opt.set_schedule

        def recording(scale, progress):
            orig(scale, progress)
            seen.append((scale, progress, opt.muon.momentum, float(model.qat_mix)))
        opt.set_schedule = recording
        # rank 1's clock runs 3x fast from another origin: a rank reading its own clock would warm
        # down, switch QAT and stop far earlier than rank 0
        skewed = (lambda: 3.0 * time.perf_counter() + 1000.0) if rank == 1 else time.perf_counter
        clock = T.SharedClock(T.Run(rank, world, CPU), clock=skewed)
        stats = T.train(args, model, model, opt, loader, T.Run(rank, world, CPU, lambda m: None), clock)
        torch.save({"seen": seen, "lengths": lengths, "steps": stats.steps, "qat_step": stats.qat_step, "local": clock.local(),
                    "train_seconds": stats.train_seconds, "state": model.state_dict()}, f"{out_prefix}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_skewed_clock_ranks_share_every_decision(smoke_dataset, tmp_path):
    data_dir, _, vocab = smoke_dataset
    mp.spawn(_clock_worker, args=(2, str(tmp_path / "init"), data_dir, vocab, str(tmp_path / "res")), nprocs=2,
             join=True)
    r0, r1 = (torch.load(str(tmp_path / f"res.{r}")) for r in range(2))
    assert r1["local"] > 2.5 * r0["local"]  # the skew was real
    assert r0["steps"] == r1["steps"] >= 10
    assert r0["qat_step"] == r1["qat_step"] is not None
    assert r0["seen"] == r1["seen"]  # learning rate, progress, momentum, QAT, step by step
    assert r0["lengths"] == r1["lengths"] and {16, 32} == set(r0["lengths"])  # the context grows on the shared clock
    assert r0["train_seconds"] == r1["train_seconds"] <= 3.0 + 0.5
    scales = [s for s, *_ in r0["seen"]]
    assert scales[0] == 1.0 and min(scales) < 0.3  # it did warm down
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k


def _rate_worker(rank, world, init_file, out_prefix):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        T.set_attention_backend("math", CPU)
        args = tiny_quant_args(max_wallclock_seconds=5.0, rate_tries=3)
        model = randomized_model(args, seed=1)
        clock = T.SharedClock(T.Run(rank, world, CPU), clock=lambda: 0.0)
        if rank == 1:  # this rank's own timer says each round takes 10 s (a skew at the limit)
            ticks = itertools.count()
            T.time.perf_counter = lambda: 10.0 * next(ticks)
        q = T.quantize_to_budget(model, None, args, 10**9, T.Run(rank, world, CPU, lambda m: None), clock)
        _, _, clip, tries = q.entries, q.data, q.clip_sigmas, q.tries
        written = T._from_rank0(1.0, world, CPU)  # main()'s next collective
        torch.save({"clip": clip, "tries": tries, "written": written}, f"{out_prefix}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rate_control_ranks_stop_on_rank0s_timing(tmp_path):
    """Whether another rate-control round fits before MAX_WALLCLOCK_SECONDS is rank 0's call: a
    rank timing the round on its own clock used to stop alone and deadlock the next collective."""
    mp.spawn(_rate_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=2, join=True)
    r0, r1 = (torch.load(str(tmp_path / f"res.{r}")) for r in range(2))
    assert len(r0["tries"]) > 1  # rank 0's rounds are quick: it goes on, and rank 1 with it
    assert r0["tries"] == r1["tries"] and r0["clip"] == r1["clip"] and r1["written"] == 1.0


def test_non_finite_gradients_stop_training_on_every_rank_alike(smoke_dataset):
    """The stop reads the all-reduced gradient norm (the same on every rank), not the rank's own
    loss: a rank whose batch overflowed must not stop alone while the others wait in a collective."""
    data_dir, _, vocab = smoke_dataset
    args = tiny_train_args(data_dir, vocab, iterations=6, max_wallclock_seconds=0.0, warmup_steps=0)
    loader = T.DistributedLoader(T.find_shards(args.data_path, "train"), vocab, T.Run(0, 1, CPU))
    model = T.build_model(args, CPU)
    opt = T.Optimizers(model, args, 1, CPU)
    calls, step = itertools.count(), opt.step
    opt.step = lambda: float("nan") if next(calls) == 2 else step()
    with pytest.raises(FloatingPointError, match="non-finite gradients at step 2"):
        T.train(args, model, model, opt, loader, T.Run(0, 1, CPU, lambda m: None), T.SharedClock(T.Run(0, 1, CPU)))
