"""The feature store on object storage (the config's ``storage`` key), against a real S3-protocol
server on loopback (moto's server mode, the ``s3_server`` fixture): versions commit manifest-last,
readers use only what meta.json lists, damage is reported naming the object, and a run with its
store on S3 ends exactly like the same run with a local store."""
from __future__ import annotations

import uuid

import numpy as np
import pyarrow.fs as pafs
import pytest

from asvp_ray.errors import RunDirError
from asvp_ray.features.store import FeatureStore, write_part


def _objects(fs, prefix):
    """Names (relative to ``prefix``) of the objects under an S3 prefix."""
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


@pytest.fixture
def s3_store(s3_server):
    prefix = f"unit-{uuid.uuid4().hex[:8]}/features"
    return FeatureStore(s3_server["uri"](prefix)), f"asvp/{prefix}"


def test_store_on_s3_writes_reads_and_verifies(s3_server, s3_store):
    store, prefix = s3_store
    fs = s3_server["fs"]
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 8)).astype(np.float32)
    with store.writer(0, {"backbone": "x"}) as w:
        w.add(np.arange(0, 30), feats[:30])
        w.add(np.arange(30, 50), feats[30:])
        w.add(np.arange(100, 105), feats[:5], split="test")
        w.commit()
    assert store.versions() == [0]
    names = _objects(fs, prefix)
    meta = store.meta(0)
    # meta.json lists every part (and only those) with its size and sha256; nothing is renamed
    assert names == sorted(["v0/meta.json"] + [f"v0/{p['file']}" for p in meta["parts"]])
    assert meta["rows"] == 50 and meta["splits"]["test"] == {"rows": 5, "dim": 8}
    ids, got = store.read(0)
    assert np.array_equal(ids, np.arange(50)) and np.array_equal(got, feats)
    assert np.array_equal(store.read_ids(0), np.arange(50))
    assert np.array_equal(store.read(0, "test")[0], np.arange(100, 105))
    store.verify(0)
    files = store.part_files(0)
    assert all(str(f).startswith("s3://asvp/") and "endpoint_override=" in str(f) for f in files)

    # a part overwritten with other bytes of the same length: read and verify name it
    victim = [p for p in meta["parts"] if p["split"] == "pool"][0]
    key = f"{prefix}/v0/{victim['file']}"
    with fs.open_input_stream(key) as f:
        data = bytearray(f.read())
    data[-20] ^= 0xFF
    with fs.open_output_stream(key) as f:
        f.write(bytes(data))
    with pytest.raises(RunDirError, match=rf"{victim['file']}.* does not match the size and sha256 .*delete"):
        store.read(0)
    with pytest.raises(RunDirError, match=rf"{victim['file']}.* does not match the sha256"):
        store.verify(0)
    # truncated: even the cheap readers notice
    with fs.open_output_stream(key) as f:
        f.write(bytes(data[:100]))
    with pytest.raises(RunDirError, match=rf"{victim['file']}.* has 100 bytes where meta.json lists {victim['bytes']}"):
        store.part_files(0)
    fs.delete_file(key)
    with pytest.raises(RunDirError, match=rf"{victim['file']}.* is missing; delete s3://asvp/.*v0"):
        store.read_ids(0)

    # removing a version deletes its meta.json first, then the rest
    store.remove(0)
    assert store.versions() == [] and _objects(fs, prefix) == []


def test_incomplete_version_on_s3_is_never_read_and_cleaned_by_the_next_writer(s3_server, s3_store):
    store, prefix = s3_store
    fs = s3_server["fs"]
    feats = np.ones((10, 4), np.float32)
    # what a crash after the workers' writes but before the commit leaves: parts, no meta.json
    write_part(store.path(1), np.arange(10), feats)
    assert store.versions() == [] and len(_objects(fs, prefix)) == 1
    with pytest.raises(RunDirError, match="v1 is missing or incomplete"):
        store.read(1)
    # a writer with a part nobody reported (a retried write task's first try): removed at commit
    with store.writer(0, {}) as w:
        orphan = write_part(w.folder(), np.arange(10), feats)
        rec = write_part(w.folder(), np.arange(10), feats * 2)
        w.add_part(rec)
        w.commit()
    assert store.versions() == [0]
    assert _objects(fs, prefix) == sorted(["v0/meta.json", f"v0/{rec['file']}"])  # v1's leftover is gone too
    assert orphan["file"] not in str(_objects(fs, prefix))
    np.testing.assert_array_equal(store.read(0)[1], feats * 2)
    # a committed version is never written into again
    with pytest.raises(RunDirError, match="already exists"):
        store.writer(0, {})
    # a writer that fails leaves nothing behind
    with pytest.raises(ValueError):
        with store.writer(1, {}) as w:
            w.add(np.arange(5), feats[:5])
            raise ValueError("boom")
    assert store.versions() == [0] and not [n for n in _objects(fs, prefix) if n.startswith("v1")]


# ---------------------------------------------------------------------------- whole runs
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402

from asvp_ray.config import load_config  # noqa: E402
from asvp_ray.errors import ConfigError  # noqa: E402
from asvp_ray.loop.driver import Driver  # noqa: E402
from tests.conftest import ROOT, SMOKE  # noqa: E402

RUN = ["budget.schedule=[30,20,20]", "proxy.epochs=10", "final.training_method=none"]
CLI = [str(Path(sys.executable).parent / "asvp-ray")]


def outcome(out):
    """What a user compares between two runs: the labelled ids per round and the proxy's accuracies."""
    lab = pq.read_table(out / "labeled.parquet").to_pydict()
    rounds = json.loads((out / "summary.json").read_text())["rounds"]
    return lab, [(r["round"], r["n_labeled"], r["selected_by"], r["proxy_test_accuracy"], r["feature_version"])
                 for r in rounds]


def run_driver(out, overrides=()):
    d = Driver(load_config(str(SMOKE), RUN + list(overrides)), str(out))
    try:
        d.run()
    finally:
        d.close()
    return outcome(out)


@pytest.fixture(scope="module")
def local_run(ray_local, tmp_path_factory):
    """The reference: the same run with its feature store in the run directory."""
    out = tmp_path_factory.mktemp("local") / "run"
    return run_driver(out)


def _run_prefix(out):
    rec = json.loads((out / "storage.json").read_text())
    return rec, rec["features"].split("?")[0][len("s3://"):]


def test_run_with_its_store_on_s3_equals_the_local_run(s3_server, local_run, tmp_path):
    storage = s3_server["uri"]("runs")
    cache = tmp_path / "cache"  # the feature cache stays local: filled from the bucket, copied back to it
    out = tmp_path / "s3run"
    assert run_driver(out, [f"storage={storage}", f"feature_cache={cache}"]) == local_run
    rec, prefix = _run_prefix(out)
    assert rec["storage"] == storage and prefix.startswith("asvp/runs/s3run-") and prefix.endswith("/features")
    names = _objects(s3_server["fs"], prefix)
    meta = json.loads(s3_server["fs"].open_input_stream(f"{prefix}/v0/meta.json").read())
    assert names == sorted(["v0/meta.json"] + [f"v0/{p['file']}" for p in meta["parts"]])
    assert meta["rows"] == 400 and meta["splits"]["test"]["rows"] == 200
    assert not (out / "features").exists()  # the run directory keeps the small commit files only
    assert {"state.json", "summary.json", "labeled.parquet", "run.log", "storage.json"} <= {
        p.name for p in out.iterdir()}
    cached = list(cache.glob("*/v0/meta.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["parts"] == meta["parts"]
    # a second run takes v0 from the cache (copied into its folder on the bucket), and its shard
    # actors read the pool's rows from the bucket themselves: the same picks
    out2 = tmp_path / "s3shards"
    assert run_driver(out2, [f"storage={storage}", f"feature_cache={cache}", "pool_shards.mode=shards",
                             "pool_shards.num_shards=2"]) == local_run
    log = (out2 / "run.log").read_text()
    assert "reusing features v0 from the feature cache" in log and "extracting feature version" not in log
    assert "stay in shard actors that load them from s3://asvp/runs/s3shards-" in log
    rec2, prefix2 = _run_prefix(out2)
    assert _objects(s3_server["fs"], prefix2) == names


# ASVP with one refresh at 70 labels: round 2 fine-tunes the backbone and extracts v1 (small and quick)
ASVP = ["method=asvp", "refresh.policy=at_labels", "refresh.at=[70]", "train.epochs=1", "train.lp_epochs=1",
        "data.pool.limit=240", "data.test.limit=100"]


@pytest.fixture(scope="module")
def local_asvp_run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("local_asvp") / "run"
    res = run_driver(out, ASVP)
    assert [r[-1] for r in res[1]] == [0, 0, 1]  # round 2 refreshed to v1
    return res


def run_cli(out, sets, kill_at=None):
    env = dict(os.environ, TQDM_DISABLE="1")
    env.pop("ASVP_KILL_AT", None)
    if kill_at:
        env["ASVP_KILL_AT"] = kill_at
    args = CLI + ["run", str(SMOKE), "--out", str(out)]
    for s in RUN + sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.long
def test_killed_runs_on_s3_leave_no_readable_half_version_and_resume_to_the_same_end(s3_server, local_asvp_run,
                                                                                      tmp_path):
    """ASVP with a refresh, its store on S3, killed while v0 and then v1 were being written: each
    time the bucket holds the parts but no meta.json (nothing readable); the resumed run removes
    them, writes the versions whole and ends exactly where the same run with a local store ends."""
    from asvp_ray.features.store import FeatureStore

    sets = ASVP + [f"storage={s3_server['uri']('crash')}"]
    out = tmp_path / "killed"
    fs = s3_server["fs"]
    r = run_cli(out, sets, kill_at="extract:v0:batch2")  # after both of v0's parts, before meta.json
    assert r.returncode != 0, r.stdout[-2000:]
    rec, prefix = _run_prefix(out)
    left = _objects(fs, prefix)
    assert sorted(n.rsplit("/", 1)[0] for n in left) == ["v0", "v0/test"], left  # a part each, no meta.json
    assert all(n.rsplit("/", 1)[1].startswith("part-w") for n in left), left
    assert FeatureStore(rec["features"]).versions() == []

    r = run_cli(out, sets, kill_at="extract:v1:batch2")  # the refresh of round 2, mid-commit of v1
    assert r.returncode != 0, r.stdout[-2000:]
    log = (out / "run.log").read_text()
    assert "removed half-written feature versions left by a crash: ['v0']" in log
    store = FeatureStore(rec["features"])
    assert store.versions() == [0]
    v0 = sorted(["v0/meta.json"] + [f"v0/{p['file']}" for p in store.meta(0)["parts"]])
    assert not set(left) & set(v0)  # the first try's parts are gone, v0 was written whole
    assert sorted(n for n in _objects(fs, prefix) if n.startswith("v0")) == v0
    assert [n for n in _objects(fs, prefix) if n.startswith("v1")] and "v1/meta.json" not in _objects(fs, prefix)

    r = run_cli(out, sets)
    assert r.returncode == 0, r.stderr[-3000:]
    assert outcome(out) == local_asvp_run
    assert store.versions() == [0, 1]
    assert _objects(fs, prefix) == sorted(v0 + ["v1/meta.json"] + [f"v1/{p['file']}" for p in store.meta(1)["parts"]])
    assert not (out / "features").exists()
    r = run_cli(out, sets)
    assert r.returncode == 0 and "already finished" in r.stdout, r.stdout[-2000:]


def test_storage_key_is_checked_at_load_and_at_run_start(s3_server, tmp_path):
    with pytest.raises(ConfigError, match=r"'storage' \(ftp://x/y\): unknown scheme 'ftp'; use a local folder, s3://"):
        load_config(str(SMOKE), ["storage=ftp://x/y"])
    with pytest.raises(ConfigError, match=r"'storage' \(s3:///p\) names no bucket"):
        load_config(str(SMOKE), ["storage=s3:///p"])
    with pytest.raises(ConfigError, match="'feature_cache' .* must be a local folder"):
        load_config(str(SMOKE), [f"feature_cache={s3_server['uri']('x')}"])
    missing = s3_server["uri"]("x").replace("s3://asvp/", "s3://no-such-bucket/")
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist there; create it"):
        Driver(load_config(str(SMOKE), [f"storage={missing}"]), str(tmp_path / "r1"))
    with pytest.raises(ConfigError, match=r"'storage' .*Unexpected query parameter .*fix the URI"):
        Driver(load_config(str(SMOKE), [f"storage={s3_server['uri']('x')}&colour=red"]), str(tmp_path / "r2"))


def test_embeddings_on_s3_become_v0_on_s3_bit_for_bit(s3_server, ray_local, tmp_path):
    """Bring-your-own embeddings read from the bucket; the import's Ray Data tasks write v0's
    parts straight into the run's folder on the bucket; v0 holds the file's rows exactly."""
    from asvp_ray.features.store import FeatureStore
    from tests.test_embeddings import _mixture, write_embeddings

    fs = s3_server["fs"]
    ids, feats, labels = _mixture(1500, 0, 5)
    t_ids, t_feats, t_labels = _mixture(300, 1, 100_000)
    for name, cols in (("pool.parquet", (ids, feats, labels)), ("test.parquet", (t_ids, t_feats, t_labels))):
        local = write_embeddings(tmp_path / name, *cols)
        with fs.open_output_stream(f"asvp/emb/{name}") as f:
            f.write(local.read_bytes())
        local.unlink()
    sets = [f"data.pool={{kind: embeddings, path: '{s3_server['uri']('emb/pool.parquet')}'}}",
            f"data.test={{kind: embeddings, path: '{s3_server['uri']('emb/test.parquet')}'}}",
            "budget.schedule=[50,50]", "proxy.epochs=30", f"storage={s3_server['uri']('embruns')}"]
    out = tmp_path / "run"
    d = Driver(load_config(str(SMOKE), sets), str(out))
    try:
        summary = d.run()
    finally:
        d.close()
    assert summary["status"] == "finished" and summary["rounds"][-1]["proxy_test_accuracy"] >= 0.9
    rec, prefix = _run_prefix(out)
    store = FeatureStore(rec["features"])
    got_ids, got = store.read(0)
    assert np.array_equal(got_ids, ids) and np.array_equal(got, feats)
    assert np.array_equal(store.read(0, "test")[1], t_feats)
    assert "v0/meta.json" in _objects(fs, prefix) and not (out / "features").exists()


def test_run_dir_records_its_folder_on_the_storage(tmp_path):
    """A run's store folder under ``storage`` is chosen once, recorded in storage.json, and found
    again on resume; another storage for the same run directory is refused."""
    from asvp_ray.loop.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    assert rd.open_store(None).root == tmp_path / "run" / "features" and not rd.storage_path.exists()
    store = rd.open_store(str(tmp_path / "shared"))
    assert store.root.parent.parent == tmp_path / "shared" and store.root.name == "features"
    assert store.root.parent.name.startswith("run-")
    assert RunDir(tmp_path / "run").open_store(str(tmp_path / "shared")).root == store.root == rd.store.root
    assert RunDir(tmp_path / "other").open_store(str(tmp_path / "shared")).root != store.root  # runs never meet
    with pytest.raises(RunDirError, match=r"keeps its features at .*shared.*resume it with storage: "):
        rd.open_store(None)


def test_cli_extract_writes_to_the_storage(s3_server, tmp_path):
    from asvp_ray.features.store import FeatureStore

    out = tmp_path / "ex"
    r = subprocess.run(CLI + ["extract", str(SMOKE), "--out", str(out), "--set", "data.pool.limit=100",
                              "--set", "data.test=null", "--set", f"storage={s3_server['uri']('extract')}"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, TQDM_DISABLE="1"), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rec, prefix = _run_prefix(out)
    assert f"wrote {rec['features'].split('?')[0]}/v0?" in r.stdout
    store = FeatureStore(rec["features"])
    assert store.versions() == [0] and store.meta(0)["rows"] == 100 and not (out / "features").exists()
