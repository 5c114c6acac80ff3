"""The driver's memory watch: growth above a start-up baseline, per phase (summary.json ->
driver_memory)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from asvp_ray.device import MemoryWatch


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
    from asvp_ray.device import unmap_shared_pages
    from asvp_ray.selection.sharded import gather_rows

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
from asvp_ray.device import lean_arrow_memory, memory_mb, memory_parts_mb, release_free_memory
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

    from asvp_ray.device import lean_memory_env

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
    from asvp_ray.device import lean_memory_env

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
    from asvp_ray.device import _reset_peak, memory_mb
    from asvp_ray.errors import BadInputError
    from asvp_ray.selection.base import PoolView

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
