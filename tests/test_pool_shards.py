"""The pool stays where it was written: with `pool_shards.mode: shards` shard actors load their rows
of the current feature version from the store, the driver holds ids (and the labelled rows'
features), and every round picks exactly what the driver-held path picks."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from asvp_ray.config import load_config
from asvp_ray.core.errors import BadInputError
from asvp_ray.loop.driver import Driver
from tests.conftest import SMOKE
from tests.test_embeddings import _mixture, write_embeddings


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard-emb")
    ids, feats, labels = _mixture(4000, 10, 3)
    t_ids, t_feats, t_labels = _mixture(400, 11, 900_000)
    return {"pool": write_embeddings(root / "pool", ids, feats, labels, parts=4),
            "test": write_embeddings(root / "test.parquet", t_ids, t_feats, t_labels)}


def _data(emb):
    return [f"data.pool={{kind: embeddings, path: '{emb['pool']}'}}",
            f"data.test={{kind: embeddings, path: '{emb['test']}'}}"]


@pytest.fixture(scope="module")
def emb_v0(ray_local, emb, tmp_path_factory):
    """Features v0 of ``emb`` (pool and test), written once (a Ray Data job) and copied into each run
    below: they compare what the rounds pick, not how v0 is written (tests/test_embeddings.py)."""
    out = tmp_path_factory.mktemp("shard-v0") / "run"
    d = Driver(load_config(str(SMOKE), _data(emb) + ["budget.schedule=[60]"]), str(out))
    try:
        d.prepare()
    finally:
        d.close()
    return out / "features"


def _run(out, sets, v0=None):
    if v0 is not None:  # a run directory holding v0 already: the run starts from it
        shutil.copytree(v0, out / "features")
    d = Driver(load_config(str(SMOKE), sets), str(out))
    try:
        d.run()
        mode, held = d.versions.pool_mode, d.versions.features
    finally:
        d.close()
    lab = pq.read_table(out / "labeled.parquet").to_pydict()
    summary = json.loads((out / "summary.json").read_text())
    return mode, held, lab, summary


def _by_round(lab):
    out = {}
    for i, r in zip(lab["id"], lab["round"]):
        out.setdefault(r, []).append(i)
    return {r: sorted(v) for r, v in out.items()}


@pytest.mark.parametrize("strategy", [
    "margin",
    "{name: coreset, execution: local}",
    "badge",
    "{name: cluster_margin, margin_factor: 4, coarse_clusters: 64}",
])
def test_shards_pick_exactly_what_the_driver_held_pool_picks(ray_local, tmp_path, emb, emb_v0, strategy):
    base = _data(emb) + [f"strategy={strategy}", "budget.schedule=[60,60,60]", "proxy.epochs=10"]
    mode_d, held_d, lab_d, sum_d = _run(tmp_path / "driver", base + ["pool_shards.mode=driver"], emb_v0)
    mode_s, held_s, lab_s, sum_s = _run(tmp_path / "shards", base + ["pool_shards.mode=shards",
                                                                     "pool_shards.num_shards=2"], emb_v0)
    assert mode_d == "driver" and held_d is not None and held_d.shape == (4000, 24)
    assert mode_s == "shards" and held_s is None  # the driver never loaded the pool matrix
    assert _by_round(lab_s) == _by_round(lab_d)
    assert [r["proxy_test_accuracy"] for r in sum_s["rounds"]] == [r["proxy_test_accuracy"] for r in sum_d["rounds"]]
    log = (tmp_path / "shards" / "run.log").read_text()
    assert "stay in shard actors" in log and "2 shard actors loaded features v0 (4000 rows)" in log


def test_asvp_monitor_on_shards_scores_what_the_driver_held_pool_scores(ray_local, tmp_path, emb, emb_v0):
    """The alignment monitor of a sharded pool runs in a task that reads the labelled and reference
    rows from the shard actors: the same LogME / LogME-PED as on the driver-held matrix."""
    base = _data(emb) + ["method=asvp", "refresh.policy=never", "monitor.reference_rows=1500",
                         "final.training_method=none", "budget.schedule=[60,60]", "proxy.epochs=10"]
    _, _, lab_d, sum_d = _run(tmp_path / "driver", base + ["pool_shards.mode=driver"], emb_v0)
    mode, held, lab_s, sum_s = _run(tmp_path / "shards", base + ["pool_shards.mode=shards", "pool_shards.num_shards=2"],
                                    emb_v0)
    assert mode == "shards" and held is None
    assert _by_round(lab_s) == _by_round(lab_d)
    got = [r["alignment"] for r in sum_s["rounds"]]
    want = [r["alignment"] for r in sum_d["rounds"]]
    assert len(got) == 2 and all(set(a) == {"logme", "logme_ped"} for a in got)
    assert got[0] != got[1]  # 60 then 120 labelled rows: the scores move
    for a, b in zip(got, want):
        assert a == pytest.approx(b, abs=2e-6)


def test_strategies_that_need_the_whole_matrix_say_which_ones_run_on_shards(ray_local, tmp_path, emb):
    sets = [f"data.pool={{kind: embeddings, path: '{emb['pool']}'}}", "data.test=null", "strategy=typiclust",
            "budget.schedule=[30,30]", "pool_shards.mode=shards", "pool_shards.num_shards=2"]
    d = Driver(load_config(str(SMOKE), sets), str(tmp_path / "t"))
    try:
        with pytest.raises(BadInputError) as err:
            d.run()
    finally:
        d.close()
    assert "typiclust needs the pool's features in one process" in str(err.value)
    assert "coreset, badge" in str(err.value) and "pool_shards.mode: driver" in str(err.value)
    # round 0 (random) was committed before the refusal: nothing labelled is lost
    assert len(pq.read_table(tmp_path / "t" / "labeled.parquet")) == 30


@pytest.mark.slow
@pytest.mark.long
def test_a_refresh_moves_the_shards_to_the_new_version(ray_local, tmp_path):
    """ASVP with a refresh: the shard actors stop before fine-tuning (their CPUs go to the Train
    worker and the extraction actors) and load v1 afterwards; the run equals the driver-held one."""
    base = ["method=asvp", "refresh.policy=at_labels", "refresh.at=[40]", "budget.schedule=[40,30]",
            "data.pool.limit=240", "data.test.limit=100", "proxy.epochs=10", "train.epochs=1", "train.lp_epochs=1",
            "final.training_method=none"]
    _, _, lab_d, sum_d = _run(tmp_path / "driver", base + ["pool_shards.mode=driver"])
    mode, held, lab_s, sum_s = _run(tmp_path / "shards", base + ["pool_shards.mode=shards", "pool_shards.num_shards=2"])
    assert mode == "shards" and held is None
    assert sum_s["rounds"][-1]["feature_version"] == 1 and sum_s["rounds"][0]["refreshed"]
    assert _by_round(lab_s) == _by_round(lab_d)
    log = (tmp_path / "shards" / "run.log").read_text()
    assert "shard actors loaded features v1" in log


def test_shard_actors_run_with_the_lean_allocator_settings_under_the_users_own(ray_local):
    """Shard actors hold the pool: they get allocator.lean_memory_env() (loading 977 MB of rows kept
    1,207 MB of heap without it, 1,015 MB with), and a user's runtime_env env_vars win over it."""
    import pyarrow as pa

    from asvp_ray.pool.shards import PoolShards

    def _allocator_env(features, start):  # local: sent by value to the actors
        import os

        return {k: os.environ.get(k) for k in ("ARROW_DEFAULT_MEMORY_POOL", "MALLOC_ARENA_MAX", "ASVP_TEST_USER_VAR")}

    want_arrow = "jemalloc" if "jemalloc" in pa.supported_memory_backends() else None
    shards = PoolShards(np.zeros((10, 2), np.float32), 10, num_shards=2, actor_options={"num_cpus": 0})
    try:
        seen = shards.group.apply_all(_allocator_env, [(), ()])
    finally:
        shards.group.close()
    assert seen == [{"ARROW_DEFAULT_MEMORY_POOL": want_arrow, "MALLOC_ARENA_MAX": "2", "ASVP_TEST_USER_VAR": None}] * 2
    mine = {"num_cpus": 0, "runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "4", "ASVP_TEST_USER_VAR": "kept"}}}
    shards = PoolShards(np.zeros((10, 2), np.float32), 10, num_shards=2, actor_options=mine)
    try:
        seen = shards.group.apply_all(_allocator_env, [(), ()])
    finally:
        shards.group.close()
    assert seen == [{"ARROW_DEFAULT_MEMORY_POOL": want_arrow, "MALLOC_ARENA_MAX": "4", "ASVP_TEST_USER_VAR": "kept"}] * 2
    assert mine["runtime_env"] == {"env_vars": {"MALLOC_ARENA_MAX": "4", "ASVP_TEST_USER_VAR": "kept"}}  # not changed


# ---------------------------------------------------------------- pool_shards.mode: auto, by bytes
def _versions(rows: int, dim: int, sets=()):
    """A FeatureVersions whose current version holds ``rows`` x ``dim`` (only what _pool_mode reads)."""
    from types import SimpleNamespace

    from asvp_ray.loop.versions import FeatureVersions

    v = FeatureVersions.__new__(FeatureVersions)
    v.cfg = load_config(str(SMOKE), list(sets))
    v.current = 0
    v.ids = np.arange(rows, dtype=np.int64)
    v.store = SimpleNamespace(meta=lambda version: {"rows": rows, "dim": dim, "splits": {"pool": {"rows": rows,
                                                                                                  "dim": dim}}})
    return v


def _cluster(monkeypatch, node_gb: float, alive: int = 1, cluster_gb=None, autoscaling=False):
    """The driver's node (``node_gb`` of Ray's memory resource) and the cluster's capacity."""
    import asvp_ray.runtime.ray_utils as ru
    import asvp_ray.runtime.resources as res
    import asvp_ray.pool.shards as shards

    node = {"memory": node_gb * 1e9, "CPU": 8.0}
    cap = {"memory": (cluster_gb if cluster_gb is not None else node_gb * alive) * 1e9, "CPU": 8.0 * alive}
    monkeypatch.setattr(res, "this_node", lambda: {"memory": node["memory"], "resources": dict(node),
                                                  "alive_nodes": alive, "source": "Ray's memory resource of node x"},
                        raising=False)  # raising=False: on the code before it, the rule itself fails the tests
    monkeypatch.setattr(res, "cluster_capacity", lambda: (dict(cap), autoscaling))
    monkeypatch.setattr(ru, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(shards, "default_num_shards", lambda: max(2, alive))


def test_auto_keeps_a_narrow_pool_of_millions_of_rows_in_the_driver(monkeypatch, caplog):
    """3,000,000 x 8 (96 MB) on a 16 GB node of a two-node cluster: 0.6%, kept (min_rows, the old
    rule, sharded it: 3,000,000 rows >= 2,000,000)."""
    _cluster(monkeypatch, node_gb=16, alive=2)
    with caplog.at_level("INFO", logger="asvp_ray.driver"):
        assert _versions(3_000_000, 8)._pool_mode() == "driver"
    assert "pool 3,000,000 x 8 = 0.10 GB = 0.6% of the driver node's 16.0 GB" in caplog.text
    assert "kept in the driver" in caplog.text


def test_auto_shards_a_wide_pool_over_the_share_of_the_driver_nodes_memory(monkeypatch, caplog):
    """1,000,000 x 1280 (5.12 GB) on a 16 GB head: 32% > 10%; with another node up, or an
    autoscaler that can add one, it goes to shard actors (min_rows kept it: 1M < 2M rows)."""
    _cluster(monkeypatch, node_gb=16, alive=2)
    with caplog.at_level("INFO", logger="asvp_ray.driver"):
        assert _versions(1_000_000, 1280)._pool_mode() == "shards"
    assert "5.12 GB = 32.0% of the driver node's 16.0 GB" in caplog.text and "sharded over 2 shard actors" in caplog.text

    _cluster(monkeypatch, node_gb=16, alive=1, cluster_gb=16 + 4 * 64, autoscaling=True)  # KubeRay, workers at 0
    assert _versions(1_000_000, 1280)._pool_mode() == "shards"
    # the same bytes under the share of a bigger node stay; a larger share lets them stay too
    _cluster(monkeypatch, node_gb=128, alive=2)
    assert _versions(1_000_000, 1280)._pool_mode() == "driver"
    _cluster(monkeypatch, node_gb=16, alive=2)
    assert _versions(1_000_000, 1280, ["pool_shards.driver_memory_fraction=0.5"])._pool_mode() == "driver"


def test_auto_keeps_a_pool_over_the_share_in_the_driver_without_another_node(monkeypatch, caplog):
    """One node, no autoscaler: shard actors would hold the same bytes on the same node. Kept, and
    the warning says so and how to shard anyway."""
    _cluster(monkeypatch, node_gb=16, alive=1)
    with caplog.at_level("INFO", logger="asvp_ray.driver"):
        assert _versions(1_000_000, 1280)._pool_mode() == "driver"
    warn = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warn and "32.0% of the driver node's 16.0 GB" in warn[0].getMessage()
    assert "no other node can hold shards" in warn[0].getMessage() and "(no autoscaler)" in warn[0].getMessage()


def test_min_rows_set_explicitly_keeps_its_old_meaning(monkeypatch, caplog):
    """An old config's pool_shards.min_rows still decides by rows, whatever the bytes."""
    from asvp_ray.config import PoolShardsConfig

    assert PoolShardsConfig().min_rows is None and PoolShardsConfig().driver_memory_fraction == 0.1
    _cluster(monkeypatch, node_gb=16, alive=2)
    with caplog.at_level("INFO", logger="asvp_ray.driver"):
        assert _versions(3_000_000, 8, ["pool_shards.min_rows=2000000"])._pool_mode() == "shards"
    assert "min_rows 2000000 (deprecated" in caplog.text
    assert _versions(1_000_000, 1280, ["pool_shards.min_rows=2000000"])._pool_mode() == "driver"
    # explicit modes are never second-guessed
    assert _versions(1_000_000, 1280, ["pool_shards.mode=driver"])._pool_mode() == "driver"
    assert _versions(10, 8, ["pool_shards.mode=shards"])._pool_mode() == "shards"


def test_this_node_is_the_drivers_node_in_rays_view(ray_local):
    """Ray's memory resource of the node this process runs on (a single local node here)."""
    from asvp_ray.runtime.resources import this_node

    node = this_node()
    me = ray_local.get_runtime_context().get_node_id()
    want = next(n for n in ray_local.nodes() if n["NodeID"] == me)["Resources"]["memory"]
    assert node["memory"] == want > 0 and node["alive_nodes"] == 1 and "memory resource" in node["source"]
