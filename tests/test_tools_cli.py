"""The measurement tools' command lines: --help prints the usage and does nothing else; a wrong
argument is refused in one line, before any work (--help once started a training run in
keep_prequant.py and crashed the others)."""
import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

# tool -> arguments it accepts (placeholders: the refusal tests add a wrong one to them)
TOOLS = {"keep_prequant.py": [], "quant_sweep.py": [], "ttt_cpu_bench.py": ["a.py", "b.py"], "ttt_schedule.py": ["data"]}


def run_tool(tmp_path, name, *args, **env):
    """The tool run from an empty folder, with OUT_DIR there: any file it writes shows."""
    (tmp_path / "work").mkdir(exist_ok=True)
    for placeholder in ("a.py", "b.py"):
        (tmp_path / "work" / placeholder).write_text("")
    (tmp_path / "work" / "data").mkdir(exist_ok=True)
    env = {**os.environ, "OUT_DIR": str(tmp_path / "work" / "out"), **env}
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", name), *args], cwd=tmp_path / "work",
                          env=env, capture_output=True, text=True, timeout=300)


def files_in(tmp_path):
    return sorted(os.listdir(tmp_path / "work"))


@pytest.mark.parametrize("name", sorted(TOOLS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_does_nothing_else(tmp_path, name, flag):
    r = run_tool(tmp_path, name, flag)
    assert r.returncode == 0 and r.stdout.startswith(f"usage: {name}"), r.stdout[-2000:] + r.stderr[-2000:]
    assert files_in(tmp_path) == ["a.py", "b.py", "data"]


@pytest.mark.parametrize("name,extra", [(n, ["--bogus"]) for n in sorted(TOOLS)] +
                         [("ttt_schedule.py", ["abc"]), ("ttt_schedule.py", ["8192", "0"]),
                          ("ttt_cpu_bench.py", ["c.py"])])
def test_a_wrong_argument_is_refused_in_one_line(tmp_path, name, extra):
    r = run_tool(tmp_path, name, *TOOLS[name], *extra)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and name in lines[0] and extra[-1] in lines[0], r.stderr[-2000:]
    assert files_in(tmp_path) == ["a.py", "b.py", "data"]


@pytest.mark.parametrize("name,args,says", [("ttt_cpu_bench.py", ["a.py", "nope.py"], "no file nope.py"),
                                            ("ttt_schedule.py", ["nope"], "nope is not a folder")])
def test_a_missing_input_is_refused_in_one_line(tmp_path, name, args, says):
    r = run_tool(tmp_path, name, *args)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr[-2000:]


@pytest.mark.slow
def test_quant_sweep_without_saved_weights_stops_in_one_line_and_writes_nothing(tmp_path):
    """Its sweep.log belongs beside the run's prequant.pt in OUT_DIR; it was once opened in the
    current folder before anything was checked."""
    r = run_tool(tmp_path, "quant_sweep.py")
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "prequant.pt" in lines[0] and "keep_prequant" in lines[0], r.stderr[-2000:]
    assert files_in(tmp_path) == ["a.py", "b.py", "data"]
