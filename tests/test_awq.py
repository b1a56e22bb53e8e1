"""AWQ-lite with stored scales (AWQ_ALPHA, AWQ_MATRICES): the settings' checks; alpha 0 is the plain
artifact byte for byte, unit scales are plain GPTQ exactly; the scales travel through the artifact
and dequantization divides by them where (and only where) they apply; down's fold into up is exact
in float; on skewed activations AWQ lowers the Hessian-weighted error at equal clip and at equal
bytes; the rate control's size model reads the scaled banks; EVAL_ONLY scores an AWQ artifact as
the run did, and tools/quant_sweep.py's SWEEP_AWQ_STORED reproduces the run's own quantization."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import train_gpt as T
from helpers import REPO_ROOT
from helpers import randomized_model, clean_env, tiny_model_args

pytestmark = pytest.mark.usefixtures("one_thread_math")

CPU = torch.device("cpu")
HOT = 4  # input channels with a large RMS, per matrix input


def tiny_args(**kw):
    return tiny_model_args(**{**dict(vocab_size=512, gptq_block=32, seed=3), **kw})


def awq_args(alpha=0.5, matrices="qkv,out,up", **kw):
    return tiny_args(awq_alpha=alpha, awq_matrices=matrices, **kw)


@pytest.fixture(scope="module")
def model():
    return randomized_model(tiny_args(), seed=1)


def skewed_hessian(c, g, n=2048, gain=8.0):
    """X^T X / n of Gaussian inputs whose HOT random channels have `gain` x the RMS of the rest."""
    X = torch.randn(n, c, generator=g)
    X[:, torch.randperm(c, generator=g)[:HOT]] *= gain
    return X.T @ X / n


@pytest.fixture(scope="module")
def hessians():
    a, g = tiny_args(), torch.Generator().manual_seed(0)
    H = {(-1, "head"): skewed_hessian(a.model_dim, g)}
    for layer in range(a.num_layers):
        for kind in ("qkv", "out", "up"):
            H[(layer, kind)] = skewed_hessian(a.model_dim, g)
        H[(layer, "down")] = skewed_hessian(a.mlp_hidden, g)
    return H


def packed(entries, args):
    return T.pack_entries(entries, args)[0]


def weighted_error(model, state, hessians, args, kinds=T.AWQ_KINDS):
    """sum over the bank matrices whose input kind is in `kinds` of tr((W - Wq) H (W - Wq)^T)."""
    keys, total = T.bank_hessian_keys(args), 0.0
    for name, bank in model.banks().items():
        for i, key in enumerate(keys[name]):
            if key[1] in kinds:
                E = bank.detach()[i] - state[f"{name}_bank"][i]
                total += float(((E @ hessians[key]) * E).sum())
    return total


def test_awq_settings_are_checked():
    a = T.Hyperparameters.from_env({"AWQ_ALPHA": "0.5", "AWQ_MATRICES": "qkv, down"})
    a.validate(1)
    assert a.awq_kinds() == ["qkv", "down"]
    assert T.Hyperparameters().awq_kinds() == [] and T.Hyperparameters().awq_alpha == 0  # off by default
    assert dataclasses.replace(a, awq_alpha=0.0).awq_kinds() == []
    with pytest.raises(T.ConfigError, match=r"AWQ_ALPHA=1.5 must be in 0..1"):
        T.Hyperparameters(awq_alpha=1.5).validate(1)
    with pytest.raises(T.ConfigError, match=r"AWQ_MATRICES='qkv,ffn': 'ffn' not among qkv, out, up, down"):
        T.Hyperparameters(awq_alpha=0.5, awq_matrices="qkv,ffn").validate(1)
    assert "awq_alpha" not in dataclasses.asdict(a.model)  # not in the artifact's header: its entries say it


def test_alpha_zero_is_the_plain_artifact_byte_for_byte(model, hessians, monkeypatch):
    """AWQ_ALPHA=0 (whatever AWQ_MATRICES) packs what the code without AWQ-lite packs: no scale
    entries, the same bytes; alpha 0.5 does not (the control)."""
    plain = packed(T.quantize_model(model, hessians, tiny_args(), 6.5), tiny_args())
    zero = T.quantize_model(model, hessians, awq_args(0.0, "qkv,out,up,down"), 6.5)
    assert not [n for n in zero if n.startswith(T.AWQ_PREFIX)]
    assert packed(zero, tiny_args()) == plain
    assert packed(T.quantize_model(model, hessians, awq_args(0.5), 6.5), tiny_args()) != plain
    monkeypatch.setattr(T, "awq_transform", lambda banks, h, args: (banks, h, {}))  # the code before AWQ-lite
    assert packed(T.quantize_model(model, hessians, tiny_args(), 6.5), tiny_args()) == plain


def test_unit_scales_are_plain_gptq_exactly(model, hessians, monkeypatch):
    """With every scale 1 the scaled banks, Hessians and codes are the plain ones bit for bit, and
    so is the dequantized model; the scale entries are stored (all ones)."""
    args = awq_args(0.5, "qkv,out,up,down")
    monkeypatch.setattr(T, "awq_scales", lambda h, a: {(l, k): torch.ones(h[(l, k)].size(0))
                                                       for k in a.awq_kinds() for l in range(a.num_layers)})
    awq = T.quantize_model(model, hessians, args, 6.5)
    plain = T.quantize_model(model, hessians, tiny_args(), 6.5)
    stored = {n: e for n, e in awq.items() if n.startswith(T.AWQ_PREFIX)}
    assert sorted(stored) == sorted(f"awq.{k}.{l}" for k in ("qkv", "out", "up") for l in range(args.num_layers))
    assert all(e.value.dtype == torch.float16 and bool((e.value == 1).all()) for e in stored.values())
    assert packed({n: e for n, e in awq.items() if n not in stored}, args) == packed(plain, args)
    a, b = T.dequantize_entries(awq, args), T.dequantize_entries(plain, args)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_scales_round_trip_through_the_artifact(model, hessians):
    """qkv and up scaled: their scales come back from pack -> compress -> decompress -> unpack bit
    for bit, dequantization divides each matrix by its input's scale (Q / s), the weights stay
    within the quantization error; out, down and every other tensor are the plain ones exactly."""
    args = awq_args(0.5, "qkv,up")
    entries = T.quantize_model(model, hessians, args, 6.5)
    back, config = T.unpack_entries(T.decompress(T.compress(packed(entries, args))))
    assert list(back) == list(entries) and "awq_alpha" not in config
    L, d = args.num_layers, args.model_dim
    assert [n for n in back if n.startswith(T.AWQ_PREFIX)] == [f"awq.{k}.{l}" for k in ("qkv", "up") for l in range(L)]
    for name, e in entries.items():
        if e.kind == "float":
            assert torch.equal(back[name].value.view(torch.int16), e.value.view(torch.int16)), name
        else:
            assert torch.equal(back[name].q, e.q) and torch.equal(back[name].scale, e.scale), name
    banks, H2, scales = T.awq_transform(model.banks(), hessians, args)  # what GPTQ took
    s = scales[(0, "qkv")]
    torch.testing.assert_close(H2[(0, "qkv")], hessians[(0, "qkv")] / (s[:, None] * s[None, :]))
    assert torch.equal(banks["kv"][L], model.kv_bank.detach()[L] * s) and torch.equal(back["awq.qkv.0"].value.float(), s)
    state = T.dequantize_entries(back, args)
    for layer in range(L):  # s = (activation RMS)^alpha, geometric mean 1, on the 2^(1/32) grid
        s = back[f"awq.up.{layer}"].value.float()
        assert s.shape == (d,)
        rms = hessians[(layer, "up")].diagonal().sqrt()
        want = rms.pow(0.5) / rms.pow(0.5).log().mean().exp()
        assert torch.allclose(s, want, rtol=0.012) and abs(float(s.log().mean())) < 0.01
        steps = s.log2() * T.AWQ_SCALE_STEPS_PER_OCTAVE
        assert float((steps - steps.round()).abs().max()) < 0.05
        up = back[f"up_bank.{layer}"]
        assert torch.equal(state["up_bank"][layer], up.q.float() * up.scale.float()[:, None] / s)
    plain = T.dequantize_entries(T.quantize_model(model, hessians, tiny_args(), 6.5), args)
    same = {"qo_bank": range(L, 2 * L), "down_bank": range(L)}  # out and down: unscaled inputs
    differ = {"qo_bank": range(L), "kv_bank": range(2 * L), "up_bank": range(L)}  # q, k, v, up
    assert all(torch.equal(state[b][i], plain[b][i]) for b, rows in same.items() for i in rows)
    assert all(not torch.equal(state[b][i], plain[b][i]) for b, rows in differ.items() for i in rows)
    assert all(torch.equal(state[k], plain[k]) for k in state if not k.endswith("_bank"))
    for name, bank in model.banks().items():  # within the quantization error
        rel = (state[f"{name}_bank"] - bank.detach()).norm() / bank.detach().norm()
        assert float(rel) < 0.1, (name, float(rel))


def test_scales_for_inputs_the_model_lacks_are_refused(model, hessians):
    entries = T.quantize_model(model, hessians, awq_args(0.5), 6.5)
    entries["awq.qkv.7"] = entries.pop("awq.qkv.1")  # a 2-layer model
    with pytest.raises(T.ArtifactError, match=r"AWQ scales for inputs the model lacks: \[\(7, 'qkv'\)\]"):
        T.dequantize_entries(entries, tiny_args())


def test_down_folds_into_up_exactly(model, hessians):
    """AWQ_MATRICES=down: down's columns times s, up's rows times s^-1/2 (LeakyReLU^2 is homogeneous
    of degree 2): the same float model, nothing stored; down's Hessian becomes diag(1/s) H diag(1/s)."""
    args = awq_args(0.5, "down")
    banks, H2, stored = T.awq_transform(model.banks(), hessians, args)
    assert stored == {}
    s = T.awq_scales(hessians, args)[(0, "down")]
    torch.testing.assert_close(H2[(0, "down")], hessians[(0, "down")] / (s[:, None] * s[None, :]))
    assert all(H2[k] is hessians[k] for k in hessians if k[1] != "down")
    assert torch.equal(banks["qo"], model.qo_bank.detach()) and not torch.equal(banks["up"], model.up_bank.detach())
    folded = randomized_model(tiny_args(), seed=1)
    with torch.no_grad():
        folded.up_bank.copy_(banks["up"])
        folded.down_bank.copy_(banks["down"])
        ids = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(folded(ids), model(ids), rtol=1e-5, atol=1e-5)
    entries = T.quantize_model(model, hessians, args, 6.5)
    assert not [n for n in entries if n.startswith(T.AWQ_PREFIX)]
    assert len(packed(entries, args)) == len(packed(T.quantize_model(model, hessians, tiny_args(), 6.5), args))


def test_awq_lowers_the_hessian_weighted_error(model, hessians):
    """A few input channels with 8x the RMS of the rest: AWQ at alpha 0.5 on qkv, out and up lowers
    tr((W - Wq) H (W - Wq)^T) of those matrices to under 0.45x at equal clip and at equal bytes (both
    rate-controlled into the same budget's band, the scales' bytes counted): 0.43x and 0.42x here."""
    plain_args, args = tiny_args(), awq_args(0.5)
    stored = ("qkv", "out", "up")

    def err(entries, a):
        return weighted_error(model, T.dequantize_entries(entries, a), hessians, a, stored)
    e_plain = err(T.quantize_model(model, hessians, plain_args, 6.5), plain_args)
    e_awq = err(T.quantize_model(model, hessians, args, 6.5), args)
    assert e_awq < 0.45 * e_plain, (e_awq, e_plain)
    budget = len(T.compress(packed(T.quantize_model(model, hessians, plain_args, 8.0), plain_args)))
    errors = []
    for a in (plain_args, args):
        q = T.quantize_to_budget(model, hessians, dataclasses.replace(a, rate_tries=4), budget, T.Run(0, 1, CPU))
        assert T.RATE_BAND * budget <= len(q.data) <= budget, q.tries
        errors.append(err(q.entries, a))
    assert errors[1] < 0.45 * errors[0], errors


def test_rate_control_predicts_from_the_scaled_banks(model, hessians, monkeypatch):
    """The size model (clip_for_size_change) reads the banks GPTQ quantizes: the scaled ones under
    AWQ-lite, the model's own without; the size floor counts one byte per stored scale."""
    seen, real = [], T.clip_for_size_change

    def spy(m, a, clip, delta):
        seen.append(m)
        return real(m, a, clip, delta)
    monkeypatch.setattr(T, "clip_for_size_change", spy)
    for a in (tiny_args(rate_tries=2), awq_args(0.5, rate_tries=2)):
        T.quantize_to_budget(model, hessians, a, 30_000, T.Run(0, 1, CPU))
    assert seen[0] is model and isinstance(seen[-1], T.ScaledBanks)
    want = T.awq_transform(model.banks(), hessians, awq_args(0.5))[0]
    assert all(torch.equal(seen[-1].banks()[k], want[k]) for k in want)
    L, d = model.args.num_layers, model.args.model_dim
    least = T.least_model_bytes(model, tiny_args())
    assert T.least_model_bytes(model, awq_args(0.5)) == least + 3 * L * d
    assert T.least_model_bytes(model, awq_args(0.5, "qkv,out,up,down")) == least + 3 * L * d  # the fold is free


# ----------------------------------------------------------------------------- through the script

TINY_RUN = dict(VOCAB_SIZE=512, NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, RECUR_PASSES=0,
                ROPE_DIMS=8, TRAIN_SEQ_LEN=64, TRAIN_BATCH_TOKENS=512, GRAD_ACCUM_STEPS=1, ITERATIONS=4,
                MAX_WALLCLOCK_SECONDS=0, WARMUP_STEPS=1, WARMDOWN_FRAC=0.5, EVAL_SEQ_LEN=64, EVAL_STRIDE=32,
                EVAL_BATCH_SEQS=8, VAL_TOKENS_LIMIT=1024, GPTQ_CALIB_SEQS=4, GPTQ_CALIB_LEN=64, GPTQ_BLOCK=32,
                RUN_ID="t", SEED=1, TTT_ENABLED=0)


def final_lines(text):
    return re.findall(r"^final_int6_\w+ val_loss:\S+ val_bpb:\S+", text, re.M)


@pytest.fixture(scope="module")
def awq_run(smoke_dataset, tmp_path_factory):
    """A tiny run with AWQ_ALPHA=0.5 through tools/keep_prequant.py (the script unchanged, its float
    weights and Hessians kept) -> (stdout, artifact path, results, environment, folder)."""
    data_dir, tok, _ = smoke_dataset
    out = tmp_path_factory.mktemp("awq_run")
    env = clean_env(DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=out, AWQ_ALPHA=0.5, **TINY_RUN)
    p = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "keep_prequant.py")], cwd=out, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout, str(out / "final_model_t.int6.ptz"), json.loads((out / "results_t.json").read_text()), env, out


@pytest.mark.slow
def test_eval_only_scores_an_awq_artifact_as_the_run_did(awq_run, smoke_dataset):
    """EVAL_ONLY of the AWQ artifact, with no AWQ setting given (the artifact's entries carry the
    scales): the run's round-trip and sliding lines to the last digit; without the scales the
    dequantized banks would differ."""
    stdout, artifact, _, _, _ = awq_run
    data_dir, tok, _ = smoke_dataset
    entries, _ = T.load_artifact(artifact)
    assert {f"awq.{k}.{l}" for k in ("qkv", "out", "up") for l in range(2)} <= set(entries)
    logs = []
    args = T.Hyperparameters(eval_only=artifact, data_path=data_dir, tokenizer_path=tok, eval_seq_len=64, eval_stride=32,
                             eval_batch_seqs=8, val_tokens_limit=1024, ttt_enabled=False, compile="0", device="cpu")
    T.run_eval_only(args, T.Run(0, 1, CPU, logs.append))
    assert len(final_lines(stdout)) == 2 and final_lines("\n".join(logs)) == final_lines(stdout)
    plain = {n: e for n, e in entries.items() if not n.startswith(T.AWQ_PREFIX)}
    a, b = T.dequantize_entries(entries, tiny_args()), T.dequantize_entries(plain, tiny_args())
    assert not torch.equal(a["up_bank"], b["up_bank"]) and torch.equal(a["down_bank"], b["down_bank"])


@pytest.mark.slow
def test_sweep_measures_stored_awq_at_the_runs_budget(awq_run):
    """tools/quant_sweep.py SWEEP_AWQ_STORED=0,0.5 on the run's float weights: the float score is the
    run's, alpha 0.5 (the run's) is the run's own artifact (bytes, round trip), alpha 0 stores no
    scale and quantizes otherwise; each row says its scales' bytes."""
    stdout, _, results, env, out = awq_run
    p = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "quant_sweep.py")], cwd=out,
                       env={**env, "SWEEP_AWQ_STORED": "0,0.5", "SWEEP_AWQ_ONLY": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = re.findall(r"^sweep awq stored alpha (\S+) \[qkv,out,up\]: float plain (\S+) clip \S+ (\d+) bytes "
                      r"\((-?\d+) of scales\) .* plain (\S+)$", p.stdout, re.M)
    assert [r[0] for r in rows] == ["0.0", "0.5"], p.stdout
    run_float = float(re.search(r"^prequant_float val_loss:\S+ val_bpb:(\S+)", stdout, re.M).group(1))
    assert all(float(r[1]) == pytest.approx(run_float, abs=1e-5) for r in rows)
    roundtrip = float(re.search(r"^final_int6_roundtrip val_loss:\S+ val_bpb:(\S+)", stdout, re.M).group(1))
    (_, _, b0, s0, bpb0), (_, _, b5, s5, bpb5) = rows
    assert int(b5) == results["model_bytes"] and float(bpb5) == pytest.approx(roundtrip, abs=1e-5)
    assert int(s0) == 0 < int(s5) and (b0, bpb0) != (b5, bpb5)
    assert "sweep done" in p.stdout and "sweep rate control" not in p.stdout and "sweep awq down" not in p.stdout
    assert math.isfinite(float(bpb0))
