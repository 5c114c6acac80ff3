"""The command line, end to end, as a user runs it (a fresh process with its own local Ray)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SMOKE
from tests.reference import check_proxy_against_reference

CLI = [str(Path(sys.executable).parent / "asvp-ray")]


def run_cli(*args, timeout=600):
    env = dict(os.environ, TQDM_DISABLE="1")
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_help_lists_subcommands_with_descriptions():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("extract", "run"):
        assert cmd in r.stdout
    assert "active-learning experiment" in r.stdout


def test_smoke_run_end_to_end_then_resume_says_finished(tmp_path):
    out = tmp_path / "smoke"
    # no final model: the rounds, the commit and the resume are what this checks (final models: test_methods)
    r = run_cli("run", str(SMOKE), "--out", str(out), "--set", "budget.schedule=[40,40]",
                "--set", "final.training_method=none")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "round  1: +40 by margin" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and [x["n_labeled"] for x in summary["rounds"]] == [40, 80]
    # the proxy as good as an independent reference on the same features and labels (tests/reference.py)
    check_proxy_against_reference(out, [x["proxy_test_accuracy"] for x in summary["rounds"]])
    again = run_cli("run", str(SMOKE), "--out", str(out), "--set", "budget.schedule=[40,40]",
                    "--set", "final.training_method=none")
    assert again.returncode == 0 and "already finished" in again.stdout


def test_config_typo_fails_before_anything_is_written(tmp_path):
    out = tmp_path / "typo"
    r = run_cli("run", str(SMOKE), "--out", str(out), "--set", "proxy.epoch=3")
    assert r.returncode == 2
    assert "Did you mean 'proxy.epochs'" in r.stderr
    assert not out.exists()


def test_extract_command_writes_a_version(tmp_path):
    r = run_cli("extract", str(SMOKE), "--out", str(tmp_path), "--set", "data.pool.limit=64",
                "--set", "data.test=null")
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "features" / "v0" / "meta.json").read_text())
    assert meta["rows"] == 64 and meta["test_source"] is None


@pytest.mark.slow
@pytest.mark.long
def test_standard_smoke_run_through_the_cli(tmp_path):
    out = tmp_path / "standard"
    r = run_cli("run", str(SMOKE), "--out", str(out), "--set", "method=standard", "--set", "budget.schedule=[40,40]",
                "--set", "train.epochs=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "final model: ft" in r.stdout
    # a console a newcomer can read: no per-epoch report line from every Ray Train worker
    assert "Reporting training result" not in r.stdout + r.stderr
    # nor Ray Data's own progress notices and per-dataset "execution finished" lines
    assert "execution finished" not in r.stdout + r.stderr and "Progress bars disabled" not in r.stdout + r.stderr
    assert "RayDeprecationWarning" not in r.stdout + r.stderr  # Ray Train's own use of a deprecated field
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "standard" and s["status"] == "finished"
    assert s["rounds"][1]["seconds"]["finetune"] > 0 and s["rounds"][1]["seconds"]["score_pool"] > 0
    acc = s["final"]["test_accuracy"]  # 1 epoch from random weights: no threshold, but the figure the user
    assert f"{acc:.4f}" in r.stdout     # is told, an accuracy over the 200 test images
    assert acc * 200 == pytest.approx(round(acc * 200), abs=1e-6)
    check_proxy_against_reference(out, [x["proxy_test_accuracy"] for x in s["rounds"]])
    assert s["cost"]["compute_seconds"]["finetune"]["cpu"] > 0
