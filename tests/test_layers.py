"""The package's layers (.importlinter), checked by import-linter: the contract is kept, and the
same contract with two layers swapped is reported broken (so the check can fail)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

LINT = [str(Path(sys.executable).parent / "lint-imports")]


def _lint(config: Path):
    return subprocess.run(LINT + ["--config", str(config), "--no-cache"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_the_layers_contract_is_kept():
    r = _lint(ROOT / ".importlinter")
    assert r.returncode == 0 and "1 kept, 0 broken" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_an_import_against_the_layers_is_reported(tmp_path):
    text = (ROOT / ".importlinter").read_text()
    swapped = text.replace("    asvp_ray.report\n    asvp_ray.loop\n", "    asvp_ray.loop\n    asvp_ray.report\n")
    assert swapped != text
    cfg = tmp_path / "swapped.importlinter"
    cfg.write_text(swapped)
    r = _lint(cfg)
    assert r.returncode != 0 and "BROKEN" in r.stdout and "asvp_ray.report -> asvp_ray.loop" in r.stdout, r.stdout[-3000:]
