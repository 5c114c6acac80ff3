"""The driver's memory watch: growth above a start-up baseline, per phase (summary.json ->
driver_memory)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from asvp_ray.runtime.allocator import MemoryWatch


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_each_phase_gets_its_own_peak_and_the_overall_peak_is_the_largest():
    watch = MemoryWatch()
    with watch.phase("big"):
        a = np.ones(300 * 2**20 // 8)  # 300 MB, touched
        del a
    with watch.phase("small"):
        b = np.ones(20 * 2**20 // 8)
        del b
    s = watch.summary()
    assert s["by_phase"]["big"] >= 250, s
    # the kernel's peak was reset on entry: the later phase does not inherit the first one's peak
    assert s["by_phase"]["small"] < s["by_phase"]["big"] - 200, s
    assert s["peak_growth_mb"] >= s["by_phase"]["big"] - 1, s
    assert s["peak_mb"] >= s["start_mb"] + 250, s


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_what_a_phase_leaves_is_recorded_by_kind():
    """after_phase_by_kind: the growth left after each phase, heap (anon) apart from mapped files
    and shared memory, so a run's figures say what kind of memory stayed."""
    watch = MemoryWatch()
    with watch.phase("keeps"):
        kept = np.ones(80 * 2**20 // 8)  # 80 MB of heap that outlives the phase
    with watch.phase("frees"):
        tmp = np.ones(80 * 2**20 // 8)
        del tmp
    s = watch.summary()["after_phase_by_kind"]
    assert set(s["keeps"]) == {"anon", "file", "shmem"}, s
    assert s["keeps"]["anon"] >= 75 and abs(s["keeps"]["shmem"]) < 5, s
    assert s["frees"]["anon"] < s["keeps"]["anon"] + 5, s  # freed: nothing new stays
    del kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_nested_phase_does_not_hide_the_outer_phases_peak():
    watch = MemoryWatch()
    with watch.phase("outer"):
        a = np.ones(300 * 2**20 // 8)
        del a
        with watch.phase("inner"):  # resets the kernel's peak on entry
            pass
    s = watch.summary()
    assert s["by_phase"]["outer"] >= 250, s
    assert s["by_phase"]["inner"] < s["by_phase"]["outer"] - 200, s


def _rss_shmem_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssShmem in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_rows_read_from_the_object_store_leave_no_shared_pages_in_this_process(ray_local):
    """StoreShards.rows_at's replies are copied out and their object-store pages unmapped: the
    driver's RSS holds the result once, and the object (and the result) keep their values."""
    from asvp_ray.runtime.allocator import unmap_shared_pages
    from asvp_ray.pool.store_shards import gather_rows

    ray = ray_local
    rng = np.random.default_rng(0)
    want = rng.standard_normal((20_000, 512), dtype=np.float32)  # 41 MB in two replies
    # the replies are written by another process, as a shard actor's are
    make = ray.remote(num_cpus=0)(lambda seed, lo, hi: np.random.default_rng(seed).standard_normal(
        (20_000, 512), dtype=np.float32)[lo:hi])
    refs = [make.remote(0, 0, 12_000), make.remote(0, 12_000, 20_000)]
    ray.wait(refs, num_returns=2)
    pieces = [(np.arange(12_000), refs[0]), (np.arange(12_000, 20_000), refs[1])]
    before = _rss_shmem_mb()
    got = gather_rows(pieces, 20_000)
    assert np.array_equal(got, want)
    assert _rss_shmem_mb() - before < 8, "the replies' shared pages stayed in this process's RSS"
    # the store's copy is intact: reading it again maps the pages back, with the same values
    again = ray.get(refs[0])
    assert np.array_equal(again, want[:12_000])
    assert _rss_shmem_mb() - before > 20  # 24.6 MB (this read is not unmapped: the check above could fail)
    assert unmap_shared_pages(again) > 20 << 20
    assert _rss_shmem_mb() - before < 8

    # memory this process owns, or a view into it, is never advised (it would be zeroed)
    view = want[5:]
    assert unmap_shared_pages(view) == 0 and unmap_shared_pages(want) == 0
    assert np.array_equal(view, got[5:])


_ARROW_READS = r"""
import sys, time
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from asvp_ray.runtime.allocator import lean_arrow_memory, memory_mb, memory_parts_mb, release_free_memory
if sys.argv[2] == "lean":
    lean_arrow_memory()
start, start_rss = memory_parts_mb()["anon"], memory_mb()["rss_mb"]
for _ in range(3):  # the reads a driver makes of a manifest (Ray Data's reader, the checks at open)
    t = pds.dataset(sys.argv[1]).to_table(); del t
    t = pq.read_table(sys.argv[1]); del t
release_free_memory(); time.sleep(0.5)
print(round(memory_parts_mb()["anon"] - start, 1), round(memory_mb()["peak_mb"] - start_rss, 1))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_arrow_reads_leave_no_heap_behind_in_a_process_with_the_drivers_allocator_settings(tmp_path):
    """The driver actor runs with lean_memory_env() (Arrow's C++ default pool on jemalloc, two
    glibc arenas) and lean_arrow_memory(): what Arrow read and freed goes back to the system.
    Without the environment Arrow's C++ reads kept 25 MB here, with neither 150 MB."""
    import os
    import subprocess

    import pyarrow as pa
    import pyarrow.parquet as pq

    from asvp_ray.runtime.allocator import lean_memory_env

    if "jemalloc" not in pa.supported_memory_backends():
        pytest.skip("this pyarrow has no jemalloc")
    n = 2_000_000
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"id": np.arange(n), "path": pa.array([f"d{i // 10000:04d}/{i:08d}.png" for i in range(n)])}),
                   path, row_group_size=200_000)
    base = {k: v for k, v in os.environ.items() if k not in ("ARROW_DEFAULT_MEMORY_POOL", "MALLOC_ARENA_MAX")}

    def kept(env, mode):
        out = subprocess.run([sys.executable, "-c", _ARROW_READS, str(path), mode], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return [float(x) for x in out.stdout.split()]

    lean_kept, lean_peak = kept({**base, **lean_memory_env()}, "lean")
    plain_kept, plain_peak = kept(base, "plain")
    assert plain_peak > 60 and lean_peak > 60, (plain_peak, lean_peak)  # the reads did allocate
    assert plain_kept > 60, plain_kept  # Arrow's defaults keep it (else this test shows nothing)
    assert lean_kept < 8, f"{lean_kept} MB of the reads stayed in the heap"


def test_lean_memory_env_passes_on_what_the_user_set(monkeypatch):
    from asvp_ray.runtime.allocator import lean_memory_env

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    env = lean_memory_env()
    assert env["MALLOC_ARENA_MAX"] == "2" and env.get("ARROW_DEFAULT_MEMORY_POOL") in ("jemalloc", None)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "system")
    assert lean_memory_env() == {"MALLOC_ARENA_MAX": "8", "ARROW_DEFAULT_MEMORY_POOL": "system"}


def test_a_pool_view_of_ascending_ids_makes_no_pool_sized_temporaries():
    """PoolView checks that ids are unique; a run's ids ascend, which is checked in chunks. The
    np.unique check it replaced peaked 56 MB at 1,000,000 ids."""
    from asvp_ray.runtime.allocator import _reset_peak, memory_mb
    from asvp_ray.core.errors import BadInputError
    from asvp_ray.pool.view import PoolView

    ids = np.arange(4_000_000, dtype=np.int64) * 3  # 32 MB
    mask = np.zeros(len(ids), dtype=bool)
    if not _reset_peak():
        pytest.skip("cannot reset the kernel's peak RSS here")
    rss = memory_mb()["rss_mb"]
    PoolView(ids=ids, labeled_mask=mask)
    assert memory_mb()["peak_mb"] - rss < 10
    for bad in (np.array([1, 2, 2, 5]), np.array([7, 1, 7, 3])):  # repeats found, ascending or not
        with pytest.raises(BadInputError, match="duplicate ids"):
            PoolView(ids=bad, labeled_mask=np.zeros(4, dtype=bool))
    ids[1 << 20] = ids[(1 << 20) - 1]  # a repeat across the edge of the check's 1,048,576-row chunks
    with pytest.raises(BadInputError, match="duplicate ids"):
        PoolView(ids=ids, labeled_mask=mask)


_POOL_LOAD = r"""
import sys
import numpy as np
from asvp_ray.runtime.allocator import _reset_peak, lean_arrow_memory, memory_mb, release_free_memory
lean_arrow_memory()
from asvp_ray.features.store import FeatureStore
FeatureStore(sys.argv[2]).read(0)  # Arrow's decoder starts up (a one-off ~30 MB) on a small version
store = FeatureStore(sys.argv[1])
store.read_ids(0)  # as FeatureVersions.load does before the read
release_free_memory()
if not _reset_peak():
    print("no-reset"); raise SystemExit(0)
start = memory_mb()["rss_mb"]
ids, feats = store.read(0)
peak = memory_mb()["peak_mb"] - start
assert np.all(ids[1:] > ids[:-1]) and np.array_equal(feats[:, 0], ids.astype(np.float32)), "rows out of place"
print(peak, feats.nbytes / 2**20)
"""


def _write_version(root, n: int, dim: int, shuffled: bool, chunk: int = 50_000):
    """Feature version v0 of ``n`` x ``dim`` in parts of ``chunk`` rows; column 0 holds the row's id."""
    from asvp_ray.features.store import FeatureStore, VersionWriter

    ids = np.arange(n, dtype=np.int64)
    if shuffled:
        np.random.default_rng(0).shuffle(ids)
    rng = np.random.default_rng(1)
    with VersionWriter(FeatureStore(root), 0, {"weights": "test"}) as w:
        for s in range(0, n, chunk):
            part = rng.standard_normal((len(ids[s:s + chunk]), dim), dtype=np.float32)
            part[:, 0] = ids[s:s + chunk]
            w.add(ids[s:s + chunk], part)
        w.commit()
    return root


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("shuffled", [False, True], ids=["ids-in-order", "ids-shuffled"])
def test_loading_a_pool_into_the_driver_holds_the_matrix_once(tmp_path, shuffled):
    """FeatureStore.read of a 200,000 x 256 version (195 MB) in a process with the driver's
    allocator settings: its peak growth stays within 1.25x the matrix. Parquet's pre-buffering
    (every part's column chunks read whole and kept while the parts were open) and the sort by
    id (a second matrix when parts held ids out of order) peaked at 2.5x and 3.2x."""
    import os
    import subprocess

    from asvp_ray.runtime.allocator import lean_memory_env

    pool = _write_version(tmp_path / "pool", 200_000, 256, shuffled)
    small = _write_version(tmp_path / "small", 4_096, 256, False)
    env = {**os.environ, **lean_memory_env()}
    out = subprocess.run([sys.executable, "-c", _POOL_LOAD, str(pool), str(small)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.strip() == "no-reset":
        pytest.skip("cannot reset the kernel's peak RSS here")
    peak, matrix = (float(x) for x in out.stdout.split())
    assert peak <= 1.25 * matrix, f"loading a {matrix:.0f} MB pool peaked {peak:.0f} MB above the baseline"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_version_with_ids_out_of_order_reads_sorted_with_each_row_in_its_place(request, tmp_path, where):
    """Parts listed out of id order and ids shuffled inside them: read sorts the ids and decodes
    the features a second time straight into their sorted rows, from a
    local folder and from S3 (each part fetched and checked again); NaN is still named by id."""
    from asvp_ray.core.errors import BadInputError
    from asvp_ray.features.store import FeatureStore, VersionWriter

    root = request.getfixturevalue("s3_server")["uri"](f"order-{tmp_path.name}") if where == "s3" else tmp_path / "s"
    store = FeatureStore(root)
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(10_000, dtype=np.int64) * 7)
    feats = rng.standard_normal((len(ids), 16), dtype=np.float32)
    with VersionWriter(store, 0, {"weights": "t"}) as w:
        for s in range(0, len(ids), 3_000):
            w.add(ids[s:s + 3_000], feats[s:s + 3_000])
        w.commit()
    order = np.argsort(ids)
    got_ids, got = store.read(0)
    assert np.array_equal(got_ids, ids[order]) and np.array_equal(got, feats[order])
    assert got.flags.c_contiguous

    feats[[5, 7_777]] = np.nan  # the store's own writer refuses NaN: write it as a damaged version would hold it
    import asvp_ray.features.parts as parts_mod

    with VersionWriter(store, 1, {"weights": "t"}) as w, pytest.MonkeyPatch.context() as mp:
        mp.setattr(parts_mod, "check_finite", lambda *a: None)
        w.add(ids, feats)
        w.commit()
    with pytest.raises(BadInputError, match=rf"NaN or infinite values for ids \[{min(ids[5], ids[7_777])}, "
                                            rf"{max(ids[5], ids[7_777])}\]"):
        store.read(1)
