"""Evaluation tests: byte accounting against SentencePiece decoding, the sliding-window plan
and its split across ranks, evaluate() against independent references (plain and sliding),
score-first test-time training, and EVAL_ONLY never touching a train shard."""
import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import smoke_data
import train_gpt as T
from conftest import REPO_ROOT
from helpers import randomized_model

pytestmark = pytest.mark.usefixtures("one_thread_math")

CPU = torch.device("cpu")
# the challenge's tokenizers, in the shared/ folder beside the checkout (CI has it there)
SHARED_TOKENIZERS = os.path.join(os.path.dirname(REPO_ROOT), "shared", "tokenizers")


def tiny_args(**kw):
    base = dict(vocab_size=512, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
                rope_dims=8, bigram_vocab=64, bigram_dim=16, ve_dim=16, train_seq_len=64, eval_seq_len=64,
                eval_stride=16, eval_batch_seqs=3, gptq_calib_len=64, attn_backend="math", compile="0", seed=5)
    base.update(kw)
    return T.Hyperparameters(**base)


@pytest.fixture(scope="module")
def sp_and_luts(smoke_dataset):
    import sentencepiece as spm
    data_dir, tok, vocab = smoke_dataset
    return spm.SentencePieceProcessor(model_file=tok), T.load_tokenizer_luts(tok, vocab)


@pytest.fixture(scope="module")
def val_tokens(smoke_dataset):
    data_dir, tok, vocab = smoke_dataset
    return T.load_validation_tokens(data_dir, vocab)


@pytest.fixture(scope="module")
def model():
    return randomized_model(tiny_args(), seed=3)


def doc_bytes_by_luts(luts, ids, bos=1):
    seq = torch.tensor([bos] + list(ids))
    return int(luts.target_bytes(seq[:-1], seq[1:]).sum())


# ----------------------------------------------------------------------------- byte accounting

EXTRA_TEXTS = [
    "café naïve über",
    "Every river in Paris; café naïve über.",
    "日本語 🎉 Ω and ASCII after it",
    "tabs\tand  double  spaces\nand a newline",
    "  leading spaces, trailing spaces  ",
    "€100 — 50% off!! ¿Qué? Ünïcödé",
    "x",
]


def test_byte_accounting_matches_decoded_utf8(sp_and_luts):
    sp, luts = sp_and_luts
    texts = smoke_data.make_docs(40, seed=123) + EXTRA_TEXTS
    saw_byte = saw_multibyte_piece = False
    for text in texts:
        ids = sp.encode(text)
        assert ids, text
        saw_byte |= any(sp.is_byte(i) for i in ids)
        saw_multibyte_piece |= any(not sp.is_byte(i) and len(sp.id_to_piece(i).encode()) > len(sp.id_to_piece(i))
                                   for i in ids)
        assert doc_bytes_by_luts(luts, ids) == len(sp.decode(ids).encode("utf-8")), text
    assert saw_byte and saw_multibyte_piece  # byte fallback and non-ASCII pieces were exercised


def test_byte_accounting_on_the_val_stream(sp_and_luts, val_tokens):
    """Concatenated documents ([BOS] doc [BOS] doc ...): the BOS target is 0 bytes and the
    first piece of a document gets no leading-space byte."""
    sp, luts = sp_and_luts
    toks = val_tokens.tolist()
    assert toks[0] == 1
    starts = [i for i, t in enumerate(toks) if t == 1] + [len(toks)]
    expect = sum(len(sp.decode(toks[a + 1:b]).encode("utf-8")) for a, b in zip(starts[:-1], starts[1:]))
    got = int(luts.target_bytes(val_tokens[:-1], val_tokens[1:]).sum())
    assert len(starts) > 10 and got == expect


def test_byte_luts_flags(sp_and_luts):
    sp, luts = sp_and_luts
    for i in (0, 1, 2, 3):  # pad, bos, eos, unk
        assert luts.boundary[i] and luts.base[i] == 0
    b = sp.piece_to_id("<0xE6>")
    assert sp.is_byte(b) and luts.base[b] == 1 and not luts.space[b] and not luts.boundary[b]
    p = sp.piece_to_id("\u2581café")
    if p != sp.unk_id():
        assert luts.space[p] and luts.base[p] == len("café".encode())


@pytest.mark.parametrize("vocab", [1024, 8192])
def test_byte_accounting_challenge_tokenizer(vocab):
    import sentencepiece as spm
    path = os.path.join(SHARED_TOKENIZERS, f"fineweb_{vocab}_bpe.model")
    if not os.path.isfile(path):
        assert not os.environ.get("CI"), f"CI must have the challenge tokenizer at {path}"
        pytest.skip(f"challenge tokenizer not at {path}")
    sp = spm.SentencePieceProcessor(model_file=path)
    luts = T.load_tokenizer_luts(path, vocab)
    texts = smoke_data.make_docs(20, seed=5)
    texts = [t.replace("café naïve über", "cafe naive uber") for t in texts] + [
        "The quick brown fox jumps over the lazy dog. 1234567890",
        "  Multiple   spaces,\tand tabs; punctuation!? (parens) 3.14 - \"quoted\" it's",
        "x"]
    for text in texts:
        assert text.isascii()
        ids = sp.encode(text)
        # this tokenizer has no byte fallback: characters it lacks become <unk>, whose text is lost
        assert sp.unk_id() not in ids, text
        assert doc_bytes_by_luts(luts, ids) == len(sp.decode(ids).encode("utf-8")), text


def test_tokenizer_errors(smoke_dataset, tmp_path):
    _, tok, vocab = smoke_dataset
    with pytest.raises(T.DataError, match="VOCAB_SIZE"):
        T.load_tokenizer_luts(tok, vocab * 2)
    with pytest.raises(T.DataError):
        T.load_tokenizer_luts(str(tmp_path / "missing.model"), vocab)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(T.DataError):
        T.load_tokenizer_luts(str(junk), vocab)


# ----------------------------------------------------------------------------- sliding windows

PLANS = [(1, 8, 4), (5, 8, 4), (8, 8, 8), (9, 8, 8), (9, 8, 1), (100, 16, 16), (100, 16, 5), (101, 16, 1),
         (257, 64, 16), (1000, 64, 64), (1000, 64, 48), (1000, 64, 7), (63, 64, 64)]


@pytest.mark.parametrize("n,seq_len,stride", PLANS)
def test_sliding_windows_plan(n, seq_len, stride):
    windows = T.sliding_windows(n, seq_len, stride)
    L = min(seq_len, n)
    for world in (1, 2, 3, 8):
        shares = [T.rank_share(windows, r, world) for r in range(world)]
        assert [w for s in shares for w in s] == windows  # contiguous, disjoint, covering, in order
        counts = np.zeros(n, dtype=np.int64)
        for share in shares:
            for start, length, first in share:
                assert length == L
                assert 0 <= start and start + length <= n and 0 <= first < length
                counts[start + first:start + length] += 1
        assert np.all(counts == 1), (world, np.nonzero(counts != 1))
    assert windows[0][0] == 0 and windows[0][2] == 0 and windows[-1][0] + windows[-1][1] == n
    for start, length, first in windows[1:]:
        # every target after the first window sees at least seq_len - stride earlier tokens
        assert first >= seq_len - stride
        assert length - first <= stride


# ----------------------------------------------------------------------------- evaluate vs references

def nll_of_window(model, tokens, start, end):
    with torch.no_grad():
        logits = model(tokens[start:end][None])[0].float()
    return F.cross_entropy(logits, tokens[start + 1:end + 1], reduction="none").double()


def reference_plain(model, tokens, seq_len):
    """Non-overlapping windows of seq_len; a short tail is scored from a window shifted back
    to full length (only its new targets count)."""
    n = tokens.numel() - 1
    seq_len = min(seq_len, n)
    total, count = 0.0, 0
    for c0 in range(0, n, seq_len):
        c1 = min(c0 + seq_len, n)
        ws = c1 - seq_len
        nll = nll_of_window(model, tokens, ws, c1)
        total += float(nll[c0 - ws:c1 - ws].sum())
        count += c1 - c0
    assert count == n
    return total, count


def reference_sliding(model, tokens, seq_len, stride):
    """Each target t scored alone, from the window the plan implies: targets < seq_len by the
    first window [0, seq_len); later targets by the window ending at the end of their stride
    block (blocks of `stride` targets from seq_len on; the last block ends at n)."""
    n = tokens.numel() - 1
    assert n >= seq_len
    cache, total = {}, 0.0
    for t in range(n):
        if t < seq_len:
            end = seq_len
        else:
            end = min(seq_len + ((t - seq_len) // stride + 1) * stride, n)
        start = end - seq_len
        if start not in cache:
            cache[start] = nll_of_window(model, tokens, start, end)
        total += float(cache[start][t - start])
    return total, n


def check_metrics(m, ref_nll, ref_count, ref_bytes):
    assert m["tokens"] == ref_count
    assert m["bytes"] == ref_bytes
    assert m["val_loss"] == pytest.approx(ref_nll / ref_count, rel=1e-6)
    assert m["val_bpb"] == pytest.approx(ref_nll / math.log(2) / ref_bytes, rel=1e-6)


@pytest.mark.parametrize("n,seq_len,batch", [(64 * 5 + 37, 64, 3), (64 * 4, 64, 4), (40, 64, 2)])
def test_evaluate_plain_matches_naive_reference(model, sp_and_luts, val_tokens, n, seq_len, batch):
    _, luts = sp_and_luts
    tokens = val_tokens[:n + 1]
    ref_bytes = int(luts.target_bytes(tokens[:-1], tokens[1:]).sum())
    ref_nll, ref_count = reference_plain(model, tokens, seq_len)
    m = T.evaluate(T.make_score_fn(model, CPU), tokens, luts, seq_len, seq_len, batch, 0, 1, CPU)
    check_metrics(m, ref_nll, ref_count, ref_bytes)


@pytest.mark.parametrize("n,seq_len,stride,batch", [(300, 64, 16, 3), (257, 64, 48, 4), (200, 32, 1, 16)])
def test_evaluate_sliding_matches_brute_force(model, sp_and_luts, val_tokens, n, seq_len, stride, batch):
    _, luts = sp_and_luts
    tokens = val_tokens[:n + 1]
    ref_bytes = int(luts.target_bytes(tokens[:-1], tokens[1:]).sum())
    ref_nll, ref_count = reference_sliding(model, tokens, seq_len, stride)
    score = T.make_score_fn(model, CPU)
    spans = []
    m = T.evaluate(score, tokens, luts, seq_len, stride, batch, 0, 1, CPU,
                   on_score=lambda lo, hi: spans.append((lo, hi)))
    check_metrics(m, ref_nll, ref_count, ref_bytes)
    assert sorted(spans) == spans and spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans[:-1], spans[1:]))  # exact cover
    # context matters for this model: the sliding score differs from the plain one
    plain_nll, _ = reference_plain(model, tokens, seq_len)
    assert abs(plain_nll - ref_nll) > 1e-4 * abs(ref_nll)
    # split over ranks (no process group: each rank returns its own share's sums)
    for world in (2, 3):
        parts = [T.evaluate(score, tokens, luts, seq_len, stride, batch, r, world, CPU) for r in range(world)]
        assert sum(p["tokens"] for p in parts) == n
        assert sum(p["bytes"] for p in parts) == ref_bytes
        nll = sum(p["val_loss"] * p["tokens"] for p in parts if p["tokens"])
        assert nll == pytest.approx(ref_nll, rel=1e-6)


# ----------------------------------------------------------------------------- test-time training

def ttt_args(**kw):
    base = dict(eval_seq_len=64, eval_stride=32, eval_batch_seqs=4, ttt_chunk_tokens=160, ttt_lr=0.0,
                ttt_momentum=0.9, ttt_epochs=1, ttt_max_seconds=1e9)
    base.update(kw)
    return tiny_args(**base)


def run_ttt(model, tokens, luts, args, record=None, monitored=True):
    events = []
    m = copy.deepcopy(model)
    base_score = T.make_score_fn(m, CPU)

    def score(x, y):
        out = base_score(x, y)
        if record is not None:
            record.append(("call", x.clone(), y.clone(), out.detach().clone()))
        return out

    def monitor(kind, lo, hi):
        events.append((kind, lo, hi))
        if record is not None:
            record.append((kind, lo, hi))
    res = T.evaluate_with_ttt(m, score, tokens, luts, args, 0, 1, CPU, lambda s: None,
                              monitor=monitor if monitored else None)
    return res, events, m


def check_ttt_events(events, n):
    scored_end, scored = 0, []
    trained = np.zeros(n, dtype=bool)
    for kind, lo, hi in events:
        assert 0 <= lo < hi <= n
        if kind == "score":
            scored.append((lo, hi))
            scored_end = max(scored_end, hi)
        else:
            assert kind == "train"
            assert hi <= scored_end, f"trained on targets [{lo},{hi}) before they were scored (<{scored_end})"
            trained[lo:hi] = True
    assert scored[0][0] == 0 and scored[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(scored[:-1], scored[1:]))  # every target exactly once
    return scored, trained


def test_ttt_with_zero_lr_equals_sliding_eval(model, sp_and_luts, val_tokens):
    _, luts = sp_and_luts
    tokens = val_tokens[:700 + 1]
    args = ttt_args(ttt_lr=0.0)
    res, events, m = run_ttt(model, tokens, luts, args)
    scored, _ = check_ttt_events(events, 700)
    assert len(scored) >= 4 and res["ttt_steps"] == len(scored) - 1
    ref = T.evaluate(T.make_score_fn(model, CPU), tokens, luts, args.eval_seq_len, args.eval_stride,
                     args.eval_batch_seqs, 0, 1, CPU)
    assert res["tokens"] == ref["tokens"] == 700 and res["bytes"] == ref["bytes"]
    assert res["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6)
    assert res["val_bpb"] == pytest.approx(ref["val_bpb"], rel=1e-6)
    for a, b in zip(m.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_ttt_time_budget_stops_training(model, sp_and_luts, val_tokens):
    _, luts = sp_and_luts
    tokens = val_tokens[:500 + 1]
    res, events, m = run_ttt(model, tokens, luts, ttt_args(ttt_lr=0.05, ttt_max_seconds=0.0))
    assert res["ttt_steps"] == 0 and not any(k == "train" for k, _, _ in events)
    check_ttt_events(events, 500)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), model.parameters()))


def _calls_by_chunk(record, counts=None):
    """Group the recorded score calls by chunk: by the 'score' event that follows them, or
    (for an unmonitored run) by the per-chunk call counts of a monitored one."""
    calls = [item for item in record if item[0] == "call"]
    if counts is not None:
        out, i = [], 0
        for c in counts:
            out.append(calls[i:i + c])
            i += c
        assert i == len(calls)
        return out
    chunks, cur = [], []
    for item in record:
        if item[0] == "call":
            cur.append(item)
        elif item[0] == "score":
            chunks.append(cur)
            cur = []
    return chunks


def test_ttt_is_score_first(model, sp_and_luts, val_tokens):
    """With real updates: monitor invariants, and an independent leak check: editing a few
    tokens inside chunk 2 must leave every score of chunks 0..2 (at positions whose inputs and
    target are unchanged) bit-identical, while later chunks, on unchanged text, do see the
    changed training."""
    _, luts = sp_and_luts
    n = 700
    tokens = val_tokens[:n + 1].clone()
    args = ttt_args(ttt_lr=0.05)
    rec_a = []
    res_a, events, m = run_ttt(model, tokens, luts, args, record=rec_a)
    scored, trained = check_ttt_events(events, n)
    assert res_a["ttt_steps"] == len(scored) - 1 >= 3
    assert trained[:scored[-2][1]].all()  # everything scored before the last chunk was trained on
    assert any(not torch.equal(a, b) for a, b in zip(m.parameters(), model.parameters()))
    ref = T.evaluate(T.make_score_fn(model, CPU), tokens, luts, args.eval_seq_len, args.eval_stride,
                     args.eval_batch_seqs, 0, 1, CPU)
    assert res_a["tokens"] == ref["tokens"] and res_a["bytes"] == ref["bytes"]
    assert abs(res_a["val_loss"] - ref["val_loss"]) > 1e-5  # training changed later scores

    lo2, hi2 = scored[2]
    M = (lo2 + hi2) // 2 + 1  # first changed token: target M-1 of chunk 2 and everything after
    changed = tokens.clone()
    g = torch.Generator().manual_seed(0)
    changed[M:M + 4] = torch.randint(4, 512, (4,), generator=g)  # a short edit; later text unchanged
    assert not torch.equal(changed[M:M + 4], tokens[M:M + 4])
    rec_b = []
    run_ttt(model, changed, luts, args, record=rec_b, monitored=False)  # no instrumentation this time
    ca = _calls_by_chunk(rec_a)
    cb = _calls_by_chunk(rec_b, counts=[len(c) for c in ca])
    assert len(ca) == len(scored)
    compared = differing_later = 0
    for ci, (calls_a, calls_b) in enumerate(zip(ca, cb)):
        assert len(calls_a) == len(calls_b)
        for (_, xa, ya, na), (_, xb, yb, nb) in zip(calls_a, calls_b):
            same = (xa == xb).long().cumprod(dim=1).bool() & (ya == yb)  # unchanged prefix and target
            if ci <= 2:
                assert torch.equal(na[same], nb[same]), f"chunk {ci} scores depend on later tokens"
                compared += int(same[:, -1].sum()) if ci == 2 else 0
            else:
                differing_later += int((na[same] != nb[same]).sum())
    assert compared > 0  # chunk 2 really had unchanged positions to compare
    assert differing_later > 0  # the check is sensitive: training on changed data shows up later


# ----------------------------------------------------------------------------- EVAL_ONLY (subprocess)

AUDIT_WRAPPER = r'''
import json, os, sys
log_path, repo = sys.argv[1], sys.argv[2]
opened = []
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        opened.append(os.fsdecode(args[0]))
sys.addaudithook(hook)
sys.path.insert(0, repo)
sys.argv = [os.path.join(repo, "train_gpt.py")]
import train_gpt
try:
    train_gpt.main()
finally:
    with open(log_path, "w") as f:
        json.dump(opened, f)
'''


def clean_env(**kw):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    for f in T.Hyperparameters.__dataclass_fields__:  # no stray settings from the caller
        env.pop(f.upper(), None)
    env.update(OMP_NUM_THREADS="1", DEVICE="cpu", COMPILE="0", PYTHONDONTWRITEBYTECODE="1")
    env.update({k: str(v) for k, v in kw.items()})
    return env


TINY_RUN = dict(VOCAB_SIZE=512, NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2,
                ROPE_DIMS=8, BIGRAM_VOCAB=64, BIGRAM_DIM=16, VE_DIM=16, TRAIN_SEQ_LEN=64, TRAIN_BATCH_TOKENS=512,
                GRAD_ACCUM_STEPS=1, ITERATIONS=4, MAX_WALLCLOCK_SECONDS=0, WARMUP_STEPS=1, WARMDOWN_FRAC=0.5,
                EVAL_SEQ_LEN=64, EVAL_STRIDE=32, EVAL_BATCH_SEQS=8, VAL_TOKENS_LIMIT=1024, GPTQ_CALIB_SEQS=4,
                GPTQ_CALIB_LEN=64, GPTQ_BLOCK=32, RUN_ID="t", SEED=1)


def final_line(text, kind):
    m = re.search(rf"^final_int6_{kind} val_loss:(\S+) val_bpb:(\S+)", text, re.M)
    assert m, f"no final_int6_{kind} line in:\n{text[-3000:]}"
    return m.group(1), m.group(2)


@pytest.fixture(scope="module")
def trained_run(smoke_dataset, tmp_path_factory):
    data_dir, tok, _ = smoke_dataset
    out = tmp_path_factory.mktemp("run")
    env = clean_env(DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=out, **TINY_RUN)
    p = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train_gpt.py")], cwd=out, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    artifact = out / "final_model_t.int6.ptz"
    assert artifact.is_file()
    return p.stdout, str(artifact), json.loads((out / "results_t.json").read_text())


def test_training_run_artifact_and_results(trained_run):
    stdout, artifact, results = trained_run
    assert results["steps"] == 4 and results["world_size"] == 1
    assert results["model_bytes"] == os.path.getsize(artifact)
    assert results["artifact_bytes"] == results["model_bytes"] + results["code_bytes"] <= T.ARTIFACT_CAP_BYTES
    assert results["code_bytes"] == os.path.getsize(os.path.join(REPO_ROOT, "train_gpt.py"))
    assert results["val_tokens"] == 1024
    _, bpb = final_line(stdout, "roundtrip")
    assert float(bpb) == pytest.approx(results["roundtrip_val_bpb"], abs=1e-8)
    _, bpb = final_line(stdout, "sliding_window")
    assert float(bpb) == pytest.approx(results["sliding_val_bpb"], abs=1e-8) == pytest.approx(results["val_bpb"])
    assert 0 < results["val_bpb"] < 20
    # averaged and raw weights are both scored; one wall clock covers training + quantization
    assert f"prequant_float_raw_weights val_bpb:{results['prequant_raw_val_bpb']:.8f}" in stdout
    assert "(EMA weights)" in stdout
    assert "wall clock from the end of the compile warm-up to the artifact written" in stdout
    assert results["wall_seconds"] >= results["train_seconds"] > 0
    assert re.search(r"^weights checksum per rank: [0-9a-f]{16} \(identical\)$", stdout, re.M)
    assert results["pruned"] == 0 and T.CLIP_RANGE[0] <= results["clip_sigmas"] <= T.CLIP_RANGE[1]
    sub = json.loads((Path(artifact).parent / "submission.json").read_text())
    assert sub["seeds"] == [1] and sub["config_id"] == results["config_id"]
    assert sub["val_bpb"] == results["val_bpb"]


def _fake_results(d, run_id, seed, config, bpb, finished):
    r = {"seed": seed, "config_id": config, "val_loss": bpb * 2, "val_bpb": bpb, "artifact_bytes": 100,
         "steps": 3, "step_avg_ms": 1.0, "code_bytes": 10, "world_size": 1, "device": "cpu", "torch": "x",
         "finished": finished}
    (d / f"results_{run_id}.json").write_text(json.dumps(r))


def test_write_submission_counts_only_this_configuration(tmp_path):
    _fake_results(tmp_path, "old42", 42, "aaaa", 1.50, 100.0)  # an older configuration in the same folder
    _fake_results(tmp_path, "seed42", 42, "bbbb", 1.20, 300.0)  # rerun of the same seed: the last finished counts
    _fake_results(tmp_path, "seed42_first", 42, "bbbb", 1.30, 200.0)
    _fake_results(tmp_path, "seed7", 7, "bbbb", 1.10, 250.0)
    sub = T.write_submission(str(tmp_path), str(tmp_path / "submission.json"), "bbbb")
    assert sub["seeds"] == [7, 42]
    assert sub["val_bpb"] == pytest.approx((1.20 + 1.10) / 2)
    assert json.loads((tmp_path / "submission.json").read_text())["seed_results"]["42"]["val_bpb"] == 1.20
    with pytest.raises(T.DataError, match="cccc"):
        T.write_submission(str(tmp_path), str(tmp_path / "s.json"), "cccc")


def test_config_id_ignores_seed_and_names_only():
    a, m = T.Hyperparameters(), (8, "NVIDIA H100")
    assert T.config_id(a, b"code", *m) == T.config_id(T.Hyperparameters(seed=7, run_id="x", out_dir="/o"), b"code", *m)
    assert T.config_id(a, b"code", *m) != T.config_id(T.Hyperparameters(num_layers=9), b"code", *m)
    assert T.config_id(a, b"code", *m) != T.config_id(a, b"code2", *m)
    assert T.config_id(a, b"code", *m) != T.config_id(a, b"code", 1, "NVIDIA H200")  # another machine


def test_eval_only_opens_no_train_shard(trained_run, smoke_dataset, tmp_path):
    stdout, artifact, _ = trained_run
    data_dir, tok, _ = smoke_dataset
    # eval data dir: the real val shard, plus train shards that are garbage (any read fails)
    eval_dir = tmp_path / "data"
    eval_dir.mkdir()
    shutil.copy(os.path.join(data_dir, "fineweb_val_000000.bin"), eval_dir)
    for i in range(2):
        (eval_dir / f"fineweb_train_{i:06d}.bin").write_bytes(b"\xff" * 100)
    wrapper = tmp_path / "audit_main.py"
    wrapper.write_text(AUDIT_WRAPPER)
    opened_log = tmp_path / "opened.json"
    # model settings deliberately wrong: the architecture must come from the artifact
    env = clean_env(EVAL_ONLY=artifact, DATA_PATH=eval_dir, TOKENIZER_PATH=tok, OUT_DIR=tmp_path / "out",
                    EVAL_SEQ_LEN=64, EVAL_STRIDE=32, EVAL_BATCH_SEQS=8, VAL_TOKENS_LIMIT=1024,
                    NUM_LAYERS=3, MODEL_DIM=128, VOCAB_SIZE=1024, TTT_ENABLED=1, TTT_CHUNK_TOKENS=256)
    p = subprocess.run([sys.executable, str(wrapper), str(opened_log), REPO_ROOT], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    opened = json.loads(opened_log.read_text())
    assert not [f for f in opened if "fineweb_train" in f], opened
    # the hook does see the data files that are read (positive control)
    assert any(os.path.basename(f) == "fineweb_val_000000.bin" for f in opened), opened
    assert any(os.path.abspath(f) == os.path.abspath(artifact) for f in opened), opened
    assert "val_bpb" in p.stdout
    # same artifact, same val tokens, same settings -> the very same numbers as the training run
    assert final_line(p.stdout, "roundtrip") == final_line(stdout, "roundtrip")
    assert final_line(p.stdout, "sliding_window") == final_line(stdout, "sliding_window")
    loss, bpb = final_line(p.stdout, "ttt")
    assert math.isfinite(float(bpb)) and float(bpb) > 0


@pytest.mark.parametrize("content", [b"PGQ1 definitely not an artifact",  # unknown codec tag
                                     b"L\x01\x05\x00\x00\x00hello"],  # lzma tag, junk chunk
                         ids=["bad-tag", "junk-chunk"])
def test_eval_only_corrupt_artifact_clean_error(smoke_dataset, tmp_path, content):
    data_dir, tok, _ = smoke_dataset
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(content)
    env = clean_env(EVAL_ONLY=bad, DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=tmp_path)
    p = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train_gpt.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
