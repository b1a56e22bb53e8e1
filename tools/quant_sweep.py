"""Quantization comparisons on the float weights + Hessians that keep_prequant.py saved
(OUT_DIR/prequant.pt, OUT_DIR as the run had it: default runs; the run's settings come with it): GPTQ vs round-to-nearest at equal bytes, by rate control starting from the run's
late-QAT grid (the clip the weights were trained onto; where its first round fits, the row is
that grid's), the tied embedding by GPTQ vs RTN, GPTQ vs RTN at fixed clips; with SWEEP_CALIB_SEQS,
first the calibration's size (SWEEP_CALIB_ONLY=1: only that); with SWEEP_AWQ_STORED, first the
script's AWQ-lite (stored scales) per alpha at the run's budget; with SWEEP_AWQ, then AWQ-lite on
the MLP's `down` folded into `up` (SWEEP_AWQ_ONLY=1: only those). Prints and appends to OUT_DIR/sweep.log."""
import argparse, dataclasses, os, sys, time


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # a wrong argument: one line, before any work
        self.exit(2, f"{self.prog}: {message} (--help: usage)\n")


OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
              epilog="No arguments: OUT_DIR and the SWEEP_* settings come from the environment.").parse_args()
import torch
sys.path[:0] = [os.getcwd(), os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]  # a run's own copy first
import train_gpt as T

run_dir = T.Hyperparameters.from_env().out_dir
if not os.path.isfile(os.path.join(run_dir, "prequant.pt")):
    sys.exit(f"quant_sweep.py: no prequant.pt in OUT_DIR={run_dir} (a run through tools/keep_prequant.py writes it)")
out = open(os.path.join(run_dir, "sweep.log"), "a")  # beside the run's files
def log(m):
    print(m, flush=True); out.write(m + "\n"); out.flush()

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.backends.cuda.matmul.allow_tf32 = True
blob = torch.load(os.path.join(run_dir, "prequant.pt"))
saved = {f.name for f in dataclasses.fields(T.Hyperparameters)} & set(blob.get("args", {}))
args = T.Hyperparameters(**{k: blob["args"][k] for k in saved}) if saved else T.Hyperparameters.from_env()
if os.environ.get("VAL_TOKENS_LIMIT"):
    args = dataclasses.replace(args, val_tokens_limit=int(os.environ["VAL_TOKENS_LIMIT"]))
log(f"sweep settings: {'the run' if saved else 'environment'}'s, grid clip {args.clip_sigmas:.3f} sigmas")
state = blob["state"]
H = {k: v.to(dev) for k, v in blob["hessians"].items()}
fmodel = T.build_model(args, dev); fmodel.load_state_dict(state); fmodel.eval()
emodel = T.build_model(args, dev); emodel.eval()
# bytes counted as the run had them, emodel's varlen segments sized as its evaluation had them
val, luts, _, sidecar = T.load_scoring_data(args, T.Run(0, 1, dev, log),
                                            T.load_tokenizer_luts(args.tokenizer_path, args.vocab_size))
T.size_varlen_segments(emodel.attention, val, args, T.Run(0, 1, dev, log))
score = T.make_score_fn(torch.compile(emodel, dynamic=False) if dev.type == "cuda" else emodel, dev)
budget = args.artifact_target_bytes - T.code_as_shipped()[1]  # the code counts as shipped
tokenizer_sha = T.file_sha256(args.tokenizer_path)


def rate_controlled(model, hessians, a=args, run=None):
    """The run's rate control under its budget, with the run's artifact header."""
    return T.quantize_to_budget(model, hessians, a, budget, run or T.Run(0, 1, dev, log), None, tokenizer_sha, sidecar)

def ev(sd, stride=None):
    emodel.load_state_dict({k: v.to(dev) for k, v in sd.items()})
    L = args.eval_seq_len
    return T.evaluate(score, val, luts, L, stride or L, args.eval_batch_seqs, T.Run(0, 1, dev))["val_bpb"]

fb = ev(state); log(f"sweep float plain {fb:.5f}")
# SWEEP_CALIB_SEQS=32,64,128: Hessians recomputed from the first N training sequences (nested
# samples: the first 64 hold the first 32), then the run's rate control and the plain round trip
if os.environ.get("SWEEP_CALIB_SEQS"):
    train_files = T.find_shards(args.data_path, "train")
    sizes = [int(x) for x in os.environ["SWEEP_CALIB_SEQS"].split(",")]
    if min(sizes) < 1:
        sys.exit(f"SWEEP_CALIB_SEQS={os.environ['SWEEP_CALIB_SEQS']}: each size must be >= 1")
    for n in sizes:
        t0 = time.time()
        cargs = dataclasses.replace(args, gptq_calib_seqs=n)
        run = T.Run(0, 1, dev, log)
        Hn = T.collect_hessians(fmodel, cargs, T.DistributedLoader(train_files, args.vocab_size, run), run)
        q = rate_controlled(fmodel, Hn, cargs, run)
        log(f"sweep calibration {n} seqs: clip {q.clip_sigmas:.3f} {len(q.data)} bytes ({time.time()-t0:.1f}s) "
            f"plain {ev(T.dequantize_entries(q.entries, cargs)):.5f}")
    if os.environ.get("SWEEP_CALIB_ONLY") == "1":
        log("sweep done"); sys.exit(0)


def awq_down(alpha, lo=0.01):
    """AWQ-lite where it costs no byte: `down`'s input columns scaled by s = (activation RMS)^alpha
    (geometric mean 1, clamped to [lo, 1/lo]) and `up`'s rows by s^-1/2, which LeakyReLU^2
    (homogeneous of degree 2) turns into 1/s on down's input: the same float model, whose `down`
    GPTQ quantizes with the Hessian of the scaled input. -> (model, Hessians)."""
    m = T.build_model(args, dev); m.load_state_dict(state); m.eval()
    H2 = dict(H)
    with torch.no_grad():
        for layer in range(args.num_layers):
            h = H[(layer, "down")].float()
            s = h.diagonal().clamp_min(1e-20).sqrt().pow(alpha)
            s = (s / s.log().mean().exp()).clamp(lo, 1 / lo)
            m.down_bank[layer].mul_(s[None, :].to(m.down_bank.dtype))
            m.up_bank[layer].mul_(s.rsqrt()[:, None].to(m.up_bank.dtype))
            H2[(layer, "down")] = (h / (s[:, None] * s[None, :])).to(H[(layer, "down")].dtype)
    return m, H2


# SWEEP_AWQ_STORED=0,0.25,0.5: per alpha, the script's AWQ-lite (AWQ_ALPHA; scales stored for
# SWEEP_AWQ_MATRICES, default the run's AWQ_MATRICES) under the run's rate control and budget: the
# float score (the float model is unchanged), clip, bytes (of them the scales'), the plain round trip
if os.environ.get("SWEEP_AWQ_STORED"):
    matrices = os.environ.get("SWEEP_AWQ_MATRICES", args.awq_matrices)
    alphas = [float(x) for x in os.environ["SWEEP_AWQ_STORED"].split(",")]
    if not all(0 <= x <= 1 for x in alphas) or not set(matrices.split(",")) <= set(T.AWQ_KINDS):
        sys.exit(f"SWEEP_AWQ_STORED: alphas in 0..1; SWEEP_AWQ_MATRICES: a comma list of {', '.join(T.AWQ_KINDS)}")
    for alpha in alphas:
        t0 = time.time()
        a = dataclasses.replace(args, awq_alpha=alpha, awq_matrices=matrices)
        q = rate_controlled(fmodel, H, a)
        plain = {k: e for k, e in q.entries.items() if not k.startswith(T.AWQ_PREFIX)}
        scale_bytes = len(q.data) - len(T.compress(T.pack_entries(plain, a, tokenizer_sha, sidecar)[0]))
        log(f"sweep awq stored alpha {alpha} [{matrices}]: float plain {fb:.5f} clip {q.clip_sigmas:.3f} {len(q.data)} bytes "
            f"({scale_bytes} of scales) ({time.time()-t0:.1f}s) plain {ev(T.dequantize_entries(q.entries, a)):.5f}")
    if os.environ.get("SWEEP_AWQ_ONLY") == "1" and not os.environ.get("SWEEP_AWQ"):
        log("sweep done"); sys.exit(0)
# SWEEP_AWQ=0,0.25,0.5: per alpha, the folded model's float score (= the run's: the fold is exact),
# then the run's rate control and the plain round trip (alpha 0 is the run's own quantization)
if os.environ.get("SWEEP_AWQ"):
    for alpha in [float(x) for x in os.environ["SWEEP_AWQ"].split(",")]:
        t0 = time.time()
        m, H2 = awq_down(alpha)
        fl = ev(m.state_dict())
        q = rate_controlled(m, H2)
        log(f"sweep awq down alpha {alpha}: float plain {fl:.5f} clip {q.clip_sigmas:.3f} {len(q.data)} bytes "
            f"({time.time()-t0:.1f}s) plain {ev(T.dequantize_entries(q.entries, args)):.5f}")
    if os.environ.get("SWEEP_AWQ_ONLY") == "1":
        log("sweep done"); sys.exit(0)
H_nohead = {k: v for k, v in H.items() if k != (-1, "head")}
for label, hs, slide in (("GPTQ (train calibration)", H, True), ("RTN", None, True), ("tok_emb RTN", H_nohead, False)):
    t0 = time.time()
    q = rate_controlled(fmodel, hs)
    e, data, clip, tries = q.entries, q.data, q.clip_sigmas, q.tries
    sd = T.dequantize_entries(e, args)
    log(f"sweep rate control [{label}]: clip {clip:.3f} {len(data)} bytes tries {tries} ({time.time()-t0:.1f}s) "
        f"plain {ev(sd):.5f}" + (f" sliding {ev(sd, args.eval_stride):.5f}" if slide else ""))
for c in (5.0, 8.0):
    for label, hs in (("GPTQ", H), ("RTN", None)):
        e = T.quantize_model(fmodel, hs, args, c)
        log(f"sweep clip {c} {label}: {len(T.compress(T.pack_entries(e, args)[0]))} bytes plain {ev(T.dequantize_entries(e, args)):.5f}")
log("sweep done")
