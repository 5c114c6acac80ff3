"""The three methods end to end on the smoke pool: refresh, standard AL, the final model, the ledger."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from asvp_ray.config import load_config
from asvp_ray.loop.driver import Driver
from asvp_ray.methods import RoundContext
from tests.conftest import SMOKE
from tests.reference import check_proxy_against_reference

BASE = ["budget.schedule=[40,40]", "proxy.epochs=10", "train.epochs=2", "train.lp_epochs=2"]


@pytest.fixture(scope="module")
def features_v0(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("template")
    d = Driver(load_config(str(SMOKE), BASE + ["final.training_method=none"]), str(out))
    d.prepare()
    d.close()
    return out / "features"


def run(tmp_path, features_v0, overrides, name="run"):
    out = tmp_path / name
    shutil.copytree(features_v0, out / "features")
    d = Driver(load_config(str(SMOKE), BASE + list(overrides)), str(out))
    assert isinstance(d, RoundContext) and d.method.ctx is d  # what its method sees of the run
    try:
        summary = d.run()
    finally:
        d.close()
    return summary, out, d


@pytest.mark.slow
def test_asvp_every_round_refreshes_features_and_trains_ft(tmp_path, features_v0):
    summary, out, d = run(tmp_path, features_v0, ["method=asvp", "refresh.policy=every_round"])
    rounds = summary["rounds"]
    assert all(r["refreshed"] for r in rounds)
    assert [r["feature_version"] for r in rounds] == [1, 2]
    for r in rounds:
        assert set(r["alignment"]) == {"logme", "logme_ped"} and "every_round" in r["decision"]
        assert r["refresh"]["finetune_seconds"] > 0 and r["refresh"]["extract_seconds"] > 0
        assert {"refresh_finetune", "refresh_extract", "monitor"} <= set(r["seconds"])
    store = d.rd.store
    assert store.versions() == [0, 1, 2]
    ids0, f0 = store.read(0)
    ids2, f2 = store.read(2)
    assert np.array_equal(ids0, ids2) and not np.allclose(f0, f2)  # new weights, new features
    meta2 = store.meta(2)
    assert meta2["weights"].endswith(".pt") and meta2["weights_hash"] != store.meta(0)["weights_hash"]
    assert meta2["splits"]["test"]["rows"] == 200
    fin = summary["final"]
    assert fin["training_method"] == "ft" and "refreshed" in fin["reason"]
    # 2 epochs from random weights on 80 images train nothing worth a threshold; the figure must
    # still be an accuracy over the 200 test images, not a batch average or a train figure.
    assert fin["test_accuracy"] * 200 == pytest.approx(round(fin["test_accuracy"] * 200), abs=1e-6)
    assert (out / "checkpoints" / "final").is_dir()


@pytest.mark.slow
def test_asvp_at_labels_refreshes_once_then_ft_and_never_refreshed_means_lpft(tmp_path, features_v0):
    summary, _, _ = run(tmp_path, features_v0, ["method=asvp", "refresh.policy=at_labels", "refresh.at=[80]",
                                                "budget.schedule=[40,40,40]", "refresh.keep_versions=1"])
    assert [r["refreshed"] for r in summary["rounds"]] == [False, True, False]
    assert [r["feature_version"] for r in summary["rounds"]] == [0, 1, 1]
    assert summary["final"]["training_method"] == "ft"
    never, _, _ = run(tmp_path, features_v0, ["method=asvp", "refresh.policy=never", "train.epochs=1"], "never")
    assert never["final"]["training_method"] == "lpft" and "never refreshed" in never["final"]["reason"]


@pytest.mark.slow
def test_standard_fine_tunes_and_scores_the_pool_each_round(tmp_path, features_v0):
    summary, out, _ = run(tmp_path, features_v0, ["method=standard"])
    r0, r1 = summary["rounds"]
    assert "finetune" not in r0["seconds"]  # round 0 is random
    assert r1["seconds"]["finetune"] > 0 and r1["seconds"]["score_pool"] > 0
    acc = r1["finetune_test_accuracy"]  # 2 epochs from random weights: an accuracy over the 200 test images
    assert acc * 200 == pytest.approx(round(acc * 200), abs=1e-6)
    # the proxy as good as an independent reference on the same features and labels (tests/reference.py)
    check_proxy_against_reference(out, [r["proxy_test_accuracy"] for r in summary["rounds"]])
    assert summary["final"]["training_method"] == "ft"
    assert not any(r["refreshed"] for r in summary["rounds"])


def test_ledger_sums_and_prices(tmp_path, features_v0):
    summary, out, _ = run(tmp_path, features_v0, ["final.training_method=none", "cost.per_label=0.5",
                                                "cost.per_cpu_hour=3.6"])
    check_proxy_against_reference(out, [r["proxy_test_accuracy"] for r in summary["rounds"]])
    cost = summary["cost"]
    assert cost["labels"] == 80
    phases = cost["compute_seconds"]
    assert "score_select" in phases and "proxy_train" in phases
    round_total = sum(r["seconds"]["proxy_train"] for r in summary["rounds"])
    assert phases["proxy_train"]["wall"] == pytest.approx(round_total, abs=1e-3)
    assert cost["dollars"]["labels"] == pytest.approx(40.0)
    assert cost["dollars"]["compute"] == pytest.approx(cost["cpu_seconds_total"] / 3600 * 3.6, abs=2e-6)
    assert cost["dollars"]["total"] == pytest.approx(cost["dollars"]["labels"] + cost["dollars"]["compute"])


def test_report_on_two_runs_writes_table_and_plots(tmp_path, features_v0):
    from asvp_ray.report import make_report

    run(tmp_path, features_v0, ["final.training_method=none"], "a")
    run(tmp_path, features_v0, ["final.training_method=none", "strategy=entropy"], "b")
    rep = make_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report")
    assert [r["strategy"] for r in rep["rows"]] == ["margin", "entropy"]
    assert all(r["labels"] == 80 for r in rep["rows"])
    csv = (tmp_path / "report" / "table.csv").read_text().splitlines()
    assert csv[0].startswith("run,method,strategy") and len(csv) == 3
    for name in ("accuracy_vs_labels.png", "accuracy_vs_cost.png", "time_per_phase.png"):
        data = (tmp_path / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
