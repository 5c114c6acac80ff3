"""Pools as web-scale image sets are stored: WebDataset tar shards and Parquet files with image
bytes, local and in the suite's S3 server (moto). The same images as an image folder, a WebDataset
and a Parquet pool give the same ids, labels, decoded images, features and labelled sets; bad
input is refused naming the shard or file and the member or row."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asvp_ray.core.errors import BadInputError
from asvp_ray.data.files import ImageFolderSource
from asvp_ray.data.parquet_images import ParquetImagesSource
from asvp_ray.data.webdataset import WebDatasetSource
from tests.formats_data import (parquet_tables, png_bytes, samples_from_fashion_mnist, tar_bytes, webdataset_shards,
                                write_image_folder, write_parquet_images, write_webdataset)

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
N = 400


@pytest.fixture(scope="module")
def samples():
    return samples_from_fashion_mnist(N, CLASSES)


@pytest.fixture(scope="module")
def local_pools(samples, tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    write_image_folder(samples, d / "folder")
    write_webdataset(samples, d / "wds", per_shard=150)  # 3 shards, the last one short
    write_parquet_images(samples, d / "pq", per_file=250, rows_per_group=64)
    return d


@pytest.fixture(scope="module")
def s3_pools(samples, s3_server):
    fs = s3_server["fs"]
    for k, data in enumerate(webdataset_shards(samples, 150)):
        with fs.open_output_stream(f"asvp/formats/wds/shard-{k:06d}.tar") as f:
            f.write(data)
    for k, data in enumerate(parquet_tables(samples, 250, 64)):
        with fs.open_output_stream(f"asvp/formats/pq/part-{k:05d}.parquet") as f:
            f.write(data)
    return s3_server


def _rows(ds):
    return {int(r["id"]): np.asarray(r["image"]) for r in ds.take_all()}


def _sources(where, index_dir, s3=None):
    if s3 is None:
        wds = str(where / "wds" / "shard-{000000..000002}.tar")  # WebDataset's brace notation
        pqs = str(where / "pq")
    else:
        q = s3["uri"]("formats/wds").split("?", 1)[1]
        wds = f"s3://asvp/formats/wds/shard-{{000000..000002}}.tar?{q}"
        pqs = s3["uri"]("formats/pq")
    return (WebDatasetSource(wds, id="json.id", classes=CLASSES, index_dir=index_dir),
            ParquetImagesSource(pqs, classes=CLASSES, index_dir=index_dir))


@pytest.mark.parametrize("place", ["local", "s3"])
def test_same_images_ids_and_labels_in_every_format(ray_local, local_pools, request, tmp_path, place):
    folder = ImageFolderSource(str(local_pools / "folder"), classes=CLASSES)
    s3 = request.getfixturevalue("s3_pools") if place == "s3" else None
    base = _rows(folder.to_dataset())
    some = folder.ids[::9]
    for src in _sources(local_pools, tmp_path / "index", s3):
        assert np.array_equal(src.ids, folder.ids), src.kind
        assert np.array_equal(src.labels, folder.labels), src.kind
        full = _rows(src.to_dataset())
        assert full.keys() == base.keys(), src.kind
        assert all(np.array_equal(full[i], base[i]) for i in base), src.kind
        picked = _rows(src.to_dataset(some))  # by byte ranges / row groups
        assert sorted(picked) == sorted(some.tolist()), src.kind
        assert all(np.array_equal(picked[i], base[i]) for i in picked), src.kind


def test_the_index_is_kept_and_loaded_not_rebuilt(local_pools, tmp_path):
    wds, pqs = _sources(local_pools, tmp_path / "index")
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "index").iterdir()) == ["parquet_images", "webdataset"]
    assert hasattr(wds, "index_seconds") and hasattr(pqs, "index_seconds")  # built: it read the shards
    again, again_pq = _sources(local_pools, tmp_path / "index")
    assert not hasattr(again, "index_seconds") and not hasattr(again_pq, "index_seconds")  # loaded, not rebuilt
    assert np.array_equal(again.ids, wds.ids) and np.array_equal(again.labels, wds.labels)
    assert again.describe_image(int(wds.ids[0])).endswith(".png)")  # the member, read back from the file


def test_a_labeller_gets_the_round_images_as_pngs_from_shards_and_parquet(ray_local, local_pools, tmp_path):
    from PIL import Image

    from asvp_ray.loop.human import write_queries
    from asvp_ray.loop.rundir import RunDir

    folder = ImageFolderSource(str(local_pools / "folder"), classes=CLASSES)
    ids = folder.ids[5:35:3]
    want = _rows(folder.to_dataset(ids))
    for src in _sources(local_pools, tmp_path / "index"):
        rd = RunDir(tmp_path / src.kind)
        csv = write_queries(rd, 0, ids, src, CLASSES)[0]
        lines = csv.read_text().splitlines()[1:]
        assert [int(x.split(",")[0]) for x in lines] == ids.tolist()
        for line in lines:
            i, path = line.split(",", 1)
            assert np.array_equal(np.asarray(Image.open(path)), want[int(i)]), (src.kind, i)


def test_brace_glob_folder_and_list_name_the_same_shards(local_pools):
    shards = sorted(str(p) for p in (local_pools / "wds").glob("*.tar"))
    ids = None
    for spec in (str(local_pools / "wds"), str(local_pools / "wds" / "shard-*.tar"),
                 str(local_pools / "wds" / "shard-{000000..000002}.tar"), shards):
        src = WebDatasetSource(spec, id="json.id", classes=CLASSES)
        assert src.located.paths == shards
        ids = src.ids if ids is None else ids
        assert np.array_equal(src.ids, ids)


# ---------------------------------------------------------------------------- bad input
def _shard(folder, name, members):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(tar_bytes(members))
    return folder / name


def _png(seed=0):
    return png_bytes(np.random.default_rng(seed).integers(0, 255, (8, 8), dtype=np.uint8))


def test_truncated_shard_is_named_with_the_last_member(tmp_path):
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))  # ~4 KB
    good = tar_bytes([m for k in range(3) for m in ((f"{k:03d}.cls", b"1"), (f"{k:03d}.png", big))])
    (tmp_path / "s").mkdir()
    end = good.index(b"002.png") + 512 + 1000  # inside the last image's data
    (tmp_path / "s" / "a.tar").write_bytes(good[:end])
    with pytest.raises(BadInputError, match=r"a\.tar: truncated or corrupt tar after member '002\.png'"):
        WebDatasetSource(str(tmp_path / "s"))


def test_image_that_does_not_decode_names_shard_and_member(ray_local, tmp_path):
    _shard(tmp_path / "s", "a.tar", [("000.png", _png(0)), ("000.cls", b"0"), ("001.png", b"not a png"),
                                     ("001.cls", b"1")])
    src = WebDatasetSource(str(tmp_path / "s"))
    for ds in (lambda: src.to_dataset(), lambda: src.to_dataset(np.array([1]))):
        with pytest.raises(Exception, match=r"id 1 \(.*a\.tar.*: image does not decode"):
            ds().take_all()
    rows = src.to_dataset(skip_unreadable=True).take_all()
    assert sorted((int(r["id"]), r["error"] != "") for r in rows) == [(0, False), (1, True)]


def test_duplicate_ids_across_shards_name_both(tmp_path):
    _shard(tmp_path / "s", "a.tar", [("000.png", _png(0)), ("007.png", _png(1))])
    _shard(tmp_path / "s", "b.tar", [("7.png", _png(2))])
    with pytest.raises(BadInputError, match=r"id 7 in .*a\.tar \(007\.png\) and .*b\.tar \(7\.png\)"):
        WebDatasetSource(str(tmp_path / "s"))


def test_missing_label_with_a_simulated_oracle_is_refused_at_open(tmp_path):
    from asvp_ray.config import load_config
    from asvp_ray.loop.resume import open_data
    from tests.conftest import SMOKE

    _shard(tmp_path / "s", "a.tar", [("000.png", _png(0)), ("000.cls", b"0"), ("001.png", _png(1)),
                                     ("002.png", _png(2)), ("002.cls", b"1")])
    over = [f"data.pool={{kind: webdataset, shards: {tmp_path / 's'}}}", "data.classes=[a,b]",
            "budget.schedule=[1]"]
    with pytest.raises(BadInputError, match=r"1 image\(s\) have no label \(member cls\).*id 1 \(.*a\.tar, 001\.png\)"):
        open_data(load_config(str(SMOKE), over))
    pool, _, _ = open_data(load_config(str(SMOKE), over + ["oracle=human"]))
    assert pool.missing_labels() == 1


def test_listed_shard_missing_and_no_image_member_and_non_integer_keys(tmp_path):
    _shard(tmp_path / "s", "a.tar", [("000.png", _png(0))])
    with pytest.raises(BadInputError, match=r"shard .*b\.tar.* does not exist"):
        WebDatasetSource([str(tmp_path / "s" / "a.tar"), str(tmp_path / "s" / "b.tar")])
    _shard(tmp_path / "t", "a.tar", [("000.png", _png(0)), ("001.txt", b"hello")])
    with pytest.raises(BadInputError, match=r"a\.tar: sample '001' has no image member .*set data.pool.image"):
        WebDatasetSource(str(tmp_path / "t"))
    _shard(tmp_path / "u", "a.tar", [("cat-1.png", _png(0)), ("cat-2.png", _png(1))])
    with pytest.raises(BadInputError, match=r"sample 'cat-1': id 'cat-1' .* set data.pool.hash_ids: true"):
        WebDatasetSource(str(tmp_path / "u"))
    hashed = WebDatasetSource(str(tmp_path / "u"), hash_ids=True)
    assert len(set(hashed.ids.tolist())) == 2 and (hashed.ids >= 0).all()


def test_a_shard_changed_since_the_index_is_refused_on_read_and_on_resume(ray_local, tmp_path):
    shard = _shard(tmp_path / "s", "a.tar", [("000.png", _png(0)), ("001.png", _png(1))])
    src = WebDatasetSource(str(tmp_path / "s"), index_dir=tmp_path / "index")
    shard.write_bytes(tar_bytes([("000.png", _png(1)), ("001.png", _png(0)), ("002.png", _png(2))]))
    with pytest.raises(BadInputError, match=r"changed since the index was built: .*a\.tar: (size|modified)"):
        src.to_dataset(np.array([1]))
    with pytest.raises(BadInputError, match=r"changed since the index was built"):
        WebDatasetSource(str(tmp_path / "s"), index_dir=tmp_path / "index")
    st = shard.stat()
    shard.write_bytes(shard.read_bytes())  # same size, rewritten: modified
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(BadInputError, match=r"a\.tar: modified since"):
        WebDatasetSource(str(tmp_path / "s"), index_dir=tmp_path / "index")


def test_parquet_bad_input_names_the_file_and_row(ray_local, tmp_path):
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"uid": [1, 2], "image": [_png(0), _png(1)]}), tmp_path / "p" / "a.parquet")
    with pytest.raises(BadInputError, match=r"a\.parquet: no column 'id' for the id .*name it in data.pool.id"):
        ParquetImagesSource(str(tmp_path / "p"))
    src = ParquetImagesSource(str(tmp_path / "p"), id="uid")
    assert src.ids.tolist() == [1, 2] and src.labels is None
    pq.write_table(pa.table({"uid": [3], "image": ["a string"]}), tmp_path / "p" / "b.parquet")
    with pytest.raises(BadInputError, match=r"b\.parquet: column image holds string, not encoded images"):
        ParquetImagesSource(str(tmp_path / "p"), id="uid")
    (tmp_path / "p" / "b.parquet").unlink()
    pq.write_table(pa.table({"uid": [2, 4], "image": [_png(2), b"\x89PNG broken"]}), tmp_path / "p" / "c.parquet")
    with pytest.raises(BadInputError, match=r"id 2 in .*a\.parquet \(row group 0, row 1, uid 2\) and .*c\.parquet"):
        ParquetImagesSource(str(tmp_path / "p"), id="uid")
    pq.write_table(pa.table({"uid": [5, 4], "image": [_png(2), b"\x89PNG broken"]}), tmp_path / "p" / "c.parquet")
    src = ParquetImagesSource(str(tmp_path / "p"), id="uid")
    with pytest.raises(Exception, match=r"id 4 \(file .*c\.parquet, row group 0, row 1\): image does not decode"):
        src.to_dataset(np.array([4, 5])).take_all()


def test_keys_of_other_kinds_are_refused_in_the_config():
    from asvp_ray.config import load_config
    from asvp_ray.core.errors import ConfigError
    from tests.conftest import SMOKE

    with pytest.raises(ConfigError, match="shards is a setting of data source kind webdataset, not of manifest"):
        load_config(str(SMOKE), ["data.pool={kind: manifest, path: m.csv, shards: x}"])


# ---------------------------------------------------------------------------- the same run, three formats
BASE = ["budget.schedule=[40,40]", "proxy.epochs=10", "final.training_method=none", "data.classes=" +
        json.dumps(CLASSES).replace('"', "")]


def _run(out, pool, overrides=()):
    from asvp_ray.config import load_config
    from asvp_ray.features.store import FeatureStore
    from asvp_ray.loop.driver import Driver
    from tests.conftest import SMOKE

    d = Driver(load_config(str(SMOKE), BASE + [f"data.pool={json.dumps(pool)}"] + list(overrides)), str(out))
    try:
        summary = d.run()
    finally:
        d.close()
    store = FeatureStore(out / "features")
    feats = {v: store.read(v) for v in store.versions()}
    lab = d.rd.read_labeled()
    return summary, feats, lab


def _pools(local_pools, s3=None):
    if s3 is None:
        return {"webdataset": {"kind": "webdataset", "shards": str(local_pools / "wds"), "id": "json.id"},
                "parquet_images": {"kind": "parquet_images", "path": str(local_pools / "pq")}}
    q = s3["uri"]("x").split("?", 1)[1]
    return {"webdataset": {"kind": "webdataset", "id": "json.id",
                           "shards": f"s3://asvp/formats/wds/shard-{{000000..000002}}.tar?{q}"},
            "parquet_images": {"kind": "parquet_images", "path": s3["uri"]("formats/pq")}}


def _same_run(ref, got, what):
    _, ref_feats, ref_lab = ref
    _, feats, lab = got
    assert sorted(feats) == sorted(ref_feats), what
    for v in ref_feats:
        assert np.array_equal(feats[v][0], ref_feats[v][0]), (what, v)
        np.testing.assert_allclose(feats[v][1], ref_feats[v][1], rtol=1e-4, atol=1e-6, err_msg=f"{what} v{v}")
    for k in ("id", "label", "round"):
        assert np.array_equal(lab[k], ref_lab[k]), (what, k)


@pytest.mark.slow
@pytest.mark.parametrize("place", ["local", "s3"])
def test_svpp_run_is_the_same_on_an_image_folder_a_webdataset_and_parquet(ray_local, local_pools, request, tmp_path,
                                                                           place):
    folder = {"kind": "image_folder", "root": str(local_pools / "folder")}
    s3 = request.getfixturevalue("s3_pools") if place == "s3" else None
    ref = _run(tmp_path / "folder", folder)
    assert len(ref[2]["id"]) == 80
    for kind, pool in _pools(local_pools, s3).items():
        _same_run(ref, _run(tmp_path / kind, pool), kind)
    assert (tmp_path / "webdataset" / "index").is_dir()  # kept with the run


@pytest.mark.slow
def test_asvp_with_a_refresh_is_the_same_on_the_three_formats(ray_local, local_pools, s3_pools, tmp_path):
    """One refresh: the fine-tune reads the labelled images by id (byte ranges, row groups), the
    re-extraction reads the whole pool again; features v0 and v1 and the labelled set match."""
    over = ["method=asvp", "refresh.policy=at_labels", "refresh.at=[40]", "train.epochs=1", "train.lp_epochs=1",
            "train.cpus_per_worker=1"]
    ref = _run(tmp_path / "folder", {"kind": "image_folder", "root": str(local_pools / "folder")}, over)
    assert sorted(ref[1]) == [0, 1] and ref[0]["rounds"][0]["refreshed"]
    pools = {**_pools(local_pools, s3_pools), "parquet_local": _pools(local_pools)["parquet_images"]}
    del pools["parquet_images"]
    for kind, pool in pools.items():
        _same_run(ref, _run(tmp_path / kind, pool, over), kind)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_the_docs_yaml_for_web_scale_pools_is_a_valid_config():
    """README's and docs/configuration.md's webdataset / parquet_images blocks, as written, pass the
    config schema (the keys and kinds a user copies)."""
    import re

    import yaml

    from asvp_ray.config import load_config
    from tests.conftest import ROOT, SMOKE

    blocks = []
    for doc in ("README.md", "docs/configuration.md"):
        text = (ROOT / doc).read_text()
        blocks += [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "webdataset" in b]
    assert len(blocks) == 2
    for b in blocks:
        data = yaml.safe_load(b)["data"]
        cfg = load_config(str(SMOKE), [f"data.pool={json.dumps(data['pool'])}", f"data.test={json.dumps(data['test'])}"])
        assert cfg.data.pool.kind == "webdataset" and cfg.data.test.kind == "parquet_images"
