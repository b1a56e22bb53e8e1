"""launch.sh: clear one-line failures without GPU/data, and the CPU smoke run end to end."""
import os
import shutil
import subprocess

import pytest

from helpers import REPO_ROOT

LAUNCH = os.path.join(REPO_ROOT, "launch.sh")


CARRIED_TOKENIZER = os.path.join(REPO_ROOT, "tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
# what launch.sh reads from the environment: a test sets the ones it means, never inherits them
LAUNCH_VARS = ("DATA_PATH", "TOKENIZER_PATH", "SMOKE", "SMOKE_DIR", "OUT_DIR", "RUN_ID", "NPROC_PER_NODE",
               "OMP_NUM_THREADS")


def run_launch(env_extra, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(env_extra)
    return subprocess.run(["bash", LAUNCH, *args], env=env, capture_output=True, text=True, timeout=timeout)


def fake_commands(tmp_path, **bodies):
    """A bin folder of shell scripts named by `bodies` (name -> script body), for the front of PATH."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    for name, body in bodies.items():
        (fake_bin / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake_bin / name).chmod(0o755)
    return f"{fake_bin}:{os.environ['PATH']}"


def full_run_env(tmp_path, **extra):
    """One fake GPU, shards and a tokenizer file in place, and a torchrun that only records that it ran and with what:
    whatever launch.sh lets through reaches `torchrun` (its line on stdout, tmp_path/ran), or
    `python3` (a smoke run: tmp_path/ran)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        (data / name).write_bytes(b"")
    path = fake_commands(tmp_path, **{"nvidia-smi": "echo 'GPU 0: Fake GPU (UUID: x)'",
                                      "torchrun": f'touch {tmp_path}/ran; echo "torchrun $* tok=$TOKENIZER_PATH"',
                                      "python3": f"touch {tmp_path}/ran"})  # a smoke run's steps
    (tmp_path / "tok.model").write_bytes(b"")
    return {"PATH": path, "DATA_PATH": str(data), "TOKENIZER_PATH": str(tmp_path / "tok.model"),
            "OUT_DIR": str(tmp_path / "runs"), **extra}


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_runs_nothing(tmp_path, flag):
    r = run_launch(full_run_env(tmp_path), flag)
    assert r.returncode == 0 and r.stdout.startswith("Usage: bash launch.sh") and "--smoke" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("args", [["--smoek"], ["smoke"], ["--SMOKE"], ["--smoke", "--fast"], ["-x"]])
def test_an_unknown_argument_is_refused_in_one_line_before_anything_runs(tmp_path, args):
    """A mistyped --smoke once fell through to the full 8-GPU run."""
    r = run_launch(full_run_env(tmp_path, SMOKE_DIR=str(tmp_path / "smoke")), *args)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and args[-1] in lines[0] and "--help" in lines[0], r.stderr
    assert r.stdout == "" and not (tmp_path / "ran").exists() and not (tmp_path / "smoke").exists()


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1.5", "2 "])
def test_a_gpu_count_that_is_no_positive_integer_is_refused_in_one_line(tmp_path, value):
    r = run_launch(full_run_env(tmp_path, NPROC_PER_NODE=value))
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "NPROC_PER_NODE" in lines[0] and "positive integer" in lines[0], lines
    assert not (tmp_path / "ran").exists()


def test_a_gpu_count_given_reaches_torchrun(tmp_path):
    r = run_launch(full_run_env(tmp_path, NPROC_PER_NODE="3"))
    assert r.returncode == 0 and "--nproc_per_node=3" in r.stdout, r.stdout + r.stderr


def test_the_default_tokenizer_is_the_one_the_repository_carries(tmp_path):
    """The default run needs the CaseOps tokenizer: the repository carries it, and launch.sh uses it."""
    import sentencepiece as spm
    env = full_run_env(tmp_path)
    del env["TOKENIZER_PATH"]
    r = run_launch(env)
    assert r.returncode == 0, r.stderr
    tok = r.stdout.split("tok=")[1].split()[0]
    assert os.path.samefile(os.path.join(REPO_ROOT, tok), CARRIED_TOKENIZER)
    sp = spm.SentencePieceProcessor(model_file=CARRIED_TOKENIZER)
    assert sp.get_piece_size() == 8192 and sp.piece_to_id("\ue001") != sp.unk_id()  # the CaseOps markers


def test_the_hints_never_send_the_user_in_a_circle(tmp_path):
    """A missing tokenizer points at the carried one (not at the data prep, which needs a tokenizer);
    missing shards point at a prep command whose tokenizer exists."""
    r = run_launch(full_run_env(tmp_path, TOKENIZER_PATH=str(tmp_path / "nope.model")))
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "nope.model" in lines[0], r.stderr
    assert "caseops_prep" not in lines[0] and "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model" in lines[0]
    env = full_run_env(tmp_path, DATA_PATH=str(tmp_path / "no_data"))
    del env["TOKENIZER_PATH"]
    r = run_launch(env)
    hint = r.stderr.split("caseops_prep.py")[1]
    tok = hint.split("--tokenizer ")[1].split()[0]
    assert os.path.isfile(os.path.join(REPO_ROOT, tok)), hint
    assert f"--out {tmp_path / 'no_data'}" in hint, hint


def smoke_env(tmp_path, **extra):
    """--smoke with a python3 that builds nothing and prints what train_gpt.py would be given."""
    path = fake_commands(tmp_path, python3='case "$1" in *smoke_data.py) exit 0;; esac\n'
                                           'echo "OUT_DIR=$OUT_DIR RUN_ID=$RUN_ID OMP_NUM_THREADS=$OMP_NUM_THREADS"')
    return {"PATH": path, "SMOKE_DIR": str(tmp_path / "smoke"), **extra}


def given(stdout, name):
    return stdout.split(f"{name}=")[1].split()[0]


def test_the_smoke_run_deletes_nothing_and_writes_into_a_new_folder(tmp_path):
    """It once emptied SMOKE_DIR/out before each run (a user's files with it)."""
    old = tmp_path / "smoke" / "out"
    old.mkdir(parents=True)
    for name in ("notes.txt", "final_model_smoke_seed42.int6.ptz", "submission.json"):
        (old / name).write_text("mine")
    outs = []
    for _ in range(2):
        r = run_launch(smoke_env(tmp_path), "--smoke")
        assert r.returncode == 0, r.stderr
        outs.append(given(r.stdout, "OUT_DIR"))
        assert os.path.isdir(outs[-1]) and os.listdir(outs[-1]) == [], outs  # new, so no earlier run's files
        assert outs[-1].startswith(str(tmp_path / "smoke") + os.sep) and given(r.stdout, "RUN_ID") == "smoke_seed42"
    assert outs[0] != outs[1]
    assert sorted(p.name for p in old.iterdir() if p.is_file()) == ["final_model_smoke_seed42.int6.ptz", "notes.txt",
                                                                     "submission.json"]
    assert all((old / n).read_text() == "mine" for n in ("notes.txt", "submission.json"))


def test_the_smoke_run_honours_out_dir_and_run_id(tmp_path):
    r = run_launch(smoke_env(tmp_path, OUT_DIR=str(tmp_path / "mine"), RUN_ID="try1"), "--smoke")
    assert r.returncode == 0, r.stderr
    assert given(r.stdout, "OUT_DIR") == str(tmp_path / "mine") and given(r.stdout, "RUN_ID") == "try1"


@pytest.mark.parametrize("env,threads", [({}, "1"), ({"OMP_NUM_THREADS": "3"}, "3")])
def test_the_smoke_run_limits_its_threads_unless_the_user_did(tmp_path, env, threads):
    """Unlimited, the tiny model's steps took 2.8x longer on a busy 2-core machine (1,297 vs 470 ms)."""
    r = run_launch(smoke_env(tmp_path, **env), "--smoke")
    assert r.returncode == 0 and given(r.stdout, "OMP_NUM_THREADS") == threads, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_launch_without_gpu_fails_in_one_line():
    r = run_launch({})
    assert r.returncode == 1
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "no NVIDIA GPU" in lines[0] and "--smoke" in lines[0], r.stderr


def test_launch_without_data_fails_in_one_line(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    smi = fake_bin / "nvidia-smi"  # pretend one GPU exists, so the data check is reached
    smi.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: x)'\n")
    smi.chmod(0o755)
    r = run_launch({"PATH": f"{fake_bin}:{os.environ['PATH']}", "DATA_PATH": str(tmp_path / "nope")})
    assert r.returncode == 1
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "fineweb_train_" in lines[0] and "caseops_prep.py" in lines[0], r.stderr


@pytest.mark.parametrize("env,skip", [({}, "1"), ({"TTT_ENABLED": "0"}, "0"), ({"TTT_ENABLED": "1"}, "1"),
                                      ({"SKIP_SLIDING_EVAL": "0"}, "0")])
def test_full_run_skips_the_sliding_pass_only_when_ttt_is_on(tmp_path, env, skip):
    """With TTT on, its score is the result and the sliding pass is skipped; with TTT off the
    sliding score must run (else the run would report the round trip alone)."""
    fake_bin, data = tmp_path / "bin", tmp_path / "data"
    fake_bin.mkdir()
    data.mkdir()
    for name, body in (("nvidia-smi", "echo 'GPU 0: Fake GPU (UUID: x)'"), ("torchrun", 'echo "skip=$SKIP_SLIDING_EVAL"')):
        (fake_bin / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake_bin / name).chmod(0o755)
    for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        (data / name).write_bytes(b"")
    (tmp_path / "tok.model").write_bytes(b"")
    r = run_launch({"PATH": f"{fake_bin}:{os.environ['PATH']}", "DATA_PATH": str(data),
                    "TOKENIZER_PATH": str(tmp_path / "tok.model"), "OUT_DIR": str(tmp_path), **env})
    assert r.returncode == 0, r.stderr
    assert f"skip={skip}" in r.stdout.splitlines()


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    r = run_launch({"SMOKE_DIR": str(tmp_path), "ITERATIONS": "40"}, "--smoke", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for key in ("final_int6_roundtrip val_loss:", "final_int6_sliding_window val_loss:", "prequant_float",
                "phase timings:", "artifact:"):
        assert key in out, key
    bpb = float(out.split("final_int6_roundtrip")[1].split("val_bpb:")[1].split()[0])
    assert 0 < bpb < 1.5  # 40 steps on structured text give ~0.9; a uniform model gives ~3.9
    run_dir = out.split("launch.sh: smoke run, files in ")[1].split("\n")[0]
    assert os.path.dirname(run_dir) == str(tmp_path / "out")  # the run's own new folder
    assert any(f.endswith(".ptz") for f in os.listdir(run_dir))
    assert os.path.exists(os.path.join(run_dir, "submission.json"))


def test_the_readme_gives_ci_its_test_command_and_stays_short():
    """.ci/run runs the README's test command verbatim; the README stays a user's document
    (<= 25,000 bytes: the lab history lives in RESULTS.md)."""
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8").read().strip().splitlines()[-1]
    assert ci in readme.splitlines()
    assert len(readme.encode()) <= 25_000


@pytest.mark.parametrize("runs,artifacts,individual,in_tar", [(2, False, 8, 0), (4, False, 7, 9), (4, True, 7, 13)])
def test_proxy_wait_brings_back_every_file_within_the_device_calls_eight(tmp_path, runs, artifacts, individual, in_tar):
    """`tools/proxy_run.sh wait` copies ended runs' files into $OUT as NAME.FILE; a device call
    returns 8 files, so past 8 the logs and json that find no slot travel in one more.tar, and an
    artifact (KEEP_ARTIFACT=1, too big for the tar) always gets a slot of its own: none is lost
    (four evaluations once lost one's score lines)."""
    import tarfile
    root, out = tmp_path / "root", tmp_path / "out"
    out.mkdir()
    expected = set()
    rels = ["stdout.log", "out/results_seed42.json", "out/submission.json", "out/train_seed42.log"]
    for i in range(runs):
        run = root / "runs" / f"r{i}"
        (run / "out").mkdir(parents=True)
        for rel in rels + (["out/final_model_seed42.int6.ptz"] if artifacts else []):
            (run / rel).write_text(f"{i} {rel}\n")
            expected.add((f"r{i}.{os.path.basename(rel)}", f"{i} {rel}\n"))
    res = subprocess.run(["bash", os.path.join(REPO_ROOT, "tools", "proxy_run.sh"), "wait", "0"],
                         env={**os.environ, "PROXY_ROOT": str(root), "OUT": str(out),
                              "KEEP_ARTIFACT": "1" if artifacts else "0"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == individual + (in_tar > 0) <= 8, files
    if artifacts:
        assert {f"r{i}.final_model_seed42.int6.ptz" for i in range(runs)} <= set(files)
    got = {(n, (out / n).read_text()) for n in files if n != "more.tar"}
    if in_tar:
        with tarfile.open(out / "more.tar") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            got |= {(os.path.basename(m.name), tar.extractfile(m).read().decode()) for m in members}
        assert len(members) == in_tar and f"more.tar ({in_tar} files" in res.stdout, res.stdout
    assert got == expected and "not copied" not in res.stdout
