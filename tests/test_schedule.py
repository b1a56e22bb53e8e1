"""The schedule follows the run's length (fractions of its time budget), and every rank takes
every decision from one clock: rank 0's, shared in the per-step collective."""
import datetime
import itertools
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as T
from helpers import randomized_model, tiny_model_args, tiny_quant_args, tiny_train_args

CPU = torch.device("cpu")


def schedule_curve(total_steps: int, step_ms: float):
    """(lr scale, Muon momentum, EMA decay) at every step of a time-bound run of `total_steps`
    steps at a constant step time, with the default settings."""
    args = T.Hyperparameters(compile="0")
    budget = total_steps * step_ms / 1000
    out = []
    for k in range(total_steps):
        p = T.run_progress(args, k, k * step_ms / 1000, budget)
        plan = T.schedule_at(args, p)
        p_next = T.run_progress(args, k + 1, (k + 1) * step_ms / 1000, budget)
        out.append((plan.lr_scale, plan.muon_momentum, 1 - T.ema_weight(args, p, p_next)))
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
    assert T.schedule_at(T.Hyperparameters(min_lr_scale=0.1), 0.999).lr_scale == 0.1


def _plans(args, n=1001):
    """(progress, schedule_at) at n evenly spaced points of the run, 0 and 1 included."""
    return [(k / (n - 1), T.schedule_at(args, k / (n - 1))) for k in range(n)]


def _first(plans, holds):
    """The first progress whose plan `holds` (None: none does)."""
    return next((p for p, s in plans if holds(s)), None)


def test_schedule_at_defaults_across_the_run():
    args = T.Hyperparameters()
    plans = _plans(args)
    assert plans[0][1] == T.StepPlan(1.0, args.muon_momentum_start, 1024, False, False)
    assert plans[-1][1] == T.StepPlan(args.min_lr_scale, args.muon_momentum, 3072, True, True)
    for p, s in plans:  # 1.0, then linear to 0 over the last WARMDOWN_FRAC, floored at MIN_LR_SCALE
        assert s.lr_scale == pytest.approx(max(args.min_lr_scale, min(1.0, (1 - p) / args.warmdown_frac)), abs=1e-12)
    assert _first(plans, lambda s: s.lr_scale < 1) == pytest.approx(1 - args.warmdown_frac, abs=1e-3)
    assert _first(plans, lambda s: s.muon_momentum == args.muon_momentum) == args.muon_momentum_warmup_frac
    assert [_first(plans, lambda s, n=n: s.seq_len == n) for n in (1024, 2048, 3072)] == [0.0, 0.3, 0.6]
    assert _first(plans, lambda s: s.recurrence_on) == args.recur_start_frac
    assert _first(plans, lambda s: s.qat_on) == 0.873  # lr scale (1 - p) / 0.85 below 0.15 from p > 0.8725
    # the learning rates only fall; momentum and context only grow; a switch once on stays on
    for (_, a), (_, b) in zip(plans, plans[1:]):
        assert b.lr_scale <= a.lr_scale and b.muon_momentum >= a.muon_momentum and b.seq_len >= a.seq_len
        assert b.qat_on >= a.qat_on and b.recurrence_on >= a.recurrence_on
    # the shapes the run takes, in order: (1024, on) and (3072, off) never come
    assert T.schedule_shapes(args) == [(1024, False), (2048, False), (2048, True), (3072, True)]
    # the EMA's weight depends on the progress a step covers, not on how it is cut into steps
    assert T.ema_weight(args, 0.3, 0.3) == 0.0
    assert T.ema_weight(args, 0.2, 0.2 + args.ema_horizon) == pytest.approx(1 - math.exp(-1))
    two = (1 - T.ema_weight(args, 0.1, 0.17)) * (1 - T.ema_weight(args, 0.17, 0.4))
    assert two == pytest.approx(1 - T.ema_weight(args, 0.1, 0.4), rel=1e-12)
    assert 0 < T.ema_weight(args, 0.5, 0.51) < T.ema_weight(args, 0.5, 0.52) < 1


def test_schedule_at_edge_settings():
    def values(field, **kw):
        return {getattr(s, field) for _, s in _plans(T.Hyperparameters(**kw))}
    # no warm-down: full learning rates to the end, so late QAT (below a scale) never starts
    assert values("lr_scale", warmdown_frac=0.0) == {1.0} and values("qat_on", warmdown_frac=0.0) == {False}
    plans = _plans(T.Hyperparameters(warmdown_frac=1.0, min_lr_scale=0.0))  # over the whole run, to 0
    assert all(s.lr_scale == pytest.approx(1 - p, abs=1e-12) for p, s in plans) and plans[-1][1].lr_scale == 0
    assert values("qat_on", qat_start_scale=0.0) == {False}
    assert values("qat_on", qat_start_scale=1.5) == {True}  # above the full rate: from the first step
    assert values("muon_momentum", muon_momentum_warmup_frac=0.0) == {T.Hyperparameters().muon_momentum}
    # no recurrence (no passes or no layers), or from the start; one context length
    assert values("recurrence_on", recur_passes=0) == values("recurrence_on", recur_layers="") == {False}
    assert values("recurrence_on", recur_start_frac=0.0) == {True}
    assert values("seq_len", train_seq_schedule="", train_seq_len=512) == {512}
    assert T.schedule_shapes(T.Hyperparameters(train_seq_schedule="", recur_passes=0)) == [(2048, False)]
    assert T.schedule_shapes(T.Hyperparameters(recur_start_frac=0.0)) == [(1024, True), (2048, True), (3072, True)]
    assert T.schedule_shapes(T.Hyperparameters(recur_start_frac=1.0)) == [(1024, False), (2048, False), (3072, False)]
    assert T.ema_weight(T.Hyperparameters(ema_horizon=0.0), 0.2, 0.3) == 1.0  # no average: the weights


def _run_args(data_dir, vocab, **kw):
    """A tiny CPU run of ITERATIONS steps: step k runs at progress k / ITERATIONS."""
    return tiny_model_args(**{**dict(
        data_path=data_dir, vocab_size=vocab, num_layers=3, train_seq_len=32, eval_seq_len=32, eval_stride=16,
        gptq_calib_len=32, train_batch_tokens=128, grad_accum_steps=1, device="cpu", max_wallclock_seconds=0.0,
        gptq_reserve_seconds=0.0, train_log_every=0, seed=7, ttt_enabled=False, iterations=8, warmup_steps=0,
        train_seq_schedule="16@0,32@0.5", recur_passes=1, recur_start_frac=0.25, warmdown_frac=0.8,
        qat_start_scale=0.5, muon_momentum_warmup_frac=0.5, ema_horizon=0.2), **kw})


def _fake_schedule(args, progress):
    """Another schedule: train() must follow it as it follows the real one."""
    return T.StepPlan(0.5 + progress / 4, 0.9 - progress / 10, 32 if progress >= 0.125 else 16, progress >= 0.375,
                      progress >= 0.75)


@pytest.mark.parametrize("schedule", [T.schedule_at, _fake_schedule], ids=["schedule_at", "another"])
def test_train_takes_every_step_from_the_schedule(smoke_dataset, monkeypatch, schedule):
    """Each step's learning-rate scale, momentum, context, QAT and recurrence are the schedule's at
    the step's progress, the switches are logged at the first step whose plan flips, and the EMA
    moves by ema_weight over each step's progress."""
    data_dir, _, vocab = smoke_dataset
    args = _run_args(data_dir, vocab)
    args.validate(1)
    monkeypatch.setattr(T, "schedule_at", schedule)
    ema_steps, ema_weight = [], T.ema_weight
    monkeypatch.setattr(T, "ema_weight", lambda a, p0, p1: (ema_steps.append((p0, p1)), ema_weight(a, p0, p1))[1])
    model = T.build_model(args, CPU)
    opt = T.Optimizers(model, args, 1, CPU)
    loader = T.DistributedLoader(T.find_shards(args.data_path, "train"), vocab, T.Run(0, 1, CPU))
    seen, set_schedule, next_batch = [], opt.set_schedule, loader.next_batch

    def recording(scale, momentum):  # the step's switches are set before its schedule
        set_schedule(scale, momentum)
        seen.append([scale, momentum, None, bool(model.qat_mix), model.recurrence_active])
    opt.set_schedule = recording
    loader.next_batch = lambda seqs, n: (seen[-1].__setitem__(2, n), next_batch(seqs, n))[1]
    logs = []
    stats = T.train(args, model, model, opt, loader, T.Run(0, 1, CPU, logs.append), T.SharedClock(T.Run(0, 1, CPU)))
    plans = [schedule(args, k / 8) for k in range(8)]
    assert [T.StepPlan(*s) for s in seen] == plans
    flips = {name: next(k for k, s in enumerate(plans) if getattr(s, name)) for name in ("qat_on", "recurrence_on")}
    flips["seq_len"] = next(k for k, s in enumerate(plans) if s.seq_len == 32)
    assert len(set(flips.values())) == 3 and min(flips.values()) > 0
    assert any(m.startswith(f"training context 32 from step {flips['seq_len']} ") for m in logs), logs
    assert any(m.startswith(f"depth recurrence on at step {flips['recurrence_on']} ") for m in logs), logs
    assert any(m.startswith(f"late QAT on at step {flips['qat_on']} ") for m in logs), logs
    assert stats.qat_step == flips["qat_on"] and stats.qat_clip == args.clip_sigmas  # no budget: CLIP_SIGMAS's grid
    assert ema_steps == [(k / 8, (k + 1) / 8) for k in range(8)]


def test_compile_warmup_runs_the_schedules_shapes(smoke_dataset):
    data_dir, _, vocab = smoke_dataset
    args = _run_args(data_dir, vocab, warmup_steps=6, iterations=1)
    args.validate(1)
    model = T.build_model(args, CPU)
    opt = T.Optimizers(model, args, 1, CPU)
    loader = T.DistributedLoader(T.find_shards(args.data_path, "train"), vocab, T.Run(0, 1, CPU))
    shapes, next_batch = [], loader.next_batch
    loader.next_batch = lambda seqs, n: (shapes.append((n, model.recurrence_active)), next_batch(seqs, n))[1]
    T.train(args, model, model, opt, loader, T.Run(0, 1, CPU, lambda m: None), T.SharedClock(T.Run(0, 1, CPU)))
    assert T.schedule_shapes(args) == [(16, False), (16, True), (32, True)]
    assert shapes[:6] == [(16, False)] * 2 + [(16, True)] * 2 + [(32, True)] * 2


@pytest.mark.slow
def test_the_rate_control_starts_from_the_late_qat_grid(smoke_dataset, tmp_path):
    """The clip late QAT trained onto (train() returns it) is the rate control's first guess."""
    data_dir, tok, vocab = smoke_dataset
    env = {k: v for k, v in os.environ.items() if k.lower() not in T.Hyperparameters.__dataclass_fields__
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    settings = dict(DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=tmp_path, VOCAB_SIZE=vocab, NUM_LAYERS=3,
                    MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, ROPE_DIMS=8, TRAIN_SEQ_SCHEDULE="",
                    TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=256, GRAD_ACCUM_STEPS=1, ITERATIONS=6, MAX_WALLCLOCK_SECONDS=0,
                    WARMUP_STEPS=0, WARMDOWN_FRAC=0.8, QAT_START_SCALE=0.5, RECUR_PASSES=0, EVAL_SEQ_LEN=32,
                    EVAL_STRIDE=32, VAL_TOKENS_LIMIT=512, GPTQ_CALIB_SEQS=2, GPTQ_CALIB_LEN=32, GPTQ_BLOCK=32,
                    TTT_ENABLED=0, RUN_ID="q", ARTIFACT_TARGET_BYTES=T.code_as_shipped()[1] + 60_000)
    env.update(OMP_NUM_THREADS="1", DEVICE="cpu", COMPILE="0", **{k: str(v) for k, v in settings.items()})
    p = subprocess.run([sys.executable, os.path.join(os.path.dirname(T.__file__), "train_gpt.py")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    grid = re.search(r"^late QAT on at step \d+ \(lr scale [\d.]+\), grid clip ([\d.]+) sigmas", p.stdout, re.M).group(1)
    assert re.search(rf"^rate control 0: clip {grid} sigmas", p.stdout, re.M), p.stdout
    assert float(grid) != T.Hyperparameters().clip_sigmas  # the budget's grid, not CLIP_SIGMAS


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

        def recording(scale, momentum):
            orig(scale, momentum)
            seen.append((scale, momentum, float(model.qat_mix)))
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
    assert r0["seen"] == r1["seen"]  # learning rate, momentum, QAT, step by step
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
    opt.step = lambda: torch.tensor(float("nan")) if next(calls) == 2 else step()  # the norm, on the device
    with pytest.raises(FloatingPointError, match="non-finite gradients at step 2"):
        T.train(args, model, model, opt, loader, T.Run(0, 1, CPU, lambda m: None), T.SharedClock(T.Run(0, 1, CPU)))
