"""Bring your own embeddings: `data.pool.kind: embeddings` becomes feature version v0 as it is."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asvp_ray.config import load_config
from asvp_ray.core.errors import AsvpError, ConfigError
from asvp_ray.features.store import FeatureStore
from asvp_ray.loop.driver import Driver
from tests.conftest import SMOKE

DIM, CLASSES = 24, 6


def _mixture(n, seed, start_id):
    """Separable Gaussian classes in DIM dimensions: ids, features, labels."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 1, (CLASSES, DIM)) * 3
    labels = rng.integers(0, CLASSES, n)
    feats = (centres[labels] + rng.normal(0, 1, (n, DIM))).astype(np.float32)
    ids = np.arange(start_id, start_id + 7 * n, 7, dtype=np.int64)
    return ids, feats, labels


def write_embeddings(path, ids, feats, labels=None, paths=None, fixed=True, parts=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = pa.array(feats.reshape(-1), pa.float32())
    col = pa.FixedSizeListArray.from_arrays(flat, feats.shape[1]) if fixed else \
        pa.ListArray.from_arrays(pa.array(np.arange(0, feats.size + 1, feats.shape[1]), pa.int32()), flat)
    cols = {"id": pa.array(ids, pa.int64()), "feature": col}
    if labels is not None:
        cols["label"] = pa.array(labels, pa.int64())
    if paths is not None:
        cols["path"] = pa.array(paths, pa.string())
    table = pa.table(cols)
    if parts == 1:
        pq.write_table(table, path)
    else:
        path.mkdir()
        step = -(-len(ids) // parts)
        for k in range(parts):
            pq.write_table(table.slice(k * step, step), path / f"part-{k}.parquet")
    return path


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    ids, feats, labels = _mixture(3000, 0, 5)
    t_ids, t_feats, t_labels = _mixture(600, 1, 100_000)
    pool = write_embeddings(root / "pool", ids, feats, labels, parts=3)  # a folder of parts
    test = write_embeddings(root / "test.parquet", t_ids, t_feats, t_labels, fixed=False)  # list<float>, one file
    return {"pool": pool, "test": test, "ids": ids, "feats": feats, "labels": labels, "test_ids": t_ids,
            "test_feats": t_feats}


def _sets(e, *extra):
    return [f"data.pool={{kind: embeddings, path: '{e['pool']}'}}",
            f"data.test={{kind: embeddings, path: '{e['test']}'}}",
            "budget.schedule=[100,100,100]", "proxy.epochs=30", *extra]


def test_an_embeddings_pool_is_features_v0_and_svpp_runs_on_it_without_extraction(embeddings, tmp_path):
    e = embeddings
    cfg = load_config(str(SMOKE), _sets(e))
    out = tmp_path / "run"
    d = Driver(cfg, str(out))
    try:
        summary = d.run()
    finally:
        d.close()
    assert summary["status"] == "finished"
    assert [r["n_labeled"] for r in summary["rounds"]] == [100, 200, 300]
    # separable classes: the proxy learns them (chance 1/6)
    assert summary["rounds"][-1]["proxy_test_accuracy"] >= 0.9, summary["rounds"]
    assert summary.get("final") in (None, {}) or summary["final"].get("training_method") in (None, "none")
    # v0 holds exactly the file's rows, bit for bit
    store = FeatureStore(out / "features")
    meta = store.meta(0)
    assert meta["weights"] == "embeddings" and meta["rows"] == 3000 and meta["dim"] == DIM
    got_ids, got = store.read(0)
    assert np.array_equal(got_ids, e["ids"]) and np.array_equal(got, e["feats"])
    # the test file (list<float>, not fixed-size) too, its rows aligned with their ids
    got_ids, got = store.read(0, "test")
    assert np.array_equal(got_ids, e["test_ids"]) and np.array_equal(got, e["test_feats"])
    log = (out / "run.log").read_text()
    assert "extracting feature version" not in log and "from the embeddings" in log
    # labels came from the file's label column; every labelled id is a pool id, none twice
    lab = pq.read_table(out / "labeled.parquet").to_pydict()
    assert len(set(lab["id"])) == 300 and set(lab["id"]) <= set(e["ids"].tolist())
    pos = np.searchsorted(e["ids"], lab["id"])
    assert np.array_equal(np.asarray(lab["label"]), e["labels"][pos])


def test_an_embeddings_uri_reads_through_pyarrow_fs(embeddings, tmp_path):
    e = embeddings
    sets = _sets(e, "budget.schedule=[50]")
    sets[0] = f"data.pool={{kind: embeddings, path: 'file://{e['pool']}'}}"
    d = Driver(load_config(str(SMOKE), sets), str(tmp_path / "uri"))
    try:
        d.run()
    finally:
        d.close()
    # through the URI, v0 holds the folder's three parts bit for bit, each row with its id
    store = FeatureStore(tmp_path / "uri" / "features")
    assert store.meta(0)["rows"] == 3000
    got_ids, got = store.read(0)
    assert np.array_equal(got_ids, e["ids"]) and np.array_equal(got, e["feats"])


@pytest.mark.parametrize("extra, words", [
    (["method=asvp"], ["without a path column", "method=asvp", "add a path column"]),
    (["method=standard"], ["without a path column", "method: svpp"]),
    (["final.training_method=ft"], ["final.training_method=ft", "no path column"]),
])
def test_what_needs_images_is_refused_for_embeddings_without_paths(embeddings, tmp_path, extra, words):
    with pytest.raises(ConfigError) as err:
        Driver(load_config(str(SMOKE), _sets(embeddings, *extra)), str(tmp_path / "bad"))
    for w in words:
        assert w in str(err.value), str(err.value)
    assert not (tmp_path / "bad" / "state.json").exists()


def test_bad_embeddings_files_name_the_problem(embeddings, tmp_path):
    ids, feats, labels = _mixture(50, 3, 0)
    no_feature = tmp_path / "nf.parquet"
    pq.write_table(pa.table({"id": ids, "label": labels}), no_feature)
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"id": ids[:3], "feature": pa.array([[1.0, 2.0], [1.0], [3.0, 4.0]])}), ragged)
    nan = write_embeddings(tmp_path / "nan.parquet", ids, np.where(np.arange(DIM) == 3, np.nan, feats).astype(np.float32),
                           labels)
    cases = [
        ([f"data.pool={{kind: embeddings, path: '{no_feature}'}}", "data.test=null"], "missing column(s) ['feature']"),
        ([f"data.pool={{kind: embeddings, path: '{tmp_path / 'absent'}'}}", "data.test=null"], "does not exist"),
        ([f"data.pool={{kind: embeddings, path: '{ragged}'}}", "data.test=null", "data.classes=[a,b]"],
         "ids [7] do not have 2 values"),
        ([f"data.pool={{kind: embeddings, path: '{nan}'}}", "data.test=null"], "NaN"),
        ([f"data.pool={{kind: embeddings, path: '{embeddings['pool']}'}}"], "data.test is fashion_mnist"),
    ]
    for k, (sets, words) in enumerate(cases):
        with pytest.raises(AsvpError) as err:
            d = Driver(load_config(str(SMOKE), sets + ["budget.schedule=[2]"]), str(tmp_path / f"r{k}"))
            try:
                d.run()  # the features are read when v0 is written
            finally:
                d.close()
        assert words in str(err.value), (words, str(err.value))


def test_an_embeddings_pool_with_paths_can_fine_tune(tmp_path):
    """With a path column the images are there: methods that fine-tune are allowed at load."""
    from tests.conftest import write_images

    folder = tmp_path / "img"
    files = write_images(folder, 30)
    ids, feats, labels = _mixture(30, 4, 0)
    emb = write_embeddings(tmp_path / "p.parquet", ids, feats, labels % 2, paths=[str(f) for f in files])
    from asvp_ray.data.sources import build_source
    from asvp_ray.loop.resume import check_embeddings_pool

    cfg = load_config(str(SMOKE), [f"data.pool={{kind: embeddings, path: '{emb}'}}", "data.test=null",
                                   "method=asvp", "budget.schedule=[10]"])
    pool = build_source(cfg.data.pool)
    check_embeddings_pool(cfg, pool, None)  # no error
    assert pool.paths([int(ids[3])]) == [str(files[3])]
    assert json.dumps(pool.describe())
