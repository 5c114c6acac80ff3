"""Distributed extraction into the feature store, on a local Ray instance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from asvp_ray.config import ExtractConfig, load_config
from asvp_ray.data.fashion_mnist import FashionMNISTSource
from asvp_ray.data.files import ManifestSource
from asvp_ray.data.sources import build_source
from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.features.backbones import BackboneSpec, Preprocessor, create_backbone, data_config
from asvp_ray.features.extract import extract_to_store
from asvp_ray.features.extract_plan import plan_actors
from asvp_ray.features.store import FeatureStore
from tests.conftest import SMOKE, write_images

SPEC = BackboneSpec("test_efficientnet", weights="none", image_size=32, crop_pct=1.0)
CFG = ExtractConfig(batch_size=64, progress=False)


def direct_features(images, spec=SPEC):
    """Features computed in this process, the plain-PyTorch way, for comparison."""
    model = create_backbone(spec)
    with torch.no_grad():
        return model(Preprocessor(data_config(spec, model))(images)).numpy()


def test_extracted_features_are_aligned_to_ids_and_deterministic(ray_local, tmp_path):
    pool = FashionMNISTSource(split="train", limit=300)
    test = FashionMNISTSource(split="test", limit=100)
    store = FeatureStore(tmp_path / "features")
    meta = extract_to_store(store, 0, pool, SPEC, CFG, test=test)
    assert meta["rows"] == 300 and meta["splits"]["test"]["rows"] == 100
    assert meta["backbone"] == "test_efficientnet" and len(meta["weights_hash"]) == 16
    ids, feats = store.read(0)
    assert ids.dtype == np.int64 and feats.dtype == np.float32
    assert np.array_equal(ids, pool.ids)
    from asvp_ray.data.fashion_mnist import read_idx

    want = direct_features(read_idx(pool.images_path)[:300])
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-4)
    pick = np.array([250, 3, 17])
    np.testing.assert_array_equal(store.lookup(0, pick), feats[pick])
    # a second extraction gives the same features
    extract_to_store(store, 1, pool, SPEC, CFG)
    np.testing.assert_allclose(store.read(1)[1], feats, rtol=1e-5, atol=1e-5)
    assert store.versions() == [0, 1]
    # Parquet schema: id int64, feature fixed_size_list<float32>
    import pyarrow.parquet as pq

    schema = pq.read_schema(next((tmp_path / "features" / "v0").glob("part-*.parquet")))
    assert str(schema.field("id").type) == "int64"
    assert str(schema.field("feature").type).startswith("fixed_size_list<element: float>")
    ds_rows = store.to_dataset(0).count()
    assert ds_rows == 300


def _manifest(tmp_path, n=6):
    paths = write_images(tmp_path / "imgs", n, size=(30, 26))
    lines = "".join(f"{10 + i},imgs/{p.name},{i % 2}\n" for i, p in enumerate(paths))
    (tmp_path / "m.csv").write_text("id,path,label\n" + lines)
    return paths


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_manifest_pool_is_read_by_ray_data_in_small_blocks_and_ids_pick_their_own_images(ray_local, tmp_path, fmt):
    """The whole pool: Ray Data reads the manifest (the driver keeps ids and labels, not paths) and
    decodes in blocks of at most 1,024 rows, so a large manifest spreads over many tasks; a few
    ids: exactly their images. 2,500 rows over 5 image files (each id's image is known)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    paths = write_images(tmp_path / "imgs", 5, size=(12, 10))
    n = 2_500
    ids = np.arange(n)[::-1] * 3 + 7  # unsorted in the file
    rel = [f"./imgs//{paths[i % 5].name}" for i in range(n)]
    if fmt == "parquet":
        pq.write_table(pa.table({"id": ids, "path": rel}), tmp_path / "m.parquet")
    else:
        (tmp_path / "m.csv").write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in zip(ids, rel)))
    src = ManifestSource(str(tmp_path / f"m.{fmt}"))
    assert src._paths is None  # nothing per row but ids (and labels) in this process
    images = {p.name: np.asarray(Image.open(p)) for p in paths}
    want = {int(i): images[paths[k % 5].name] for k, i in enumerate(ids)}
    sizes = src.to_dataset().map_batches(lambda b: {"rows": np.array([len(b["id"])])}, batch_size=None).take_all()
    assert sum(r["rows"] for r in sizes) == n and max(r["rows"] for r in sizes) <= 1024 and len(sizes) >= 3
    rows = src.to_dataset().take_all()
    assert sorted(r["id"] for r in rows) == sorted(want)
    assert all(np.array_equal(r["image"], want[r["id"]]) for r in rows[::97])
    some = np.array([int(ids[5]), int(ids[2_000]), int(ids[1])])
    got = src.to_dataset(ids=some).take_all()
    assert sorted(r["id"] for r in got) == sorted(some.tolist())
    assert all(np.array_equal(r["image"], want[r["id"]]) for r in got)
    assert src.paths(some) == [str((tmp_path / "imgs" / paths[k % 5].name).resolve()) for k in (5, 2_000, 1)]


def test_manifest_extraction_matches_direct_features(ray_local, tmp_path):
    paths = _manifest(tmp_path)
    src = ManifestSource(str(tmp_path / "m.csv"))
    store = FeatureStore(tmp_path / "features")
    extract_to_store(store, 0, src, SPEC, CFG)
    ids, feats = store.read(0)
    assert ids.tolist() == [10 + i for i in range(6)]
    from asvp_ray.data.images import decode_image

    imgs = np.empty(6, dtype=object)
    imgs[:] = [decode_image(str(p)) for p in paths]
    np.testing.assert_allclose(feats, direct_features(imgs), rtol=1e-4, atol=1e-4)


def test_read_tasks_hand_the_actors_model_sized_uint8_images_and_features_match(ray_local, tmp_path):
    """Images of several sizes and modes (RGB 30x26, grayscale 18x40) are resized in the read
    tasks to one uint8 (B, 32, 32, 3) array; the features equal the in-process ones of each image."""
    from asvp_ray.data.images import decode_image
    from asvp_ray.features.backbones import input_config
    from asvp_ray.features.extract import _comparable, _fit_images

    rgb = write_images(tmp_path / "imgs", 4, size=(30, 26))
    gray = write_images(tmp_path / "gray", 4, size=(18, 40), seed=1, mode="L")
    rows = [f"{i},{p.relative_to(tmp_path)},{i % 2}\n" for i, p in enumerate(rgb + gray)]
    (tmp_path / "m.csv").write_text("id,path,label\n" + "".join(rows))
    src = ManifestSource(str(tmp_path / "m.csv"))
    spec = BackboneSpec("test_efficientnet", weights="none", image_size=32, crop_pct=0.875)
    fitted = src.to_dataset().map_batches(_fit_images, fn_kwargs={"input_cfg": _comparable(input_config(spec))},
                                          batch_size=None, batch_format="numpy").take_batch(8, batch_format="numpy")
    assert fitted["image"].dtype == np.uint8 and fitted["image"].shape == (8, 32, 32, 3)
    store = FeatureStore(tmp_path / "features")
    extract_to_store(store, 0, src, spec, CFG)
    ids, feats = store.read(0)
    imgs = np.empty(8, dtype=object)
    imgs[:] = [decode_image(str(p)) for p in rgb + gray]
    assert imgs[4].ndim == 2 and imgs[0].shape == (30, 26, 3)
    np.testing.assert_allclose(feats, direct_features(imgs, spec), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
def test_unreadable_image_fails_naming_it_and_writes_no_version(ray_local, tmp_path, damage):
    paths = _manifest(tmp_path)
    bad = paths[3]
    if damage == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.unlink()
    src = ManifestSource(str(tmp_path / "m.csv"))
    store = FeatureStore(tmp_path / "features")
    with pytest.raises(BadInputError) as ei:
        extract_to_store(store, 0, src, SPEC, CFG)
    msg = str(ei.value)
    assert "id 13" in msg and bad.name in msg and "skip_unreadable" in msg
    assert ("missing file" in msg) == (damage == "missing")
    assert store.versions() == []
    assert not any(p.name.startswith(".v") for p in (tmp_path / "features").iterdir())


def test_skip_unreadable_lists_skipped_ids(ray_local, tmp_path):
    paths = _manifest(tmp_path)
    paths[1].write_bytes(b"not an image")
    src = ManifestSource(str(tmp_path / "m.csv"))
    store = FeatureStore(tmp_path / "features")
    meta = extract_to_store(store, 0, src, SPEC, CFG, skip_unreadable=True)
    assert [s["id"] for s in meta["skipped"]] == [11]
    assert paths[1].name in meta["skipped"][0]["reason"]
    assert store.read(0)[0].tolist() == [10, 12, 13, 14, 15]
    assert json.loads((store.path(0) / "meta.json").read_text())["skipped"][0]["id"] == 11


def test_crash_mid_write_leaves_no_complete_version(ray_local, tmp_path, monkeypatch):
    import asvp_ray.features.parts as parts_mod

    store = FeatureStore(tmp_path / "features")
    pool = FashionMNISTSource(split="train", limit=150)
    calls = {"n": 0}
    real_add = parts_mod.SplitWriter.add_part

    def dying_add(self, record):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_add(self, record)

    monkeypatch.setattr(parts_mod.SplitWriter, "add_part", dying_add)
    with pytest.raises(KeyboardInterrupt):
        extract_to_store(store, 0, pool, SPEC, ExtractConfig(batch_size=50, progress=False), part_rows=50)
    assert store.versions() == [] and store.latest() is None
    monkeypatch.undo()
    # a partial folder from a hard kill (no cleanup ran) is ignored and then removed
    (tmp_path / "features" / ".v0.partial-deadbeef").mkdir()
    assert store.versions() == []
    extract_to_store(store, 0, pool, SPEC, CFG)
    assert store.versions() == [0]
    assert not (tmp_path / "features" / ".v0.partial-deadbeef").exists()


def test_actor_plan_leaves_a_cpu_for_reads():
    plan = plan_actors(ExtractConfig(), {"CPU": 2.0})
    assert (plan.min_actors, plan.max_actors) == (1, 1) and plan.num_cpus == 1.0 and plan.device == "cpu"
    assert plan_actors(ExtractConfig(), {"CPU": 16.0}).max_actors == 15
    gpu = plan_actors(ExtractConfig(), {"CPU": 16.0, "GPU": 4.0})
    assert gpu.device == "cuda" and (gpu.min_actors, gpu.max_actors) == (1, 4) and gpu.num_gpus == 1.0
    with pytest.raises(ConfigError, match="starves the read tasks"):
        plan_actors(ExtractConfig(num_actors=2), {"CPU": 2.0})
    with pytest.raises(ConfigError, match="leaves no CPU"):
        plan_actors(ExtractConfig(num_cpus_per_actor=2), {"CPU": 2.0})
    # cuda with no GPU up yet plans one GPU actor: extract() waits for the node (tests/test_autoscale.py)
    cuda = plan_actors(ExtractConfig(device="cuda"), {"CPU": 2.0})
    assert cuda.device == "cuda" and (cuda.min_actors, cuda.max_actors, cuda.num_gpus) == (1, 1, 1.0)
    # two GPUs on two CPUs (a laptop with two cards): a read task still fits beside both actors
    two = plan_actors(ExtractConfig(device="cuda", num_actors=2), {"CPU": 2.0, "GPU": 2.0})
    assert (two.min_actors, two.num_gpus) == (2, 1.0) and two.min_actors * two.num_cpus + 1.0 <= 2.0
    assert plan_actors(ExtractConfig(), {"CPU": 16.0, "GPU": 4.0}).num_cpus == 1.0


def test_smoke_config_builds_its_sources(ray_local):
    """The smoke config's sources hold the first 400 training and 200 test images of Fashion-MNIST:
    ids, labels and image pixels equal the IDX files' own rows, decoded here without the project."""
    import gzip

    from tests.reference import fashion_mnist_labels

    cfg = load_config(str(SMOKE))
    pool, test = build_source(cfg.data.pool), build_source(cfg.data.test)
    for src, n, split, prefix in ((pool, 400, "train", "train"), (test, 200, "test", "t10k")):
        assert np.array_equal(src.ids, np.arange(n)) and src.classes[9] == "Ankle boot"
        assert np.array_equal(src.labels, fashion_mnist_labels(split)[:n])
        some = np.random.default_rng(0).permutation(n)[:25]
        assert np.array_equal(src.label_of(some), fashion_mnist_labels(split)[some])  # aligned to the asked ids
        with gzip.open(src.images_path) as f:  # 16 header bytes, then 28 x 28 uint8 per image
            assert f.read(16)[:4] == b"\x00\x00\x08\x03" and src.images_path.name.startswith(prefix)
            want = np.frombuffer(f.read(28 * 28 * n), dtype=np.uint8).reshape(n, 28, 28)
        rows = src.to_dataset(np.sort(some)).take_all()
        assert [r["id"] for r in rows] == np.sort(some).tolist()
        assert all(np.array_equal(np.asarray(r["image"]).reshape(28, 28), want[r["id"]]) for r in rows)


def test_extraction_actor_killed_mid_job_is_replaced_with_equal_features(ray_local, tmp_path, monkeypatch):
    pool = FashionMNISTSource(split="train", limit=300)
    clean = FeatureStore(tmp_path / "clean")
    extract_to_store(clean, 0, pool, SPEC, ExtractConfig(batch_size=50, progress=False))
    monkeypatch.setenv("ASVP_KILL_AT", "extract_actor:batch3")
    monkeypatch.setenv("ASVP_KILL_ONCE", str(tmp_path / "killed-once"))
    faulty = FeatureStore(tmp_path / "faulty")
    extract_to_store(faulty, 0, pool, SPEC, ExtractConfig(batch_size=50, progress=False))
    assert (tmp_path / "killed-once").exists()  # an actor really died on its third batch
    ids_a, fa = clean.read(0)
    ids_b, fb = faulty.read(0)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-5)


def test_nan_in_a_feature_file_is_reported(tmp_path):
    from asvp_ray.features.parts import features_to_arrow
    import pyarrow.parquet as pq

    store = FeatureStore(tmp_path / "features")
    with store.writer(0, {}) as w:
        w.add(np.arange(4), np.ones((4, 3), dtype=np.float32))
        w.commit()
    part = next(store.path(0).glob("part-*.parquet"))
    bad = np.ones((4, 3), dtype=np.float32)
    bad[2, 1] = np.nan
    pq.write_table(features_to_arrow(np.arange(4), bad), part)
    with pytest.raises(BadInputError, match=r"NaN or infinite values for ids \[2\].*delete"):
        store.read(0)


def _sha256(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_workers_write_checksummed_parts_and_damage_is_reported(ray_local, tmp_path):
    import pyarrow.parquet as pq

    from asvp_ray.data.fashion_mnist import read_idx
    from asvp_ray.core.errors import RunDirError
    from asvp_ray.features.parts import arrow_to_features, features_to_arrow

    pool = FashionMNISTSource(split="train", limit=300)
    store = FeatureStore(tmp_path / "features")
    meta = extract_to_store(store, 0, pool, SPEC, CFG, test=FashionMNISTSource(split="test", limit=70), part_rows=64)
    # the write tasks made several parts; meta.json lists each with its rows, size and sha256
    pool_parts = [p for p in meta["parts"] if p["split"] == "pool"]
    assert len(pool_parts) >= 4 and sum(p["rows"] for p in pool_parts) == meta["rows"] == 300
    assert [p["file"] for p in pool_parts] == [f"part-{k:05d}.parquet" for k in range(len(pool_parts))]
    assert sum(p["rows"] for p in meta["parts"] if p["split"] == "test") == meta["splits"]["test"]["rows"] == 70
    for p in meta["parts"]:
        f = store.path(0) / p["file"]
        assert f.stat().st_size == p["bytes"] and _sha256(f) == p["sha256"]
    assert sorted(f.name for f in store.path(0).glob("*.parquet")) == [p["file"] for p in pool_parts]
    # the same features as the backbone computes in this process, for the same ids
    ids, feats = store.read(0)
    assert np.array_equal(ids, pool.ids)
    np.testing.assert_allclose(feats, direct_features(read_idx(pool.images_path)[:300]), rtol=1e-4, atol=1e-4)
    store.verify(0)

    # a part rewritten with other (finite, well-formed) values no longer matches its checksum
    victim = store.path(0) / pool_parts[1]["file"]
    p_ids, p_feats = arrow_to_features(pq.read_table(victim))
    pq.write_table(features_to_arrow(p_ids, p_feats + 1.0), victim)
    with pytest.raises(RunDirError, match=rf"part .*{victim.name} does not match the size and sha256.*delete"):
        store.read(0)
    with pytest.raises(RunDirError, match=rf"{victim.name} (has \d+ bytes where meta.json lists|does not match)"):
        store.verify(0)
    # a truncated part: the cheap readers notice it too
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(RunDirError, match=rf"{victim.name} has 100 bytes where meta.json lists {pool_parts[1]['bytes']}"):
        store.part_files(0)
    with pytest.raises(RunDirError, match=rf"{victim.name} has 100 bytes"):
        store.read_ids(0)
    victim.unlink()
    with pytest.raises(RunDirError, match=rf"part .*{victim.name} is missing; delete .*v0 and rerun"):
        store.read_ids(0)


KILLED_EXTRACTION = """
import sys
import ray
from asvp_ray.config import ExtractConfig
from asvp_ray.data.fashion_mnist import FashionMNISTSource
from asvp_ray.features.backbones import BackboneSpec
from asvp_ray.features.extract import extract_to_store
from asvp_ray.features.store import FeatureStore

ray.init(address=sys.argv[1])
extract_to_store(FeatureStore(sys.argv[2]), 0, FashionMNISTSource(split="train", limit=300),
                 BackboneSpec("test_efficientnet", weights="none", image_size=32, crop_pct=1.0),
                 ExtractConfig(batch_size=64, progress=False), part_rows=64)
print("finished")
"""


def test_killed_extraction_leaves_no_readable_version_and_a_rerun_writes_it(ray_local, tmp_path):
    import os
    import subprocess
    import sys

    from asvp_ray.core.errors import RunDirError

    root = tmp_path / "features"
    env = dict(os.environ, ASVP_KILL_AT="extract:v0:batch2")  # SIGKILL once the 2nd part is reported
    r = subprocess.run([sys.executable, "-c", KILLED_EXTRACTION, ray_local.get_runtime_context().gcs_address,
                        str(root)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9 and "finished" not in r.stdout, r.stderr[-3000:]
    partial = [d for d in root.iterdir() if d.name.startswith(".v0.partial-")]
    assert len(partial) == 1 and len(list(partial[0].glob("part-w*.parquet"))) >= 2  # workers wrote parts
    assert not (partial[0] / "meta.json").exists()
    store = FeatureStore(root)
    assert store.versions() == [] and store.latest() is None
    with pytest.raises(RunDirError, match="v0 is missing or incomplete"):
        store.read(0)
    pool = FashionMNISTSource(split="train", limit=300)
    meta = extract_to_store(store, 0, pool, SPEC, CFG, part_rows=64)
    assert store.versions() == [0] and meta["rows"] == 300
    assert [d.name for d in root.iterdir()] == ["v0"]  # the half version is gone
    from asvp_ray.data.fashion_mnist import read_idx

    ids, feats = store.read(0)
    assert np.array_equal(ids, pool.ids)
    np.testing.assert_allclose(feats, direct_features(read_idx(pool.images_path)[:300]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_manifest_on_object_storage_resolves_its_relative_paths_there(ray_local, tmp_path, s3_server, fmt):
    """A manifest at an s3:// URI (a real S3-protocol server on loopback) whose rows name images
    relative to it: they resolve to URIs beside it, carrying the manifest's endpoint options, and
    every id reads its own image, for the whole pool and for a few ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    paths = write_images(tmp_path / "imgs", 6, size=(14, 12), seed=5)
    fs = s3_server["fs"]
    for p in paths:
        with fs.open_output_stream(f"asvp/man-{fmt}/imgs/{p.name}") as f:
            f.write(p.read_bytes())
    rel = [f"imgs/{p.name}" if i % 2 else f"./imgs//{p.name}" for i, p in enumerate(paths)]
    ids = [50 - 3 * i for i in range(6)]
    if fmt == "parquet":
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": ids, "path": rel, "label": [i % 3 for i in range(6)]}), buf)
        data = buf.getvalue().to_pybytes()
    else:
        data = ("id,path,label\n" + "".join(f"{i},{r},{k % 3}\n" for k, (i, r) in enumerate(zip(ids, rel)))).encode()
    with fs.open_output_stream(f"asvp/man-{fmt}/m.{fmt}") as f:
        f.write(data)
    uri = s3_server["uri"](f"man-{fmt}/m.{fmt}")
    query = uri.split("?", 1)[1]
    src = ManifestSource(uri)
    assert src.ids.tolist() == sorted(ids) and src.labels.tolist() == [(5 - k) % 3 for k in range(6)]
    want_uri = {i: f"s3://asvp/man-{fmt}/imgs/{p.name}?{query}" for i, p in zip(ids, paths)}
    assert src.paths([ids[0], ids[3]]) == [want_uri[ids[0]], want_uri[ids[3]]]
    images = {i: np.asarray(Image.open(p)) for i, p in zip(ids, paths)}
    rows = src.to_dataset().take_all()
    assert sorted(r["id"] for r in rows) == sorted(ids) and all(r["error"] == "" for r in rows)
    assert all(np.array_equal(r["image"], images[r["id"]]) for r in rows)
    got = src.to_dataset(ids=np.array([ids[4], ids[1]])).take_all()
    assert sorted(r["id"] for r in got) == sorted([ids[4], ids[1]])
    assert all(np.array_equal(r["image"], images[r["id"]]) for r in got)
    with pytest.raises(BadInputError, match="does not exist"):
        ManifestSource(s3_server["uri"](f"man-{fmt}/nowhere.{fmt}"))


def test_images_on_object_storage_are_read_concurrently_and_match_local_features(ray_local, tmp_path, s3_server):
    """A manifest of s3:// image URIs (a real S3-protocol server on loopback): the read tasks fetch
    them (several at a time) and the features equal those of the same files read locally; a
    missing object is skipped and named."""
    from asvp_ray.data.images import _read_all, decode_image

    paths = write_images(tmp_path / "imgs", 24, size=(30, 26), seed=3)
    fs = s3_server["fs"]
    for p in paths:
        with fs.open_output_stream(f"asvp/images/{p.name}") as f:
            f.write(p.read_bytes())
    query = s3_server["uri"]("x").split("?", 1)[1]
    uris = [f"s3://asvp/images/{p.name}?{query}" for p in paths]
    assert _read_all(uris[:3]) == [p.read_bytes() for p in paths[:3]]
    missing = f"s3://asvp/images/nowhere.png?{query}"
    rows = [f"{i},{u},{i % 2}\n" for i, u in enumerate(uris)] + [f"99,{missing},0\n"]
    (tmp_path / "m.csv").write_text("id,path,label\n" + "".join(rows))
    src = ManifestSource(str(tmp_path / "m.csv"))
    store = FeatureStore(tmp_path / "features")
    meta = extract_to_store(store, 0, src, SPEC, CFG, skip_unreadable=True)
    ids, feats = store.read(0)
    assert ids.tolist() == list(range(24))
    assert [s["id"] for s in meta["skipped"]] == [99] and "nowhere.png" in meta["skipped"][0]["reason"]
    imgs = np.empty(24, dtype=object)
    imgs[:] = [decode_image(str(p)) for p in paths]
    np.testing.assert_allclose(feats, direct_features(imgs), rtol=1e-4, atol=1e-4)
