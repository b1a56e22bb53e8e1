"""Where a training step's GPU time goes: run train_gpt.main() unchanged (same environment as a
run, from a folder holding a copy of train_gpt.py) with torch.profiler's CUDA activity on two
training steps after compilation, then print GPU time by kernel family and the top kernels.
    ITERATIONS=8 MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=3 TTT_ENABLED=0 SKIP_SLIDING_EVAL=1 \
    VAL_TOKENS_LIMIT=100000 python3 profile_step.py
The window counts micro-batches (the run's micro-steps per step, as train_gpt resolves them): it
skips the warm-up steps and the first two training steps, and ends before late QAT."""
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path[:0] = [os.getcwd(), os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]  # a run's own copy first
import train_gpt as T

if not torch.cuda.is_available():
    sys.exit("profile_step: needs a CUDA GPU (it profiles GPU kernels)")
accum = T.Hyperparameters.from_env().resolved_grad_accum(int(os.environ.get("WORLD_SIZE", "1")))
prof = profile(activities=[ProfilerActivity.CUDA],
               schedule=schedule(wait=accum * 5, warmup=accum, active=accum * 2, repeat=1))
next_batch = T.DistributedLoader.next_batch


def stepping_next_batch(self, *a, **k):
    prof.step()
    return next_batch(self, *a, **k)


def family(name):
    n = name.lower()
    if any(s in n for s in ("gemm", "sm90", "cutlass", "nvjet", "matmul")):
        return "matmul"
    if any(s in n for s in ("flash", "attn", "flex", "sdpa", "fmha")):
        return "attention"
    return "nccl" if "nccl" in n else "triton" if "triton" in n else "other"


T.DistributedLoader.next_batch = stepping_next_batch
prof.start()
T.main()
prof.stop()
events = prof.key_averages()
total = sum(e.self_device_time_total for e in events)
if total == 0:
    sys.exit("profile_step: no GPU events in the window (too few ITERATIONS?)")
by_family = collections.Counter()
for e in events:
    by_family[family(e.key)] += e.self_device_time_total
print(f"profiled GPU time {total / 1e3:.1f} ms over 2 steps")
for name, us in by_family.most_common():
    print(f"  {name:10s} {us / 1e3:9.1f} ms {100 * us / total:5.1f}%")
for e in sorted(events, key=lambda e: -e.self_device_time_total)[:45]:
    print(f"{e.self_device_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key[:150]}")
