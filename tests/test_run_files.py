"""What a run reads and writes, and how it stops: the code counted as shipped, the data named,
a run's files never mixed with another run's, files written whole or not at all, the tokenizer
bound to the artifact, and one clear line (not a traceback) for every bad input."""
import dataclasses
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import smoke_data
import train_gpt as T
from helpers import REPO_ROOT, SCRIPT, TINY_RUN, clean_env, final_line, one_error_line, run_script

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_run(smoke_dataset, tmp_path_factory):
    """One tiny training run with its data named: (out dir, stdout, results)."""
    data_dir, tok, _ = smoke_dataset
    out = tmp_path_factory.mktemp("named")
    p = run_script(out, DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=out, DATA_NAME="smoke text for tests",
                   **TINY_RUN)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout, json.loads((out / "results_t.json").read_text())


# ----- the code as shipped

def _run_shipped(tmp_path, source):
    path = tmp_path / "shipped.py"
    path.write_bytes(T.shipped_form(source))
    return subprocess.run([sys.executable, str(path)], capture_output=True, timeout=60)


def test_shipped_form_carries_any_bytes(tmp_path):
    """The wrapper's literal holds every byte value (the escaped ones next to digits included):
    the code it decodes is the minified source, byte for byte, and a bytes constant in it keeps
    its value."""
    rng = random.Random(0)
    for n in (0, 1, 300, 5000):
        payload = bytes(rng.getrandbits(8) for _ in range(n)) + bytes(range(256)) + b"\x00123\\0\r\n\"'"
        source = (b"import hashlib\nX=" + repr(payload).encode() + b"  # a comment\n"
                  b"print(hashlib.sha256(SHIPPED_SOURCE).hexdigest(), hashlib.sha256(X).hexdigest())\n")
        p = _run_shipped(tmp_path, source)
        assert p.returncode == 0, p.stderr
        assert p.stdout.decode().split() == [T.hashlib.sha256(T.minified(source)).hexdigest(),
                                             T.hashlib.sha256(payload).hexdigest()]


@pytest.mark.slow
def test_minified_drops_comments_and_docstrings_only():
    """The shipped code: no comment, blank line or docstring left (a docstring becomes ""), every
    other line the source's own text (cut, never rewritten: the same bytes on every Python
    version, where ast.unparse's output changes with the version and 3.12's does not compile on
    3.11); '#' inside strings and f-strings stays; the real script shrinks by a fifth and parses
    to its own syntax tree with the docstrings emptied."""
    source = (b'"""Module doc."""\nimport os  # why\n\n\nclass A:\n    """Class doc."""\n\n    # alone\n'
              b'    def f(self, x="#no"):\n        """Only a docstring."""\n\n    def g(self):\n        """Doc\n\n'
              b'        on lines."""\n        s = """a\n\n# kept: inside a string\n"""\n'
              b'        return f"{os.sep}#" + s[:1]  # c\n')
    code = T.minified(source).decode()
    assert "doc" not in code.lower() and "# why" not in code and "# c" not in code and "alone" not in code
    assert 'x="#no"' in code and 'f"{os.sep}#"' in code and "\n\n# kept: inside a string\n" in code
    ns = {}
    exec(code, ns)
    assert ns["A"]().g() == os.sep + "#a" and ns["A"]().f() is None
    real = open(SCRIPT, "rb").read()
    mini = T.minified(real)
    assert len(mini) < 0.85 * len(real)
    lines = real.decode().splitlines()
    for line in mini.decode().splitlines():
        assert line.strip() == '""' or any(s.startswith(line) for s in lines), line
    tree = T.ast.parse(real)
    for d in T._docstrings(tree):
        d.value.value = ""
    assert T.ast.dump(T.ast.parse(mini)) == T.ast.dump(tree)


@pytest.mark.slow
def test_ship_tool_writes_and_decodes_the_wrapper(tmp_path):
    out = tmp_path / "train_gpt.py"
    p = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "ship.py"), str(out)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    source = open(SCRIPT, "rb").read()
    assert out.read_bytes() == T.shipped_form(source) and len(source) > 2 * out.stat().st_size
    back = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "ship.py"), "--decode", str(out)],
                          capture_output=True, timeout=120)
    assert back.returncode == 0 and back.stdout == T.minified(source)


@pytest.mark.slow
def test_run_through_the_shipped_file_is_the_same_run(tiny_run, smoke_dataset, tmp_path):
    """The smoke job through the wrapper gives the very same scores as from the source; both count
    the wrapper's file size as the code's bytes."""
    out, stdout, results = tiny_run
    data_dir, tok, _ = smoke_dataset
    wrapper = tmp_path / "train_gpt.py"
    wrapper.write_bytes(T.shipped_form(open(SCRIPT, "rb").read()))
    p = run_script(tmp_path, script=str(wrapper), DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=tmp_path / "o",
                   DATA_NAME="smoke text for tests", **TINY_RUN)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    shipped = json.loads((tmp_path / "o" / "results_t.json").read_text())
    assert shipped["code_bytes"] == results["code_bytes"] == wrapper.stat().st_size
    assert results["artifact_bytes"] == results["model_bytes"] + wrapper.stat().st_size
    for kind in ("roundtrip", "sliding_window"):
        assert final_line(p.stdout, kind) == final_line(stdout, kind)
    assert shipped["config_id"] == results["config_id"]  # the same source, the same configuration


# ----- the data named

@pytest.mark.slow
def test_log_and_submission_name_the_data(tiny_run, smoke_dataset):
    out, stdout, results = tiny_run
    data_dir, tok, _ = smoke_dataset
    line = next(l for l in stdout.splitlines() if l.startswith("data: "))
    assert line.startswith(f"data: smoke text for tests: {data_dir}, 3 train shards (")
    docs = int((T.load_validation_tokens(data_dir, 512, 1024) == 1).sum())  # TINY_RUN scores 1,024 tokens
    assert f"validation {docs} documents, 1024 targets (sha256 " in line and f"tokenizer {os.path.basename(tok)}" in line
    note = json.loads((out / "submission.json").read_text())["data_note"]
    assert note.startswith("scored on smoke text for tests: ") and "measured on 1x cpu" in note
    assert results["data"] in note


@pytest.mark.slow
def test_first_log_line_names_the_code_bytes_profile_and_attention(tiny_run):
    out, stdout, results = tiny_run
    first = next(l for l in stdout.splitlines() if l.startswith("train_gpt.py: "))
    assert re.match(rf"train_gpt.py: {results['code_bytes']} bytes as shipped \(counted; \d+ bytes of code less "
                    r"comments and docstrings\); profile 8xh100; torch \S+; world_size 1; device cpu; attention math$",
                    first), first


def test_unnamed_data_says_so(smoke_dataset):
    data_dir, tok, _ = smoke_dataset
    args = T.Hyperparameters(data_path=data_dir, tokenizer_path=tok, vocab_size=512)
    val = T.load_validation_tokens(data_dir, 512)
    assert T.describe_data(args, [], val).startswith("unnamed data (DATA_NAME not set): ")


# ----- a run's files

@pytest.mark.slow
def test_a_second_run_with_the_same_id_refuses_and_leaves_the_first_whole(tiny_run, smoke_dataset):
    out, _, _ = tiny_run
    data_dir, tok, _ = smoke_dataset
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    p = run_script(out, DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=out, **TINY_RUN)
    one_error_line(p, f"OUT_DIR={out} already holds train_t.log", "RUN_ID")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


@pytest.mark.slow
def test_a_run_refuses_a_folder_whose_submission_is_another_configuration(tiny_run, smoke_dataset, tmp_path):
    out, _, _ = tiny_run
    data_dir, tok, _ = smoke_dataset
    (tmp_path / "submission.json").write_bytes((out / "submission.json").read_bytes())
    p = run_script(tmp_path, DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=tmp_path, **{**TINY_RUN, "SEED": 7,
                                                                                            "NUM_LAYERS": 3})
    one_error_line(p, "submission.json belongs to configuration", "use another OUT_DIR")
    assert "step:" not in p.stdout


def test_defaults_write_under_runs_not_over_the_record_files():
    assert T.Hyperparameters().out_dir == "runs"
    launch = open(os.path.join(REPO_ROOT, "launch.sh")).read()
    assert "OUT_DIR=${OUT_DIR:-runs}" in launch


def test_write_atomic_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "final_model.ptz"
    path.write_bytes(b"the good old artifact")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(T.os, "fsync", full)
    with pytest.raises(T.OutputError, match="No space left on device.*unchanged"):
        T.write_atomic(str(path), b"x" * 1000)
    assert path.read_bytes() == b"the good old artifact" and os.listdir(tmp_path) == ["final_model.ptz"]
    monkeypatch.undo()
    T.write_atomic(str(path), b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["final_model.ptz"]


FULL_DISK_WRAPPER = r'''
import errno, os, runpy, sys
def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
os.fsync = full  # every file the script writes whole goes through fsync
runpy.run_path(sys.argv[1], run_name="__main__")
'''


@pytest.mark.slow
def test_full_disk_at_the_artifact_is_one_line(smoke_dataset, tmp_path):
    data_dir, tok, _ = smoke_dataset
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(FULL_DISK_WRAPPER)
    p = subprocess.run([sys.executable, str(wrapper), SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=clean_env(DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=tmp_path / "o",
                                                  **TINY_RUN))
    one_error_line(p, "cannot write", "final_model_t.int6.ptz", "No space left on device")
    assert sorted(os.listdir(tmp_path / "o")) == ["train_t.log"]  # no artifact, no partial file


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_unusable_out_dir_is_one_line(smoke_dataset, tmp_path, kind):
    data_dir, tok, _ = smoke_dataset
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if kind == "file" else tmp_path / "f" / "sub"
    p = run_script(tmp_path, DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=out, **TINY_RUN)
    one_error_line(p, f"OUT_DIR={out}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_read_only_out_dir_is_one_line(smoke_dataset, tmp_path):
    data_dir, tok, _ = smoke_dataset
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        p = run_script(tmp_path, DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=out, **TINY_RUN)
    finally:
        out.chmod(0o700)
    one_error_line(p, f"OUT_DIR={out} cannot be written")


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_leaves_no_partial_file(smoke_dataset, tmp_path):
    data_dir, tok, _ = smoke_dataset
    env = clean_env(DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=tmp_path, **{**TINY_RUN, "ITERATIONS": 100000})
    proc = subprocess.Popen([sys.executable, SCRIPT], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "train_t.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "step:" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted") and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["train_t.log"]  # training had begun: its log stays, with the error
    assert log.read_text().splitlines()[-1] == "error: interrupted (Ctrl-C)"


@pytest.mark.slow
def test_a_run_that_fails_before_training_leaves_no_log_and_its_rerun_goes_ahead(smoke_dataset, tmp_path):
    """A mistyped DATA_PATH: one error line and no file (the log held settings only), so the
    corrected rerun with the same RUN_ID is not refused."""
    data_dir, tok, _ = smoke_dataset
    p = run_script(tmp_path, DATA_PATH=tmp_path / "typo", TOKENIZER_PATH=tok, OUT_DIR=tmp_path / "o", **TINY_RUN)
    one_error_line(p, "is not a directory")
    assert os.listdir(tmp_path / "o") == []
    p = run_script(tmp_path, DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=tmp_path / "o", **TINY_RUN)
    assert p.returncode == 0, p.stderr[-2000:]


# ----- the artifact and its tokenizer

@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A second tokenizer of the same size, trained on other text."""
    path = str(tmp_path_factory.mktemp("tok2") / "other.model")
    smoke_data.train_tokenizer(smoke_data.make_docs(600, seed=99), 512, path)
    return path


@pytest.mark.slow
def test_eval_only_refuses_another_tokenizer(tiny_run, smoke_dataset, other_tokenizer, tmp_path):
    out, _, _ = tiny_run
    data_dir, tok, _ = smoke_dataset
    assert T.file_sha256(other_tokenizer) != T.file_sha256(tok)
    p = run_script(tmp_path, EVAL_ONLY=out / "final_model_t.int6.ptz", DATA_PATH=data_dir,
                   TOKENIZER_PATH=other_tokenizer, OUT_DIR=tmp_path, **TINY_RUN)
    one_error_line(p, f"was made with the tokenizer of sha256 {T.file_sha256(tok)}", "score it with its own tokenizer")
    assert "val_bpb" not in p.stdout


@pytest.mark.slow
def test_eval_only_of_an_artifact_without_fingerprint_warns(tiny_run, smoke_dataset):
    """An artifact of an older revision (no fingerprint) is still scored, with a warning."""
    out, _, _ = tiny_run
    logs = []
    T.check_artifact_tokenizer("old.ptz", None, smoke_dataset[1], logs.append)
    assert "records no tokenizer fingerprint" in logs[0]


@pytest.mark.slow
def test_eval_only_header_that_does_not_match_its_tensors_is_one_line(tiny_run, smoke_dataset, tmp_path):
    out, _, _ = tiny_run
    data_dir, tok, _ = smoke_dataset
    entries, config = T.load_artifact(str(out / "final_model_t.int6.ptz"))
    args = T.Hyperparameters(**{k: v for k, v in config.items() if k != T.TOKENIZER_KEY})
    args = dataclasses.replace(args, num_layers=args.num_layers + 1)  # a header of 3 layers; the tensors are of 2
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(T.compress(T.pack_entries(entries, args, config[T.TOKENIZER_KEY])[0]))
    p = run_script(tmp_path, EVAL_ONLY=bad, DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=tmp_path, **TINY_RUN)
    one_error_line(p, "its tensors do not match the model its header describes")


@pytest.mark.slow
def test_eval_only_flags_an_artifact_over_the_cap(tiny_run, smoke_dataset, tmp_path, monkeypatch):
    out, _, results = tiny_run
    data_dir, tok, _ = smoke_dataset
    monkeypatch.setattr(T, "ARTIFACT_CAP_BYTES", results["artifact_bytes"] - 1)
    logs = []
    args = T.Hyperparameters(eval_only=str(out / "final_model_t.int6.ptz"), data_path=data_dir, tokenizer_path=tok,
                             eval_seq_len=64, eval_stride=32, eval_batch_seqs=8, val_tokens_limit=256,
                             ttt_enabled=False, skip_sliding_eval=True, compile="0")
    T.run_eval_only(args, T.Run(0, 1, CPU, logs.append))
    assert f"WARNING: artifact + code = {results['artifact_bytes']} bytes > {results['artifact_bytes'] - 1}: " \
           "NOT compliant" in logs
    monkeypatch.setattr(T, "ARTIFACT_CAP_BYTES", results["artifact_bytes"])
    logs.clear()
    T.run_eval_only(args, T.Run(0, 1, CPU, logs.append))
    assert not [l for l in logs if "NOT compliant" in l]
    assert [l for l in logs if l.startswith("eval-only: ") and "; attention math; config: " in l]  # the provider, logged


@pytest.mark.slow
@pytest.mark.parametrize("scorer", ["roundtrip", "TTT"])
def test_a_score_that_is_not_a_number_stops_the_evaluation(tiny_run, smoke_dataset, monkeypatch, scorer):
    """A NaN score (as the lift's adapters gave once) is a bug: the line is logged, then a one-line
    ScoreError, and no results are returned to be written."""
    out, _, _ = tiny_run
    data_dir, tok, _ = smoke_dataset
    name = "evaluate" if scorer == "roundtrip" else "evaluate_with_ttt"
    real = getattr(T, name)

    def nan_score(*a, **kw):
        return {**real(*a, **kw), ("val_bpb" if scorer == "roundtrip" else "untilted_bpb"): float("nan")}
    monkeypatch.setattr(T, name, nan_score)
    logs = []
    args = T.Hyperparameters(eval_only=str(out / "final_model_t.int6.ptz"), data_path=data_dir, tokenizer_path=tok,
                             eval_seq_len=64, eval_stride=32, eval_batch_seqs=8, val_tokens_limit=256, ttt_chunk=16,
                             ttt_batch_docs=4, ttt_enabled=scorer == "TTT", skip_sliding_eval=True, compile="0")
    key = "val_bpb" if scorer == "roundtrip" else "untilted_bpb"
    with pytest.raises(T.ScoreError, match=rf"the {scorer} score is nan \({key}\): not a result; no results file"):
        T.run_eval_only(args, T.Run(0, 1, CPU, logs.append))
    line = "final_int6_roundtrip " if scorer == "roundtrip" else "final_int6_ttt "
    assert [l for l in logs if l.startswith(line) and "nan" in l]


# ----- settings

@pytest.mark.slow
def test_a_target_the_model_cannot_pack_to_is_refused_before_training(smoke_dataset, tmp_path):
    data_dir, tok, _ = smoke_dataset
    args = T.Hyperparameters.from_env({k: str(v) for k, v in TINY_RUN.items()})
    least = T.least_model_bytes(T.build_model(args, CPU), args)
    code = T.code_as_shipped()[1]
    p = run_script(tmp_path, DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=tmp_path,
                   **{**TINY_RUN, "ARTIFACT_TARGET_BYTES": code + least - 1})
    one_error_line(p, f"ARTIFACT_TARGET_BYTES={code + least - 1}", f"no less than ~{least}")
    assert "step:" not in p.stdout


def test_least_model_bytes_is_a_floor(smoke_dataset):
    """Below what the trained model packs to on the widest grid (a floor must never refuse a fit)."""
    from helpers import randomized_model
    args = T.Hyperparameters.from_env({k: str(v) for k, v in TINY_RUN.items()})
    for seed in range(3):
        model = randomized_model(args, seed=seed)
        packed = len(T.compress(T.pack_entries(T.quantize_model(model, None, args, T.CLIP_RANGE[1]), args)[0]))
        assert T.least_model_bytes(model, args) < packed


@pytest.mark.parametrize("key", ["ITERATIONS", "MAX_WALLCLOCK_SECONDS", "TTT_LR", "EVAL_STRIDE", "GPTQ_RESERVE_SECONDS"])
def test_negative_settings_are_refused(key):
    value = "-5" if key != "GPTQ_RESERVE_SECONDS" else "-2"
    args = T.Hyperparameters.from_env({key: value})
    with pytest.raises(T.ConfigError, match=f"{key}=-"):
        args.validate(1)


def test_zero_keeps_its_meaning_and_minus_one_means_automatic():
    for env in ({"ITERATIONS": "0"}, {"MAX_WALLCLOCK_SECONDS": "0"}, {"GPTQ_RESERVE_SECONDS": "-1"},
                {"XSA_LAYERS": "-1"}):
        T.Hyperparameters.from_env(env).validate(1)


def test_lookalike_variables_are_warned_about():
    seen = []
    env = {"SKIP_SLIDING": "1", "TTT": "0", "num_layers": "2", "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0",
           "OMP_NUM_THREADS": "1", "MASTER_PORT": "1", "LOG_NOTE": "x", "NUM_LAYERS": "3"}
    args = T.Hyperparameters.from_env(env, warn=seen.append)
    assert args.num_layers == 3 and len(seen) == 3, seen
    assert "SKIP_SLIDING is not a setting; did you mean SKIP_SLIDING_EVAL?" in seen[0]
    assert "TTT is not a setting; did you mean TTT_ENABLED?" in seen[1]
    assert "num_layers is not a setting; did you mean NUM_LAYERS?" in seen[2]


@pytest.mark.slow
def test_warnings_go_into_the_log(smoke_dataset, tmp_path):
    data_dir, tok, _ = smoke_dataset
    p = run_script(tmp_path, DATA_PATH=data_dir, TOKENIZER_PATH=tok, OUT_DIR=tmp_path, SKIP_SLIDING="1", **TINY_RUN)
    assert p.returncode == 0, p.stderr[-3000:]
    msg = "warning: environment variable SKIP_SLIDING is not a setting; did you mean SKIP_SLIDING_EVAL?"
    assert msg in p.stderr and msg in (tmp_path / "train_t.log").read_text()
