"""The feature store on Google Cloud Storage (``storage: gs://...``), against a real GCS-protocol
server on loopback (fake-gcs-server, the ``gcs_server`` fixture): versions commit manifest-last,
readers use only what meta.json lists, a version without meta.json is never read and is removed
by the next writer, and a run with its store on gs:// ends exactly like the same run with a local
store. pyarrow's GcsFileSystem lists no implied folders and has no folder to delete where no
marker object was written: the store must not depend on either."""
from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow.fs as pafs
import pytest

from asvp_ray.config import load_config
from asvp_ray.errors import ConfigError, RunDirError
from asvp_ray.features.store import FeatureStore, check_storage_reachable, write_part
from asvp_ray.loop.driver import Driver
from tests.conftest import SMOKE
from tests.test_storage import _objects, outcome, run_driver


@pytest.fixture
def gcs_store(gcs_server):
    prefix = f"unit-{uuid.uuid4().hex[:8]}/features"
    return FeatureStore(gcs_server["uri"](prefix)), f"asvp/{prefix}"


def test_store_on_gcs_writes_reads_and_verifies(gcs_server, gcs_store):
    store, prefix = gcs_store
    fs = gcs_server["fs"]
    assert type(store.fs).__name__ == "GcsFileSystem"
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
    # meta.json lists every part (and only those) with its size and sha256; nothing else is there
    assert names == sorted(["v0/meta.json"] + [f"v0/{p['file']}" for p in meta["parts"]])
    assert meta["rows"] == 50 and meta["splits"]["test"] == {"rows": 5, "dim": 8}
    ids, got = store.read(0)
    assert np.array_equal(ids, np.arange(50)) and np.array_equal(got, feats)
    assert np.array_equal(store.read_ids(0), np.arange(50))
    assert np.array_equal(store.read(0, "test")[0], np.arange(100, 105))
    store.verify(0)
    files = store.part_files(0)
    assert all(str(f).startswith("gs://anonymous@asvp/") and "endpoint_override=" in str(f) for f in files)
    # a second version next to it; a new FeatureStore object on the same URI finds both
    with store.writer(1, {"backbone": "y"}) as w:
        w.add(np.arange(50), feats * 3)
        w.commit()
    again = FeatureStore(gcs_server["uri"](prefix[len("asvp/"):]))
    assert again.versions() == [0, 1] and np.array_equal(again.read(1)[1], feats * 3)

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
    fs.delete_file(key)
    with pytest.raises(RunDirError, match=rf"{victim['file']}.* is missing; delete gs://.*asvp/.*v0"):
        store.read_ids(0)

    # removing a version deletes its meta.json first, then the rest (no folder marker to delete on GCS)
    store.remove(0)
    assert store.versions() == [1] and not [n for n in _objects(fs, prefix) if n.startswith("v0")]
    store.remove(1)
    assert store.versions() == [] and _objects(fs, prefix) == []


def test_incomplete_version_on_gcs_is_never_read_and_cleaned_by_the_next_writer(gcs_server, gcs_store):
    store, prefix = gcs_store
    fs = gcs_server["fs"]
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


def test_gcs_storage_is_checked_at_run_start(gcs_server, tmp_path):
    """A gs:// storage that parses, whose bucket exists and takes a probe write passes; a missing
    bucket or an option pyarrow's GCS filesystem does not take fails naming the fix."""
    uri = gcs_server["uri"]("checked")
    check_storage_reachable(uri)  # the probe object is written and deleted again
    assert _objects(gcs_server["fs"], "asvp/checked") == []
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist there; create it"):
        check_storage_reachable(uri.replace("@asvp/", "@no-such-bucket/"))
    with pytest.raises(ConfigError, match=r"'storage' .*Unexpected query parameter in GCS URI: 'region'.*fix the "
                                          r"URI .*for gs: .*gs://anonymous@bucket"):
        Driver(load_config(str(SMOKE), [f"storage={uri}&region=us"]), str(tmp_path / "r1"))


def _embeddings_to_bucket(fs, tmp_path):
    from tests.test_embeddings import _mixture, write_embeddings

    pool, test = _mixture(1500, 0, 5), _mixture(300, 1, 100_000)
    for name, cols in (("pool.parquet", pool), ("test.parquet", test)):
        local = write_embeddings(tmp_path / "emb" / name, *cols)
        with fs.open_output_stream(f"asvp/emb/{name}") as f:
            f.write(local.read_bytes())
    return pool, test, tmp_path / "emb"


def test_run_with_its_store_on_gcs_equals_the_local_run(gcs_server, ray_local, tmp_path):
    """svpp on bring-your-own embeddings: the pool read from the bucket and v0 written into the
    run's folder there ends exactly like the same run from local files with a local store (the
    labelled ids per round, the proxy's accuracies); v0 holds the file's rows bit for bit; a
    second run keeps the pool's rows in shard actors that read them from the bucket: the same."""
    fs = gcs_server["fs"]
    (ids, feats, _), (_, t_feats, _), local_dir = _embeddings_to_bucket(fs, tmp_path)
    sched = ["budget.schedule=[40,30,30]", "proxy.epochs=30"]

    def data(pool, test):
        return [f"data.pool={{kind: embeddings, path: '{pool}'}}", f"data.test={{kind: embeddings, path: '{test}'}}"]

    local = run_driver(tmp_path / "local", data(local_dir / "pool.parquet", local_dir / "test.parquet") + sched)
    assert [r[1] for r in local[1]] == [40, 70, 100] and local[1][-1][3] >= 0.9

    storage = gcs_server["uri"]("runs")
    on_gcs = data(gcs_server["uri"]("emb/pool.parquet"), gcs_server["uri"]("emb/test.parquet")) + sched
    out = tmp_path / "gcsrun"
    assert run_driver(out, on_gcs + [f"storage={storage}"]) == local
    rec = json.loads((out / "storage.json").read_text())
    assert rec["storage"] == storage  # gs://anonymous@... names no credential: recorded as it is
    store = FeatureStore(rec["features"])
    prefix = rec["features"].split("?")[0][len("gs://anonymous@"):]
    assert prefix.startswith("asvp/runs/gcsrun-") and prefix.endswith("/features")
    assert store.versions() == [0]
    got_ids, got = store.read(0)
    assert np.array_equal(got_ids, ids) and np.array_equal(got, feats)
    assert np.array_equal(store.read(0, "test")[1], t_feats)
    meta = store.meta(0)
    assert _objects(fs, prefix) == sorted(["v0/meta.json"] + [f"v0/{p['file']}" for p in meta["parts"]])
    assert not (out / "features").exists()

    out2 = tmp_path / "gcsshards"
    assert run_driver(out2, on_gcs + [f"storage={storage}", "pool_shards.mode=shards",
                                      "pool_shards.num_shards=2"]) == local
    assert "stay in shard actors that load them from gs://anonymous@asvp/runs/gcsshards-" in (
        out2 / "run.log").read_text()
