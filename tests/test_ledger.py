"""The cost ledger: what a run spent here and what its result needed (issue 18), and the probe
policy paying for one fine-tune per refresh (issue 17)."""
from __future__ import annotations

import json

import pytest

from asvp_ray.config import load_config
from asvp_ray.loop.driver import Driver
from asvp_ray.loop.ledger import CostLedger, sampling_seconds
from asvp_ray.report import row_of
from tests.conftest import SMOKE

SMALL = ["data.pool.limit=120", "data.test=null", "budget.schedule=[20,20]", "proxy.epochs=10",
         "final.training_method=none"]
# the probe's fine-tune must lift LogME over the random-init features for a refresh to happen
PROBE = ["method=asvp", "refresh.policy=probe", "refresh.margin=0.0", "refresh.max_refreshes=1", "train.epochs=20"]


def test_ledger_keeps_attributed_and_spent_apart():
    led = CostLedger(per_label=0.0, per_cpu_hour=3.6, per_gpu_hour=36.0)
    led.add("proxy_train", 2.0, round=0)
    led.add_version("extract", {"wall_s": 100.0, "cpu_s": 200.0, "gpu_s": 100.0}, 0.5, version=0, source="/c/v0")
    led.add_version("extract", None, 0.25, version=0, source="/old/v0")
    t = led.totals()
    ex = t["compute_seconds"]["extract"]
    assert ex["cached"] is True and t["compute_seconds"]["proxy_train"]["cached"] is False
    assert (ex["wall"], ex["cpu"], ex["gpu"]) == (100.0, 200.0, 100.0)
    assert (ex["spent_wall"], ex["spent_cpu"], ex["spent_gpu"]) == (0.75, 0.75, 0.0)
    assert t["wall_seconds_total"] == 102.0 and t["spent_wall_seconds_total"] == 2.75
    assert t["dollars"]["compute"] == pytest.approx(202 / 1000 + 100 / 100)
    assert t["dollars_spent"]["compute"] == pytest.approx(2.75 / 1000)
    assert [c.get("cost_unknown") for c in t["cached"]] == [None, True]
    assert sampling_seconds(t) == {"sampling_seconds": 102.0, "spent_seconds": 2.75}
    # a ledger written before costs were attributed: spent = recorded
    old = CostLedger.from_json({"entries": [{"phase": "extract", "round": None, "wall_s": 5.0, "cpu_s": 5.0,
                                             "gpu_s": 0.0}]}, 0, 0, 0).totals()
    assert old["compute_seconds"]["extract"]["spent_wall"] == 5.0 and old["spent_wall_seconds_total"] == 5.0


def _run(root, name, extra=()):
    d = Driver(load_config(str(SMOKE), SMALL + [f"feature_cache={root / 'cache'}", *extra]), str(root / name))
    try:
        summary = d.run()
    finally:
        d.close()
    summary["_dir"] = str(root / name)
    return summary


@pytest.fixture(scope="module")
def cache_runs(ray_local, tmp_path_factory):
    """Two runs sharing one feature cache: ``a`` (SVPp) extracts features v0, ``b`` (ASVP with
    the probe policy) takes them from the cache."""
    root = tmp_path_factory.mktemp("ledger")
    return root, _run(root, "a"), _run(root, "b", PROBE)


def _round_work(cost):
    return sum(v["wall"] for k, v in cost["compute_seconds"].items() if k not in ("extract", "final_train"))


@pytest.mark.slow
def test_runs_sharing_a_feature_cache_are_charged_the_same_extraction(cache_runs):
    tmp_path, a, b = cache_runs
    ea, eb = a["cost"]["compute_seconds"]["extract"], b["cost"]["compute_seconds"]["extract"]
    # a extracted: not cached, spent = attributed
    assert ea["cached"] is False and ea["wall"] > 1.0
    assert (ea["spent_wall"], ea["spent_cpu"]) == (ea["wall"], ea["cpu"])
    assert a["cost"]["spent_wall_seconds_total"] == a["cost"]["wall_seconds_total"]
    # b took v0 from the cache: charged a's extraction, spent only the linking
    assert eb["cached"] is True
    assert eb["wall"] == pytest.approx(ea["wall"], abs=1e-3) and eb["cpu"] == pytest.approx(ea["cpu"], abs=1e-3)
    assert eb["spent_wall"] < 0.5 * ea["wall"]
    (cached,) = b["cost"]["cached"]
    assert cached["phase"] == "extract" and cached["version"] == 0 and "cache" in cached["source"]
    # the cache's meta.json records what the extracting run was charged
    (entry,) = list((tmp_path / "cache").iterdir())
    meta = json.loads((entry / "v0" / "meta.json").read_text())
    assert meta["cost"]["wall_s"] == pytest.approx(ea["wall"], abs=1e-3)
    assert meta["cost"]["resources"]["cpus"] >= 1 and meta["cost"]["charged_by"] == str(tmp_path / "a")
    assert b["feature_versions"][0]["cost"]["wall_s"] == meta["cost"]["wall_s"]
    # sampling_seconds: the same extraction plus each run's own round work
    ra, rb = row_of(a), row_of(b)
    assert ra["sampling_seconds"] == pytest.approx(ea["wall"] + _round_work(a["cost"]), abs=0.02)
    assert rb["sampling_seconds"] == pytest.approx(ea["wall"] + _round_work(b["cost"]), abs=0.02)
    assert abs(ra["sampling_seconds"] - rb["sampling_seconds"]) <= max(_round_work(a["cost"]),
                                                                       _round_work(b["cost"])) + 0.02
    assert ra["spent_seconds"] == ra["sampling_seconds"]  # no cache used: the two agree
    assert rb["spent_seconds"] < rb["sampling_seconds"] - 0.5 * ea["wall"]


@pytest.mark.slow
def test_probe_triggered_refresh_runs_exactly_one_fine_tune(cache_runs):
    tmp_path, _, s = cache_runs
    refreshed = [r for r in s["rounds"] if r["refreshed"]]
    assert len(refreshed) == 1, [r["decision"] for r in s["rounds"]]  # fine-tuned features scored higher
    r = refreshed[0]["round"]
    run = tmp_path / "b"
    # one fine-tune for this round: the probe's, whose checkpoint made features v1
    assert (run / "checkpoints" / f"probe-r{r}").is_dir()
    assert not (run / "checkpoints" / "refresh-v1").exists()
    log = (run / "run.log").read_text()
    assert log.count(f"fine-tune probe-r{r} ") == 1 and "fine-tune refresh-v" not in log
    assert "reuses the probe's fine-tuned checkpoint" in log
    rec = refreshed[0]
    assert rec["refresh"]["finetune_reused"].startswith(str(run / "checkpoints" / f"probe-r{r}"))
    assert rec["refresh"]["finetune_seconds"] == 0.0 and rec["seconds"]["probe"] > 0
    ledger = s["ledger"]["entries"]
    ft = [e for e in ledger if e["phase"] == "refresh_finetune"]
    assert len(ft) == 1 and ft[0]["wall_s"] == 0.0 and ft[0]["reused"] == rec["refresh"]["finetune_reused"]
    meta1 = json.loads((run / "features" / "v1" / "meta.json").read_text())
    assert meta1["weights"] == rec["refresh"]["checkpoint"]
    assert meta1["cost"]["phase"] == "refresh_extract" and meta1["cost"]["wall_s"] > 0
    assert meta1["cost"]["finetune"]["checkpoint"] == rec["refresh"]["checkpoint"]
    assert rec["decision_reference"]["mode"] == "current"


def test_a_run_begun_before_the_reference_keys_existed_still_resumes(tmp_path):
    import yaml

    from asvp_ray.config import dump_config
    from asvp_ray.core.errors import RunDirError

    cfg = load_config(str(SMOKE), SMALL)
    old = yaml.safe_load(dump_config(cfg))
    for k in ("reference", "reference_min_labels"):
        del old["refresh"][k]  # what config.yaml held before refresh.reference existed
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(old))
    Driver(cfg, str(tmp_path / "run")).close()  # same config: accepted
    with pytest.raises(RunDirError, match=r"differs in: refresh.reference\)"):
        Driver(load_config(str(SMOKE), SMALL + ["refresh.reference=best"]), str(tmp_path / "run"))
