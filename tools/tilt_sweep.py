"""N-gram tilt settings against one artifact, in one forward pass: for each hint rule
(NGRAM_CONF x NGRAM_MIN_COUNT) and each fixed NGRAM_BETA (SWEEP_BETAS, "b=") or NGRAM_LIFT
(SWEEP_LIFTS, "r="), the bpb of the tilted plain (non-overlapping window) scores against the
untilted one. The tilt of a target is closed-form in log p(y) and
log p(hint), so the model runs once and every (rule, beta) is exact arithmetic on those.

    EVAL_ONLY=path/to/final_model_seed42.int6.ptz DATA_PATH=... TOKENIZER_PATH=... \
        [SWEEP_EVERY=K] python3 tools/tilt_sweep.py

SWEEP_SAVE=FILE keeps what the table is computed from (torch.save: the scored positions, log p(y),
log p(hint), the hints, the targets, the bytes) for other rules of use. SWEEP_EVERY=K scores every
K-th window only (a sample spread over the whole stream, whose hints
come from everything before it, as in a full evaluation). Hints in the stream's order (the sliding scorer's; TTT's order hints about as often, RESULTS.md).
Plain windows see less context than sliding ones, so the absolute bpb is the round trip's, and
the tilt's gain here a guide to the settings, not the sliding or TTT gain: confirm the chosen
setting by EVAL_ONLY."""
import dataclasses, itertools, math, os, sys, time
import torch
sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]
import train_gpt as T

CONFS = [float(v) for v in os.environ.get("SWEEP_CONFS", "0.8,0.9,0.95,0.99").split(",")]
COUNTS = [int(v) for v in os.environ.get("SWEEP_COUNTS", "2,3,4,6").split(",")]
EVERY = int(os.environ.get("SWEEP_EVERY", "1"))
BETAS = [float(v) for v in os.environ.get("SWEEP_BETAS", "0.5,1,2,2.625").split(",") if v]
LIFTS = [float(v) for v in os.environ.get("SWEEP_LIFTS", "0.4,0.5,0.6,0.7,0.8").split(",") if v]


def main():
    args = T.Hyperparameters.from_env()
    if not args.eval_only:
        sys.exit("tilt_sweep.py: set EVAL_ONLY to an artifact")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = T.Run(0, 1, dev, print)
    entries, config = T.load_artifact(args.eval_only)
    config.pop(T.TOKENIZER_KEY, None)
    config.pop(T.SIDECAR_KEY, None)
    args = dataclasses.replace(args, **T.settings_from_header(config, args.eval_only))
    luts = T.load_tokenizer_luts(args.tokenizer_path, args.vocab_size)
    val, byte_source, _, _ = T.load_scoring_data(args, run, luts)
    model = T.build_model(args, dev)
    T.size_varlen_segments(model.attention, val, args, run)
    model.load_state_dict(T.dequantize_entries(entries, args), strict=True)
    model.eval()

    t0 = time.perf_counter()
    rules = list(itertools.product(CONFS, COUNTS))
    hints = []
    for conf, count in rules:
        hints.append(T.ngram_hints(val, dataclasses.replace(args, ngram_conf=conf, ngram_min_count=count)))
    print(f"hints for {len(rules)} rules in {time.perf_counter() - t0:.1f}s", flush=True)

    n, L = val.numel() - 1, args.eval_seq_len
    logp_y = torch.zeros(n, dtype=torch.float64)
    logp_h = torch.zeros(len(rules), n, dtype=torch.float64)
    nbytes = 0.0
    scored = torch.zeros(n, dtype=torch.bool)
    windows = T.sliding_windows(n, L, L)[::EVERY]  # the round trip's windows (stride = length)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, (w0, ln, first) in enumerate(windows):
            lo, hi = w0 + first, w0 + ln  # the targets this window scores: lo+1..hi
            scored[lo:hi] = True
            x, y = val[w0:w0 + ln][None], val[w0 + 1:w0 + 1 + ln][None]
            with T._autocast(dev):
                lp = torch.log_softmax(model(x).float(), -1)[0, first:]
            logp_y[lo:hi] = lp.gather(-1, val[lo + 1:hi + 1][:, None])[:, 0].double().cpu()
            for r, h in enumerate(hints):
                logp_h[r, lo:hi] = lp.gather(-1, h[lo + 1:hi + 1].clamp_min(0)[:, None])[:, 0].double().cpu()
            pos = torch.arange(w0 + 1, w0 + 1 + ln, device=dev)[None]
            nbytes += float(byte_source.target_bytes(x, y, pos)[:, first:].double().sum())
            if (i + 1) % 32 == 0 or i + 1 == len(windows):
                print(f"  {i + 1}/{len(windows)} windows, {int(scored.sum())} targets, {time.perf_counter() - t0:.0f}s",
                      flush=True)
    if os.environ.get("SWEEP_SAVE"):
        torch.save({"rules": rules, "scored": scored, "logp_y": logp_y, "logp_h": logp_h, "nbytes": nbytes,
                    "hints": torch.stack([h[1:].cpu() for h in hints]), "targets": val[1:].cpu()}, os.environ["SWEEP_SAVE"])
    base = -logp_y.sum()
    denom = math.log(2) * nbytes
    y_all = val[1:].cpu()
    print(f"untilted bpb {float(base) / denom:.5f} over {int(scored.sum())} of {n} targets (every {EVERY}. window "
          f"of {L}), {nbytes:.0f} bytes")
    columns = [(b, 0.0) for b in BETAS] + [(0.0, r) for r in LIFTS]
    print("the tilt's bpb change:\nconf  count  hinted  right  "
          + "  ".join(f"r={r:<6g}" if r else f"b={b:<6g}" for b, r in columns))
    for r, (conf, count) in enumerate(rules):
        h = hints[r][1:].cpu()
        on = (h >= 0) & scored
        right = (h == y_all) & on
        cells = []
        for beta, lift in columns:
            tilt = T.tilt_shift(logp_h[r], right.double(), beta, lift)
            cells.append(f"{float(base + tilt[on].sum()) / denom - float(base) / denom:+.5f}")
        print(f"{conf:<5g} {count:<6d} {float(on.sum()) / max(1, int(scored.sum())):6.1%} "
              f"{float(right.sum()) / max(1, int(on.sum())):6.1%}  "
              + "  ".join(f"{c:<8s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
