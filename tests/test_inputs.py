"""Inputs a run must refuse (or flag) before it trains, and how a run stops: settings that cannot be
finite, cannot fit in memory or cannot fit the budget, text that is not UTF-8, look-alike variables,
a byte sidecar or tokenizer that does not belong to the shards, a stopped rank, a full disk, SIGTERM."""
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import lzma
import shutil

import numpy as np
import pytest
import torch

import smoke_data
import train_gpt as T
from helpers import REPO_ROOT, SCRIPT, TINY_RUN as TINY, clean_env as script_env, one_error_line

CPU = torch.device("cpu")


def run_tiny(cwd, data, timeout=300, **env):
    """The script on the smoke data set with TINY's settings, then `env`."""
    data_dir, tok, _ = data
    return subprocess.run([sys.executable, SCRIPT], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=script_env(**{"DATA_PATH": data_dir, "TOKENIZER_PATH": tok, **TINY, **env}))


# ----- data that does not belong together: a sidecar, a tokenizer, no BOS

def shared_tokenizer(name):
    path = os.path.join(os.path.dirname(REPO_ROOT), "shared", "tokenizers", name)
    if not os.path.isfile(path):
        assert not os.environ.get("CI"), f"CI must have the tokenizer at {path}"
        pytest.skip(f"tokenizer not at {path}")
    return path


@pytest.fixture(scope="module")
def two_kinds(tmp_path_factory):
    """The same documents made into CaseOps shards and plain ones (--identity), each with its sidecar,
    by tools/caseops_prep.py -> {"caseops"|"plain": (data dir, tokenizer)}."""
    toks = {"caseops": shared_tokenizer("fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"),
            "plain": shared_tokenizer("fineweb_8192_bpe.model")}
    root = tmp_path_factory.mktemp("two_kinds")
    (root / "corpus").mkdir()
    for name, docs in (("val", smoke_data.make_docs(60, seed=6)), ("train_000", smoke_data.make_docs(240, seed=7))):
        with lzma.open(root / "corpus" / f"{name}.txt.xz", "wt", encoding="utf-8") as f:
            f.write("\n<|doc|>\n".join(d + " The USA and NASA; an iPhone at McDonald's." for d in docs) + "\n")
    out = {}
    for kind, tok in toks.items():
        p = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "caseops_prep.py"), "--workers", "2",
                            "--corpus", root / "corpus", "--tokenizer", tok, "--out", root / kind,
                            *(["--identity"] if kind == "plain" else [])], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        out[kind] = (str(root / kind), tok)
    return out


def sidecar_of(data_dir):
    val = T.load_validation_tokens(data_dir, 8192)
    return val, T.load_byte_sidecar(data_dir, val, 1)


@pytest.mark.slow
def test_real_sidecars_agree_with_their_tokenizers_table(two_kinds):
    """The tool's sidecars pass: plain, the table's count itself; CaseOps, the table's count less the
    markers' bytes (here 3 per capitalised word)."""
    for kind, (data_dir, tok) in two_kinds.items():
        val, counts = sidecar_of(data_dir)
        luts = T.load_tokenizer_luts(tok, 8192)
        table = T.check_sidecar_against_table(counts, val, luts, data_dir)
        assert table == int(luts.target_bytes(val[:-1], val[1:]).sum())
        assert (table == int(counts[1:].sum())) == (kind == "plain")


@pytest.mark.slow
@pytest.mark.parametrize("kind,change,error", [
    ("caseops", lambda c: c * 0, "counts 0 bytes where the tokenizer's table counts .* and "),
    ("caseops", lambda c: torch.where(c > 0, 60000, 0), "bytes where the tokenizer's table counts"),
    ("plain", lambda c: c + c * (torch.arange(len(c)) % 20 == 0), "more than 1% apart"),  # ~5 % more
])
def test_a_sidecar_the_table_does_not_vouch_for_is_refused(two_kinds, kind, change, error):
    """All counts 0 trained, wrote the artifact and died dividing by zero; counts of 60,000 gave rc
    0 and a bpb of 0.00009."""
    data_dir, tok = two_kinds[kind]
    val, counts = sidecar_of(data_dir)
    with pytest.raises(T.DataError, match=error):
        T.check_sidecar_against_table(change(counts), val, T.load_tokenizer_luts(tok, 8192), data_dir)


def test_a_sidecar_with_many_counts_no_piece_stands_for_is_refused():
    """Counts above what any piece stands for: a few are whitespace runs of real text (accepted), more
    than SIDECAR_OVERLONG_SHARE of the targets are garbage even where the total agrees."""
    vocab, n = 16, 10_000
    luts = T.ByteLUTs(torch.full((vocab,), 2), torch.zeros(vocab, dtype=torch.bool), torch.zeros(vocab, dtype=torch.bool))
    val = torch.randint(2, vocab, (n + 1,), generator=torch.Generator().manual_seed(0))
    counts = torch.full((n + 1,), 2)
    counts[0] = 0

    def moved(k):  # k targets get 3 bytes, k others 1: the same total
        c = counts.clone()
        c[1:1 + 2 * k:2], c[2:2 + 2 * k:2] = 3, 1
        return c
    assert T.check_sidecar_against_table(moved(int(T.SIDECAR_OVERLONG_SHARE * n)), val, luts, "d") == 2 * n
    with pytest.raises(T.DataError, match=r"to 100 validation tokens \(e.g. 3 to token 1; at most 0.1%"):
        T.check_sidecar_against_table(moved(100), val, luts, "d")


@pytest.mark.slow
def test_a_sidecar_with_a_few_whitespace_runs_is_accepted(two_kinds):
    """A sidecar of the text before the tokenizer's normalizer gives a collapsed whitespace run's bytes
    to one token, more than any piece stands for: a few such counts are real text, not garbage."""
    data_dir, tok = two_kinds["caseops"]
    val, counts = sidecar_of(data_dir)
    runs = counts.clone()
    runs[[5, len(counts) // 2]] += 40  # two tokens after a 40-space run
    T.check_sidecar_against_table(runs, val, T.load_tokenizer_luts(tok, 8192), data_dir)


@pytest.fixture
def smoke_with_sidecar(smoke_dataset, tmp_path):
    """A copy of the smoke data set with a sidecar file (written by the test)."""
    data_dir, tok, _ = smoke_dataset
    shutil.copytree(data_dir, tmp_path / "data")
    val = T.load_validation_tokens(str(tmp_path / "data"), 512)
    return tmp_path / "data", tok, val


@pytest.mark.slow
@pytest.mark.parametrize("count", [0, 60000])
def test_a_run_on_a_sidecar_of_garbage_stops_before_training(smoke_with_sidecar, tmp_path, count):
    data, tok, val = smoke_with_sidecar
    smoke_data.write_shard(str(data / "fineweb_val_bytes_000000.bin"), np.where(val.numpy() == 1, 0, count))
    p = run_tiny(tmp_path, (str(data), tok, 512), OUT_DIR=tmp_path / "o")
    one_error_line(p, f"byte sidecar in {data} ")
    assert "step:" not in p.stdout and os.listdir(tmp_path / "o") == []


@pytest.mark.slow
def test_shards_of_another_tokenizer_are_refused(two_kinds):
    """Each kind's documents re-encode to themselves through their own tokenizer, not the other's."""
    for kind, (data_dir, tok) in two_kinds.items():
        val = T.load_validation_tokens(data_dir, 8192)
        train = T.find_shards(data_dir, "train")
        T.check_data_fits_tokenizer(T.Hyperparameters(data_path=data_dir, tokenizer_path=tok), val, train)
        other = two_kinds["plain" if kind == "caseops" else "caseops"][1]
        with pytest.raises(T.DataError, match=r"(\d+) of \1 sampled documents .* do not re-encode to their tokens "
                                              "through TOKENIZER_PATH=.*: the shards were made by another tokenizer"):
            T.check_data_fits_tokenizer(T.Hyperparameters(data_path=data_dir, tokenizer_path=other), val, train)


@pytest.mark.slow
def test_a_run_with_the_plain_tokenizer_on_caseops_shards_stops_before_training(two_kinds, tmp_path):
    """It ran (rc 0, the wrong tokenizer recorded; BYTE_SIDECAR=0: bpb 2.172 for 2.027)."""
    data_dir, _ = two_kinds["caseops"]
    p = run_tiny(tmp_path, (data_dir, two_kinds["plain"][1], 8192), OUT_DIR=tmp_path / "o", VOCAB_SIZE=8192,
                 BYTE_SIDECAR=0)
    one_error_line(p, "sampled documents", "the shards were made by another tokenizer")
    assert "step:" not in p.stdout and os.listdir(tmp_path / "o") == []


def test_validation_tokens_without_a_bos_are_refused(smoke_dataset, tmp_path):
    """They were scored as "0 documents", silently."""
    data_dir, tok, _ = smoke_dataset
    val = T.load_validation_tokens(data_dir, 512)
    args = T.Hyperparameters(data_path=data_dir, tokenizer_path=tok, vocab_size=512)
    T.check_data_fits_tokenizer(args, val)
    with pytest.raises(T.DataError, match=f"start with {int(val[1])}, not BOS_ID=1 .*shards made without BOS"):
        T.check_data_fits_tokenizer(args, val[val != 1])


# ----- settings: finite, UTF-8, named

@pytest.mark.parametrize("key,value", [("EMBED_LR", "inf"), ("TTT_LR", "inf"), ("MATRIX_LR", "nan"),
                                       ("TTT_MAX_SECONDS", "inf"), ("MAX_WALLCLOCK_SECONDS", "Infinity")])
def test_a_float_setting_that_is_not_finite_is_refused(key, value):
    """inf passed every range check (EMBED_LR=inf: a traceback at step 1; TTT_LR=inf: NaN after
    training): every float setting must be a finite number."""
    with pytest.raises(T.ConfigError, match=f"^{key}=(inf|nan) must be a finite number$"):
        T.Hyperparameters.from_env({key: value}).validate(1)


def test_an_int_setting_out_of_range_of_a_float_is_one_error():
    with pytest.raises(T.ConfigError, match="ITERATIONS='1e999' is not a valid int"):
        T.Hyperparameters.from_env({"ITERATIONS": "1e999"})


@pytest.mark.slow
@pytest.mark.parametrize("key", ["OUT_DIR", "DATA_PATH"])
def test_a_path_that_is_not_utf8_is_refused_before_training(smoke_dataset, tmp_path, key):
    """It failed in the log's write after the whole run (a traceback, results lost): now one line
    before any file is claimed."""
    bad = os.fsencode(str(tmp_path)) + b"/o\xff"
    p = run_tiny(tmp_path, smoke_dataset, **{"OUT_DIR": tmp_path / "o", key: bad})
    one_error_line(p, f"{key}=", "\\xff", "is not valid UTF-8")
    assert "step:" not in p.stdout and not os.path.exists(bad) and not (tmp_path / "o").exists()


def test_short_names_draw_a_lookalike_warning():
    seen = []
    T.Hyperparameters.from_env({"SEQ_LEN": "1024", "ITERS": "9", "LR": "0.1", "PATH": "/bin"}, warn=seen.append)
    assert seen == ["warning: environment variable SEQ_LEN is not a setting; did you mean TRAIN_SEQ_LEN?",
                    "warning: environment variable ITERS is not a setting; did you mean ITERATIONS?",
                    "warning: environment variable LR is not a setting; did you mean MATRIX_LR, EMBED_LR or "
                    "SCALAR_LR (the learning rates)?"]


def test_device_cuda_without_a_gpu_is_refused(monkeypatch):
    """It ran on the CPU, silently."""
    monkeypatch.setattr(T.torch.cuda, "is_available", lambda: False)
    with pytest.raises(T.ConfigError, match="DEVICE=cuda but torch sees no CUDA device"):
        T.setup_distributed("cuda")
    assert T.setup_distributed("auto")[2] == CPU


# ----- settings found wrong after the log was opened, and what cannot fit

@pytest.mark.slow
def test_a_reserve_that_leaves_no_training_time_claims_no_file(smoke_dataset, tmp_path):
    """It was raised in the training loop, after the log was claimed and the run's work begun: the
    log stayed and refused the corrected rerun (contrary to the README). Now it is refused before
    any file is claimed; the corrected rerun goes ahead."""
    p = run_tiny(tmp_path, smoke_dataset, OUT_DIR=tmp_path / "o", GPTQ_RESERVE_SECONDS=1000, MAX_WALLCLOCK_SECONDS=3)
    one_error_line(p, "MAX_WALLCLOCK_SECONDS=3.0 leaves no time after the 1000.0s quantization reserve")
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []
    p = run_tiny(tmp_path, smoke_dataset, OUT_DIR=tmp_path / "o", GPTQ_RESERVE_SECONDS=1, MAX_WALLCLOCK_SECONDS=300)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("env,needle", [
    (dict(TTT_ENABLED=1, TTT_BATCH_DOCS=10 ** 7, TTT_CHUNK=16), "TTT_BATCH_DOCS=10000000 x TTT_RANK=80"),
    (dict(TTT_ENABLED=1, TTT_RANK=10 ** 7, TTT_CHUNK=16), "TTT_BATCH_DOCS=64 x TTT_RANK=10000000"),
    (dict(TRAIN_SEQ_LEN=2 ** 20, TRAIN_BATCH_TOKENS=2 ** 20), "TRAIN_SEQ_LEN=1048576"),
])
def test_a_setting_that_cannot_fit_in_memory_is_refused_before_training(smoke_dataset, tmp_path, env, needle):
    """TTT's adapters of 100,000 documents (or rank) were killed ~60 s into the evaluation, no error;
    TRAIN_SEQ_LEN=1048576 asked for a 1 TB mask with a traceback: now one line naming the setting,
    before any file."""
    p = run_tiny(tmp_path, smoke_dataset, OUT_DIR=tmp_path / "o", **env)
    one_error_line(p, needle, "GiB, more than the", "GiB of cpu")
    assert "step:" not in p.stdout and not (tmp_path / "o").exists()


def test_the_memory_check_counts_what_each_attention_holds():
    """SDPA with document masks holds a bool mask, not the math path's fp32 scores: a long context that
    fits with it is not refused as if it were the math path's (~99 GiB counted before for this one)."""
    args = T.Hyperparameters.from_env({"PROFILE": "1gpu", "TRAIN_SEQ_LEN": "16384", "ATTN_BACKEND": "sdpa"})
    T.check_memory_fits(args, 1, torch.device("cuda", 0), total=80e9)
    with pytest.raises(T.ConfigError, match="TRAIN_SEQ_LEN=16384"):
        T.check_memory_fits(dataclasses.replace(args, attn_backend="math"), 1, torch.device("cuda", 0), total=80e9)


@pytest.mark.parametrize("profile", ["8xh100", "1gpu"])
@pytest.mark.parametrize("world", [1, 8])
def test_the_record_configuration_fits_an_80gb_gpu_easily(profile, world):
    """Every estimate of the defaults stays under a quarter of an 80 GB card, even counting the
    attention of the math path; and a card a hundred times too small refuses."""
    args = T.Hyperparameters.from_env({"PROFILE": profile})
    args.validate(world)
    for score_bytes in (0, 1, 1 + 4 * args.num_heads):  # varlen, a dense mask, the math path's mask and scores
        assert max(T.large_allocations(args, world, score_bytes).values()) < 20e9
    T.check_memory_fits(args, world, torch.device("cuda", 0), total=80e9)
    with pytest.raises(T.ConfigError, match=r"TTT_BATCH_DOCS=64 x TTT_RANK=80 .* needs ~[67]\.\d GiB"):
        T.check_memory_fits(args, world, torch.device("cuda", 0), total=0.8e9)


def test_eval_only_warns_where_the_artifact_overrides_a_model_setting():
    """EVAL_ONLY takes the model from the artifact's header; a model setting given otherwise was
    ignored silently. Now the log names it (a setting that agrees, or is not given, says nothing)."""
    args = T.Hyperparameters(num_layers=12, model_dim=512, eval_only="a.ptz")
    config = {"num_layers": 11, "model_dim": 512, "mlp_mult": 3.0}
    seen = []
    T.warn_model_settings_overridden(args, config, seen.append, env={"NUM_LAYERS": "12", "MODEL_DIM": "512"})
    assert seen == ["warning: NUM_LAYERS=12 is not used: a.ptz is a model with NUM_LAYERS=11 (its header's value "
                    "scores it)"]


# ----- how a run stops: a full disk at the log, SIGTERM, a stopped rank, one line per job

FULL_LOG_WRAPPER = r'''
import builtins, errno, runpy, sys
real_open = builtins.open


class FullDisk:
    """The run's log, on a disk that fills up at the first training step's line (half of it lands)."""
    def __init__(self, f):
        self.f, self.full = f, False

    def write(self, s):
        if self.full or "step:" in s:
            self.full = True
            self.f.write(s[: len(s) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(s)

    def __getattr__(self, name):
        return getattr(self.f, name)


def fake_open(path, mode="r", *a, **kw):
    f = real_open(path, mode, *a, **kw)
    return FullDisk(f) if str(path).endswith(".log") and "x" in mode else f


builtins.open = fake_open
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.slow
def test_a_full_disk_at_the_log_is_one_line_and_the_log_ends_whole(smoke_dataset, tmp_path):
    """A failed write to the log was a 34-line traceback and left the log cut mid-line: now one
    OutputError line, the log cut back to its last whole line."""
    data_dir, tok, _ = smoke_dataset
    wrapper = tmp_path / "full_log.py"
    wrapper.write_text(FULL_LOG_WRAPPER)
    p = subprocess.run([sys.executable, str(wrapper), SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=script_env(DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=tmp_path / "o",
                                                   **{**TINY, "TRAIN_LOG_EVERY": 1}))
    one_error_line(p, f"cannot write the log {tmp_path / 'o' / 'train_t.log'}: No space left on device")
    log = (tmp_path / "o" / "train_t.log").read_text()
    assert log.endswith("\n") and log.splitlines()[-1].startswith("compile warm-up: ")  # the line before step 1's
    assert os.listdir(tmp_path / "o") == ["train_t.log"]


def start_tiny(cwd, data, **env):
    data_dir, tok, _ = data
    return subprocess.Popen([sys.executable, SCRIPT], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=script_env(**{"DATA_PATH": data_dir, "TOKENIZER_PATH": tok, **TINY, **env}))


def wait_for_training(log, procs, timeout=180):
    deadline = time.time() + timeout
    while not (log.exists() and "step:" in log.read_text()):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_stops_the_run_like_ctrl_c(smoke_dataset, tmp_path):
    """SIGTERM (a scheduler stopping the job) ended the run without a word or a closing log line:
    now one line, the log's closing line, and no partial file."""
    proc = start_tiny(tmp_path, smoke_dataset, OUT_DIR=tmp_path, ITERATIONS=100000)
    wait_for_training(tmp_path / "train_t.log", [proc])
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: terminated (SIGTERM); files written so far are whole"), err
    assert sorted(os.listdir(tmp_path)) == ["train_t.log"]
    assert (tmp_path / "train_t.log").read_text().splitlines()[-1] == "error: terminated (SIGTERM)"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(cwd, data, world=2, **env):
    port = free_port()
    return [start_tiny(cwd, data, RANK=r, LOCAL_RANK=r, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                       **env) for r in range(world)]


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_with_one_line_within_the_bound(smoke_dataset, tmp_path):
    """A frozen rank (SIGSTOP) left the others waiting in a collective without a word (>= 150 s):
    now the collective gives up after DIST_TIMEOUT_SECONDS and the waiting rank ends with one line."""
    bound = 10  # seconds; the training steps' collectives come far more often on a loaded box
    ranks = start_ranks(tmp_path, smoke_dataset, OUT_DIR=tmp_path, ITERATIONS=100000, DIST_TIMEOUT_SECONDS=bound)
    try:
        wait_for_training(tmp_path / "train_t.log", ranks)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        out, err = ranks[0].communicate(timeout=bound + 120)
        waited = time.time() - stopped
    finally:
        for p in ranks:
            p.kill()
            p.communicate()
    assert ranks[0].returncode == 2 and bound - 2 <= waited <= bound + 90, (waited, err[-2000:])
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: a collective failed: another rank is gone, "
                                                   f"stopped, or kept it waiting past DIST_TIMEOUT_SECONDS={bound} ("), err
    assert (tmp_path / "train_t.log").read_text().splitlines()[-1] == lines[0]


@pytest.mark.slow
def test_an_error_of_every_rank_is_said_once(smoke_dataset, tmp_path):
    """Each rank printed the same one-line error (and torchrun its report): rank 0 says it; the
    other ranks end quietly with the same exit status."""
    ranks = start_ranks(tmp_path, smoke_dataset, OUT_DIR=tmp_path / "o", DATA_PATH=tmp_path / "typo")
    (out0, err0), (out1, err1) = (p.communicate(timeout=180) for p in ranks)
    one_error_line(subprocess.CompletedProcess([], ranks[0].returncode, out0, err0), "is not a directory")
    assert ranks[1].returncode == 2 and err1.strip() == "", err1
