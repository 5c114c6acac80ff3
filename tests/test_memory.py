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
