"""tools/same_behaviour.py compare, on two small hand-made records (the record itself runs the
script in several configurations: too slow for the suite)."""
import copy
import json
import os
import subprocess
import sys

from helpers import REPO_ROOT

TOOL = os.path.join(REPO_ROOT, "tools", "same_behaviour.py")

RECORD = {
    "format": "same_behaviour/1", "mode": "record", "work": "/somewhere", "created": "2024-01-01T00:00:00",
    "data": {"plain": {"tokenizer.model": "ab12", "data/fineweb_val_000000.bin": "cd34"}},
    "configs": {
        "ttt_tilt": {"settings": {"SEED": "1"}, "artifact_sha256": "e5f6", "training": ["step:1 train_loss:6.2411"],
                     "scores": ["final_int6_roundtrip val_loss:2.46055533 val_bpb:1.04801122 (<s>)",
                                "final_int6_ttt val_loss:2.82163599 val_bpb:1.20180438 (n-gram tilt, <s>)"]},
        "eval_only_ttt_tilt": {"settings": {"SEED": "1"}, "eval_of": "ttt_tilt", "input_artifact_sha256": "e5f6",
                               "training": [], "scores": ["final_int6_ttt val_loss:2.82163599 val_bpb:1.20180438"]},
    },
}


def compare(tmp_path, before, after):
    paths = []
    for name, record in (("a.json", before), ("b.json", after)):
        (tmp_path / name).write_text(json.dumps(record))
        paths.append(str(tmp_path / name))
    return subprocess.run([sys.executable, TOOL, "compare", *paths], capture_output=True, text=True, timeout=60)


def test_compare_same_records_and_a_score_off_in_the_8th_decimal(tmp_path):
    after = copy.deepcopy(RECORD)
    after.update(work="/elsewhere", created="2025-06-30T12:00:00")  # where and when: not behaviour
    p = compare(tmp_path, RECORD, after)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith(
        "same behaviour: 2 configurations, 3 score lines, 1 artifacts identical")
    changed = "final_int6_ttt val_loss:2.82163599 val_bpb:1.20180439 (n-gram tilt, <s>)"
    after["configs"]["ttt_tilt"]["scores"][1] = changed
    p = compare(tmp_path, RECORD, after)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "ttt_tilt: scores, line 2:" in p.stdout and "eval_only" not in p.stdout, p.stdout
    assert f"after:  {changed}" in p.stdout and RECORD["configs"]["ttt_tilt"]["scores"][1] in p.stdout
    assert "same behaviour" not in p.stdout.replace("NOT the same behaviour", "")
