"""The cost ledger: wall seconds and device-seconds per phase, labels bought, and dollars.

Device-seconds are wall seconds times the devices a phase holds (CPUs reserved by its Ray
actors/workers, or GPUs), which is what a cluster bills. Unit prices come from the config
(``cost``); their defaults are documented there and in docs/configuration.md.

Two sums are kept, so that runs compare like with like:

- **attributed** (``compute_seconds``, ``*_seconds_total``, ``dollars``): what the run's result
  needed. A feature version taken from the shared feature cache (or already in the run
  directory) is charged what it cost to make, as recorded in its ``meta.json`` → ``cost``.
- **spent** (``spent_*`` keys): what this run's processes actually ran; for a cached version,
  the seconds spent linking or copying it.

Both are equal for a run that used no cache.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional

PHASES = ("extract", "refresh_finetune", "refresh_extract", "proxy_train", "score_select", "label",
          "finetune", "score_pool", "monitor", "probe", "evaluate", "final_train")

_SUMS = ("wall", "cpu", "gpu", "spent_wall", "spent_cpu", "spent_gpu")


def _spent(e: Mapping[str, Any], kind: str) -> float:
    """An entry's spent seconds of ``kind`` (wall/cpu/gpu); entries without ``spent_*`` ran here."""
    return float(e.get(f"spent_{kind}_s", e[f"{kind}_s"]))


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
            round: Optional[int] = None, **info: Any) -> None:
        """Record one phase execution that held ``cpus`` CPUs and ``gpus`` GPUs for ``wall_s``.

        ``info`` is stored with the entry (e.g. ``reused=<checkpoint>`` for a refresh that
        reused the probe's fine-tune).
        """
        self.entries.append({"phase": phase, "round": round, "wall_s": float(wall_s),
                             "cpu_s": float(wall_s) * float(cpus), "gpu_s": float(wall_s) * float(gpus), **info})

    def add_version(self, phase: str, cost: Optional[Mapping[str, Any]], spent_wall_s: float, *, version: int,
                    source: str, round: Optional[int] = None) -> None:
        """Charge a feature version this run took ready-made (cached: true).

        Args:
            phase: ``extract`` or ``refresh_extract``.
            cost: the version's ``meta.json`` → ``cost`` (``wall_s``, ``cpu_s``, ``gpu_s``), or None
                when it was made before costs were recorded (then charged 0, ``cost_unknown``).
            spent_wall_s: seconds this process spent linking or copying it (one CPU).
            version: the feature version.
            source: where it came from (the cache folder).
        """
        entry: Dict[str, Any] = {"phase": phase, "round": round, "cached": True, "version": int(version),
                                 "source": str(source), "spent_wall_s": float(spent_wall_s),
                                 "spent_cpu_s": float(spent_wall_s), "spent_gpu_s": 0.0}
        if cost and all(k in cost for k in ("wall_s", "cpu_s", "gpu_s")):
            entry.update(wall_s=float(cost["wall_s"]), cpu_s=float(cost["cpu_s"]), gpu_s=float(cost["gpu_s"]))
        else:
            entry.update(wall_s=0.0, cpu_s=0.0, gpu_s=0.0, cost_unknown=True)
        self.entries.append(entry)

    def add_labels(self, n: int) -> None:
        self.labels += int(n)

    def has(self, phase: str) -> bool:
        return any(e["phase"] == phase for e in self.entries)

    def totals(self) -> Dict[str, Any]:
        """The ledger for summary.json → ``cost``.

        ``compute_seconds`` {phase: {wall, cpu, gpu (attributed), spent_wall, spent_cpu,
        spent_gpu, cached}}, ``wall/cpu/gpu_seconds_total`` (attributed),
        ``spent_wall/cpu/gpu_seconds_total``, ``cached`` (the versions taken ready-made),
        ``dollars`` (attributed) and ``dollars_spent``.
        """
        by_phase: Dict[str, Dict[str, Any]] = defaultdict(lambda: {**{k: 0.0 for k in _SUMS}, "cached": False})
        for e in self.entries:
            p = by_phase[e["phase"]]
            for kind in ("wall", "cpu", "gpu"):
                p[kind] += float(e[f"{kind}_s"])
                p[f"spent_{kind}"] += _spent(e, kind)
            p["cached"] = p["cached"] or bool(e.get("cached"))
        tot = {k: sum(p[k] for p in by_phase.values()) for k in _SUMS}
        labels_usd = self.labels * self.per_label

        def usd(cpu_s: float, gpu_s: float) -> float:
            return cpu_s / 3600 * self.per_cpu_hour + gpu_s / 3600 * self.per_gpu_hour

        compute_usd, spent_usd = usd(tot["cpu"], tot["gpu"]), usd(tot["spent_cpu"], tot["spent_gpu"])
        return {
            "labels": self.labels,
            "compute_seconds": {k: {kk: (round(vv, 4) if kk != "cached" else vv) for kk, vv in v.items()}
                                for k, v in by_phase.items()},
            "wall_seconds_total": round(tot["wall"], 4),
            "cpu_seconds_total": round(tot["cpu"], 4),
            "gpu_seconds_total": round(tot["gpu"], 4),
            "spent_wall_seconds_total": round(tot["spent_wall"], 4),
            "spent_cpu_seconds_total": round(tot["spent_cpu"], 4),
            "spent_gpu_seconds_total": round(tot["spent_gpu"], 4),
            "cached": [{k: e.get(k) for k in ("phase", "version", "source", "wall_s", "spent_wall_s", "cost_unknown")
                        if k in e} for e in self.entries if e.get("cached")],
            "unit_prices": {"per_label": self.per_label, "per_cpu_hour": self.per_cpu_hour,
                            "per_gpu_hour": self.per_gpu_hour},
            "dollars": {"labels": round(labels_usd, 6), "compute": round(compute_usd, 6),
                        "total": round(labels_usd + compute_usd, 6)},
            "dollars_spent": {"compute": round(spent_usd, 6), "total": round(labels_usd + spent_usd, 6)},
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


def sampling_seconds(cost: Mapping[str, Any], exclude: tuple = ("final_train",)) -> Dict[str, float]:
    """The sampling cost of a run from its summary.json → ``cost``: every phase but ``exclude``.

    Returns:
        ``{"sampling_seconds": attributed wall seconds (every round's work plus the feature
        versions used, cached or not), "spent_seconds": the same phases' wall seconds this run's
        processes actually ran}``. Ledgers written before costs were attributed count their
        recorded wall seconds for both.
    """
    phases = cost.get("compute_seconds") or {}
    att = sum(float(v["wall"]) for k, v in phases.items() if k not in exclude)
    spent = sum(float(v.get("spent_wall", v["wall"])) for k, v in phases.items() if k not in exclude)
    return {"sampling_seconds": att, "spent_seconds": spent}
