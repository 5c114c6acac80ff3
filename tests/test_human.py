"""Human-in-the-loop rounds through the CLI, with label files written as a labeller would."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from asvp_ray.cli import app
from asvp_ray.data.fashion_mnist import CLASSES
from asvp_ray.data.sources import FashionMNISTSource
from asvp_ray.loop.rundir import RunDir
from tests.conftest import SMOKE

runner = CliRunner()
TRUTH = FashionMNISTSource(split="train", limit=400).labels


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def queried(out, k):
    lines = (out / "queries" / f"round-{k}.csv").read_text().splitlines()
    assert lines[0] == "id,path"
    return [int(line.split(",")[0]) for line in lines[1:]]


@pytest.fixture
def human_run(ray_local, tmp_path):
    out = tmp_path / "hitl"
    code, text = cli("init", SMOKE, "--out", out, "--set", "budget.schedule=[30,20,20]",
                     "--set", "final.training_method=none")
    assert code == 0, text
    return out


def test_three_rounds_with_csv_parquet_and_label_studio_files(human_run, tmp_path):
    out = human_run
    # round 0: a CSV with class names, imported in two parts
    code, text = cli("select", out)
    assert code == 0, text
    ids0 = queried(out, 0)
    assert len(ids0) == 30
    ls_tasks = json.loads((out / "queries" / "round-0.labelstudio.json").read_text())
    assert [t["data"]["asvp_id"] for t in ls_tasks] == ids0 and ls_tasks[0]["data"]["classes"] == list(CLASSES)
    half = tmp_path / "r0a.csv"
    half.write_text("id,label\n" + "".join(f'{i},"{CLASSES[TRUTH[i]]}"\n' for i in ids0[:15]))
    code, text = cli("label", out, half)
    assert code == 0 and "imported 15 label(s) into round 0; 15 pending" in text
    code, text = cli("select", out)  # refuses while ids are pending
    assert code == 2 and "round 0 still has 15 pending id(s)" in text
    rest = tmp_path / "r0b.csv"
    rest.write_text("id,label\n" + "".join(f"{i},{TRUTH[i]}\n" for i in ids0[15:]))  # class indices
    assert cli("label", out, rest)[0] == 0
    # round 1: Parquet
    code, text = cli("select", out)
    assert code == 0 and "round  0:" in text and "round 1: 20 images selected by margin" in text
    ids1 = queried(out, 1)
    pq.write_table(pa.table({"id": ids1, "label": [CLASSES[TRUTH[i]] for i in ids1]}), tmp_path / "r1.parquet")
    assert cli("label", out, tmp_path / "r1.parquet")[0] == 0
    # round 2: a Label Studio export (one task left unannotated, then closed with --close)
    assert cli("select", out)[0] == 0
    tasks = json.loads((out / "queries" / "round-2.labelstudio.json").read_text())
    export = [dict(t, annotations=[{"result": [{"value": {"choices": [CLASSES[TRUTH[t["data"]["asvp_id"]]]]}}]}])
              for t in tasks[:-1]] + [dict(tasks[-1], annotations=[])]
    (tmp_path / "export.json").write_text(json.dumps(export))
    code, text = cli("label", out, tmp_path / "export.json")
    assert code == 0 and "imported 19 label(s) into round 2; 1 pending" in text
    code, text = cli("status", out)
    assert code == 0 and "total labelled: 69; pending: 1" in text
    code, text = cli("select", out, "--close")
    assert code == 0 and "all rounds are done" in text
    summary = json.loads((out / "summary.json").read_text())
    assert [r["n_labeled"] for r in summary["rounds"]] == [30, 50, 69]
    lab = RunDir(out).read_labeled()
    assert len(np.unique(lab["id"])) == 69 and np.array_equal(lab["label"], TRUTH[lab["id"]])
    assert np.bincount(lab["round"]).tolist() == [30, 20, 19]


def test_bad_label_files_change_nothing(human_run, tmp_path):
    out = human_run
    assert cli("select", out)[0] == 0
    ids0 = queried(out, 0)
    before = (out / "labeled.parquet").read_bytes() if (out / "labeled.parquet").exists() else None
    not_selected = next(i for i in range(400) if i not in ids0)
    cases = {
        "typo.csv": ("id,label\n" + f"{ids0[0]},Shirtt\n", "label 'Shirtt' is not one of the 10 classes"),
        "dup.csv": (f"id,label\n{ids0[0]},Shirt\n{ids0[0]},Coat\n", "conflicting labels"),
        "nonint.csv": (f"id,label\nabc,Shirt\n", "id 'abc' is not an integer"),
        "stranger.csv": (f"id,label\n{not_selected},Shirt\n", f"id {not_selected} is not pending in the open round 0"),
        "cols.csv": ("image,label\n1,Shirt\n", "missing column(s) ['id']"),
    }
    for name, (content, match) in cases.items():
        (tmp_path / name).write_text(content)
        code, text = cli("label", out, tmp_path / name)
        assert code == 2 and match in text, (name, text)
        after = (out / "labeled.parquet").read_bytes() if (out / "labeled.parquet").exists() else None
        assert after == before
    # the typo error names the line of the file
    code, text = cli("label", out, tmp_path / "typo.csv")
    assert "typo.csv line 2" in text
    # an import for a closed round
    good = tmp_path / "good.csv"
    good.write_text("id,label\n" + "".join(f"{i},{TRUTH[i]}\n" for i in ids0))
    assert cli("label", out, good)[0] == 0
    assert cli("select", out)[0] == 0
    code, text = cli("label", out, good)
    assert code == 2 and "is already labelled (round 0, which is closed)" in text
