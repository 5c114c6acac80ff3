"""Compare runs: a table (CSV, Markdown, printed) and PNG plots a person reads at a glance.

Every plot shows each quantity under its own name: the final model's test accuracy only for runs
that trained one, the proxy's (an MLP on the current features) marked as proxy accuracy; no axis
carries an offset (``+1e2``), and each PNG has a JSON file beside it holding the values read back
from the drawn artists (``plot_data``), so a test or a reader can check them against
``summary.json``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from asvp_ray.core.errors import BadInputError

SAMPLING_PHASES_EXCLUDED = ("final_train",)
COLUMNS = ["run", "method", "strategy", "seed", "labels", "final_test_accuracy", "last_proxy_test_accuracy",
           "sampling_seconds", "spent_seconds", "total_seconds", "cpu_hours", "gpu_hours", "compute_dollars",
           "total_dollars", "refreshes"]
"""Columns: ``sampling_seconds`` = every round's work plus the feature versions the run used, cached
or not (what its result needed); ``spent_seconds`` = the same phases as this run's processes
actually ran them (a cached feature version counts its linking/copying); the two agree for a run
that used no cache. ``total_seconds`` = ``sampling_seconds`` + the final training;
``cpu_hours``/``gpu_hours``/``compute_dollars`` = that compute in device-hours and at the run's unit
prices; ``total_dollars`` = labels + that compute."""


def load_run(path) -> Dict[str, Any]:
    """A run's summary.json (a folder, or a run in a bucket: ``s3://`` / ``gs://``)."""
    from asvp_ray.storage.locations import is_uri

    if is_uri(path):
        from asvp_ray.loop.rundir import RunDir

        rd = RunDir(str(path))
        p, shown = rd.summary_path, rd.location
    else:
        p, shown = Path(path) / "summary.json", str(path)
    if not p.is_file():
        raise BadInputError(f"{shown} is not an asvp-ray run directory (no summary.json); pass run directories "
                            "made by `asvp-ray run`")
    s = json.loads(p.read_text())
    s["_dir"] = shown.split("?", 1)[0].rstrip("/")
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
        "cpu_hours": round(cost["cpu_seconds_total"] / 3600, 9) if "cpu_seconds_total" in cost else None,
        "gpu_hours": round(cost["gpu_seconds_total"] / 3600, 9) if "gpu_seconds_total" in cost else None,
        "compute_dollars": (cost.get("dollars") or {}).get("compute"),
        "total_dollars": (cost.get("dollars") or {}).get("total"),
        "refreshes": sum(1 for r in rounds if r.get("refreshed")),
    }


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |\n" for r in rows)


# ---------------------------------------------------------------------------------- plot helpers
def plain_axes(*axes) -> None:
    """Tick labels that read as the values themselves: no offset (``+1e2``), no scientific notation."""
    from matplotlib.ticker import ScalarFormatter

    for ax in axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "linear":
                f = ScalarFormatter(useOffset=False)
                f.set_scientific(False)
                axis.set_major_formatter(f)


def plot_data(fig) -> Dict[str, Any]:
    """The values a figure shows, read back from its artists: per axes its labels, offset texts and
    every labelled series (lines, scatter points, error bars; labels starting with '_' are skipped)."""
    from matplotlib.collections import PathCollection
    from matplotlib.container import BarContainer, ErrorbarContainer

    fig.canvas.draw()  # computes tick and offset texts
    out = []
    for ax in fig.axes:
        series = []
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                xy = line.get_xydata()
                series.append({"label": line.get_label(), "kind": "line", "x": [float(v) for v in xy[:, 0]],
                               "y": [float(v) for v in xy[:, 1]]})
        for coll in ax.collections:
            if isinstance(coll, PathCollection) and not coll.get_label().startswith("_"):
                xy = coll.get_offsets()
                series.append({"label": coll.get_label(), "kind": "points", "x": [float(v) for v in xy[:, 0]],
                               "y": [float(v) for v in xy[:, 1]]})
        for cont in ax.containers:
            if isinstance(cont, BarContainer) and not str(cont.get_label()).startswith("_"):
                series.append({"label": cont.get_label(), "kind": "bars",
                               "x": [float(p.get_x() + p.get_width() / 2) for p in cont.patches],
                               "y": [float(p.get_height()) for p in cont.patches]})
            if isinstance(cont, ErrorbarContainer) and not str(cont.get_label()).startswith("_"):
                xy = cont.lines[0].get_xydata()
                series.append({"label": cont.get_label(), "kind": "errorbar", "x": [float(v) for v in xy[:, 0]],
                               "y": [float(v) for v in xy[:, 1]]})
        out.append({"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                    "x_offset_text": ax.xaxis.get_offset_text().get_text(),
                    "y_offset_text": ax.yaxis.get_offset_text().get_text(),
                    "texts": [t.get_text() for t in ax.texts], "series": series})
    return {"axes": out}


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Save ``fig`` as ``path`` (PNG) and its ``plot_data`` as the same name with ``.json``."""
    import matplotlib.pyplot as plt

    path = Path(path)
    data = plot_data(fig)
    fig.savefig(path, dpi=dpi)
    path.with_suffix(".json").write_text(json.dumps(data, indent=1))
    plt.close(fig)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4", wrap=True)


FINAL_Y = "final model test accuracy"
PROXY_Y = "last-round proxy test accuracy (MLP on features)"


def _accuracy_panels(axes_row, runs, rows, x_of, xlabel: str, label) -> None:
    """One row of two panels: final model accuracy (runs that trained one) and proxy accuracy."""
    from matplotlib.ticker import MaxNLocator

    ax_f, ax_p = axes_row
    for s, r in zip(runs, rows):
        x = x_of(r)
        if x is None:
            continue
        if r["final_test_accuracy"] is not None:
            ax_f.scatter([x], [r["final_test_accuracy"]], s=50, label=label(s))
        if r["last_proxy_test_accuracy"] is not None:
            ax_p.scatter([x], [r["last_proxy_test_accuracy"]], s=50, marker="s", label=label(s))
    for ax, y in ((ax_f, FINAL_Y), (ax_p, PROXY_Y)):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(y, fontsize=8)
        ax.grid(alpha=0.3)
        plain_axes(ax)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        if ax.collections:
            ax.legend(fontsize=6)
    if not ax_f.collections:
        _empty(ax_f, "no run trained a final model\n(final.training_method: none)")


def make_report(run_dirs: Sequence[Path], out: Path) -> Dict[str, Any]:
    """Write ``table.csv``, ``table.md`` and four PNG plots (each with a ``.json`` of its plotted
    values) into ``out``; return the rows and paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
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

    files = []
    # 1. accuracy against labels: the proxy per round (lines), the final model (stars)
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
                ax.axvline(r["n_labeled"], color=line.get_color(), ls=":", lw=1, label="_refresh")
    ax.set_xlabel("labelled images")
    ax.set_ylabel("test accuracy (lines: proxy per round; stars: final model)")
    ax.set_title("Test accuracy against labels (dotted: feature refresh)")
    ax.grid(alpha=0.3)
    plain_axes(ax)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(save_figure(fig, out / "accuracy_vs_labels.png"))

    # 2. accuracy against total cost (labels + compute)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    _accuracy_panels(axes, runs, rows, lambda r: r["total_dollars"], "total cost (US$: labels + compute)", label)
    fig.suptitle("Accuracy against total cost (at a fixed label budget, labels dominate it)")
    fig.tight_layout()
    files.append(save_figure(fig, out / "accuracy_vs_cost.png"))

    # 3. accuracy against compute: compute dollars, CPU-hours and (when any run used one) GPU-hours
    cols = [("compute_dollars", "compute cost (US$, CPU/GPU-hours at the run's prices)"),
            ("cpu_hours", "CPU-hours (reserved CPUs x wall time)")]
    if any((r["gpu_hours"] or 0) > 0 for r in rows):
        cols.append(("gpu_hours", "GPU-hours"))
    fig, axes = plt.subplots(2, len(cols), figsize=(5.2 * len(cols), 8), squeeze=False)
    for j, (key, xlabel) in enumerate(cols):
        _accuracy_panels((axes[0][j], axes[1][j]), runs, rows, lambda r, k=key: r[k], xlabel, label)
    fig.suptitle("Accuracy against compute (where the methods differ at a fixed label budget)")
    fig.tight_layout()
    files.append(save_figure(fig, out / "accuracy_vs_compute.png"))

    # 4. time per phase, stacked
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
    plain_axes(ax)
    ax.legend(fontsize=7, ncol=2)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    files.append(save_figure(fig, out / "time_per_phase.png"))
    return {"rows": rows, "files": [str(out / "table.csv"), str(out / "table.md")] + [str(f) for f in files]}
