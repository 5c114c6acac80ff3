"""Fault injection for crash-safety tests: ``ASVP_KILL_AT=<point>`` makes the process that reaches
``<point>`` kill itself with SIGKILL, exactly as a power cut or the OOM killer would.

Points: ``phase:<phase>:r<round>`` when a round phase starts (select, proxy_train, refresh_finetune,
refresh_extract, final_train, ...), ``extract:v<version>:batch<k>`` after the k-th batch of a
feature version is written, and ``commit:v<version>`` just before an object store's meta.json, ``bucket:before_commit`` / ``bucket:after_commit`` around a bucket run's commit record. Unset (the normal case) it costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    """SIGKILL this process if ``$ASVP_KILL_AT`` names this point.

    With ``$ASVP_KILL_ONCE`` set to a file path, only the first process to reach the point dies
    (it creates the file first), so a restarted worker gets past it.
    """
    if os.environ.get("ASVP_KILL_AT") != name:
        return
    marker = os.environ.get("ASVP_KILL_ONCE")
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def fault_env() -> dict:
    """The ``ASVP_*`` variables to forward to Ray workers (runtime_env), so faults reach them."""
    return {k: v for k, v in os.environ.items() if k.startswith("ASVP_")}


def gpu_on_cpu() -> bool:
    """Test-only: ``ASVP_TEST_GPU_ON_CPU=1`` makes work that reserved a GPU compute on the CPU when
    the process has no CUDA (the fake GPU nodes of a cluster rehearsal: they declare ``GPU: 1`` but
    have no card), so that scheduling is exactly a GPU run's. Never set outside tests."""
    if os.environ.get("ASVP_TEST_GPU_ON_CPU") != "1":
        return False
    import torch

    return not torch.cuda.is_available()
