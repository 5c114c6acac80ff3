"""A live round trip with a real Label Studio server (issue 15): push the round's tasks through
the API, annotate through the API, export in every format, and check that ``asvp-ray label``
stores exactly the annotated labels, on the right images."""
from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from asvp_ray.data.fashion_mnist import CLASSES
from asvp_ray.loop.rundir import RunDir
from tests.conftest import SMOKE
from tests.test_human import TRUTH, cli, queried

PROJECT = "asvp live round trip"


@pytest.fixture
def ls(labelstudio_server, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", labelstudio_server["token"])
    s = requests.Session()
    s.headers["Authorization"] = f"Token {labelstudio_server['token']}"
    return dict(labelstudio_server, http=s)


def _tasks(ls, pid):
    r = ls["http"].get(ls["url"] + "/api/tasks", params={"project": pid, "page_size": 1000, "fields": "all"})
    r.raise_for_status()
    return r.json()["tasks"]


def _annotate(ls, task_id, label):
    r = ls["http"].post(ls["url"] + f"/api/tasks/{task_id}/annotations",
                        json={"result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                          "value": {"choices": [label]}}]})
    assert r.status_code == 201, r.text
    time.sleep(0.01)  # distinct updated_at for agreement: last


def _export(ls, pid, fmt, path):
    r = ls["http"].get(ls["url"] + f"/api/projects/{pid}/export", params={"exportType": fmt})
    r.raise_for_status()
    path.write_bytes(r.content)
    return path


def test_round_trip_through_a_real_label_studio(ls, request, tmp_path, monkeypatch):
    request.getfixturevalue("ray_local")  # after the server fixture, so a missing Label Studio skips at once
    cache = request.getfixturevalue("feature_cache")
    t0 = time.monotonic()
    out = ls["root"] / "run"  # under LOCAL_FILES_DOCUMENT_ROOT, so the server can show the PNGs
    code, text = cli("init", SMOKE, "--out", out, "--set", "budget.schedule=[12,8]", "--set",
                     "final.training_method=none", "--set", f"label.local_files_root={ls['root']}",
                     "--set", f"feature_cache={cache}")
    assert code == 0, text
    t_init = time.monotonic() - t0
    # round 0 pushed through the API: project, config, tasks, a Local Files storage
    code, text = cli("select", out, "--labelstudio", ls["url"], "--project", PROJECT)
    assert code == 0 and f"Label Studio project {PROJECT!r}" in text and "imported 12 task(s)" in text, text
    assert "warning" not in text
    pid = next(p["id"] for p in ls["http"].get(ls["url"] + "/api/projects").json()["results"]
               if p["title"] == PROJECT)
    tasks = _tasks(ls, pid)
    ids0 = queried(out, 0)
    assert sorted(t["data"]["asvp_id"] for t in tasks) == sorted(ids0)
    # a labeller sees the image: the server serves the round's PNG for the task's link
    t = tasks[0]
    img = ls["http"].get(ls["url"] + t["data"]["image"])
    assert img.status_code == 200 and img.content == (out / "queries" / "round-0" / f"{t['data']['asvp_id']}.png").read_bytes()
    # pushing the open round again changes nothing
    code, text = cli("select", out, "--labelstudio", ls["url"], "--project", PROJECT)
    assert code == 0 and "round 0 is open with 12 pending" in text and "imported 0 task(s), 12 already there" in text
    assert len(_tasks(ls, pid)) == 12
    # annotate 10 of 12 (one twice, in agreement); Label Studio's task ids differ from the pool ids
    assert any(t["id"] != t["data"]["asvp_id"] for t in tasks)
    done = tasks[:10]
    for t in done:
        _annotate(ls, t["id"], CLASSES[TRUTH[t["data"]["asvp_id"]]])
    _annotate(ls, done[0]["id"], CLASSES[TRUTH[done[0]["data"]["asvp_id"]]])
    # every export format: the first stores 10 labels, the others find exactly the same ones
    for k, fmt in enumerate(["CSV", "TSV", "JSON_MIN", "JSON"]):
        f = _export(ls, pid, fmt, tmp_path / f"export-{fmt}.{ {'CSV': 'csv', 'TSV': 'tsv'}.get(fmt, 'json') }")
        code, text = cli("label", out, f)
        assert code == 0, (fmt, text)
        if k == 0:
            assert "imported 10 label(s) into round 0; 2 pending (labelstudio-csv)" in text, text
        else:
            assert "imported 0 label(s) into round 0; 2 pending" in text and "10 already stored" in text, (fmt, text)
    lab = RunDir(out).read_labeled()
    assert sorted(lab["id"].tolist()) == sorted(t["data"]["asvp_id"] for t in done)
    assert np.array_equal(lab["label"], TRUTH[lab["id"]])
    # the last two, pulled through the API
    for t in tasks[10:]:
        _annotate(ls, t["id"], CLASSES[TRUTH[t["data"]["asvp_id"]]])
    code, text = cli("label", out, "--labelstudio", ls["url"], "--project", PROJECT)
    assert code == 0 and "imported 2 label(s) into round 0; 0 pending" in text and "10 already stored" in text, text
    # round 1 into the same project; one task gets two annotations that disagree
    code, text = cli("select", out, "--labelstudio", ls["url"], "--project", PROJECT)
    assert code == 0 and "imported 8 task(s)" in text, text
    ids1 = queried(out, 1)
    new = [t for t in _tasks(ls, pid) if t["data"]["asvp_id"] in ids1]
    assert len(new) == 8
    for t in new:
        _annotate(ls, t["id"], CLASSES[TRUTH[t["data"]["asvp_id"]]])
    odd = new[0]
    wrong = CLASSES[(TRUTH[odd["data"]["asvp_id"]] + 1) % 10]
    _annotate(ls, odd["id"], wrong)  # the later annotation is wrong
    code, text = cli("label", out, "--labelstudio", ls["url"], "--project", PROJECT)
    assert code == 2 and f"id {odd['data']['asvp_id']}: conflicting labels" in text, text
    code, text = cli("label", out, "--labelstudio", ls["url"], "--project", PROJECT, "--agreement", "majority")
    assert code == 2 and "no majority (a tie)" in text
    code, text = cli("label", out, "--labelstudio", ls["url"], "--project", PROJECT, "--agreement", "last")
    assert code == 0 and "imported 8 label(s) into round 1; 0 pending" in text and "12 already stored" in text, text
    lab = RunDir(out).read_labeled()
    expect = {**{i: TRUTH[i] for i in ids0 + ids1}, odd["data"]["asvp_id"]: CLASSES.index(wrong)}
    assert len(lab["id"]) == 20 and {int(i): int(v) for i, v in zip(lab["id"], lab["label"])} == expect
    # a personal access token (JWT refresh token) works as well as the legacy one
    pat = ls["http"].post(ls["url"] + "/api/token/").json()["token"]
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", pat)
    code, text = cli("label", out, "--labelstudio", ls["url"], "--project", PROJECT, "--agreement", "last")
    assert code == 0 and "imported 0 label(s)" in text and "20 already stored" in text, text
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "wrong-token-123")
    code, text = cli("label", out, "--labelstudio", ls["url"], "--project", PROJECT)
    assert code == 2 and "refused the token" in text and "LABEL_STUDIO_API_KEY" in text
    code, text = cli("select", out, "--close")
    assert code == 0 and "all rounds are done" in text
    import json

    rec = json.loads((out / "summary.json").read_text())["rounds"][1]
    assert rec["label_agreement"] == "last" and rec["label_imports"][-1]["resolved_disagreements"] == 1
    print(f"Label Studio start {ls['startup_seconds']:.1f}s, round trip {time.monotonic() - t0:.1f}s "
          f"(of which asvp-ray init {t_init:.1f}s)")
