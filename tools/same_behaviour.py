#!/usr/bin/env python3
"""Same behaviour: proves that a change to train_gpt.py (a refactor) changed nothing a run does.

    python3 tools/same_behaviour.py record OUT.json [--work DIR] [--caseops-tokenizer MODEL]
    python3 tools/same_behaviour.py compare A.json B.json [--scores-only]
    python3 tools/same_behaviour.py eval-old WORK_DIR OUT.json [--work DIR]

record: builds tiny data sets on the spot (tests/smoke_data.py's synthetic text and tokenizer;
CaseOps shards with the validation byte sidecar by tools/caseops_prep.py from the same kind of
text, with the shared CaseOps tokenizer), runs this checkout's train_gpt.py on CPU (one thread,
subprocesses) in the CONFIGS below, and writes OUT.json: per configuration its settings, the
sha256 of its artifact, its score lines (val_loss, val_bpb, final_int*, prequant*, untilted,
ttt phase, quantization gap) and its training lines (step losses, context switches, late QAT,
EMA, rate control...), with wall-clock figures (seconds, ms, tokens/s, dates) and paths taken
out, so that two runs of the same code compare equal. The data sets and a copy of every artifact
stay in the work folder (default: a new temporary folder), for eval-old later.

compare: prints each difference (configuration, line before / after) and exits 1 if there is
any; else prints "same behaviour: N configurations, M score lines, K artifacts identical" and
exits 0. Lines compare as text: the scores to every decimal the log prints (8 for val_loss and
val_bpb). --scores-only leaves the training lines out (for a change that rewords them).

eval-old: EVAL_ONLY with this checkout's train_gpt.py of the artifacts a `record` (of another
revision) kept in WORK_DIR, on the data kept there: OUT.json holds the eval-only configurations,
to compare with the record's (compare A.json OUT.json looks at those only).

The tool talks to train_gpt.py only through its environment variables, files and log lines
(nothing of it is imported), so it keeps working across a refactor of the script. Exit status:
0 same / done, 1 a difference or a failed run, 2 bad arguments or input.
"""
import argparse
import dataclasses
import datetime
import difflib
import glob
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "train_gpt.py")
CASEOPS_TOKENIZER = os.path.join(os.path.dirname(REPO), "shared", "tokenizers",
                                 "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
FORMAT = "same_behaviour/1"
MODEL_BUDGET = 50_000  # model bytes beside the code: the rate control and QAT's grid have to work for it


class InputError(Exception):
    """Bad arguments or input files: one line, exit 2."""


class RunError(Exception):
    """A run that failed or no longer covers what it should: exit 1."""


# ----- the configurations

# the tiny model of every run (launch.sh --smoke and tests/helpers.py sizes): ~0.1 M parameters, 16
# steps, a context growing 32 -> 64 -> 96, late QAT in the last 2 steps (lr scale under
# QAT_START_SCALE past 87 % of the run), the default 4 micro-steps (2 on 2 ranks)
TINY = dict(VOCAB_SIZE=512, NUM_LAYERS=3, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, ROPE_DIMS=8,
            RECUR_PASSES=0, TRAIN_SEQ_LEN=96, TRAIN_SEQ_SCHEDULE="32@0,64@0.3,96@0.6", TRAIN_BATCH_TOKENS=768,
            ITERATIONS=16, MAX_WALLCLOCK_SECONDS=0, WARMUP_STEPS=3, TRAIN_LOG_EVERY=1, EVAL_SEQ_LEN=96,
            EVAL_STRIDE=32, EVAL_BATCH_SEQS=8, VAL_TOKENS_LIMIT=2048, GPTQ_CALIB_SEQS=4, GPTQ_CALIB_LEN=64,
            GPTQ_BLOCK=32, TTT_CHUNK=16, TTT_RANK=4, TTT_BATCH_DOCS=4, TTT_LR=0.003, NGRAM_MIN_COUNT=1, SEED=1)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    covers: str
    data: str  # "plain" | "caseops"
    settings: dict
    ranks: int = 1
    budget: int = 0  # ARTIFACT_TARGET_BYTES = the code's bytes as shipped + this (0: the default target)
    eval_of: str = ""  # EVAL_ONLY of that configuration's artifact
    expect: tuple = ()  # log lines (regex) that show the run covers what it should


TRAINING = (
    Config("ttt_tilt", "TTT on and n-gram tilt on (their defaults), sliding + TTT scores tilted; progressive context "
           "(3 lengths); 4 micro-steps; compile warm-up undone; late QAT on the grid that fills the budget; EMA; "
           "GPTQ with a rate control of several rounds", "plain", dict(TINY), budget=MODEL_BUDGET,
           expect=(r"^training context 64 ", r"^training context 96 ", r"late QAT on", r"EMA", r"^rate control 1",
                   r"hints for [1-9]", r"^ttt phase 3/3", r"^final_int\d+_ttt .*untilted")),
    Config("recurrence", "depth recurrence on from 35 % (a layer x3, both depths compiled in the warm-up); parallel "
           "attention || MLP from layer 2; XSA on the last 2 layers; no document mask; no EMA; one training "
           "length; TTT off, tilt by a fixed beta (sliding is the final score); the default artifact target",
           "plain", {**TINY, "NUM_LAYERS": 4, "RECUR_PASSES": 2, "PARALLEL_FROM": 2, "XSA_LAYERS": 2, "DOC_MASK": 0,
                     "EMA_HORIZON": 0, "TRAIN_SEQ_LEN": 64, "TRAIN_SEQ_SCHEDULE": "", "WARMUP_STEPS": 2,
                     "EVAL_SEQ_LEN": 64, "TTT_ENABLED": 0, "NGRAM_LIFT": 0},
           expect=(r"depth recurrence on", r"late QAT on", r"^final_int\d+_sliding_window .*untilted")),
    Config("caseops", "CaseOps data (the shared CaseOps tokenizer, 8192 pieces) scored on the validation byte "
           "sidecar; TTT and tilt on; 8 steps of half the tokens in 2 micro-steps (late QAT in the last); the "
           "default artifact target", "caseops",
           {**TINY, "VOCAB_SIZE": 8192, "VAL_TOKENS_LIMIT": 1500, "ITERATIONS": 8, "TRAIN_BATCH_TOKENS": 384,
            "GRAD_ACCUM_STEPS": 2},
           expect=(r"^data: .*byte sidecar", r"late QAT on", r"^ttt phase 3/3", r"^final_int\d+_ttt ")),
    Config("two_ranks", "the ttt_tilt run on 2 CPU ranks under torchrun (gloo): every collective (2 micro-steps, "
           "Muon's shards, the rate control's broadcasts, the TTT document split), ranks agree", "plain",
           dict(TINY), ranks=2, budget=MODEL_BUDGET,
           expect=(r"world_size 2", r"checksum per rank: (\S+) \1 ", r"late QAT on", r"^final_int\d+_ttt ")),
)
EVAL_ONLY = tuple(
    Config(f"eval_only_{c.name}", f"EVAL_ONLY of {c.name}'s artifact on 1 rank (model settings from the artifact)",
           c.data, c.settings, eval_of=c.name, expect=(r"^final_int\d+_roundtrip ",))
    for c in TRAINING)
CONFIGS = TRAINING + EVAL_ONLY


# ----- log lines

SCORE_LINE = re.compile(r"val_bpb|val_loss|final_int|prequant|untilted|ttt phase|quantization gap")
TRAINING_LINE = re.compile(r"^(step:\d|training context|compile warm-up|late QAT|depth recurrence|step time|"
                           r"final weights|training done|calibration|rate control|n-gram tilt \(|weights checksum|"
                           r"parameters:|batch:|WARNING)")
OTHER_LINE = re.compile(r"^(\s|config:|eval-only:|data:|train_gpt\.py:)")  # settings, paths, the timing table
WALL_CLOCK = [  # (pattern, stand-in): what differs between two runs of the same code
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?"), "<date>"),
    (re.compile(r"\d+(\.\d+)? tokens/s\b"), "<n> tokens/s"),
    (re.compile(r"\d+(\.\d+)? ?(ms/step|ms|s)\b"), r"<\2>"),
    (re.compile(r"peak memory \d+(\.\d+)? MiB"), "peak memory <n> MiB"),
]


def strip_wall_clock(line, roots):
    """The line without its wall-clock figures and with `roots` (folders of this run) named."""
    for path, name in roots:
        line = line.replace(path, name)
    for pattern, stand_in in WALL_CLOCK:
        line = pattern.sub(stand_in, line)
    return line


def log_lines(stdout, roots):
    """(score lines, training lines) of a run's log, wall clock stripped."""
    scores, training = [], []
    for line in stdout.splitlines():
        line = strip_wall_clock(line.rstrip(), roots)
        if OTHER_LINE.match(line):
            continue
        if SCORE_LINE.search(line):
            scores.append(line)
        elif TRAINING_LINE.search(line):
            training.append(line)
    return scores, training


# ----- data

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder):
    """{relative path: sha256} of the files under `folder`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "**"), recursive=True)):
        if os.path.isfile(path):
            out[os.path.relpath(path, folder)] = sha256(path)
    return out


def smoke_data():
    tests = os.path.join(REPO, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import smoke_data as module  # the builder the tests and launch.sh --smoke use
    return module


def build_plain(folder):
    """The smoke data set: a 512-piece BPE tokenizer trained on synthetic text, 3 train shards, 1 val shard."""
    smoke_data().build(folder, vocab=512, train_docs=600, val_docs=80, train_shards=3, seed=0)


CASED = ["The USA and NASA agree.", "An iPhone at McDonald's.", "I said HELLO world.", "Über Élan, ÇA VA?"]


def build_caseops(folder, tokenizer):
    """CaseOps shards + the byte sidecar, by tools/caseops_prep.py, from synthetic text with capitals."""
    if not os.path.isfile(tokenizer):
        raise InputError(f"no CaseOps tokenizer at {tokenizer} (give one with --caseops-tokenizer)")
    os.makedirs(folder)
    shutil.copy(tokenizer, os.path.join(folder, "tokenizer.model"))  # the work folder holds all it needs
    rng = random.Random(6)
    docs = [d + " " + rng.choice(CASED) for d in smoke_data().make_docs(300, seed=6)]
    jsonl = os.path.join(folder, "docs.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "caseops_prep.py"), "--docs", jsonl,
                        "--num-val-docs", "60", "--tokenizer", os.path.join(folder, "tokenizer.model"),
                        "--out", os.path.join(folder, "data"), "--workers", "1"],
                       cwd=REPO, env=clean_env({}), capture_output=True, text=True)
    if p.returncode != 0:
        raise RunError(f"tools/caseops_prep.py failed: {(p.stderr or p.stdout).strip()[-2000:]}")


def data_paths(work, data):
    folder = os.path.join(work, "data", data)
    return os.path.join(folder, "data"), os.path.join(folder, "tokenizer.model")


# ----- running train_gpt.py

KEPT_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "VIRTUAL_ENV", "CONDA_PREFIX",
            "LD_LIBRARY_PATH", "PYTHONPATH")


def clean_env(settings):
    """The machine's basics and `settings` only: no stray setting of the caller's; one thread, CPU."""
    env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1",
               DEVICE="cpu", COMPILE="0")
    env.update({k: str(v) for k, v in settings.items()})
    return env


def launch(settings, ranks, cwd, timeout=900):
    cmd = [sys.executable, SCRIPT]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", SCRIPT]
    try:
        return subprocess.run(cmd, cwd=cwd, env=clean_env(settings), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RunError(f"train_gpt.py ran past {timeout}s in {cwd}: stopped") from None


def code_bytes_as_shipped(work):
    """The script's code bytes as it counts them, from its refusal of a 1-byte target: the model's
    budget must not depend on the size of the code (a refactor changes it)."""
    out = os.path.join(work, "runs", "probe_code_bytes")
    os.makedirs(out)
    data, tok = data_paths(work, "plain")
    p = launch({**TINY, "DATA_PATH": data, "TOKENIZER_PATH": tok, "OUT_DIR": out, "RUN_ID": "probe",
                "ARTIFACT_TARGET_BYTES": 1}, 1, out)
    m = re.search(r"(\d+) (?:bytes )?as shipped", p.stderr + p.stdout)
    if p.returncode == 0 or not m:
        raise RunError("cannot read the code's bytes as shipped from train_gpt.py's refusal of "
                       f"ARTIFACT_TARGET_BYTES=1 (exit {p.returncode}): {(p.stderr or p.stdout).strip()[-500:]}")
    return int(m.group(1))


def run_settings(config, work, code_bytes, artifact=None):
    """The config's environment for a run in work/runs/<name>, and its form for the record (paths named)."""
    data, tok = data_paths(work, config.data)
    paths = {"DATA_PATH": data, "TOKENIZER_PATH": tok, "OUT_DIR": os.path.join(work, "runs", config.name)}
    shown = {"DATA_PATH": f"<data:{config.data}>", "TOKENIZER_PATH": f"<tokenizer:{config.data}>", "OUT_DIR": "<out>"}
    extra = {"RUN_ID": config.name}
    if config.budget:
        extra["ARTIFACT_TARGET_BYTES"] = code_bytes + config.budget
        shown["ARTIFACT_TARGET_BYTES"] = f"code as shipped + {config.budget}"
    if artifact:
        paths["EVAL_ONLY"], shown["EVAL_ONLY"] = artifact, f"<artifact:{config.eval_of}>"
    settings = {**config.settings, **extra, **paths}
    return settings, {k: str(v) for k, v in sorted({**settings, **shown}.items())}


def check_covers(config, stdout):
    for pattern in config.expect:
        if not re.search(pattern, stdout, re.M):
            raise RunError(f"{config.name}: no log line matches /{pattern}/: the run no longer covers what it "
                           f"should ({config.covers})")


def run_config(config, work, code_bytes, roots, artifact=None):
    """One run of train_gpt.py -> its record entry (and the artifact it wrote, if any)."""
    settings, shown = run_settings(config, work, code_bytes, artifact)
    out = settings["OUT_DIR"]
    os.makedirs(out)
    t0 = time.perf_counter()
    p = launch(settings, config.ranks, out)
    with open(os.path.join(out, "stdout.txt"), "w") as f:
        f.write(p.stdout + ("\n--- stderr\n" + p.stderr if p.stderr else ""))
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-30:])
        raise RunError(f"{config.name}: train_gpt.py exited {p.returncode}; the end of its output:\n{tail}")
    check_covers(config, p.stdout)
    scores, training = log_lines(p.stdout, roots)
    entry = {"covers": config.covers, "ranks": config.ranks, "settings": shown, "scores": scores, "training": training}
    if artifact:
        entry["eval_of"], entry["input_artifact_sha256"] = config.eval_of, sha256(artifact)
    else:
        made = glob.glob(os.path.join(glob.escape(out), "*.ptz"))
        if len(made) != 1:
            raise RunError(f"{config.name}: expected one *.ptz artifact in {out}, found {len(made)}")
        artifact = made[0]
        entry["artifact_sha256"] = sha256(artifact)
    print(f"  {config.name}: {len(scores)} score lines, {len(training)} training lines "
          f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    return entry, artifact


def keep_artifact(work, name, path):
    dest = os.path.join(work, "artifacts", f"{name}.ptz")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copy(path, dest)
    return os.path.relpath(dest, work)


# ----- the commands

def git_revision():
    p = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else ""


def new_work_dir(work):
    if work is None:
        return tempfile.mkdtemp(prefix="same_behaviour_")
    work = os.path.abspath(work)
    if os.path.exists(work) and os.listdir(work):
        raise InputError(f"--work {work} is not empty (the runs refuse to write over earlier files)")
    os.makedirs(work, exist_ok=True)
    return work


def record_header(mode, work, data):
    return {"format": FORMAT, "mode": mode, "script": SCRIPT, "script_sha256": sha256(SCRIPT),
            "revision": git_revision(), "work": work,
            "created": datetime.datetime.now().isoformat(timespec="seconds"), "data": data, "configs": {}}


def write_record(path, record):
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def cmd_record(a):
    out = os.path.abspath(a.out)
    work = new_work_dir(a.work)
    t0 = time.perf_counter()
    print(f"record: {SCRIPT}; work folder {work}", file=sys.stderr, flush=True)
    build_plain(os.path.join(work, "data", "plain"))
    build_caseops(os.path.join(work, "data", "caseops"), a.caseops_tokenizer)
    data = {name: file_hashes(os.path.join(work, "data", name)) for name in ("plain", "caseops")}
    code_bytes = code_bytes_as_shipped(work)
    record, artifacts = record_header("record", work, data), {}
    roots = [(work, "<work>"), (REPO, "<repo>")]
    for config in CONFIGS:
        source = os.path.join(work, artifacts[config.eval_of]) if config.eval_of else None
        entry, made = run_config(config, work, code_bytes, roots, source)
        if not config.eval_of:
            entry["artifact"] = artifacts[config.name] = keep_artifact(work, config.name, made)
        record["configs"][config.name] = entry
    record["seconds"] = round(time.perf_counter() - t0, 1)
    write_record(out, record)
    print(f"record: {len(CONFIGS)} configurations in {record['seconds']:.0f}s -> {out}; artifacts in "
          f"{os.path.join(work, 'artifacts')}")


def old_work_dir(path):
    """The work folder of a record (its artifacts/ and data/), or its artifacts/ folder."""
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.join(path, "artifacts")) and os.path.basename(path) == "artifacts":
        path = os.path.dirname(path)
    if not (os.path.isdir(os.path.join(path, "artifacts")) and os.path.isdir(os.path.join(path, "data"))):
        raise InputError(f"{path} is not the work folder of a record (no artifacts/ and data/ in it)")
    return path


def cmd_eval_old(a):
    old = old_work_dir(a.artifact_dir)
    out = os.path.abspath(a.out)
    work = new_work_dir(a.work)
    t0 = time.perf_counter()
    print(f"eval-old: {SCRIPT} on the artifacts and data of {old}; work folder {work}", file=sys.stderr, flush=True)
    os.symlink(os.path.join(old, "data"), os.path.join(work, "data"))  # the old record's data: only the script changes
    data = {name: file_hashes(os.path.join(old, "data", name)) for name in ("plain", "caseops")}
    record = record_header("eval-old", work, data)
    record["artifacts_of"] = old
    roots = [(work, "<work>"), (old, "<work>"), (REPO, "<repo>")]
    for config in EVAL_ONLY:
        artifact = os.path.join(old, "artifacts", f"{config.eval_of}.ptz")
        if not os.path.isfile(artifact):
            raise InputError(f"{artifact} not found: {old} holds no artifact of {config.eval_of}")
        record["configs"][config.name], _ = run_config(config, work, 0, roots, artifact)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    write_record(out, record)
    print(f"eval-old: {len(EVAL_ONLY)} configurations in {record['seconds']:.0f}s -> {out}")


def load_record(path):
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"{path} is not a record of this tool (format {FORMAT})")
    return record


def compared_configs(a, b):
    """Every configuration of either; against an eval-old record, the eval-only ones."""
    names = list(dict.fromkeys([*a["configs"], *b["configs"]]))
    if "eval-old" in (a["mode"], b["mode"]):
        names = [n for n in names if "eval_of" in (a["configs"].get(n) or b["configs"].get(n))]
    return names


def line_differences(where, before, after):
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, before, after, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        for k in range(max(i2 - i1, j2 - j1)):
            old = before[i1 + k] if i1 + k < i2 else "(no such line)"
            new = after[j1 + k] if j1 + k < j2 else "(no such line)"
            out.append(f"{where}, line {i1 + k + 1}:\n  before: {old}\n  after:  {new}")
    return out


def config_differences(name, x, y, scores_only):
    diffs = []
    for key in ("settings", "artifact_sha256", "input_artifact_sha256"):
        if x.get(key) != y.get(key):
            diffs.append(f"{name}: {key} differs:\n  before: {x.get(key)}\n  after:  {y.get(key)}")
    for kind in ("scores",) if scores_only else ("scores", "training"):
        diffs += line_differences(f"{name}: {kind}", x[kind], y[kind])
    return diffs


def data_differences(x, y):
    diffs = []
    for data in sorted(set(x["data"]) | set(y["data"])):
        before, after = x["data"].get(data) or {}, y["data"].get(data) or {}
        changed = sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))
        if changed:
            diffs.append(f"data {data}: {', '.join(changed)} differ (the builders changed): the runs saw other data")
    return diffs


def cmd_compare(a):
    x, y = load_record(a.before), load_record(a.after)
    names, diffs = compared_configs(x, y), data_differences(x, y)
    for name in names:
        if name not in x["configs"] or name not in y["configs"]:
            diffs.append(f"{name}: only in {a.before if name in x['configs'] else a.after}")
            continue
        diffs += config_differences(name, x["configs"][name], y["configs"][name], a.scores_only)
    if diffs:
        print("\n".join(diffs))
        where = {d.split(":")[0] for d in diffs if not d.startswith("data ")}
        print(f"NOT the same behaviour: {len(diffs)} differences in {len(where)} of {len(names)} configurations"
              + (" and the data" if len(where) < len({d.split(":")[0] for d in diffs}) else ""))
        return 1
    configs = [x["configs"][n] for n in names]
    lines = sum(len(c["scores"]) for c in configs)
    artifacts = {c.get(k) for c in configs for k in ("artifact_sha256", "input_artifact_sha256")} - {None}
    training = "" if a.scores_only else f"; {sum(len(c['training']) for c in configs)} training lines"
    print(f"same behaviour: {len(names)} configurations, {lines} score lines, {len(artifacts)} artifacts "
          f"identical{training}")
    return 0


# ----- command line

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parser():
    p = Parser(prog="same_behaviour.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    r = sub.add_parser("record", help="run today's train_gpt.py in every configuration")
    r.add_argument("out", metavar="OUT.json")
    r.add_argument("--work", metavar="DIR", help="an empty or new folder for the data, runs and artifacts")
    r.add_argument("--caseops-tokenizer", metavar="MODEL", default=CASEOPS_TOKENIZER,
                   help="the CaseOps SentencePiece model (default: ../shared/tokenizers/ beside the checkout)")
    c = sub.add_parser("compare", help="compare two records")
    c.add_argument("before", metavar="A.json")
    c.add_argument("after", metavar="B.json")
    c.add_argument("--scores-only", action="store_true", help="leave the training lines out")
    e = sub.add_parser("eval-old", help="EVAL_ONLY with today's script of a record's artifacts")
    e.add_argument("artifact_dir", metavar="WORK_DIR", help="the --work folder of the record that made them")
    e.add_argument("out", metavar="OUT.json")
    e.add_argument("--work", metavar="DIR", help="an empty or new folder for the runs")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    try:
        return {"record": cmd_record, "compare": cmd_compare, "eval-old": cmd_eval_old}[a.command](a) or 0
    except InputError as e:
        print(f"same_behaviour.py: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"same_behaviour.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
