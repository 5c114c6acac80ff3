"""Fault injection for crash-safety tests: ``ASVP_KILL_AT=<point>`` makes the process that reaches
``<point>`` kill itself with SIGKILL, exactly as a power cut or the OOM killer would.

Points: ``phase:<phase>:r<round>`` when a round phase starts (select, proxy_train, refresh_finetune,
refresh_extract, final_train, ...), and ``extract:v<version>:batch<k>`` after the k-th batch of a
feature version is written. Unset (the normal case) it costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    """SIGKILL this process if ``$ASVP_KILL_AT`` names this point."""
    if os.environ.get("ASVP_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
