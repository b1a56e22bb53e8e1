"""launch.sh: clear one-line failures without GPU/data, and the CPU smoke run end to end."""
import os
import shutil
import subprocess

import pytest

from helpers import REPO_ROOT

LAUNCH = os.path.join(REPO_ROOT, "launch.sh")


def run_launch(env_extra, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "TOKENIZER_PATH", "SMOKE")}
    env.update(env_extra)
    return subprocess.run(["bash", LAUNCH, *args], env=env, capture_output=True, text=True, timeout=timeout)


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
    r = run_launch({"SMOKE_DIR": str(tmp_path), "ITERATIONS": "40", "OMP_NUM_THREADS": "1"}, "--smoke", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for key in ("final_int6_roundtrip val_loss:", "final_int6_sliding_window val_loss:", "prequant_float",
                "phase timings:", "artifact:"):
        assert key in out, key
    bpb = float(out.split("final_int6_roundtrip")[1].split("val_bpb:")[1].split()[0])
    assert 0 < bpb < 1.5  # 40 steps on structured text give ~0.9; a uniform model gives ~3.9
    assert any(f.endswith(".ptz") for f in os.listdir(tmp_path / "out"))
    assert os.path.exists(tmp_path / "out" / "submission.json")


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
