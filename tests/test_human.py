"""Human-in-the-loop rounds through the CLI, with label files written as a labeller would."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from asvp_ray.cli import app
from asvp_ray.data.fashion_mnist import CLASSES, FashionMNISTSource
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
def human_run(ray_local, tmp_path, feature_cache):
    out = tmp_path / "hitl"
    code, text = cli("init", SMOKE, "--out", out, "--set", "budget.schedule=[30,20,20]",
                     "--set", "final.training_method=none", "--set", f"feature_cache={feature_cache}")
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
    code, text = cli("label", out, good)  # the same file again: nothing changes
    assert code == 0 and "imported 0 label(s)" in text and "30 already stored with the same label" in text
    assert cli("select", out)[0] == 0
    code, text = cli("label", out, good)  # and after the round closed
    assert code == 0 and "30 already stored" in text
    changed = tmp_path / "changed.csv"
    other = (TRUTH[ids0[3]] + 1) % 10
    changed.write_text("id,label\n" + "".join(f"{i},{other if i == ids0[3] else TRUTH[i]}\n" for i in ids0))
    code, text = cli("label", out, changed)
    assert code == 2 and f"id {ids0[3]} is already labelled {CLASSES[TRUTH[ids0[3]]]!r} (round 0)" in text
    assert f"this file says {CLASSES[other]!r}" in text
    lab = RunDir(out).read_labeled()
    assert len(lab["id"]) == 30 and np.array_equal(lab["label"], TRUTH[lab["id"]])


def ls_rows(tasks, labels_of, first_task_id=1):
    """Rows as Label Studio 1.23 writes them in a CSV/TSV/JSON_MIN export: data fields, Label
    Studio's own task ``id`` and annotation columns (one row per annotation)."""
    rows = []
    for k, t in enumerate(tasks):
        for a, lab in enumerate(labels_of(t["data"]["asvp_id"])):
            rows.append({"annotation_id": 100 * k + a, "annotator": "1", "asvp_id": t["data"]["asvp_id"],
                         "classes": json.dumps(t["data"]["classes"]), "created_at": f"2026-01-01T00:{a:02d}:00Z",
                         "id": first_task_id + k, "image": t["data"]["image"], "label": lab, "lead_time": "",
                         "path": t["data"]["path"], "round": t["data"]["round"],
                         "updated_at": f"2026-01-01T00:{a:02d}:00Z"})
    return rows


def write_ls_csv(path, rows, sep=","):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=sep, quoting=csv.QUOTE_NONNUMERIC)
        w.writeheader()
        w.writerows(rows)


def test_label_studio_exports_are_read_through_asvp_id(human_run, tmp_path):
    """Issue 15's regression: a CSV export of a subset whose Label Studio task ids happen to be
    pending pool ids must store each label on its asvp_id, never on the task id."""
    out = human_run
    assert cli("select", out)[0] == 0
    ids0 = queried(out, 0)
    tasks = json.loads((out / "queries" / "round-0.labelstudio.json").read_text())
    # Fashion-MNIST: the tasks link PNGs written for the round, URL-encoded local-files URLs
    png = out / "queries" / "round-0" / f"{ids0[0]}.png"
    from pathlib import Path

    from PIL import Image

    from asvp_ray.data.fashion_mnist import read_idx
    src = FashionMNISTSource(split="train", limit=400)
    assert np.array_equal(np.asarray(Image.open(png)), read_idx(Path(src.images_path), np.array([ids0[0]]))[0])
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=" + str(png.resolve()).lstrip("/")
    # a subset of 8 tasks whose Label Studio task ids are pending pool ids other than their own
    sub = tasks[:8]
    decoys = [i for i in ids0 if i not in [t["data"]["asvp_id"] for t in sub]][:8]
    rows = ls_rows(sub, lambda i: [CLASSES[TRUTH[i]]])
    for r, d in zip(rows, decoys):
        r["id"] = d
    write_ls_csv(tmp_path / "subset.csv", rows)
    code, text = cli("label", out, tmp_path / "subset.csv")
    assert code == 0 and "imported 8 label(s) into round 0" in text and "labelstudio-csv" in text, text
    lab = RunDir(out).read_labeled()
    assert sorted(lab["id"].tolist()) == sorted(t["data"]["asvp_id"] for t in sub)
    assert np.array_equal(lab["label"], TRUTH[lab["id"]]) and not set(decoys) & set(lab["id"].tolist())
    # the same export without asvp_id is refused, never read through Label Studio's id
    for r in rows:
        del r["asvp_id"]
    write_ls_csv(tmp_path / "noasvp.csv", rows)
    code, text = cli("label", out, tmp_path / "noasvp.csv")
    assert code == 2 and "without an asvp_id column" in text and "labelstudio.json" in text
    json.dump([{k: v for k, v in r.items()} for r in rows], open(tmp_path / "noasvp.json", "w"))
    code, text = cli("label", out, tmp_path / "noasvp.json")
    assert code == 2 and "no asvp_id" in text
    assert len(RunDir(out).read_labeled()["id"]) == 8
    # several annotations per task: error (default), then majority, then last; TSV and JSON_MIN
    rest = tasks[8:]
    votes = {t["data"]["asvp_id"]: [CLASSES[TRUTH[t["data"]["asvp_id"]]]] for t in rest}
    a, b, c = (t["data"]["asvp_id"] for t in rest[:3])
    wrong = lambda i: CLASSES[(TRUTH[i] + 1) % 10]  # noqa: E731
    votes[a] = [wrong(a), CLASSES[TRUTH[a]], CLASSES[TRUTH[a]]]  # majority right
    votes[b] = [wrong(b), CLASSES[TRUTH[b]]]  # a tie; the last (later updated_at) is right
    write_ls_csv(tmp_path / "multi.tsv", ls_rows(rest, lambda i: votes[i]), sep="\t")
    code, text = cli("label", out, tmp_path / "multi.tsv")
    assert code == 2 and f"id {a}: conflicting labels" in text and f"id {b}: conflicting labels" in text
    code, text = cli("label", out, tmp_path / "multi.tsv", "--agreement", "majority")
    assert code == 2 and f"id {b}: conflicting labels with no majority (a tie)" in text and f"id {a}: conflicting" not in text
    assert len(RunDir(out).read_labeled()["id"]) == 8
    json.dump(ls_rows(rest, lambda i: votes[i]), open(tmp_path / "multi.json", "w"))  # JSON_MIN
    code, text = cli("label", out, tmp_path / "multi.json", "--agreement", "last")
    assert code == 0 and "imported 22 label(s) into round 0; 0 pending (labelstudio-json_min; 2 disagreement(s) " \
                         "settled by last)" in text, text
    lab = RunDir(out).read_labeled()
    assert len(lab["id"]) == 30 and np.array_equal(lab["label"], TRUTH[lab["id"]])
    # the round record keeps the imports and the policy
    assert cli("select", out)[0] == 0
    rec = json.loads((out / "summary.json").read_text())["rounds"][0]
    assert rec["label_agreement"] == "last"
    assert [(i["format"], i["imported"], i["agreement"]) for i in rec["label_imports"]] == [
        ("labelstudio-csv", 8, "error"), ("labelstudio-json_min", 22, "last")]


def test_task_links_are_url_encoded_files_or_uris(tmp_path):
    """Image files are linked as URL-encoded local-files URLs relative to label.local_files_root;
    URIs stay as they are; an image outside the root is refused, naming the setting."""
    from urllib.parse import parse_qs, urlsplit

    from asvp_ray.data.files import ImageFolderSource, ManifestSource
    from asvp_ray.core.errors import BadInputError
    from asvp_ray.loop.human import write_queries
    from tests.conftest import write_images

    folder = tmp_path / "imgs"
    names = ["a#1.png", "b&c+d e.png", "plain.png"]
    for p, name in zip(write_images(folder, 3), names):
        p.rename(folder / name)
    src = ImageFolderSource(str(folder))
    rd = RunDir(tmp_path / "run")
    write_queries(rd, 0, src.ids, src, ["x", "y"], local_files_root=str(tmp_path))
    tasks = json.loads((tmp_path / "run" / "queries" / "round-0.labelstudio.json").read_text())
    got = {}
    for t in tasks:
        url = t["data"]["image"]
        assert url.startswith("/data/local-files/?d=imgs/") and "#" not in url and "&" not in url.split("?d=")[1]
        got[parse_qs(urlsplit(url).query)["d"][0]] = t["data"]["asvp_id"]
    assert sorted(got) == sorted(f"imgs/{n}" for n in names)
    assert not (tmp_path / "run" / "queries" / "round-0").exists()  # files are linked, not copied
    with pytest.raises(BadInputError, match="label.local_files_root"):
        write_queries(rd, 0, src.ids, src, ["x", "y"], local_files_root=str(tmp_path / "elsewhere"))
    (tmp_path / "m.csv").write_text("id,path\n7,s3://bucket/a b.png\n")
    man = ManifestSource(str(tmp_path / "m.csv"))
    write_queries(rd, 1, man.ids, man, ["x"])
    tasks = json.loads((tmp_path / "run" / "queries" / "round-1.labelstudio.json").read_text())
    assert tasks[0]["data"]["image"] == "s3://bucket/a b.png"
