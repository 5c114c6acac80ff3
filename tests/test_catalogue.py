"""The catalogue of bad inputs (docs/bad-input.md): each fails with a message that names the item and the fix,
a non-zero exit code, and leaves the run directory's state as it was."""
from __future__ import annotations

import errno
import hashlib
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from asvp_ray.cli import app
from asvp_ray.config import load_config
from asvp_ray.loop.driver import Driver
from asvp_ray.loop.rundir import RunDir
from tests.conftest import SMOKE, write_images

runner = CliRunner()
BASE = ["budget.schedule=[30,30]", "proxy.epochs=5", "final.training_method=none"]


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def snapshot(out):
    """Hashes of every committed file of a run directory (not the log or the lock)."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name not in ("run.log", ".lock"):
            files[str(p.relative_to(out))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


@pytest.fixture(scope="module")
def one_round_run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("cat") / "run"
    d = Driver(load_config(str(SMOKE), BASE), str(out))
    d.prepare()
    d.run_round()
    d.close()
    return out


@pytest.fixture
def run_dir(one_round_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_round_run, out)
    return out


def sets(*extra):
    args = []
    for s in BASE + list(extra):
        args += ["--set", s]
    return args


@pytest.mark.parametrize("extra,match", [
    (["strategy=marginn"], "unknown strategy 'marginn'. Did you mean 'margin'?"),
    (["method=svp"], "config key 'method'"),
    (["proxy.epochs=ten"], "config key 'proxy.epochs'"),
    (["proxy.hiden=3"], "Did you mean 'proxy.hidden'?"),
    (["budget.schedule=[30,30,30]"], "differs in: budget.schedule"),
])
def test_config_errors_leave_the_run_as_it_was(run_dir, extra, match):
    before = snapshot(run_dir)
    code, text = cli("run", SMOKE, "--out", run_dir, *sets(*extra))
    assert code == 2 and match in text, text
    assert snapshot(run_dir) == before


def test_budget_larger_than_the_pool_writes_nothing(tmp_path):
    out = tmp_path / "new"
    code, text = cli("run", SMOKE, "--out", out, *sets("budget.schedule=[300,300]"))
    assert code == 2 and "buys 600 labels but the pool holds 400 images; shorten the schedule" in text
    assert snapshot(out) == {}


def test_second_process_is_refused(run_dir):
    before = snapshot(run_dir)
    rd = RunDir(run_dir).lock()
    try:
        code, text = cli("run", SMOKE, "--out", run_dir, *sets())
    finally:
        rd.unlock()
    assert code == 2 and "in use by another asvp-ray process" in text
    assert snapshot(run_dir) == before


def test_damaged_feature_file_is_reported(run_dir):
    import pyarrow.parquet as pq

    from asvp_ray.features.parts import arrow_to_features, features_to_arrow

    part = next((run_dir / "features" / "v0").glob("part-*.parquet"))
    ids, feats = arrow_to_features(pq.read_table(part))
    feats = feats.copy()
    feats[5, 0] = np.inf
    pq.write_table(features_to_arrow(ids, feats), part)
    before = snapshot(run_dir)
    code, text = cli("run", SMOKE, "--out", run_dir, *sets())
    assert code == 2 and f"NaN or infinite values for ids [{ids[5]}]" in text
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage,match", [
    ("corrupt_jpeg", "unreadable or corrupt image"),
    ("truncated_png", "unreadable or corrupt image"),
    ("missing", "missing file"),
])
def test_bad_images_stop_the_run_before_anything_is_complete(ray_local, tmp_path, damage, match):
    from PIL import Image

    paths = write_images(tmp_path / "imgs", 8, size=(16, 16))
    jpg = tmp_path / "imgs" / "x.jpg"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(jpg)
    paths.append(jpg)
    if damage == "corrupt_jpeg":
        jpg.write_bytes(jpg.read_bytes()[:20] + b"\x00" * 50)
        bad = jpg
    elif damage == "truncated_png":
        bad = paths[2]
        bad.write_bytes(bad.read_bytes()[:100])
    else:
        bad = paths[4]
        bad.unlink()
    rows = "".join(f"{100 + k},imgs/{p.name},{k % 2}\n" for k, p in enumerate(paths))
    (tmp_path / "m.csv").write_text("id,path,label\n" + rows)
    out = tmp_path / "run"
    code, text = cli("run", SMOKE, "--out", out, *sets("data.pool={kind: manifest, path: " + str(tmp_path / "m.csv") + "}",
                                                     "data.test=null", "data.classes=[a,b]", "budget.schedule=[4]"))
    assert code == 2 and match in text and bad.name in text and "skip_unreadable" in text, text
    assert not (out / "summary.json").exists() and not (out / "state.json").exists()
    assert not (out / "features").exists() or not any((out / "features").iterdir())


def test_disk_full_while_committing_keeps_the_previous_state(run_dir, monkeypatch):
    import builtins

    d = Driver(load_config(str(SMOKE), BASE), str(run_dir))
    d.prepare()  # (rewrites the copied run's absolute paths)
    before = snapshot(run_dir)
    real_open = builtins.open

    def full_open(path, mode="r", *a, **k):
        if "w" in mode and ".tmp-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", full_open)
    from asvp_ray.core.errors import RunDirError

    with pytest.raises(RunDirError, match="no space left on the device.*previous version of it is intact"):
        d.run_round()
    monkeypatch.setattr(builtins, "open", real_open)
    d.close()
    assert snapshot(run_dir) == before
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]
    # and the run continues once there is space again
    d = Driver(load_config(str(SMOKE), BASE), str(run_dir))
    d.run()
    d.close()
    assert RunDir(run_dir).read_state()["next_round"] == 2
