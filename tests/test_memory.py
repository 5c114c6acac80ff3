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
