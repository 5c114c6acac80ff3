"""Pool sources: ids are stable, labels align, bad manifests fail with the item and the fix."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asvp_ray.data import fashion_mnist as fm
from asvp_ray.data.fashion_mnist import FashionMNISTSource
from asvp_ray.data.files import ImageFolderSource, ManifestSource, path_id
from asvp_ray.core.errors import BadInputError
from tests.conftest import write_images


def test_fashion_mnist_ids_and_labels_match_the_idx_files():
    src = FashionMNISTSource(split="train", limit=300)
    assert src.ids.dtype == np.int64 and src.ids.tolist() == list(range(300))
    labels = fm.read_idx(fm.split_paths(src.root, "train")[1])[:300]
    assert np.array_equal(src.labels, labels)
    assert src.classes[9] == "Ankle boot"
    assert np.array_equal(src.label_of(np.array([5, 2])), labels[[5, 2]])
    test = FashionMNISTSource(split="test")
    assert len(test) == 10_000


def test_fashion_mnist_files_pass_their_checksums():
    root = fm.find_root()
    for name, digest in fm.FILES.items():
        assert fm.sha256(root / name) == digest


def test_truncated_idx_file_is_reported(tmp_path):
    import gzip

    root = fm.find_root()
    for name in fm.FILES:
        (tmp_path / name).write_bytes((root / name).read_bytes())
    data = gzip.open(root / "train-images-idx3-ubyte.gz").read()[:5000]
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(data)
    with pytest.raises(BadInputError, match="truncated or corrupt"):
        fm.read_idx(tmp_path / "train-images-idx3-ubyte.gz")


def test_image_folder_with_class_subfolders_gives_labels(tmp_path):
    write_images(tmp_path / "cat", 3, seed=1)
    write_images(tmp_path / "dog", 2, seed=2)
    src = ImageFolderSource(str(tmp_path))
    assert src.classes == ["cat", "dog"]
    assert len(src) == 5 and sorted(src.labels.tolist()) == [0, 0, 0, 1, 1]
    for i, p in zip(src.ids, src.paths(src.ids)):
        rel = str(p)[len(str(tmp_path)) + 1:]
        assert i == path_id(rel)
        assert src.label_of(np.array([i]))[0] == (0 if rel.startswith("cat") else 1)


def test_image_folder_ids_survive_adding_files(tmp_path):
    from PIL import Image

    write_images(tmp_path, 4, seed=1)
    src = ImageFolderSource(str(tmp_path))
    before = dict(zip(src.paths(src.ids), src.ids))
    Image.new("RGB", (8, 8)).save(tmp_path / "aaa_new.png")  # sorts first: positional ids would shift
    after_src = ImageFolderSource(str(tmp_path))
    after = dict(zip(after_src.paths(after_src.ids), after_src.ids))
    assert len(after) == 5 and after_src.labels is None
    for p, i in before.items():
        assert after[p] == i


def _manifest_rows(tmp_path, n=4):
    paths = write_images(tmp_path / "imgs", n)
    return [f"imgs/{p.name}" for p in paths]


def test_manifest_csv_resolves_relative_paths_and_label_names(tmp_path):
    rel = _manifest_rows(tmp_path)
    (tmp_path / "m.csv").write_text("id,path,label\n" + "".join(
        f"{100 + i},{p},{'b' if i % 2 else 'a'}\n" for i, p in enumerate(rel)))
    src = ManifestSource(str(tmp_path / "m.csv"))
    assert src.ids.tolist() == [100, 101, 102, 103]
    assert src.classes == ["a", "b"] and src.labels.tolist() == [0, 1, 0, 1]
    assert src.paths([102])[0] == str((tmp_path / rel[2]).resolve())


def test_manifest_parquet_with_uri_paths_and_int_labels(tmp_path):
    rel = _manifest_rows(tmp_path)
    uris = [(tmp_path / r).resolve().as_uri() for r in rel]
    pq.write_table(pa.table({"id": [7, 3, 9, 1], "path": uris, "label": [2, 0, 1, 2]}), tmp_path / "m.parquet")
    src = ManifestSource(str(tmp_path / "m.parquet"))
    assert src.ids.tolist() == [1, 3, 7, 9]  # sorted by id, labels follow their rows
    assert src.labels.tolist() == [2, 0, 2, 1]
    assert src.classes == ["0", "1", "2"]
    assert src.paths([7]) == [uris[0]]


@pytest.mark.parametrize("content,match", [
    ("id,file\n1,a.png\n", r"missing column\(s\) \['path'\]"),
    ("id,path\n1,a.png\n1,b.png\n", r"duplicate ids \[1\]"),
    ("id,path\nx1,a.png\n2,b.png\n", r"column id must hold integers, found 'x1'"),
    ("id,path,label\n1,a.png,shirt\n2,b.png,shirtt\n", r"id 2: 'shirtt'"),
])
def test_bad_manifests_name_the_problem(tmp_path, content, match):
    (tmp_path / "m.csv").write_text(content)
    classes = ["shirt", "shoe"] if "label" in content else None
    with pytest.raises(BadInputError, match=match):
        ManifestSource(str(tmp_path / "m.csv"), classes=classes)


def test_missing_manifest_and_folder(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        ManifestSource(str(tmp_path / "nope.csv"))
    with pytest.raises(BadInputError, match="does not exist"):
        ImageFolderSource(str(tmp_path / "nope"))


def test_manifest_paths_are_joined_like_pathlib_and_an_empty_path_is_named(tmp_path):
    from pathlib import Path

    rel = ["a.png", "./b/c.png", "x//y.png", "sub/./d.png", "/abs/z.png", "s3://bucket/k.png?region=x"]
    pq.write_table(pa.table({"id": list(range(len(rel))), "path": rel}), tmp_path / "m.parquet")
    src = ManifestSource(str(tmp_path / "m.parquet"))
    base = tmp_path.resolve()
    want = [p if ("://" in p or p.startswith("/")) else str(Path(base) / p) for p in rel]
    assert src.paths(list(range(len(rel)))) == want
    pq.write_table(pa.table({"id": [1, 2, 3], "path": ["a.png", "", None]}), tmp_path / "bad.parquet")
    with pytest.raises(BadInputError, match=r"bad.parquet: 2 row\(s\) have an empty path"):
        ManifestSource(str(tmp_path / "bad.parquet"))


def test_a_manifest_changed_under_a_run_is_refused_not_read_for_other_images(tmp_path):
    """The driver keeps ids only and reads paths from the manifest again later: if the file changed
    since the source opened it, an id's row could name another image, so reading refuses."""
    import os

    rel = _manifest_rows(tmp_path)
    m = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "path": rel, "label": [0, 1, 0, 1]}), m)
    src = ManifestSource(str(m))
    assert src.paths([3]) == [str((tmp_path / rel[2]).resolve())]
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "path": rel[::-1], "label": [0, 1, 0, 1]}), m)
    os.utime(m, ns=(src._stamp[1] + 10**9, src._stamp[1] + 10**9))
    with pytest.raises(BadInputError, match=r"m.parquet changed since this run opened it"):
        src.paths([3])
    with pytest.raises(BadInputError, match=r"changed since this run opened it"):
        src.to_dataset(ids=np.array([3]))
    m.unlink()
    with pytest.raises(BadInputError, match=r"can no longer be read"):
        src.paths([3])
