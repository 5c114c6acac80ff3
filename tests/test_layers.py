"""The package's layers and its freedom from import circles (.importlinter), checked by
import-linter: both contracts are kept; the same layers with two swapped are reported broken, and a
copy of the package with one circle added is reported (so each check can fail)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

LINT = [str(Path(sys.executable).parent / "lint-imports")]


def _lint(config: Path, root: Path = ROOT):
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(LINT + ["--config", str(config), "--no-cache"], capture_output=True, text=True, cwd=root,
                          timeout=300, env=env)


def test_the_layers_contract_is_kept():
    r = _lint(ROOT / ".importlinter")
    assert r.returncode == 0 and "2 kept, 0 broken" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_an_import_against_the_layers_is_reported(tmp_path):
    text = (ROOT / ".importlinter").read_text()
    swapped = text.replace("    asvp_ray.report\n    asvp_ray.loop\n", "    asvp_ray.loop\n    asvp_ray.report\n")
    assert swapped != text
    cfg = tmp_path / "swapped.importlinter"
    cfg.write_text(swapped)
    r = _lint(cfg)
    assert r.returncode != 0 and "BROKEN" in r.stdout and "asvp_ray.report -> asvp_ray.loop" in r.stdout, r.stdout[-3000:]


def test_an_import_circle_is_reported(tmp_path):
    """A copy of the package where loop/process.py (which the driver imports) imports the driver
    back, inside a function as the package's own lazy imports do: the acyclic contract breaks and
    names the two modules."""
    shutil.copytree(ROOT / "asvp_ray", tmp_path / "asvp_ray", ignore=shutil.ignore_patterns("__pycache__"))
    process = tmp_path / "asvp_ray" / "loop" / "process.py"
    process.write_text(process.read_text() + "\n\ndef _driver():\n    from asvp_ray.loop.driver import Driver\n\n"
                       "    return Driver\n")
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    r = _lint(tmp_path / ".importlinter", root=tmp_path)
    assert r.returncode != 0, r.stdout[-3000:]
    assert "1 kept, 1 broken" in r.stdout and "No cycles are allowed in asvp_ray.loop" in r.stdout, r.stdout[-3000:]
    assert ".process -> .driver" in r.stdout, r.stdout[-3000:]
