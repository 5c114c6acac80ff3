"""Compare runs: a table (CSV, Markdown, printed) and PNG plots a person reads at a glance."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from asvp_ray.errors import BadInputError

SAMPLING_PHASES_EXCLUDED = ("final_train",)
COLUMNS = ["run", "method", "strategy", "seed", "labels", "final_test_accuracy", "last_proxy_test_accuracy",
           "sampling_seconds", "spent_seconds", "total_seconds", "total_dollars", "refreshes"]
"""Columns: ``sampling_seconds`` = every round's work plus the feature versions the run used, cached
or not (what its result needed); ``spent_seconds`` = the same phases as this run's processes
actually ran them (a cached feature version counts its linking/copying); the two agree for a run
that used no cache. ``total_seconds`` = ``sampling_seconds`` + the final training;
``total_dollars`` = labels + that compute at the run's unit prices."""


def load_run(path: Path) -> Dict[str, Any]:
    p = Path(path) / "summary.json"
    if not p.is_file():
        raise BadInputError(f"{path} is not an asvp-ray run directory (no summary.json); pass run directories "
                            "made by `asvp-ray run`")
    s = json.loads(p.read_text())
    s["_dir"] = str(path)
    return s


def row_of(s: Dict[str, Any]) -> Dict[str, Any]:
    """One table row (see :data:`COLUMNS`)."""
    from asvp_ray.loop.ledger import sampling_seconds

    cost = s.get("cost") or {}
    phases = cost.get("compute_seconds") or {}
    sums = sampling_seconds(cost, SAMPLING_PHASES_EXCLUDED)
    sampling, spent = sums["sampling_seconds"], sums["spent_seconds"]
    if not phases:  # runs without a ledger: sum the round records
        sampling = spent = sum(sum(r["seconds"].values()) for r in s.get("rounds", []))
    rounds = s.get("rounds", [])
    final = s.get("final") or {}
    return {
        "run": Path(s["_dir"]).name, "method": s.get("method"), "strategy": s.get("strategy"), "seed": s.get("seed"),
        "labels": rounds[-1]["n_labeled"] if rounds else 0,
        "final_test_accuracy": final.get("test_accuracy"),
        "last_proxy_test_accuracy": rounds[-1].get("proxy_test_accuracy") if rounds else None,
        "sampling_seconds": round(sampling, 2),
        "spent_seconds": round(spent, 2),
        "total_seconds": round(cost.get("wall_seconds_total", sampling), 2),
        "total_dollars": (cost.get("dollars") or {}).get("total"),
        "refreshes": sum(1 for r in rounds if r.get("refreshed")),
    }


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |\n" for r in rows)


def make_report(run_dirs: Sequence[Path], out: Path) -> Dict[str, Any]:
    """Write ``table.csv``, ``table.md`` and three PNG plots into ``out``; return the rows and paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(Path(d)) for d in run_dirs]
    if not runs:
        raise BadInputError("report needs at least one run directory")
    out.mkdir(parents=True, exist_ok=True)
    rows = [row_of(s) for s in runs]
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (out / "table.md").write_text(markdown_table(rows))

    def label(s):
        return f"{Path(s['_dir']).name} ({s.get('method')}, {s.get('strategy')})"

    # 1. accuracy against labels
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for s in runs:
        rs = s.get("rounds", [])
        line, = ax.plot([r["n_labeled"] for r in rs], [r.get("proxy_test_accuracy") for r in rs], marker="o",
                        ms=3, label=label(s) + " proxy")
        fin = (s.get("final") or {}).get("test_accuracy")
        if fin is not None and rs:
            ax.scatter([rs[-1]["n_labeled"]], [fin], marker="*", s=140, color=line.get_color(), zorder=3,
                       label=label(s) + " final model")
        for r in rs:
            if r.get("refreshed"):
                ax.axvline(r["n_labeled"], color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("labelled images")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy against labels (dotted: feature refresh)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_labels.png", dpi=120)
    plt.close(fig)

    # 2. accuracy against total cost
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for s, r in zip(runs, rows):
        acc = r["final_test_accuracy"] if r["final_test_accuracy"] is not None else r["last_proxy_test_accuracy"]
        if r["total_dollars"] is not None and acc is not None:
            ax.scatter([r["total_dollars"]], [acc], s=50, label=label(s))
    ax.set_xlabel("total cost (US$: labels + compute)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("Accuracy against total cost")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_cost.png", dpi=120)
    plt.close(fig)

    # 3. time per phase, stacked
    phases = sorted({k for s in runs for k in ((s.get("cost") or {}).get("compute_seconds") or {})}
                    | {k for s in runs for r in s.get("rounds", []) for k in r["seconds"]})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(runs) + 3), 4.8))
    bottom = [0.0] * len(runs)
    names = [Path(s["_dir"]).name for s in runs]
    for ph in phases:
        vals = []
        for s in runs:
            cs = (s.get("cost") or {}).get("compute_seconds")
            vals.append(cs[ph]["wall"] if cs and ph in cs else
                        (0.0 if cs else sum(r["seconds"].get(ph, 0.0) for r in s.get("rounds", []))))
        ax.bar(names, vals, bottom=bottom, label=ph)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("wall seconds")
    ax.set_title("Time per phase")
    ax.legend(fontsize=7, ncol=2)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(out / "time_per_phase.png", dpi=120)
    plt.close(fig)
    return {"rows": rows, "files": [str(out / n) for n in ("table.csv", "table.md", "accuracy_vs_labels.png",
                                                            "accuracy_vs_cost.png", "time_per_phase.png")]}
