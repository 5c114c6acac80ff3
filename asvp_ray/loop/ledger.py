"""The cost ledger: wall seconds and device-seconds per phase, labels bought, and dollars.

Device-seconds are wall seconds times the devices a phase holds (CPUs reserved by its Ray
actors/workers, or GPUs), which is what a cluster bills. Unit prices come from the config
(``cost``); their defaults are documented there and in the README.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, Optional

PHASES = ("extract", "refresh_finetune", "refresh_extract", "proxy_train", "score_select", "label",
          "finetune", "score_pool", "monitor", "evaluate", "final_train")


class CostLedger:
    """Accumulates per-phase costs over a run; serialises to and from summary.json.

    Args:
        per_label: dollars per label bought.
        per_cpu_hour: dollars per CPU-hour.
        per_gpu_hour: dollars per GPU-hour.
    """

    def __init__(self, per_label: float, per_cpu_hour: float, per_gpu_hour: float):
        self.per_label = per_label
        self.per_cpu_hour = per_cpu_hour
        self.per_gpu_hour = per_gpu_hour
        self.entries: List[Dict[str, Any]] = []
        self.labels = 0

    def add(self, phase: str, wall_s: float, cpus: float = 1.0, gpus: float = 0.0,
            round: Optional[int] = None) -> None:
        """Record one phase execution that held ``cpus`` CPUs and ``gpus`` GPUs for ``wall_s``."""
        self.entries.append({"phase": phase, "round": round, "wall_s": float(wall_s),
                             "cpu_s": float(wall_s) * float(cpus), "gpu_s": float(wall_s) * float(gpus)})

    def add_labels(self, n: int) -> None:
        self.labels += int(n)

    def totals(self) -> Dict[str, Any]:
        """``labels``, ``compute_seconds`` {phase: {wall, cpu, gpu}}, and ``dollars``."""
        by_phase: Dict[str, Dict[str, float]] = defaultdict(lambda: {"wall": 0.0, "cpu": 0.0, "gpu": 0.0})
        for e in self.entries:
            p = by_phase[e["phase"]]
            p["wall"] += e["wall_s"]
            p["cpu"] += e["cpu_s"]
            p["gpu"] += e["gpu_s"]
        cpu_s = sum(p["cpu"] for p in by_phase.values())
        gpu_s = sum(p["gpu"] for p in by_phase.values())
        labels_usd = self.labels * self.per_label
        compute_usd = cpu_s / 3600 * self.per_cpu_hour + gpu_s / 3600 * self.per_gpu_hour
        return {
            "labels": self.labels,
            "compute_seconds": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in by_phase.items()},
            "wall_seconds_total": round(sum(p["wall"] for p in by_phase.values()), 4),
            "cpu_seconds_total": round(cpu_s, 4),
            "gpu_seconds_total": round(gpu_s, 4),
            "unit_prices": {"per_label": self.per_label, "per_cpu_hour": self.per_cpu_hour,
                            "per_gpu_hour": self.per_gpu_hour},
            "dollars": {"labels": round(labels_usd, 6), "compute": round(compute_usd, 6),
                        "total": round(labels_usd + compute_usd, 6)},
        }

    def to_json(self) -> Dict[str, Any]:
        return {"entries": list(self.entries), "labels": self.labels}

    @classmethod
    def from_json(cls, data: Optional[Dict[str, Any]], per_label: float, per_cpu_hour: float,
                  per_gpu_hour: float, before_round: Optional[int] = None) -> "CostLedger":
        """Rebuild a ledger, dropping entries of rounds at or after ``before_round`` (rolled back)."""
        led = cls(per_label, per_cpu_hour, per_gpu_hour)
        if data:
            led.entries = [e for e in data.get("entries", [])
                           if before_round is None or e.get("round") is None or e["round"] < before_round]
        return led
