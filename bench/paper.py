"""The paper's comparison on Fashion-MNIST: standard AL vs SVPp vs ASVP (each refresh policy),
plus random selection, over several seeds; then the aggregate table and the report's plots.

Claim under test (ASVP.md, "Claims to reproduce"): ASVP's final accuracy is close to standard
AL's at a sampling cost close to SVPp's, and SVPp loses accuracy.

Every run is ``asvp-ray run bench/paper_fashion_mnist.yaml --out OUT/runs/NAME --set ...`` in a
subprocess, one after the other (the machine is small; fine-tuning takes every CPU), with one
shared ``feature_cache`` so features v0 are extracted once. Rerunning the same command skips
finished runs and resumes unfinished ones, so an interrupted benchmark continues where it
stopped. Output::

    OUT/runs/<run>/            one asvp-ray run directory per (method, policy, strategy, seed)
    OUT/logs/<run>.log         its console output
    OUT/aggregate.md|.csv      mean +- std over seeds per (method, policy, strategy)
    OUT/per_run.csv            one row per run
    OUT/aggregate_*.png        by method: accuracy against labels, and against sampling time
    OUT/report/                `asvp-ray report` on every run: table and plots

Columns (seconds are wall seconds on this machine):

- ``final_acc``: test accuracy of the final model (FT, or LP-FT for ASVP without a refresh);
- ``proxy_acc``: the proxy's test accuracy after the last round;
- ``sampling_s``: every round phase (standard: fine-tune + pool scoring; SVPp/ASVP: proxy
  training, selection, alignment monitor, probes, refreshes) plus the feature versions the run
  used, cached or not: the ledger charges a run that takes features v0 from the shared feature
  cache what their extraction cost (``summary.json`` → ``cost``; for runs made before the
  ledger did that, the one v0 extraction of the benchmark is added). Standard AL is not charged
  features v0: it samples without them. The final training is not sampling;
- ``spent_s``: the same phases as the run's process actually ran them (a cached v0 counts
  the seconds spent linking it); equal to ``sampling_s`` for the run that extracted v0;
- ``eval_in_sampling_s``: of ``sampling_s``, the seconds standard AL's per-round fine-tunes
  spent evaluating the test set after every epoch (asvp-ray does that for the round's
  ``finetune_test_accuracy``; a sampler does not need it), read from the run's console log;
- ``compute_s``: ``sampling_s`` + final training;
- ``refreshes``; ``compute_usd``: CPU-seconds at the config's price (labels cost the same for
  every method: ``labels`` x ``cost.per_label``).

Usage::

    .venv/bin/python bench/paper.py --quick            # minutes: tiny pool, 1 seed
    .venv/bin/python bench/paper.py --trigger-rows     # only the ASVP rows of the trigger study:
                                                       # score_drop with each refresh.reference, and probe
    .venv/bin/python bench/paper.py --replay-from bench/results/paper_fashion_mnist.md
                                                       # reference replay from recorded LogME series
    .venv/bin/python bench/paper.py                    # the full benchmark (3 seeds)
    .venv/bin/python bench/paper.py --aggregate-only   # tables and plots from finished runs
"""
from __future__ import annotations

import sys
from pathlib import Path

# Python puts this script's folder first on sys.path, where a sibling bench script can shadow a
# standard module (bench/select.py hides `select`, which subprocess imports); drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import ast
import csv
import json
import math
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "bench" / "paper_fashion_mnist.yaml"
METHODS = ("random", "svpp", "standard", "asvp")
POLICIES = ("never", "every_round", "at_labels", "score_drop", "probe")
DEFAULT_POLICIES = ("at_labels", "score_drop", "probe")
REFERENCES = ("first", "best", "min_labels")
DEFAULT_REFERENCE_MIN_LABELS = 500  # the paper schedule's second round: 250 random + 250 selected

# Per-policy settings (--set keys). at_labels' label count is filled in from the schedule.
POLICY_SETTINGS: Dict[str, Dict[str, object]] = {
    "never": {},
    "every_round": {},
    "at_labels": {},
    "score_drop": {"refresh.score": "logme", "refresh.threshold": 0.05, "refresh.min_new_labels": 1,
                   "refresh.max_refreshes": 2},
    "probe": {"refresh.score": "logme", "refresh.margin": 0.05, "refresh.max_refreshes": 2},
}

# --quick: a tiny pool and short fine-tunes; checks the whole pipeline in minutes, decides nothing.
QUICK_SETTINGS: Dict[str, object] = {
    "data.pool.limit": 1500, "data.test.limit": 500, "budget.schedule": [100, 100, 100],
    "train.epochs": 2, "train.lp_epochs": 1, "proxy.epochs": 20,
}


@dataclass(frozen=True)
class RunSpec:
    """One asvp-ray run of the benchmark."""

    method: str      # random | svpp | standard | asvp
    policy: str      # refresh policy (asvp), "-" otherwise
    seed: int
    overrides: Tuple[str, ...] = field(default=())
    reference: str = "first"  # refresh.reference of score_drop (first = the runs made before it existed)

    @property
    def group(self) -> str:
        if self.method == "random":
            return "random (svpp)"
        if self.method == "asvp":
            ref = f" ref={self.reference}" if self.policy == "score_drop" and self.reference != "first" else ""
            return f"asvp {self.policy}{ref}"
        return self.method

    @property
    def name(self) -> str:
        tag = {"random": "random-svpp", "svpp": "svpp-margin", "standard": "standard-margin"}.get(
            self.method, f"asvp-margin-{self.policy}")
        if self.method == "asvp" and self.policy == "score_drop" and self.reference != "first":
            tag += f"-{self.reference}"
        return f"{tag}-s{self.seed}"


def _yaml_value(v: object) -> str:
    return "null" if v is None else json.dumps(v, separators=(",", ":"))


def _sets(d: Dict[str, object]) -> List[str]:
    return [f"{k}={_yaml_value(v)}" for k, v in d.items()]


def _schedule(config: Path, extra: Sequence[str]) -> List[int]:
    sys.path.insert(0, str(ROOT))
    from asvp_ray.config import load_config

    return list(load_config(str(config), list(extra)).budget.schedule)


def at_labels_point(schedule: Sequence[int]) -> int:
    """The label count where at_labels refreshes once: after the middle round (the released code
    refreshes once at a hand-picked count)."""
    cum = [sum(schedule[: i + 1]) for i in range(len(schedule))]
    return cum[max(0, (len(cum) - 1) // 2)]


def plan_runs(methods: Sequence[str], policies: Sequence[str], seeds: Sequence[int],
              schedule: Sequence[int], common: Sequence[str], references: Sequence[str] = ("first",),
              reference_min_labels: int = DEFAULT_REFERENCE_MIN_LABELS) -> List[RunSpec]:
    """All runs, seed-major so that an interrupted benchmark holds whole seeds. ``score_drop``
    runs once per ``refresh.reference`` in ``references``."""
    runs = []
    for seed in seeds:
        for m in methods:
            base = [f"seed={seed}", *common]
            if m == "random":
                runs.append(RunSpec(m, "-", seed, tuple(base + ["method=svpp", "strategy=random"])))
            elif m in ("svpp", "standard"):
                runs.append(RunSpec(m, "-", seed, tuple(base + [f"method={m}", "strategy=margin"])))
            else:
                for p in policies:
                    extra = dict(POLICY_SETTINGS[p])
                    if p == "at_labels":
                        extra["refresh.at"] = [at_labels_point(schedule)]
                    for ref in (references if p == "score_drop" else ("first",)):
                        sets = dict(extra)
                        if ref != "first":  # "first" runs keep the command line of the runs made before
                            sets["refresh.reference"] = ref
                        if ref == "min_labels":
                            sets["refresh.reference_min_labels"] = reference_min_labels
                        runs.append(RunSpec(m, p, seed, tuple(base + ["method=asvp", "strategy=margin",
                                                                      f"refresh.policy={p}"] + _sets(sets)), ref))
    return runs


def ray_env() -> Dict[str, str]:
    """The environment of every run: one torch thread per process, and a Ray temp dir of its own, so that ``ray.init()`` starts a
    private local instance instead of attaching to another process's Ray on a shared machine (which
    then dies with that process: "Found multiple active Ray instances ... Connecting to latest
    cluster"), and other processes do not find this one either."""
    env = dict(os.environ)
    env.setdefault("RAY_TMPDIR", f"/tmp/asvp-paper-{os.getuid()}")  # short: Ray's socket paths
    # One intra-op thread per process (the proxy in the driver too; the config pins fine-tuning and
    # extraction to one): on this shared 2-CPU machine two threads ran 5-10x slower, not faster.
    env.setdefault("OMP_NUM_THREADS", "1")
    Path(env["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    return env


def _finished(run_dir: Path) -> bool:
    p = run_dir / "summary.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("status") == "finished"
    except (OSError, json.JSONDecodeError):
        return False


def execute(spec: RunSpec, config: Path, out: Path, user_sets: Sequence[str], dry_run: bool) -> Optional[float]:
    """Run one spec unless it is finished; returns its wall seconds (None when skipped)."""
    run_dir = out / "runs" / spec.name
    if _finished(run_dir):
        print(f"  {spec.name}: finished already, skipped", flush=True)
        return None
    exe = Path(sys.executable).with_name("asvp-ray")
    cmd = [str(exe) if exe.exists() else "asvp-ray", "run", str(config), "--out", str(run_dir)]
    for s in list(spec.overrides) + list(user_sets):
        cmd += ["--set", s]
    if dry_run:
        print("  " + " ".join(cmd), flush=True)
        return None
    log_path = out / "logs" / f"{spec.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"  {spec.name}: running (log {log_path}) ...", flush=True)
    with open(log_path, "a") as f:
        f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT), env=ray_env())
    dt = time.perf_counter() - t0
    status = "done" if rc == 0 and _finished(run_dir) else f"FAILED (exit {rc}; see {log_path})"
    print(f"  {spec.name}: {status} in {dt / 60:.1f} min", flush=True)
    return dt


# --------------------------------------------------------------------------- aggregation
_REPORT_RE = re.compile(r"Reporting training result \d+: TrainingReport\(checkpoint=Checkpoint\([^)]*path=([^)]*)\), "
                        r"metrics=(\{.*?\}), validation")


def eval_seconds_in_rounds(log_path: Path) -> float:
    """Seconds the per-round fine-tunes (checkpoints/round-*) spent evaluating after each epoch:
    an epoch's ``seconds`` minus its ``train_seconds``, where it reported an ``eval_accuracy``."""
    if not log_path.is_file():
        return 0.0
    total = 0.0
    for m in _REPORT_RE.finditer(log_path.read_text(errors="replace")):
        if "/checkpoints/round-" not in m.group(1):
            continue
        try:
            metrics = ast.literal_eval(m.group(2))
        except (ValueError, SyntaxError):
            continue
        if "eval_accuracy" in metrics:
            total += float(metrics.get("seconds", 0.0)) - float(metrics.get("train_seconds", 0.0))
    return total


def v0_extraction(summaries: Sequence[dict]) -> Tuple[float, float]:
    """(wall, cpu) seconds of the one v0 extraction (the run that filled the feature cache)."""
    best = (0.0, 0.0)
    for s in summaries:
        e = ((s.get("cost") or {}).get("compute_seconds") or {}).get("extract")
        if e and e["wall"] > best[0]:
            best = (float(e["wall"]), float(e["cpu"]))
    return best


def run_row(spec: RunSpec, s: dict, v0: Tuple[float, float], log_path: Path) -> Dict[str, object]:
    cost = s.get("cost") or {}
    phases = cost.get("compute_seconds") or {}
    rounds = s.get("rounds") or []
    final = s.get("final") or {}
    final_wall = (phases.get("final_train") or {}).get("wall", 0.0)
    final_cpu = (phases.get("final_train") or {}).get("cpu", 0.0)
    if "spent_wall_seconds_total" in cost:  # the ledger charges cached feature versions itself
        # standard AL samples without features v0 (the driver extracts them only for the proxy
        # accuracy it reports), so they are not charged to it, as in the older rows
        skip = ("final_train", "extract") if spec.method == "standard" else ("final_train",)
        sampling = sum(v["wall"] for k, v in phases.items() if k not in skip)
        spent = sum(v["spent_wall"] for k, v in phases.items() if k not in skip)
        cpu_s = float(cost.get("cpu_seconds_total", 0.0)) - sum(
            v["cpu"] for k, v in phases.items() if k in skip and k != "final_train")
    else:  # older runs: add the benchmark's one v0 extraction to every run that used v0
        uses_v0 = spec.method != "standard"
        rounds_wall = sum(v["wall"] for k, v in phases.items() if k not in ("extract", "final_train"))
        rounds_cpu = sum(v["cpu"] for k, v in phases.items() if k not in ("extract", "final_train"))
        sampling = rounds_wall + (v0[0] if uses_v0 else 0.0)
        spent = sum(v["wall"] for k, v in phases.items() if k != "final_train")
        cpu_s = rounds_cpu + final_cpu + (v0[1] if uses_v0 else 0.0)
    per_cpu_hour = (cost.get("unit_prices") or {}).get("per_cpu_hour", 0.05)
    return {
        "run": spec.name, "group": spec.group, "method": spec.method, "policy": spec.policy, "seed": spec.seed,
        "strategy": s.get("strategy"), "labels": rounds[-1]["n_labeled"] if rounds else 0,
        "final_acc": final.get("test_accuracy"), "final_method": final.get("training_method"),
        "proxy_acc": rounds[-1].get("proxy_test_accuracy") if rounds else None,
        "sampling_s": round(sampling, 1), "spent_s": round(spent, 1),
        "eval_in_sampling_s": round(eval_seconds_in_rounds(log_path), 1) if spec.method == "standard" else 0.0,
        "final_s": round(final_wall, 1), "compute_s": round(sampling + final_wall, 1),
        "refreshes": sum(1 for r in rounds if r.get("refreshed")),
        "refresh_at": ",".join(str(r["n_labeled"]) for r in rounds if r.get("refreshed")) or "-",
        "compute_usd": round(cpu_s / 3600 * per_cpu_hour, 4),
    }


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


AGG_COLUMNS = ("final_acc", "proxy_acc", "sampling_s", "spent_s", "eval_in_sampling_s", "final_s", "compute_s",
               "refreshes", "compute_usd")


def aggregate(rows: Sequence[Dict[str, object]], order: Sequence[str]) -> List[Dict[str, object]]:
    out = []
    for g in order:
        rs = [r for r in rows if r["group"] == g]
        if not rs:
            continue
        agg: Dict[str, object] = {"group": g, "seeds": len(rs), "labels": rs[0]["labels"]}
        for c in AGG_COLUMNS:
            agg[c] = _mean_std([r[c] for r in rs])
        agg["final_method"] = "/".join(sorted({str(r["final_method"]) for r in rs}))
        out.append(agg)
    return out


def _fmt(col: str, ms: Tuple[float, float]) -> str:
    m, s = ms
    if math.isnan(m):
        return "-"
    if col.endswith("_acc"):
        return f"{m:.4f} ± {s:.4f}"
    if col == "refreshes":
        return f"{m:.1f} ± {s:.1f}"
    if col == "compute_usd":
        return f"{m:.4f} ± {s:.4f}"
    return f"{m:.0f} ± {s:.0f}"


def _num(v) -> str:
    return "-" if v is None else f"{float(v):.4f}"


def markdown(agg: Sequence[Dict[str, object]]) -> str:
    head = ["method", "seeds", "labels", "final model", *AGG_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in agg:
        lines.append("| " + " | ".join([str(a["group"]), str(a["seeds"]), str(a["labels"]), str(a["final_method"])]
                                       + [_fmt(c, a[c]) for c in AGG_COLUMNS]) + " |")
    return "\n".join(lines) + "\n"


def claim_check(rows: Sequence[Dict[str, object]]) -> str:
    """Paired (same seed) differences against standard AL and sampling-time ratios against SVPp."""
    by = {}
    for r in rows:
        by.setdefault(r["group"], {})[r["seed"]] = r
    lines = []
    std, svpp = by.get("standard", {}), by.get("svpp", {})

    def paired(g, ref, col):
        seeds = sorted(set(by[g]) & set(ref))
        d = [by[g][k][col] - ref[k][col] for k in seeds if by[g][k][col] is not None and ref[k][col] is not None]
        return _mean_std(d), len(d)

    for g in by:
        if g == "standard" or not std:
            continue
        (m, s), n = paired(g, std, "final_acc")
        if n:
            lines.append(f"- {g}: final accuracy minus standard's {m:+.4f} ± {s:.4f} (paired over {n} seeds)")
    if svpp:
        ref = statistics.fmean(r["sampling_s"] for r in svpp.values())
        for g in by:
            if g != "svpp":
                mine = statistics.fmean(r["sampling_s"] for r in by[g].values())
                lines.append(f"- {g}: sampling time {mine:.0f}s = {mine / ref:.2f} x SVPp's ({ref:.0f}s)")
    if "random (svpp)" in by and svpp:
        (m, s), n = paired("svpp", by["random (svpp)"], "final_acc")
        if n:
            lines.append(f"- svpp (margin) minus random selection, final accuracy: {m:+.4f} ± {s:.4f} ({n} seeds)")
        (m, s), n = paired("svpp", by["random (svpp)"], "proxy_acc")
        if n:
            lines.append(f"- svpp (margin) minus random selection, proxy accuracy: {m:+.4f} ± {s:.4f} ({n} seeds)")
    return "\n".join(lines) + "\n"


def write_outputs(runs: Sequence[RunSpec], out: Path, report: bool) -> Optional[str]:
    done = [(spec, out / "runs" / spec.name) for spec in runs if _finished(out / "runs" / spec.name)]
    if not done:
        print("no finished runs yet; nothing to aggregate")
        return None
    summaries = [json.loads((d / "summary.json").read_text()) for _, d in done]
    v0 = v0_extraction(summaries)
    rows = [run_row(spec, s, v0, out / "logs" / f"{spec.name}.log") for (spec, _), s in zip(done, summaries)]
    order = list(dict.fromkeys(spec.group for spec in runs))
    agg = aggregate(rows, order)
    with open(out / "per_run.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "aggregate.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "seeds", "labels", "final_method"]
                   + [f"{c}_{k}" for c in AGG_COLUMNS for k in ("mean", "std")])
        for a in agg:
            w.writerow([a["group"], a["seeds"], a["labels"], a["final_method"]]
                       + [round(x, 6) for c in AGG_COLUMNS for x in a[c]])
    per_run = ["| run | final model | final_acc | proxy_acc | sampling_s | spent_s | final_s | refreshed at (labels) |",
               "|---|---|---|---|---|---|---|---|"]
    per_run += [f"| {r['run']} | {r['final_method']} | {_num(r['final_acc'])} | {_num(r['proxy_acc'])} | "
                f"{r['sampling_s']:.0f} | {r['spent_s']:.0f} | {r['final_s']:.0f} | {r['refresh_at']} |" for r in rows]
    monitor = ["| run | per round: labels logme / logme_ped (after a refresh: *refreshed* scores) | proxy acc |",
               "|---|---|---|"]
    for (spec, _), sm in zip(done, summaries):
        if spec.method != "asvp":
            continue
        cells = []
        for r in sm.get("rounds") or []:
            a = r.get("alignment") or {}
            cell = f"{r['n_labeled']}: {a.get('logme', math.nan):.3f} / {a.get('logme_ped', math.nan):.3f}"
            if r.get("refreshed"):
                b = r.get("alignment_after_refresh") or {}
                cell += f" *-> {b.get('logme', math.nan):.3f} / {b.get('logme_ped', math.nan):.3f}*"
            cells.append(cell)
        accs = ", ".join(f"{r.get('proxy_test_accuracy') or 0:.3f}" for r in sm.get("rounds") or [])
        monitor.append(f"| {spec.name} | {'; '.join(cells)} | {accs} |")
    pairs = [(spec, sm) for (spec, _), sm in zip(done, summaries)]
    text = (markdown(agg) + f"\nFeatures v0 (pool + test) extracted once in {v0[0]:.0f}s, charged to every proxy "
            "method's sampling_s (spent_s: what each run's process ran).\n\nClaim check:\n" + claim_check(rows) + "\nPer run:\n\n" + "\n".join(per_run)
            + "\n\nAlignment monitor (ASVP runs):\n\n" + "\n".join(monitor) + "\n"
            + "\n" + threshold_replay(pairs) + "\n" + reference_replay(pairs))
    (out / "aggregate.md").write_text(text)
    print(text)
    plots = plot_aggregate(pairs, rows, agg, out)
    print("plots by method: " + ", ".join(str(p) for p in plots))
    if report:
        exe = Path(sys.executable).with_name("asvp-ray")
        cmd = [str(exe) if exe.exists() else "asvp-ray", "report", *[str(d) for _, d in done],
               "--out", str(out / "report")]
        rc = subprocess.call(cmd, stdout=subprocess.DEVNULL, cwd=str(ROOT), env=ray_env())
        print(f"report ({'ok' if rc == 0 else f'exit {rc}'}): {out / 'report'} (table.md, accuracy_vs_labels.png, "
              "accuracy_vs_cost.png, time_per_phase.png)")
    return text


REPLAY_THRESHOLDS = (0.02, 0.05, 0.1, 0.2)


def threshold_replay(runs_and_summaries, score: str = "logme") -> str:
    """Where ``score_drop`` with other thresholds would have refreshed first, replayed from the
    scores the ASVP runs recorded on the pre-trained features (v0) up to their first refresh
    (after it the v0 scores are no longer measured, so a later trigger shows as "> N")."""
    lines = [f"Threshold replay ({score} on features v0, drop since round 0; the first label count where "
             "score_drop would refresh):", "",
             "| seed (longest v0 series) | v0 " + score + " per round (labels: score) | "
             + " | ".join(f"t={t:g}" for t in REPLAY_THRESHOLDS) + " |",
             "|---|---|" + "---|" * len(REPLAY_THRESHOLDS)]
    longest: Dict[int, Tuple[str, list]] = {}  # ASVP runs of one seed share v0 until a refresh
    for spec, s in runs_and_summaries:
        if spec.method != "asvp":
            continue
        series = []
        for r in s.get("rounds") or []:
            a = (r.get("alignment") or {}).get(score)
            if r.get("feature_version", 0) != 0 and not r.get("refreshed") or a is None:
                break
            series.append((int(r["n_labeled"]), float(a)))
            if r.get("refreshed"):
                break
        if series and len(series) > len(longest.get(spec.seed, ("", []))[1]):
            longest[spec.seed] = (spec.name, series)
    for seed in sorted(longest):
        name, series = longest[seed]
        ref = series[0][1]
        cells = []
        for t in REPLAY_THRESHOLDS:
            hit = next((n for n, a in series[1:] if ref - a > t), None)
            cells.append(str(hit) if hit is not None else f"> {series[-1][0]}")
        lines.append(f"| seed {seed} ({name}) | " + ", ".join(f"{n}: {a:.3f}" for n, a in series) + " | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


REPLAY_REFERENCE_THRESHOLDS = (0.02, 0.05, 0.1)


def _replay_one(series: Sequence[dict], policy) -> Tuple[int, List[int], Optional[str]]:
    """Run ``policy`` over one run's recorded rounds while its decisions match the run's.

    Returns:
        ``(rounds followed, label counts where it refreshed, divergence)``; the divergence says
        what the policy would have done where the run did otherwise (beyond it nothing is
        recorded), None when it agreed to the end.
    """
    sys.path.insert(0, str(ROOT))
    from asvp_ray.alignment import History, RoundState

    h = History()
    refreshed: List[int] = []
    for i, r in enumerate(series):
        h.append(RoundState(round=int(r["round"]), n_labeled=int(r["n_labeled"]), scores=r.get("alignment") or {}))
        d = policy.decide(h)
        if d.refresh != bool(r.get("refreshed")):
            what = "refresh" if d.refresh else "no refresh"
            return i, refreshed, f"{what} at {r['n_labeled']}"
        if d.refresh:
            refreshed.append(int(r["n_labeled"]))
        h.mark_refreshed(d.refresh, refreshed_scores=r.get("alignment_after_refresh"))
    return len(series), refreshed, None


def reference_replay(runs_and_summaries, score: str = "logme",
                     reference_min_labels: int = DEFAULT_REFERENCE_MIN_LABELS) -> str:
    """What ``score_drop`` (max_refreshes 2, min_new_labels 1) would have done with each
    ``refresh.reference``, replayed through the real policy over the per-round scores the ASVP
    runs recorded. A decision can be followed only along a recorded path: for each seed the run
    whose decisions the replay matches longest is used; where the replay would have decided
    otherwise than every recorded run, the cell says so and the rest is unknown."""
    sys.path.insert(0, str(ROOT))
    from asvp_ray.alignment import REFRESH_POLICIES

    by_seed: Dict[int, List[Tuple[str, list]]] = {}
    for spec, s in runs_and_summaries:
        rounds = [r for r in s.get("rounds") or [] if (r.get("alignment") or {}).get(score) is not None]
        if spec.method == "asvp" and rounds:
            by_seed.setdefault(spec.seed, []).append((spec.name, rounds))
    refs = [("first", "first"), ("best", "best"), (f"min_labels {reference_min_labels}", "min_labels")]
    head = ["seed", "threshold"] + [r for r, _ in refs]
    lines = [f"Reference replay ({score}; score_drop with max_refreshes 2; label counts where it refreshes; "
             "\"then X at N\": no recorded run took that decision, later rounds unknown):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed in sorted(by_seed):
        for t in REPLAY_REFERENCE_THRESHOLDS:
            cells = []
            for _, mode in refs:
                policy = REFRESH_POLICIES.create("score_drop", score=score, threshold=t, min_new_labels=1,
                                                 max_refreshes=2, reference=mode,
                                                 reference_min_labels=reference_min_labels)
                best = max((_replay_one(series, policy) + (name,) for name, series in by_seed[seed]),
                           key=lambda x: (x[2] is None, x[0]))
                followed, hits, diverge, name = best
                text = ", ".join(map(str, hits)) or "none"
                if diverge:
                    text = (text + f", then {diverge}, later ?") if hits else f"{diverge}, later ?"
                else:
                    text += f" (to {by_seed[seed][0][1][-1]['n_labeled']})" if not hits else ""
                cells.append(text)
            lines.append(f"| {seed} | {t:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_CELL_RE = re.compile(r"(\d+): (-?[\d.]+|nan) / (-?[\d.]+|nan)(?: \*-> (-?[\d.]+|nan) / (-?[\d.]+|nan)\*)?")


def recorded_monitor_series(md_path: Path) -> List[Tuple[RunSpec, dict]]:
    """(spec, summary-like dict) pairs rebuilt from the "Alignment monitor" table of an
    aggregate.md (scores there are rounded to 3 decimals), for the replays."""
    out = []
    for line in md_path.read_text().splitlines():
        m = re.match(r"\| (asvp-margin-([a-z_]+?)(?:-(best|min_labels))?-s(\d+)) \| (.*?) \| [\d., ]+ \|$", line)
        if not m:
            continue
        name, policy, ref, seed, cells = m.groups()
        rounds = []
        for i, c in enumerate(_CELL_RE.finditer(cells)):
            n, a, b, a2, b2 = c.groups()
            rec = {"round": i, "n_labeled": int(n), "alignment": {"logme": float(a), "logme_ped": float(b)},
                   "refreshed": a2 is not None}
            if a2 is not None:
                rec["alignment_after_refresh"] = {"logme": float(a2), "logme_ped": float(b2)}
            rounds.append(rec)
        out.append((RunSpec("asvp", policy, int(seed), (), ref or "first"), {"rounds": rounds}))
    return out


def _group_stats(pairs, order: Sequence[str]) -> Dict[str, Tuple[float, float]]:
    """Mean and std over seeds per group of ``(group, value)`` pairs (None values left out)."""
    out = {}
    for g in order:
        vals = [float(v) for gg, v in pairs if gg == g and v is not None]
        if vals:
            out[g] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return out


def plot_aggregate(runs_and_summaries, rows, agg, out: Path) -> List[Path]:
    """Three plots by method (mean and std over seeds), readable with any number of runs: proxy and
    final accuracy against labels; accuracy against sampling seconds; accuracy against compute (the
    runs' own ledgers: compute dollars and CPU-hours, unrounded). Final model accuracy and proxy
    accuracy are always separate series or panels, no axis has an offset, and each PNG has a
    ``.json`` of the plotted values (read back from the figure) beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from asvp_ray.report import plain_axes, save_figure

    order = [a["group"] for a in agg]
    final = _group_stats([(spec.group, (s.get("final") or {}).get("test_accuracy")) for spec, s in runs_and_summaries],
                         order)
    proxy = _group_stats([(spec.group, (s.get("rounds") or [{}])[-1].get("proxy_test_accuracy"))
                          for spec, s in runs_and_summaries], order)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for g in order:
        curves = [[r.get("proxy_test_accuracy") for r in s.get("rounds") or []]
                  for spec, s in runs_and_summaries if spec.group == g]
        labels = [r["n_labeled"] for r in next(s for spec, s in runs_and_summaries if spec.group == g)["rounds"]]
        arr = np.array([c for c in curves if len(c) == len(labels)], dtype=float)
        m, sd = arr.mean(0), arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(len(labels))
        line, = ax.plot(labels, m, marker="o", ms=3, label=f"{g} proxy")
        ax.fill_between(labels, m - sd, m + sd, color=line.get_color(), alpha=0.12)
        if g in final:
            ax.errorbar([labels[-1]], [final[g][0]], yerr=[final[g][1]], fmt="*", ms=11, capsize=3,
                        color=line.get_color(), label=f"{g} final model")
    ax.set_xlabel("labelled images")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("Proxy accuracy per round (lines) and final model (stars, at the last round's labels)")
    ax.grid(alpha=0.3)
    plain_axes(ax)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths = [save_figure(fig, out / "aggregate_accuracy_vs_labels.png")]

    def cost(s, key):
        c = s.get("cost") or {}
        return (c.get("dollars") or {}).get("compute") if key == "usd" else (
            c["cpu_seconds_total"] / 3600 if "cpu_seconds_total" in c else None)

    sampling = _group_stats([(r["group"], r.get("sampling_s")) for r in rows], order)
    usd = _group_stats([(spec.group, cost(s, "usd")) for spec, s in runs_and_summaries], order)
    cpu_h = _group_stats([(spec.group, cost(s, "cpu_h")) for spec, s in runs_and_summaries], order)
    for name, title, columns in (
            ("aggregate_accuracy_vs_sampling.png", "Accuracy against sampling time",
             [(sampling, "sampling wall seconds (rounds + features v0; not the final training)")]),
            ("aggregate_accuracy_vs_compute.png", "Accuracy against compute (each run's ledger, final training included)",
             [(usd, "compute cost (US$: CPU/GPU-hours x unit prices)"), (cpu_h, "CPU-hours")])):
        fig, axes = plt.subplots(2, len(columns), figsize=(6 * len(columns), 8.5), squeeze=False)
        for j, (xs, xlabel) in enumerate(columns):
            for ax, ys, ylabel in ((axes[0][j], final, "final model test accuracy"),
                                   (axes[1][j], proxy, "last-round proxy test accuracy")):
                for g in order:
                    if g in xs and g in ys:
                        ax.errorbar([xs[g][0]], [ys[g][0]], xerr=[xs[g][1]], yerr=[ys[g][1]], fmt="o", ms=7,
                                    capsize=3, label=g)
                ax.set_xlabel(xlabel, fontsize=8)
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
                plain_axes(ax)
                if ax.containers:
                    ax.legend(fontsize=7)
                else:
                    ax.text(0.5, 0.5, "no run trained a final model", ha="center", va="center",
                            transform=ax.transAxes)
        fig.suptitle(title + " (mean ± std over seeds)")
        fig.tight_layout()
        paths.append(save_figure(fig, out / name))
    return paths


def _seeds(text: str) -> List[int]:
    """``3`` -> [0, 1, 2]; ``0,4,7`` -> [0, 4, 7]."""
    if "," in text:
        return [int(x) for x in text.split(",") if x.strip()]
    return list(range(int(text)))


def _names(text: str, valid: Sequence[str], what: str) -> List[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in valid]
    if bad:
        raise SystemExit(f"unknown {what} {', '.join(bad)}; choose from {', '.join(valid)}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base config (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: runs/paper, --quick: "
                                                              "runs/paper-quick)")
    ap.add_argument("--seeds", default=None, help="a count (3 -> seeds 0,1,2) or a list (0,5,7); default 3, "
                                                  "--quick: 1")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)} "
                                                                  "(random = SVPp with random selection)")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                    help=f"ASVP refresh policies, comma list of {', '.join(POLICIES)} (default: %(default)s)")
    ap.add_argument("--references", default="first",
                    help=f"refresh.reference values for the score_drop rows, comma list of {', '.join(REFERENCES)} "
                         "(default: %(default)s)")
    ap.add_argument("--reference-min-labels", type=int, default=DEFAULT_REFERENCE_MIN_LABELS,
                    help="refresh.reference_min_labels of the min_labels rows (default: %(default)s)")
    ap.add_argument("--trigger-rows", action="store_true",
                    help="only the ASVP rows of the trigger study: score_drop with every refresh.reference, and "
                         "probe (same as --methods asvp --policies score_drop,probe --references "
                         "first,best,min_labels)")
    ap.add_argument("--replay-from", type=Path, default=None,
                    help="print the threshold and reference replays from the alignment-monitor table of an "
                         "aggregate.md (e.g. bench/results/paper_fashion_mnist.md) and exit")
    ap.add_argument("--quick", action="store_true", help="tiny pool and short fine-tunes: an end-to-end check")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="extra config override for every run, e.g. --set train.epochs=4 (repeatable)")
    ap.add_argument("--aggregate-only", action="store_true", help="only aggregate the finished runs")
    ap.add_argument("--no-report", action="store_true", help="skip `asvp-ray report` (plots)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)

    if args.replay_from is not None:
        pairs = recorded_monitor_series(args.replay_from)
        if not pairs:
            raise SystemExit(f"{args.replay_from}: no alignment-monitor rows (| asvp-margin-... |) found")
        print(threshold_replay(pairs) + "\n" + reference_replay(pairs, reference_min_labels=args.reference_min_labels))
        return 0
    if args.trigger_rows:
        args.methods, args.policies, args.references = "asvp", "score_drop,probe", ",".join(REFERENCES)
    out = (args.out or Path("runs/paper-quick" if args.quick else "runs/paper")).resolve()
    seeds = _seeds(args.seeds or ("1" if args.quick else "3"))
    methods = _names(args.methods, METHODS, "method")
    policies = _names(args.policies, POLICIES, "policy")
    references = _names(args.references, REFERENCES, "reference")
    common = [f"feature_cache={out / 'feature_cache'}"] + (_sets(QUICK_SETTINGS) if args.quick else [])
    schedule = _schedule(args.config, common + args.sets)
    runs = plan_runs(methods, policies, seeds, schedule, common, references, args.reference_min_labels)
    out.mkdir(parents=True, exist_ok=True)

    if not args.aggregate_only:
        print(f"{len(runs)} runs into {out} (seeds {seeds}, schedule {schedule}, at_labels refresh at "
              f"{at_labels_point(schedule)} labels)", flush=True)
        t0 = time.perf_counter()
        for i, spec in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] {time.strftime('%H:%M:%S')}", end="", flush=True)
            execute(spec, args.config, out, args.sets, args.dry_run)
        if args.dry_run:
            return 0
        print(f"benchmark wall time this invocation: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    write_outputs(runs, out, report=not args.no_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
