"""`asvp-ray report`: the plotted values, read back from the drawn figures (the .json beside each
PNG), are the numbers in each run's summary.json, each under its own name, on axes without offsets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from asvp_ray.config import load_config
from asvp_ray.loop.driver import Driver
from asvp_ray.report import FINAL_Y, PROXY_Y, make_report
from tests.conftest import SMOKE

BASE = ["budget.schedule=[40,40]", "proxy.epochs=10", "train.epochs=1"]


@pytest.fixture(scope="module")
def two_runs(ray_local, feature_cache, tmp_path_factory):
    """Two real runs sharing features v0 through the session's feature cache (filled by whichever
    smoke run came first): one trains a final model (FT), one does not."""
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for name, extra in (("with_final", []), ("no_final", ["final.training_method=none"])):
        d = Driver(load_config(str(SMOKE), BASE + [f"feature_cache={feature_cache}"] + extra), str(root / name))
        try:
            d.run()
        finally:
            d.close()
        dirs.append(root / name)
    return dirs


def _summary(run: Path):
    return json.loads((run / "summary.json").read_text())


def _series(axes, label_start):
    return [s for s in axes["series"] if s["label"].startswith(label_start)]


def test_plots_show_each_quantity_under_its_own_name_with_the_summary_values(two_runs, tmp_path):
    with_final, no_final = two_runs
    sf, sn = _summary(with_final), _summary(no_final)
    assert sf["final"]["test_accuracy"] is not None and not sn.get("final", {}).get("test_accuracy")
    rep = make_report(two_runs, tmp_path / "report")
    out = tmp_path / "report"
    for png in ("accuracy_vs_labels", "accuracy_vs_cost", "accuracy_vs_compute", "time_per_phase"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for ax in json.loads((out / f"{png}.json").read_text())["axes"]:
            assert ax["x_offset_text"] == "" and ax["y_offset_text"] == "", (png, ax["xlabel"], ax["ylabel"])
    assert str(out / "accuracy_vs_compute.png") in rep["files"]

    # accuracy against labels: proxy lines for both runs, a final-model star only for the run with one
    ax = json.loads((out / "accuracy_vs_labels.json").read_text())["axes"][0]
    for run, s in ((with_final, sf), (no_final, sn)):
        (line,) = _series(ax, run.name + " ")[:1]
        assert line["label"].endswith(" proxy")
        assert line["x"] == [r["n_labeled"] for r in s["rounds"]]
        assert line["y"] == pytest.approx([r["proxy_test_accuracy"] for r in s["rounds"]])
    stars = [x for x in ax["series"] if x["label"].endswith("final model")]
    assert len(stars) == 1 and stars[0]["label"].startswith("with_final ")
    assert stars[0]["y"] == pytest.approx([sf["final"]["test_accuracy"]]) and stars[0]["x"] == [80]

    def check_panels(axes, key_of):
        final_ax = [a for a in axes if a["ylabel"] == FINAL_Y]
        proxy_ax = [a for a in axes if a["ylabel"] == PROXY_Y]
        assert final_ax and proxy_ax and len(final_ax) + len(proxy_ax) == len(axes)
        for a in final_ax:  # only the run with a final model, at its final accuracy
            assert [x["label"].split(" ")[0] for x in a["series"]] == ["with_final"]
            assert a["series"][0]["y"] == pytest.approx([sf["final"]["test_accuracy"]])
            assert a["series"][0]["x"] == pytest.approx([key_of(a["xlabel"], sf)])
        for a in proxy_ax:  # both runs, at their last round's proxy accuracy
            got = {x["label"].split(" ")[0]: (x["x"][0], x["y"][0]) for x in a["series"]}
            assert set(got) == {"with_final", "no_final"}
            for name, s in (("with_final", sf), ("no_final", sn)):
                assert got[name] == pytest.approx((key_of(a["xlabel"], s), s["rounds"][-1]["proxy_test_accuracy"]))

    cost = json.loads((out / "accuracy_vs_cost.json").read_text())["axes"]
    check_panels(cost, lambda xlabel, s: s["cost"]["dollars"]["total"])

    def compute_x(xlabel, s):
        if xlabel.startswith("compute cost"):
            return s["cost"]["dollars"]["compute"]
        assert xlabel.startswith("CPU-hours"), xlabel
        return s["cost"]["cpu_seconds_total"] / 3600

    compute = json.loads((out / "accuracy_vs_compute.json").read_text())["axes"]
    assert len(compute) == 4  # (final, proxy) x (compute dollars, CPU-hours); no GPU used
    check_panels(compute, compute_x)
    # The table carries the same compute numbers.
    row = next(r for r in rep["rows"] if r["run"] == "with_final")
    assert row["compute_dollars"] == sf["cost"]["dollars"]["compute"]
    assert row["cpu_hours"] == pytest.approx(sf["cost"]["cpu_seconds_total"] / 3600, abs=1e-6)


def test_a_report_of_runs_without_final_models_says_so_instead_of_plotting_proxy_as_final(two_runs, tmp_path):
    make_report([two_runs[1]], tmp_path / "r")
    for name in ("accuracy_vs_cost", "accuracy_vs_compute"):
        axes = json.loads((tmp_path / "r" / f"{name}.json").read_text())["axes"]
        for a in axes:
            if a["ylabel"] == FINAL_Y:
                assert a["series"] == [] and any("no run trained a final model" in t for t in a["texts"])
