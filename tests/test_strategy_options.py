"""Strategy options from the config (`strategy: {name: ..., OPTION: VALUE}`) and Cluster-Margin."""
from __future__ import annotations

import numpy as np
import pytest

from asvp_ray.config import dump_config, load_config
from asvp_ray.core.errors import ConfigError
from asvp_ray.pool.view import PoolView
from asvp_ray.selection import STRATEGIES, ShardedStrategy, build_strategy
from asvp_ray.selection.cluster_margin import round_robin
from tests.conftest import SMOKE


# ------------------------------------------------------------------------------ options
def test_a_strategy_mapping_in_yaml_sets_the_strategys_options_and_survives_a_dump(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(SMOKE.read_text().replace("strategy: margin",
                                                  "strategy: {name: coreset, metric: cosine, execution: local}"))
    cfg = load_config(str(cfg_file))
    assert cfg.strategy == "coreset" and cfg.strategy_options == {"metric": "cosine", "execution": "local"}
    s = build_strategy(cfg.strategy, cfg.strategy_options)
    assert s.metric == "cosine" and s.execution == "local"
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(str(again)) == cfg
    # a plain name stays valid and has no options
    plain = load_config(str(SMOKE))
    assert plain.strategy == "margin" and plain.strategy_options == {}


@pytest.mark.parametrize("override, words", [
    ("strategy={name: coreset, metrc: cosine}", ["unknown option 'metrc'", "Did you mean 'metric'?"]),
    ("strategy={name: margin, executon: sharded}", ["unknown option 'executon'", "Did you mean 'execution'?"]),
    ("strategy={name: margin, execution: shard}", ["execution='shard'", "auto, local, sharded"]),
    ("strategy={name: cluster_margin, margin_factor: 0.5}", ["margin_factor=0.5", ">= 1"]),
    ("strategy={name: cluster_margin, n_clusters: 1}", ["n_clusters=1"]),
    ("strategy={name: typiclust, k_neighbors: many}", ["typiclust", "many"]),
    ("strategy={metric: cosine}", ["has no 'name'"]),
    ("strategy={name: marginn}", ["unknown strategy 'marginn'", "Did you mean 'margin'?"]),
    ("strategy_options.foo=1", ["unknown option 'foo' for strategy 'margin'"]),
])
def test_bad_strategy_options_are_refused_at_load_naming_the_option_and_the_fix(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(str(SMOKE), [override])
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("ids_order", ["ascending", "shuffled"])
def test_score_strategies_take_execution_options_and_run_sharded_with_the_same_picks(ray_local, rng, ids_order):
    """Sharded margin picks what local margin picks, ties broken by the lower id, whether the ids
    ascend with the rows (a run's pool: the shards get positions instead of ids) or not."""
    probs = rng.dirichlet(np.ones(5), size=3000).astype(np.float32)
    probs = np.round(probs * 8) / 8  # coarse probabilities: many tied margins
    mask = np.zeros(3000, dtype=bool)
    mask[rng.choice(3000, 300, replace=False)] = True
    ids = np.arange(3000) * 7 + 3
    if ids_order == "shuffled":
        ids = rng.permutation(ids)
    pool = PoolView(ids=ids, labeled_mask=mask, probs=probs, chunk_size=500)
    plain = build_strategy("margin")
    assert not isinstance(plain, ShardedStrategy)
    sharded = build_strategy("margin", {"execution": "sharded", "num_shards": 3, "actor_options": {"num_cpus": 0.5}})
    assert isinstance(sharded, ShardedStrategy) and sharded.num_shards == 3
    want = plain.select(pool, 100, np.random.default_rng(0))
    try:
        got = sharded.select(pool, 100, np.random.default_rng(0))
    finally:
        sharded._shards.close()
    assert np.array_equal(want, got)
    order = np.argsort(ids)
    pos = order[np.searchsorted(ids[order], got)]  # select returns ids
    margins = np.sort(probs, axis=1)[:, -1] - np.sort(probs, axis=1)[:, -2]
    edge = margins[pos].max()  # the batch's last margin is tied with unpicked rows: lower ids won
    tied_out = np.flatnonzero((margins == edge) & ~mask & ~np.isin(np.arange(3000), pos))
    assert len(tied_out) and got[margins[pos] == edge].max() < ids[tied_out].min()


# ------------------------------------------------------------------------------ Cluster-Margin
def _blobs(sizes, seed=0):
    """Well-separated 8-d blobs, one per size; returns features and the blob of each row."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8, dtype=np.float32)[: len(sizes)] * 20.0
    X = np.concatenate([c + rng.normal(0, 0.3, (s, 8)) for c, s in zip(centres, sizes)]).astype(np.float32)
    blob = np.repeat(np.arange(len(sizes)), sizes)
    return X, blob


def _probs_with_margins(margins):
    """Two-class-dominant probabilities whose top-2 gap is exactly ``margins`` (5 classes)."""
    m = np.asarray(margins, dtype=np.float64)
    p = np.zeros((len(m), 5))
    p[:, 0] = 0.5 + m / 2 - 0.02
    p[:, 1] = 0.5 - m / 2 - 0.02
    p[:, 2:] = 0.04 / 3
    return p.astype(np.float32)


def test_round_robin_takes_one_per_cluster_per_pass_from_the_smallest_cluster_up():
    positions = np.array([10, 11, 12, 13, 14, 15, 16])
    clusters = np.array([5, 5, 5, 7, 7, 9, 2])  # sizes: 5 -> 3, 7 -> 2, 9 -> 1, 2 -> 1
    picks = round_robin(positions, clusters, 7, np.random.default_rng(0))
    by = dict(zip(positions, clusters))
    seq = [by[p] for p in picks]
    # pass 1: sizes 1, 1 (by cluster id: 2 then 9), 2, 3; pass 2: 7, 5; pass 3: 5
    assert seq == [2, 9, 7, 5, 7, 5, 5]
    assert sorted(picks) == sorted(positions)
    assert list(round_robin(positions, clusters, 3, np.random.default_rng(0))) == list(picks[:3])


def test_cluster_margin_picks_from_the_margin_shortlist_round_robin_over_the_pools_clusters():
    sizes = [120, 60, 30, 15]
    X, blob = _blobs(sizes)
    N = len(X)
    rng = np.random.default_rng(1)
    margins = rng.uniform(0.3, 0.9, N)
    # the shortlist (k_m x n = 3 x 6 = 18 lowest margins): 12 in blob 0, 4 in blob 1, 2 in blob 3
    short = np.concatenate([np.flatnonzero(blob == 0)[:12], np.flatnonzero(blob == 1)[:4], np.flatnonzero(blob == 3)[:2]])
    margins[short] = np.linspace(0.01, 0.2, len(short))
    margins[np.flatnonzero(blob == 0)[12]] = 0.25  # the 19th lowest: fills in for the labelled one below
    labeled = np.zeros(N, dtype=bool)
    labeled[np.flatnonzero(blob == 2)[:5]] = True
    labeled[short[0]] = True  # a labelled shortlist row: the shortlist moves one further
    nxt = np.argsort(margins + labeled * 10)[:18]
    pool = PoolView(ids=np.arange(N) + 1000, features=X, labeled_mask=labeled, probs=_probs_with_margins(margins))
    s = STRATEGIES.create("cluster_margin", margin_factor=3, n_clusters=4, coarse_clusters=16, execution="local")
    ids = s.select(pool, 6, np.random.default_rng(0))
    pos = ids - 1000
    assert len(set(ids)) == 6 and not labeled[pos].any()
    assert set(pos) <= set(nxt), "a pick outside the margin shortlist"
    # the clusters found are the blobs
    c = s.clusters_for(pool).assign(X)
    assert len(np.unique(c)) == 4 and all(len(np.unique(c[blob == b])) == 1 for b in range(4))
    # round-robin from the smallest shortlisted cluster up: blob 3 (2 rows), blob 1 (4), blob 0 (11)
    seq = [int(blob[p]) for p in pos]
    assert seq == [3, 1, 0, 3, 1, 0], seq
    # plain margin would have taken the 6 lowest margins: all from blob 0
    margin_pos = STRATEGIES.create("margin").select(pool, 6, np.random.default_rng(0)) - 1000
    assert set(blob[margin_pos]) == {0}
    assert s.last_stats_["clusters_in_batch"] == 3


def test_cluster_margin_with_margin_factor_1_is_margin_and_clusters_once_per_feature_version():
    X, blob = _blobs([200, 100, 50])
    rng = np.random.default_rng(2)
    probs = _probs_with_margins(rng.uniform(0, 1, len(X)))
    pool = PoolView(ids=np.arange(len(X)), features=X, labeled_mask=np.zeros(len(X), bool), probs=probs)
    s = STRATEGIES.create("cluster_margin", margin_factor=1, coarse_clusters=32, execution="local")
    got = s.select(pool, 20, np.random.default_rng(0))
    want = STRATEGIES.create("margin").select(pool, 20, np.random.default_rng(0))
    assert set(got) == set(want)
    first = s.clusters_
    s.select(pool, 20, np.random.default_rng(1))
    assert s.clusters_ is first  # same features: the clustering is kept
    moved = PoolView(ids=pool.ids, features=X + 1.0, labeled_mask=pool.labeled_mask, probs=probs)
    s.select(moved, 20, np.random.default_rng(0))
    assert s.clusters_ is not first  # a new feature version: clustered again
    # the same seed gives the same clusters (a resumed run picks what the straight run picked)
    again = STRATEGIES.create("cluster_margin", margin_factor=1, coarse_clusters=32, execution="local")
    assert np.array_equal(again.clusters_for(moved).assign(X), s.clusters_.assign(X))


def test_cluster_margin_runs_in_a_smoke_run_from_the_config(ray_local, tmp_path):
    from asvp_ray.loop.driver import Driver

    cfg = load_config(str(SMOKE), ["strategy={name: cluster_margin, margin_factor: 4, coarse_clusters: 32}",
                                   "final.training_method=none", "budget.schedule=[40,40]"])
    d = Driver(cfg, str(tmp_path / "run"))
    try:
        d.run()
    finally:
        d.close()
    import json

    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["strategy"] == "cluster_margin" and s["strategy_options"]["margin_factor"] == 4
    assert [r["selected_by"] for r in s["rounds"]] == ["random", "cluster_margin"]
    assert [r["n_labeled"] for r in s["rounds"]] == [40, 80]


def test_cli_lists_the_strategies_with_their_options():
    from typer.testing import CliRunner

    from asvp_ray.cli import app

    r = CliRunner().invoke(app, ["strategies"])
    assert r.exit_code == 0, r.output
    for name in STRATEGIES.names():
        assert f"\n{name}: " in "\n" + r.output
    assert "margin_factor=10.0" in r.output and "metric='euclidean'" in r.output


def test_the_driver_actor_computes_on_every_cpu_of_its_node_though_it_reserves_none(ray_local, tmp_path):
    """Ray gives a zero-CPU actor OMP_NUM_THREADS=1; the driver actor's proxy would use one core."""
    import ray

    from asvp_ray.runtime.resources import node_cpus
    from asvp_ray.loop.actor import driver_actor

    cfg = load_config(str(SMOKE), ["final.training_method=none"])
    actor = driver_actor(cfg, str(tmp_path / "run"))
    try:
        status = ray.get(actor.status.remote(), timeout=300)
        threads = status["compute_threads"]
    finally:
        ray.get(actor.close.remote(), timeout=60)
        ray.kill(actor)
    assert node_cpus() >= 2  # this machine: otherwise the check below cannot fail
    assert threads == {"torch": node_cpus(), "OMP_NUM_THREADS": str(node_cpus())}
    # and with the allocator settings that keep its heap to what it holds (allocator.lean_memory_env)
    assert status["allocators"] == {"arrow": "jemalloc", "ARROW_DEFAULT_MEMORY_POOL": "jemalloc",
                                    "MALLOC_ARENA_MAX": "2"}, status["allocators"]
    # driver_threads sets it; the actor still reserves no CPU
    cfg = load_config(str(SMOKE), ["final.training_method=none", "driver_threads=1"])
    actor = driver_actor(cfg, str(tmp_path / "run1"))
    try:
        assert ray.get(actor.status.remote(), timeout=300)["compute_threads"]["torch"] == 1
    finally:
        ray.get(actor.close.remote(), timeout=60)
        ray.kill(actor)
