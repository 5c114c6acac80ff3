"""The feature store on object storage (the config's ``storage`` key), against a real S3-protocol
server on loopback (moto's server mode, the ``s3_server`` fixture; the store units also against
fake-gcs-server, ``gcs_server``): versions commit manifest-last,
readers use only what meta.json lists, damage is reported naming the object, and a run with its
store on S3 ends exactly like the same run with a local store."""
from __future__ import annotations

import uuid

import numpy as np
import pyarrow.fs as pafs
import pytest

from asvp_ray.core.errors import RunDirError
from asvp_ray.features.parts import write_part
from asvp_ray.features.store import FeatureStore


def _objects(fs, prefix):
    """Names (relative to ``prefix``) of the objects under an S3 prefix."""
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


# each object store the tests run a real server of: (its fixture, how part URIs start, pyarrow's class)
OBJECT_STORES = {"s3": ("s3_server", "s3://asvp/", "S3FileSystem"),
                 "gs": ("gcs_server", "gs://anonymous@asvp/", "GcsFileSystem")}


@pytest.fixture(params=sorted(OBJECT_STORES))
def object_store(request):
    """``(server, FeatureStore at a fresh prefix, that prefix in the bucket, URI start, fs class)``
    on each object store: S3 (moto) and GCS (fake-gcs-server)."""
    fixture, uri_start, fs_class = OBJECT_STORES[request.param]
    server = request.getfixturevalue(fixture)
    prefix = f"unit-{uuid.uuid4().hex[:8]}/features"
    return server, FeatureStore(server["uri"](prefix)), f"asvp/{prefix}", uri_start, fs_class


def test_store_on_object_storage_writes_reads_and_verifies(object_store):
    server, store, prefix, uri_start, fs_class = object_store
    fs = server["fs"]
    assert type(store.fs).__name__ == fs_class
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
    assert all(str(f).startswith(uri_start) and "endpoint_override=" in str(f) for f in files)
    # a second version next to it; a new FeatureStore object on the same URI finds both (GCS lists
    # no folder that only objects' names make: the store must not need one)
    with store.writer(1, {"backbone": "y"}) as w:
        w.add(np.arange(50), feats * 3)
        w.commit()
    again = FeatureStore(server["uri"](prefix[len("asvp/"):]))
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
    with pytest.raises(RunDirError, match=rf"{victim['file']}.* does not match the sha256"):
        store.verify(0)
    # truncated: even the cheap readers notice
    with fs.open_output_stream(key) as f:
        f.write(bytes(data[:100]))
    with pytest.raises(RunDirError, match=rf"{victim['file']}.* has 100 bytes where meta.json lists {victim['bytes']}"):
        store.part_files(0)
    fs.delete_file(key)
    with pytest.raises(RunDirError, match=rf"{victim['file']}.* is missing; delete {uri_start.split('://')[0]}://.*asvp/.*v0"):
        store.read_ids(0)

    # removing a version deletes its meta.json first, then the rest (no folder marker needed)
    store.remove(0)
    assert store.versions() == [1] and not [n for n in _objects(fs, prefix) if n.startswith("v0")]
    store.remove(1)
    assert store.versions() == [] and _objects(fs, prefix) == []


def test_incomplete_version_on_object_storage_is_never_read_and_cleaned_by_the_next_writer(object_store):
    server, store, prefix, _, _ = object_store
    fs = server["fs"]
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
from asvp_ray.core.errors import ConfigError  # noqa: E402
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
def local_run(ray_local, feature_cache, tmp_path_factory):
    """The reference: the same run with its feature store in the run directory (v0 from the
    session's feature cache when an earlier smoke run filled it: the same features)."""
    out = tmp_path_factory.mktemp("local") / "run"
    return run_driver(out, [f"feature_cache={feature_cache}"])


def _run_prefix(out):
    rec = json.loads((out / "storage.json").read_text())
    return rec, rec["features"].split("?")[0][len("s3://"):].rpartition("@")[2]


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
    # the refresh's model file is on the bucket too (its Ray Train checkpoints removed), none in the run directory
    run_files = _objects(fs, prefix.rsplit("/", 1)[0])
    assert "checkpoints/refresh-v1/model.pt" in run_files and not (out / "checkpoints").exists()
    assert not [n for n in run_files if "/ray/" in n]
    r = run_cli(out, sets)
    assert r.returncode == 0 and "already finished" in r.stdout, r.stdout[-2000:]


def test_storage_key_is_checked_at_load_and_at_run_start(s3_server, tmp_path):
    with pytest.raises(ConfigError, match=r"'storage' \(ftp://x/y\): unknown scheme 'ftp'; use a local folder, s3://"):
        load_config(str(SMOKE), ["storage=ftp://x/y"])
    with pytest.raises(ConfigError, match=r"'storage' \(s3:///p\) names no bucket"):
        load_config(str(SMOKE), ["storage=s3:///p"])
    # a feature cache may be a bucket (a study in a bucket keeps its cache there); its form is checked
    assert load_config(str(SMOKE), [f"feature_cache={s3_server['uri']('x')}"]).feature_cache.startswith("s3://")
    with pytest.raises(ConfigError, match=r"'feature_cache' \(ftp://x/y\): unknown scheme 'ftp'"):
        load_config(str(SMOKE), ["feature_cache=ftp://x/y"])
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


# ---------------------------------------------------------------------------- model files and checkpoints
@pytest.mark.slow
@pytest.mark.long
def test_finetune_on_s3_resumes_from_its_checkpoints_there_and_its_model_file_scores_from_there(
        s3_server, ray_local, tmp_path):
    """A fine-tune with its folder on S3: Ray Train's checkpoints go to the bucket (a worker killed
    after epoch 1 resumes from there), the model file is written there and the
    checkpoints removed; the model equals the same fine-tune in a local folder (no kill), and the
    extraction actors score the pool from the model file on the bucket exactly as from the local one."""
    import torch

    from asvp_ray.config import ExtractConfig
    from asvp_ray.data.fashion_mnist import FashionMNISTSource
    from asvp_ray.features.backbones import BackboneSpec
    from asvp_ray.features.extract import predict_proba
    from asvp_ray.features.model_file import read_torch_file
    from asvp_ray.train.config import TrainConfig
    from asvp_ray.train.finetune import finetune

    spec = BackboneSpec("test_efficientnet", weights="none", image_size=32, crop_pct=1.0)
    pool = FashionMNISTSource(split="train", limit=120)
    cfg = TrainConfig(batch_size=32, epochs=3, max_failures=1)
    marker = tmp_path / "killed-once"

    def kill_once(epoch, rank, marker=str(marker)):
        import os
        import signal

        if epoch == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    folder = s3_server["uri"](f"ft-{uuid.uuid4().hex[:6]}/checkpoints/refresh-v1")
    prefix = folder.split("?")[0][len("s3://"):]
    res = finetune(pool, pool.ids[:64], None, 10, spec, cfg, folder, method="ft", on_epoch_end=kill_once)
    # resumed from a checkpoint on the bucket (epoch 1's, or epoch 0's when the kill beat its upload)
    assert marker.exists() and res.resumed_from in ([1], [2]), res.resumed_from
    assert res.checkpoint == folder.replace("?", "/model.pt?")
    assert _objects(s3_server["fs"], prefix) == ["model.pt"]  # Ray Train's checkpoints are removed
    local = finetune(pool, pool.ids[:64], None, 10, spec, cfg, tmp_path / "local", method="ft")
    got, want = read_torch_file(res.checkpoint), torch.load(local.checkpoint, weights_only=True)
    for part in ("backbone", "head"):
        assert got[part].keys() == want[part].keys()
        for k in want[part]:
            assert torch.equal(got[part][k], want[part][k]), (part, k)
    ecfg = ExtractConfig(batch_size=32, min_actors=1, max_actors=1)
    ids_s3, probs_s3 = predict_proba(pool, pool.ids[:50], res.checkpoint, spec, ecfg)
    ids_local, probs_local = predict_proba(pool, pool.ids[:50], local.checkpoint, spec, ecfg)
    assert np.array_equal(ids_s3, ids_local) and np.array_equal(probs_s3, probs_local)
    assert probs_s3.shape == (50, 10)


# ---------------------------------------------------------------------------- write permission, credentials
def test_a_storage_the_run_cannot_write_to_fails_at_start_naming_the_fix(tmp_path):
    """The write check of check_storage_reachable on a local folder: a read-only folder is refused
    before anything runs (root ignores permissions: there the S3 test below covers the check)."""
    from asvp_ray.storage.locations import check_storage_reachable

    check_storage_reachable(str(tmp_path / "new" / "folder"))  # created, probe written and removed
    assert list((tmp_path / "new" / "folder").iterdir()) == []
    if os.geteuid() == 0:
        pytest.skip("running as root, which writes into read-only folders; the S3 variant covers the check")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=rf"'storage' \({ro}\): this run cannot write there .*chmod"):
            check_storage_reachable(str(ro))
    finally:
        ro.chmod(0o755)


# moto's IAM: after this many requests it checks signatures and policies; the script below makes
# exactly that many (the bucket, a user, its read-only policy, its key) and then checks the denial.
# (moto names a bucket's HEAD s3:HeadBucket; AWS checks s3:ListBucket for it.)
_IAM_SETUP = """
import json, sys, boto3
url = sys.argv[1]
kw = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
boto3.client("s3", **kw).create_bucket(Bucket="ro-bucket")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="reader")
iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps({
    "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*",
    "Action": ["s3:ListBucket", "s3:HeadBucket", "s3:GetObject", "s3:GetBucketLocation"]}]}))
key = iam.create_access_key(UserName="reader")["AccessKey"]
s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                  aws_secret_access_key=key["SecretAccessKey"])
s3.list_objects_v2(Bucket="ro-bucket")
try:
    s3.put_object(Bucket="ro-bucket", Key="x", Body=b"x")
    print("NOT-DENIED")
except Exception as e:
    print(json.dumps({"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"], "denied": str(e)}))
"""


def test_a_read_only_bucket_fails_at_start_and_the_message_hides_the_credentials(tmp_path):
    """A second moto server that enforces IAM: a user allowed to list and read the bucket but not
    to write. A run with that user's keys in the storage URI is refused at start, naming the key,
    the URI with its credentials as ***, and the fix."""
    from urllib.parse import quote

    from tests.conftest import S3_VENV, _free_port, _stop_server

    exe = S3_VENV / "bin" / "moto_server"
    if not exe.is_file():
        if os.environ.get("ASVP_REQUIRE_S3") == "1":
            pytest.fail(f"the S3 test server (moto) is not installed in {S3_VENV}; run `make s3server`")
        pytest.skip(f"the S3 test server (moto) is not installed in {S3_VENV}; run `make s3server`")
    import time
    import urllib.request

    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4"))
    try:
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() - t0 < 60, (tmp_path / "server.log").read_text()
                time.sleep(0.2)
        r = subprocess.run([str(S3_VENV / "bin" / "python"), "-c", _IAM_SETUP, f"http://127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip().startswith("{"), (r.stdout, r.stderr[-2000:])
        user = json.loads(r.stdout)
        assert "AccessDenied" in user["denied"]
        keys = f"{quote(user['access_key'], safe='')}:{quote(user['secret_key'], safe='')}"
        storage = f"s3://{keys}@ro-bucket/runs?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        with pytest.raises(ConfigError) as e:
            Driver(load_config(str(SMOKE), [f"storage={storage}"]), str(tmp_path / "run"))
        msg = str(e.value)
        assert msg.startswith(f"config key 'storage' (s3://***@ro-bucket/runs?endpoint_override=127.0.0.1:{port}"
                              "&scheme=http&region=us-east-1): this run cannot write there"), msg
        assert ("ACCESS_DENIED" in msg or "AccessDenied" in msg) and "s3:PutObject" in msg  # the store's answer
        assert quote(user["secret_key"], safe="") not in msg and user["secret_key"] not in msg
        assert not (tmp_path / "run" / "config.yaml").exists()
    finally:
        _stop_server(proc, log)


def test_credentials_in_the_storage_uri_are_never_written_and_a_resume_takes_them_from_the_config(tmp_path):
    """storage.json (and config.yaml) hold the URI with its credentials as ``***``; the store and
    checkpoint folders are rebuilt with the config's full URI; a resume with the same URI (same or
    other credentials) is accepted, another endpoint refused without showing the secret."""
    from asvp_ray.storage.locations import with_options_of
    from asvp_ray.loop.rundir import RunDir
    from asvp_ray.core.redact import redact_text

    secret = f"sEcReT{uuid.uuid4().hex[:8]}"
    storage = f"s3://AK:{secret}@bkt/pre?endpoint_override=127.0.0.1:9&scheme=http"
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    store = rd.open_store(storage)
    text = rd.storage_path.read_text()
    assert secret not in text and "AK" not in text
    rec = json.loads(text)
    assert rec["storage"] == "s3://***@bkt/pre?endpoint_override=127.0.0.1:9&scheme=http"
    assert rec["features"].startswith("s3://***@bkt/pre/run-") and rec["checkpoints"].startswith("s3://***@bkt/pre/")
    assert store.uri.startswith(f"s3://AK:{secret}@bkt/pre/run-") and store.fs_root.startswith("bkt/pre/run-")
    assert store.uri.endswith("/features?endpoint_override=127.0.0.1:9&scheme=http")
    assert str(rd.checkpoints) == store.uri.replace("/features?", "/checkpoints?")
    again = RunDir(tmp_path / "run")
    assert again.open_store(storage.replace(secret, "other")).uri == store.uri.replace(secret, "other")
    # without the config (rd.store): the redacted credentials are dropped, pyarrow uses the environment's
    assert RunDir(tmp_path / "run").store.uri == store.uri.replace(f"AK:{secret}@", "")
    with pytest.raises(RunDirError, match=r"keeps its features at s3://\*\*\*@bkt/pre/run-") as e:
        RunDir(tmp_path / "run").open_store(storage.replace(":9?", ":10?").replace(":9&", ":10&"))
    assert secret not in str(e.value)
    assert with_options_of("/a/b", storage) == "/a/b"
    rd.write_config(f"storage: {storage}\n")
    assert secret not in rd.config_path.read_text() and "s3://***@bkt" in rd.config_path.read_text()
    # query options named like credentials are masked too (filesystems that take them there)
    assert redact_text("gs://b/p?access_token=t0k&scheme=http s3://b/q?secret_key=x&session_token=y") == \
        "gs://b/p?access_token=***&scheme=http s3://b/q?secret_key=***&session_token=***"


def _secret_free(fs, prefix, secret):
    """Every object under ``prefix`` (parts, meta.json, model files ...) read whole: none holds ``secret``."""
    names = _objects(fs, prefix)
    for n in names:
        with fs.open_input_stream(f"{prefix}/{n}") as f:
            assert secret.encode() not in f.read(), n
    return names


@pytest.mark.slow
@pytest.mark.long
def test_asvp_refresh_with_credentials_in_the_uri_keeps_model_files_on_s3_and_writes_no_secret(
        s3_server, local_asvp_run, tmp_path):
    """ASVP's refresh with its storage on S3 and the credentials in the URI's query: the fine-tune's
    Ray Train checkpoints and model file go to the run's folder on the bucket, the extraction actors
    read the model file from there, the run ends exactly like the local one, and no file of the run
    directory nor object of the bucket holds the secret; the same command resumes (finished)."""
    secret = f"sEcReT-{uuid.uuid4().hex[:10]}"
    storage = s3_server["uri"]("creds").replace("s3://", f"s3://asvp-test:{secret}@")
    out = tmp_path / "run"
    assert run_driver(out, ASVP + [f"storage={storage}"]) == local_asvp_run
    for p in out.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p
    rec = json.loads((out / "storage.json").read_text())
    assert rec["storage"] == s3_server["uri"]("creds").replace("s3://", "s3://***@")
    run_prefix = _run_prefix(out)[1].rsplit("/", 1)[0]
    names = _secret_free(s3_server["fs"], run_prefix, secret)
    assert "checkpoints/refresh-v1/model.pt" in names
    assert not [n for n in names if n.startswith("checkpoints/") and "/ray/" in n]  # Ray Train's are removed
    assert not (out / "checkpoints").exists() and not (out / "features").exists()
    summary = json.loads((out / "summary.json").read_text())
    ckpt = summary["rounds"][2]["refresh"]["checkpoint"]
    assert ckpt.startswith(f"s3://***@{run_prefix}/checkpoints/refresh-v1/model.pt?")
    meta_v1 = json.loads(s3_server["fs"].open_input_stream(f"{run_prefix}/features/v1/meta.json").read())
    assert meta_v1["weights"] == ckpt
    assert "s3://***@asvp/creds" in (out / "config.yaml").read_text()
    # the same config again: config.yaml (redacted) matches it, and the run is already finished
    assert run_driver(out, ASVP + [f"storage={storage}"]) == local_asvp_run


@pytest.mark.slow
@pytest.mark.long
def test_study_with_its_trials_storage_on_s3_equals_the_local_study(s3_server, ray_local, tmp_path):
    """`run_study` with storage on S3 (credentials in the URI): each trial's run keeps its feature
    versions in its own folder on the bucket, the study's files stay local and hold no secret, and
    every trial labels the same ids and reaches the same accuracies as in the same study with the
    features in the trials' run directories."""
    from asvp_ray.storage.locations import with_options_of
    from asvp_ray.features.store import FeatureStore
    from asvp_ray.tune import run_study

    space = {"strategy": {"grid": ["margin", "entropy"]}}
    sets = ["budget.schedule=[30,20]", "proxy.epochs=10", "final.training_method=none"]
    secret = f"sEcReT-{uuid.uuid4().hex[:10]}"
    storage = s3_server["uri"]("study").replace("s3://", f"s3://asvp-test:{secret}@")
    results = {}
    for name, extra in (("local", []), ("s3", [f"storage={storage}"])):
        res = run_study(SMOKE, space, tmp_path / name, overrides=sets + extra, verbose=0)
        assert sorted(r["status"] for r in res.rows) == ["finished", "finished"], res.rows
        results[name] = {r["strategy"]: outcome(Path(r["run_dir"])) for r in res.rows}
        if name == "s3":
            for r in res.rows:
                run = Path(r["run_dir"])
                rec = json.loads((run / "storage.json").read_text())
                store = FeatureStore(with_options_of(rec["features"], storage))
                assert store.remote and store.versions() == [0] and store.meta(0)["rows"] == 400
                assert rec["features"].startswith(f"s3://***@asvp/study/{run.name}-")
                assert not (run / "features").exists()
            for p in (tmp_path / name).rglob("*"):
                if p.is_file():  # study.yaml, results.csv, best_config.yaml, Tune's state, the runs' files
                    assert secret.encode() not in p.read_bytes(), p
            _secret_free(s3_server["fs"], "asvp/study", secret)
    assert results["s3"] == results["local"]
