"""The feature store on Google Cloud Storage (``storage: gs://...``), against a real GCS-protocol
server on loopback (fake-gcs-server, the ``gcs_server`` fixture): versions commit manifest-last,
readers use only what meta.json lists, a version without meta.json is never read and is removed
by the next writer, and a run with its store on gs:// ends exactly like the same run with a local
store. pyarrow's GcsFileSystem lists no implied folders and has no folder to delete where no
marker object was written: the store must not depend on either. (The store's unit tests run on
both servers in test_storage.py: ``object_store``.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

from asvp_ray.config import load_config
from asvp_ray.core.errors import ConfigError
from asvp_ray.storage.locations import check_storage_reachable
from asvp_ray.features.store import FeatureStore
from asvp_ray.loop.driver import Driver
from tests.conftest import SMOKE
from tests.test_storage import _objects, run_driver


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
