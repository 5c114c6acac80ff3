"""The public Python API (asvp_ray.api, exported by the package): a run from a config mapping,
read back as objects; resumed and found finished; the same run the CLI makes; a light import;
the other commands as functions (extract, init, select, label, status, final, strategies, study)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

import asvp_ray
from asvp_ray.core.errors import ConfigError, RunDirError
from tests.conftest import ROOT, SMOKE
from tests.reference import check_proxy_against_reference

SETS = ["budget.schedule=[30,20,20]", "proxy.epochs=10", "final.training_method=none"]


def test_import_is_light_and_exports_the_api():
    code = ("import sys, asvp_ray; heavy = [m for m in ('torch', 'ray', 'timm') if m in sys.modules]; "
            "print(heavy, sorted(asvp_ray.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.startswith("[]"), out
    for name in ("run", "resume", "result", "extract", "init", "select", "label", "status", "final", "report_runs",
                 "study", "strategies", "as_config", "RunResult", "Extracted", "Selection", "NotARunError", "Config",
                 "load_config"):
        assert name in out and callable(getattr(asvp_ray, name))
    with pytest.raises(AttributeError):
        asvp_ray.no_such_name  # noqa: B018


def test_run_from_a_mapping_returns_the_run_and_a_second_call_finds_it_finished(ray_local, feature_cache, tmp_path):
    from asvp_ray.data.fashion_mnist import FashionMNISTSource

    raw = yaml.safe_load(SMOKE.read_text())
    raw["feature_cache"] = str(feature_cache)
    events = []
    res = asvp_ray.run(raw, tmp_path / "run", overrides=SETS, progress=lambda e, d: events.append((e, d)))
    assert res.finished and not res.already_finished
    assert [e for e, _ in events] == ["round", "round", "round"]
    assert [r["n_labeled"] for r in res.rounds] == [30, 50, 70]
    assert [d["round"] for _, d in events] == [0, 1, 2]
    ids, labels = res.labeled["id"], res.labeled["label"]
    assert len(ids) == len(set(ids.tolist())) == 70
    truth = FashionMNISTSource(split="train", limit=int(raw["data"]["pool"]["limit"])).labels
    assert np.array_equal(labels, truth[ids]), "a label is stored on the wrong image"
    assert sorted(np.unique(res.labeled["round"]).tolist()) == [0, 1, 2]
    # the proxy as good as an independent reference on the same features and labels (tests/reference.py)
    check_proxy_against_reference(tmp_path / "run", [r["proxy_test_accuracy"] for r in res.rounds])
    assert res.final_model is None  # final.training_method=none

    again = asvp_ray.run(raw, tmp_path / "run", overrides=SETS)
    assert again.already_finished and again.rounds == res.rounds
    assert np.array_equal(again.labeled["id"], ids)
    read = asvp_ray.result(tmp_path / "run")
    assert read.summary == again.summary
    # the same run through the CLI's config file: resume() reads the run's own config.yaml
    assert asvp_ray.resume(tmp_path / "run").already_finished


def test_api_errors_are_the_packages_own(tmp_path):
    with pytest.raises(RunDirError, match="holds no asvp-ray run"):
        asvp_ray.result(tmp_path / "nothing")
    with pytest.raises(RunDirError, match="no config.yaml"):
        asvp_ray.resume(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="Did you mean 'proxy.epochs'"):
        asvp_ray.as_config(str(SMOKE), ["proxy.epoch=3"])
    cfg = asvp_ray.as_config(str(SMOKE), SETS)
    assert asvp_ray.as_config(cfg).budget.schedule == [30, 20, 20]
    assert asvp_ray.as_config(cfg, ["seed=3"]).seed == 3 and cfg.seed != 3


def _query_ids(csv_file):
    lines = open(csv_file).read().splitlines()
    assert lines[0] == "id,path"
    return [int(line.split(",")[0]) for line in lines[1:]]


def test_human_rounds_through_the_api(ray_local, feature_cache, tmp_path):
    from asvp_ray.data.fashion_mnist import CLASSES
    from asvp_ray.data.sources import FashionMNISTSource
    from asvp_ray.loop.rundir import RunDir

    out = tmp_path / "hitl"
    truth = FashionMNISTSource(split="train", limit=400).labels
    with pytest.raises(asvp_ray.NotARunError, match="has no config.yaml"):
        asvp_ray.select(out)
    st = asvp_ray.init(str(SMOKE), out, overrides=["budget.schedule=[20,10]", "final.training_method=none",
                                                    f"feature_cache={feature_cache}"])
    assert st["feature_version"] == 0 and st["next_round"] == 0 and st["rounds"] == 2 and st["n_labeled"] == 0
    assert asvp_ray.as_config(str(out / "config.yaml")).oracle == "human"

    events = []
    sel = asvp_ray.select(out, progress=lambda e, d: events.append(e))
    assert events == ["opened"] and sel.round == 0 and sel.selected_by == "random" and not sel.done
    assert sel.files[0] == str(out / "queries" / "round-0.csv") and sel.closed is None and sel.pushed is None
    assert sel.ids.dtype == np.int64 and sel.ids.tolist() == _query_ids(sel.files[0])
    assert len(set(sel.ids.tolist())) == 20
    tasks = json.loads(open(sel.files[1]).read())
    assert [t["data"]["asvp_id"] for t in tasks] == sel.ids.tolist()

    # the first 12 labelled by name, from a file as a labeller writes it
    part = tmp_path / "part.csv"
    part.write_text("id,label\n" + "".join(f"{i},{CLASSES[truth[i]]}\n" for i in sel.ids[:12]))
    res = asvp_ray.label(out, part)
    assert (res["imported"], res["round"], res["pending"], res["file"]) == (12, 0, 8, str(part))
    assert [(r["round"], r["state"], r["selected"], r["labelled"], r["pending"]) for r in asvp_ray.status(out)] \
        == [(0, "open", 20, 12, 8)]
    with pytest.raises(RunDirError, match="round 0 still has 8 pending id"):
        asvp_ray.select(out)
    with pytest.raises(ConfigError, match="agreement 'most'"):
        asvp_ray.label(out, part, agreement="most")
    with pytest.raises(RunDirError, match="has rounds left"):
        asvp_ray.final(out)

    # closed with the 12 it has: round 1 comes from the proxy, never an id bought already
    sel1 = asvp_ray.select(out, close=True)
    assert sel1.closed["round"] == 0 and sel1.closed["n_labeled"] == 12 and sel1.n_labeled == 12
    assert sel1.round == 1 and sel1.selected_by == "margin" and len(sel1.ids) == 10
    assert sel1.ids.tolist() == _query_ids(sel1.files[0]) and not set(sel1.ids.tolist()) & set(sel.ids.tolist())
    rest = tmp_path / "r1.csv"
    rest.write_text("id,label\n" + "".join(f"{i},{truth[i]}\n" for i in sel1.ids))
    assert asvp_ray.label(out, rest)["pending"] == 0
    done = asvp_ray.select(out)
    assert done.done and done.round is None and len(done.ids) == 0 and done.n_labeled == 22
    assert asvp_ray.final(out) is None  # final.training_method=none

    lab = RunDir(out).read_labeled()
    assert sorted(lab["id"].tolist()) == sorted(sel.ids[:12].tolist() + sel1.ids.tolist())
    assert np.array_equal(lab["label"], truth[lab["id"]]), "a label is stored on the wrong image"
    assert np.bincount(lab["round"]).tolist() == [12, 10]
    read = asvp_ray.result(out)
    assert [r["n_labeled"] for r in read.rounds] == [12, 22] and read.finished


def test_extract_returns_the_version_written_and_its_meta(ray_local, tmp_path):
    (tmp_path / "features" / "v0").mkdir(parents=True)  # a version there: the next free one is written
    (tmp_path / "features" / "v0" / "meta.json").write_text("{}")
    res = asvp_ray.extract(str(SMOKE), tmp_path, overrides=["data.pool.limit=48", "data.test=null"])
    assert res.version == 1 and res.path == str(tmp_path / "features" / "v1")
    assert res.meta == json.loads((tmp_path / "features" / "v1" / "meta.json").read_text())
    assert res.meta["rows"] == 48 and res.meta["test_source"] is None and res.meta["skipped"] == []
    assert "asvp_ray" in (tmp_path / "extract.log").read_text()  # the log, as the CLI writes it
    with pytest.raises(ConfigError, match="Did you mean 'proxy.epochs'"):
        asvp_ray.extract(str(SMOKE), tmp_path / "typo", overrides=["proxy.epoch=3"])
    assert not (tmp_path / "typo").exists()


def test_strategies_and_the_checks_before_a_study_starts(tmp_path):
    from asvp_ray.selection.options import option_defaults

    cat = asvp_ray.strategies()
    assert {"random", "margin", "entropy", "coreset", "badge"} <= set(cat)
    assert cat["coreset"]["options"] == option_defaults("coreset") and cat["margin"]["doc"]
    with pytest.raises(ConfigError, match="scheduler 'hyperband' is not one of"):
        asvp_ray.study(str(SMOKE), ROOT / "examples" / "space.yaml", tmp_path / "study", scheduler="hyperband")
    assert not (tmp_path / "study").exists()
    with pytest.raises(RunDirError, match="not an initialised run directory"):
        asvp_ray.status(tmp_path)
    with pytest.raises(asvp_ray.NotARunError, match="is not a run directory"):
        asvp_ray.label(tmp_path, tmp_path / "labels.csv")
