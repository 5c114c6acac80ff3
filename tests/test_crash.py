"""Crash safety: SIGKILL the driver at several points, resume each time, and end exactly where an
uninterrupted run with the same seed ends — no label lost or bought twice."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, SMOKE

CLI = [str(Path(sys.executable).parent / "asvp-ray")]
SETS = ["method=asvp", "refresh.policy=at_labels", "refresh.at=[100]", "budget.schedule=[40,30,30]",
        "data.pool.limit=240", "data.test.limit=100", "proxy.epochs=10", "train.epochs=1", "train.lp_epochs=1"]


def run_cli(out, kill_at=None):
    env = dict(os.environ, TQDM_DISABLE="1")
    env.pop("ASVP_KILL_AT", None)
    if kill_at:
        env["ASVP_KILL_AT"] = kill_at
    args = CLI + ["run", str(SMOKE), "--out", str(out)]
    for s in SETS:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)


def outcome(out):
    lab = pq.read_table(out / "labeled.parquet").to_pydict()
    s = json.loads((out / "summary.json").read_text())
    keys = ("round", "n_labeled", "n_selected", "selected_by", "feature_version", "refreshed")
    return lab, [{k: r[k] for k in keys} for r in s["rounds"]], s["status"], s["final"]["training_method"]


@pytest.mark.slow
@pytest.mark.long
def test_sigkill_at_many_points_then_resume_equals_straight_run(tmp_path):
    straight = tmp_path / "straight"
    r = run_cli(straight)
    assert r.returncode == 0, r.stderr[-3000:]
    want = outcome(straight)
    assert want[1][-1]["refreshed"] and want[2] == "finished"

    out = tmp_path / "killed"
    points = ["extract:v0:batch2",        # mid-extraction of v0
              "phase:proxy_train:r1",     # proxy training, round 1 (labels bought, round not committed)
              "phase:refresh_extract:r2", # a refresh (fine-tuned, re-extracting v1)
              "phase:final_train:r3"]     # the final training
    for point in points:
        r = run_cli(out, kill_at=point)
        assert r.returncode != 0, f"{point}: the run was not killed\n{r.stdout[-2000:]}"
        lab_path = out / "labeled.parquet"
        if lab_path.exists():  # what is on disk is never more than what state.json committed
            lab = pq.read_table(lab_path).to_pydict()
            assert len(set(lab["id"])) == len(lab["id"]), f"{point}: a label was bought twice"
    r = run_cli(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert outcome(out) == want
    assert not [p for p in (out / "features").iterdir() if p.name.startswith(".")]  # no half versions
    assert sorted(p.name for p in (out / "features").iterdir()) == ["v0", "v1"]
