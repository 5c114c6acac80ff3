"""A Ray Tune study whose trials are asvp-ray runs.

Layout of a study directory ``DIR``::

    DIR/study.yaml           the base config and the search space (a restore checks they match)
    DIR/feature_cache/       features v0, extracted once per backbone + data, hard-linked into trials
    DIR/prefetch/            the scratch runs that extracted them before the trials started
    DIR/runs/<trial_id>/     each trial's run directory (config.yaml, summary.json, ...); with the
                             config's ``storage`` set, the trial's features and model files go to its
                             own folder there (``storage.json``), as for ``asvp-ray run``
    DIR/tune/                Ray Tune's experiment state (``Tuner.restore`` reads it)
    DIR/results.csv          one row per trial: status, searched values, rounds, accuracies
    DIR/best_config.yaml     the best trial's config; ``asvp-ray run`` accepts it unchanged
    DIR/curves.png           proxy test accuracy against labels, one line per trial; stars: final models
    DIR/curves.json          the plotted values (read back from the figure)

``DIR`` may be a bucket (``s3://bucket/prefix``, ``gs://...``): then each trial's run directory is
a run in the bucket (``asvp_ray.loop.bucket``: commit record, lease), the feature cache is a
folder there whose versions are copied into the trials' stores, Ray Tune keeps its experiment
state there (``RunConfig(storage_path=..., storage_filesystem=...)``), and the results are uploaded
once written. Nothing of the study needs a file system shared by the cluster's nodes.

A trial runs a ``Driver`` in its own Ray task, round by round, and reports each round to Tune
(``round``, ``n_labeled``, ``proxy_test_accuracy``, ...; ``final_test_accuracy`` with the last
round when the run trains a final model), with a tiny checkpoint naming the round. ASHA, when
chosen, stops trials on the per-round metric. A restored trial resumes its run directory (the
driver's own resume) and first re-reports any round that was committed but not reported.

Ranking: trials that finished every round first, then by final test accuracy when the runs
train a final model, else by the last round's proxy test accuracy.
"""
from __future__ import annotations

import csv
import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

from asvp_ray.config import Config, dump_config, load_config
from asvp_ray.core.errors import ConfigError, RunDirError
from asvp_ray.core.redact import redact_obj, redact_text
from asvp_ray.tune.resources import head_resources, placement_group_factory, plan_study, resource_variants
from asvp_ray.tune.space import SearchSpace, parse_space, set_key

log = logging.getLogger("asvp_ray.tune")

METRIC = "proxy_test_accuracy"
SCHEDULERS = ("fifo", "asha")
EXPERIMENT = "tune"
LOCK_WAIT_S = 120.0
# The trial actor's own CPU: it trains the proxy and selects between its nested phases, and sits
# idle while its Ray Train workers or extraction actors run (see tune/resources.py).
CPUS_PER_TRIAL = 0.5


@dataclass
class StudyResult:
    """What a study produced.

    Attributes:
        out: the study directory (a folder, or its URI with credentials redacted).
        rows: one dict per trial, best first (the rows of ``results.csv``).
        best: the best row (None when no trial finished a round).
        table: the results as printed text.
        results_csv, best_config, curves_png: the files written (best_config None without a best);
            URIs with credentials redacted for a study in a bucket.
        interrupted: the study stopped before every trial ended (rerun to resume it).
        restored: this call resumed an earlier, interrupted study.
        prefetched: feature-cache keys extracted before the trials (empty when all were cached).
    """

    out: Union[Path, str]
    rows: List[Dict[str, Any]]
    best: Optional[Dict[str, Any]]
    table: str
    results_csv: Union[Path, str]
    best_config: Optional[Union[Path, str]]
    curves_png: Union[Path, str]
    interrupted: bool
    restored: bool
    prefetched: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- places
def _child(out: Union[Path, str], *names: str) -> Union[Path, str]:
    """``names`` under the study: a path, or a URI (options and credentials kept) in a bucket."""
    from asvp_ray.storage.locations import is_uri, join_uri

    return join_uri(str(out), *names) if is_uri(out) else Path(out).joinpath(*names)


def _read_text(loc: Union[Path, str]) -> Optional[str]:
    """A file of the study (local or in a bucket), or None when it is not there."""
    from asvp_ray.storage.locations import is_uri, resolve_uri
    from asvp_ray.loop.bucket import _read

    if is_uri(loc):
        fs, path = resolve_uri(str(loc))
        data = _read(fs, path)
        return data.decode() if data is not None else None
    return Path(loc).read_text() if Path(loc).is_file() else None


def _write_bytes(loc: Union[Path, str], data: bytes) -> None:
    """A file of the study written whole: atomically on a disk, one PUT in a bucket."""
    from asvp_ray.storage.locations import put_bytes, is_uri, resolve_uri
    from asvp_ray.storage.atomic import atomic_write_bytes

    if is_uri(loc):
        fs, path = resolve_uri(str(loc))
        put_bytes(fs, path, data)
    else:
        atomic_write_bytes(Path(loc), data)


def _run_summary(run_dir: Union[Path, str]) -> Dict[str, Any]:
    """A trial run's summary.json ({} when it has none yet): its last commit, for a run in a bucket."""
    from asvp_ray.storage.locations import is_uri
    from asvp_ray.loop.bucket import read_committed

    try:
        if is_uri(run_dir):
            data = read_committed(str(run_dir), "summary.json")
            return json.loads(data) if data else {}
        p = Path(run_dir) / "summary.json"
        return json.loads(p.read_text()) if p.is_file() else {}
    except ValueError:  # being replaced right now (a local file read mid-write by an old writer)
        return {}


# ---------------------------------------------------------------------------------- the trial
def trial_config(base: Dict[str, Any], values: Dict[str, Any], feature_cache: str) -> Config:
    """A trial's config: the base config dict, the trial's searched values, the shared feature cache."""
    raw = dict(base)
    for key, value in values.items():
        raw = set_key(raw, key, value)
    raw["feature_cache"] = feature_cache
    return load_config(raw=raw)


def _wait_for_lock(run_dir: Path, wait_s: float) -> None:
    """Wait until no process holds ``run_dir``'s lock: a trial restored right after an interruption
    may start before the process of its previous attempt has exited."""
    lock = run_dir / ".lock"
    if not lock.is_file():
        return
    deadline = time.monotonic() + wait_s
    while True:
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                return  # the driver raises its own error, naming the holder
        finally:
            os.close(fd)
        time.sleep(0.5)


def _metrics(rec: Dict[str, Any], final: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The numbers of a round record (one level of nested dicts flattened with '/')."""
    out: Dict[str, Any] = {}
    for k, v in rec.items():
        if isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                    out[f"{k}/{kk}"] = vv
    if final and final.get("test_accuracy") is not None:
        out["final_test_accuracy"] = float(final["test_accuracy"])
    return out


def _report(rec: Dict[str, Any], final: Optional[Dict[str, Any]]) -> None:
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="asvp-ckpt-") as d:
        (Path(d) / "round.json").write_text(json.dumps({"round": int(rec["round"])}))
        tune.report(_metrics(rec, final), checkpoint=tune.Checkpoint.from_directory(d))


def _last_reported() -> int:
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return -1
    with ckpt.as_directory() as d:
        p = Path(d) / "round.json"
        return int(json.loads(p.read_text())["round"]) if p.is_file() else -1


def _trial(params: Dict[str, Any], *, base: Dict[str, Any], feature_cache: str, runs: str, cwd: str,
           extract_budget: Optional[Dict[str, float]] = None) -> None:
    """The Tune trainable: one asvp-ray run, reported round by round."""
    from ray import tune

    from asvp_ray.features.extract_plan import BUDGET_ENV
    from asvp_ray.loop.driver import Driver

    if extract_budget:  # size this trial's extraction actor pool to its share of the cluster
        os.environ[BUDGET_ENV] = json.dumps(extract_budget)
    if Path(cwd).is_dir():  # relative paths in the config mean what they meant to the study
        os.chdir(cwd)
    from asvp_ray.storage.locations import is_uri
    from asvp_ray.loop.bucket import wait_for_lease

    cfg = trial_config(base, params, feature_cache)
    run_dir = _child(runs, tune.get_context().get_trial_id())
    reported = _last_reported()
    if is_uri(run_dir):  # the lease of the trial's previous attempt, killed with the study
        wait_for_lease(str(run_dir), LOCK_WAIT_S)
    else:
        _wait_for_lock(Path(run_dir), LOCK_WAIT_S)
    driver = Driver(cfg, str(run_dir))
    try:
        driver.prepare()
        last = len(cfg.budget.schedule) - 1
        pending = [r for r in driver.summary.get("rounds", []) if r["round"] > reported]
        while pending or not getattr(driver, "rounds_done", driver.finished):
            rec = pending.pop(0) if pending else driver.run_round()
            final = None
            if rec["round"] == last and hasattr(driver, "run_final"):
                final = driver.run_final()  # a no-op returning the record when already done
            _report(rec, final)
    finally:
        driver.close()


def _trial_dirname(trial) -> str:
    return str(trial.trial_id)


# ---------------------------------------------------------------------------------- set-up
def _base_config(config: Union[str, Path, Config, Dict[str, Any]], overrides: Sequence[str]) -> Config:
    if isinstance(config, Config):
        return load_config(raw=config.model_dump(mode="json"), overrides=overrides) if overrides else config
    if isinstance(config, dict):
        return load_config(raw=config, overrides=overrides)
    return load_config(str(config), overrides)


def _check_study(out: Union[Path, str], meta: Dict[str, Any]) -> bool:
    """Write ``study.yaml``, or check that an existing one matches. Returns True when it existed."""
    from asvp_ray.loop.resume import config_differences

    shown = redact_text(str(out))
    text = _read_text(_child(out, "study.yaml"))
    if text is not None:
        old = yaml.safe_load(text) or {}
        # study.yaml holds URIs with credentials redacted: compare what was written
        diff = config_differences(redact_obj(old.get("config", {})), redact_obj(meta["config"]))
        if diff:
            raise RunDirError(f"{shown} holds a study of a different config (differs in: {', '.join(diff)}); rerun it "
                              "with the same config and --set, or use a new --out")
        if old.get("space") != meta["space"]:
            raise RunDirError(f"{shown} holds a study of a different search space ({old.get('space')}); rerun it with "
                              "the same --space, or use a new --out")
        return True
    _write_bytes(_child(out, "study.yaml"), yaml.safe_dump(redact_obj(meta), sort_keys=False).encode())
    return False


def _prefetch(base: Dict[str, Any], space: SearchSpace, out: Union[Path, str], cache: Union[Path, str]) -> List[str]:
    """Extract features v0 once per backbone + data combination, before any trial starts, so that
    trials find them in the cache instead of racing to extract the same pool."""
    from asvp_ray.loop.driver import Driver

    combos, continuous = space.feature_combinations()
    if continuous:
        log.warning("searched keys %s change the features and are continuous: each trial extracts its own "
                    "features (search them with grid or choice to extract once per value)", continuous)
        return []
    done = []
    for i, combo in enumerate(combos):
        raw = space.trial_raw(base, combo)
        raw["feature_cache"] = str(cache)
        raw["storage"] = None  # scratch runs that only fill the local cache: trials copy v0 to their storage
        raw = set_key(raw, "budget.schedule", [1])  # features only; no round is run
        cfg = load_config(raw=raw)
        d = Driver(cfg, str(_child(out, "prefetch", f"features-{i}")))
        try:
            d.prepare()
            done.append(redact_text(str(d.rd.store.path(0))))
        finally:
            d.close()
    return done


def _max_rounds(base: Config, space: SearchSpace) -> int:
    lengths = [len(base.budget.schedule)]
    for p in space.params:
        if p.key == "budget.schedule" and p.discrete:
            lengths += [len(v) for v in p.args if isinstance(v, list)]
        if p.key == "budget" and p.discrete:
            lengths += [len(v.get("schedule", [])) for v in p.args if isinstance(v, dict)]
    sched = space.constants.get("budget.schedule")
    if isinstance(sched, list):
        lengths = [len(sched)] + lengths[1:]
    return max(lengths)


# ---------------------------------------------------------------------------------- the study
def check_settings(*, num_samples: int = 1, scheduler: str = "fifo", grace_period: int = 1,
                   max_concurrent: Optional[int] = None, cpus_per_trial: float = CPUS_PER_TRIAL,
                   gpus_per_trial: float = 0.0) -> None:
    """Check a study's settings (``run_study``'s keyword arguments) before anything starts.

    Raises:
        ConfigError: naming the setting and the fix.
    """
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if num_samples < 1:
        raise ConfigError(f"num_samples must be at least 1 (got {num_samples})")
    if grace_period < 1:
        raise ConfigError(f"grace_period must be at least 1 round (got {grace_period})")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"max_concurrent must be at least 1 (got {max_concurrent})")
    if cpus_per_trial < 0 or gpus_per_trial < 0 or (cpus_per_trial == 0 and gpus_per_trial == 0):
        raise ConfigError("a trial must reserve some resource: set cpus_per_trial > 0 (e.g. 0.5 or 1)")


def run_study(config: Union[str, Path, Config, Dict[str, Any]], space: Union[str, Path, Dict[str, Any], SearchSpace],
              out: Union[str, Path], *, overrides: Sequence[str] = (), num_samples: int = 1,
              scheduler: str = "fifo", grace_period: int = 1, reduction_factor: float = 2.0,
              max_concurrent: Optional[int] = None, cpus_per_trial: float = CPUS_PER_TRIAL,
              gpus_per_trial: float = 0.0, verbose: int = 0, callbacks: Optional[list] = None) -> StudyResult:
    """Run (or resume) a study, then write its results table, best config and curves.

    Args:
        config: the base config (a YAML file, a ``Config`` or its dict).
        space: the search space (a YAML file, its mapping, or a parsed ``SearchSpace``).
        out: the study directory, a folder or a bucket (``s3://bucket/prefix``, ``gs://...``); when
            it already holds a study, that study is resumed (``Tuner.restore``) and the config and
            space must be the same.
        overrides: ``key=value`` overrides of the base config (as ``--set``).
        num_samples: samples of the space (each runs every grid combination).
        scheduler: ``fifo`` (every trial runs every round) or ``asha`` (early stopping on the
            per-round proxy test accuracy).
        grace_period: ASHA: rounds every trial runs before it can be stopped.
        reduction_factor: ASHA: keep 1 in this many trials at each rung.
        max_concurrent: trials running at once (default, and at most: as many as fit in the cluster
            together at their peak, see ``asvp_ray.tune.resources``).
        cpus_per_trial, gpus_per_trial: the Ray resources the trial actor itself reserves; its Ray
            Train workers and extraction actors come on top, and the study admits only as many
            trials at once as fit with them.
        verbose: Tune's console output (0 silent, 1 progress, 2 detailed).
        callbacks: Tune callbacks (kept for a restore, as Tune stores them).

    Raises:
        ConfigError: a bad config, space or setting; one trial needs more than the cluster has
            (before anything starts).
        RunDirError: ``out`` holds a study of another config or space.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    check_settings(num_samples=num_samples, scheduler=scheduler, grace_period=grace_period,
                   max_concurrent=max_concurrent, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial)
    from asvp_ray.storage.locations import check_storage, is_uri, resolve_uri, with_options_of

    remote = is_uri(out)
    if remote:
        out = str(check_storage(str(out), "--out")).rstrip("/")  # the form of the URI, before anything runs
    else:
        out = Path(out).resolve()
    base_cfg = _base_config(config, overrides)
    if base_cfg.data.test is None:
        raise ConfigError(f"a study ranks trials by {METRIC}, which needs a test set; set data.test in the config")
    from asvp_ray.storage.locations import check_storage_reachable

    check_storage_reachable(base_cfg.storage)  # every trial's run would fail on it: say so once, first
    base = base_cfg.model_dump(mode="json")
    base.pop("feature_cache", None)
    sp = space if isinstance(space, SearchSpace) else parse_space(space, base=base)
    base_with_constants = sp.trial_raw(base, {})
    meta = {"config": base, "space": sp.to_yaml_dict()}
    if _read_text(_child(out, "study.yaml")) is not None:
        _check_study(out, meta)  # another study's directory: refused before Ray is asked anything
    # What one trial needs, before anything is written: a study that cannot fit stops here.
    head = head_resources(cpus_per_trial, gpus_per_trial)
    variants = [load_config(raw=v) for v in resource_variants(base_with_constants, sp)]
    plan = plan_study(variants, sp.grid_size * num_samples, head=head, prefetched=not sp.feature_combinations()[1],
                      max_concurrent=max_concurrent)
    log.info("resources: %s", plan.describe())
    if max_concurrent is not None and plan.max_concurrent < min(max_concurrent, sp.grid_size * num_samples):
        log.warning("max_concurrent=%d lowered to %d: more trials at once would wait on each other's Ray Train "
                    "workers or extraction actors", max_concurrent, plan.max_concurrent)
    cache = _child(out, "feature_cache")
    runs = _child(out, "runs")
    if not remote:
        for d in (out, cache, runs):
            d.mkdir(parents=True, exist_ok=True)
    existed = _check_study(out, meta)

    # Ray Tune's experiment state: in the study's folder, or in its bucket through the same
    # pyarrow filesystem (the URI's options and credentials) that the runs use.
    # Tune pickles its filesystem into its experiment state, and a pyarrow filesystem made from a
    # URI with credentials holds them: Tune's gets the URI without them (the environment's or the
    # node's credentials then reach the bucket, as for Ray itself); the trials' runs keep the URI's.
    fs, root = resolve_uri(with_options_of(redact_text(out), None)) if remote else (None, str(out))
    if remote and with_options_of(redact_text(out), None) != out:
        log.info("Ray Tune's experiment state in %s is reached with the environment's credentials (Tune writes its "
                 "filesystem object into its state, so the credentials in the URI are not given to it)",
                 redact_text(str(_child(out, EXPERIMENT))))
    exp_path = f"{root}/{EXPERIMENT}"
    restoring = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if existed and not restoring:
        log.info("%s holds a study that has no Tune state yet; starting it", redact_text(str(out)))
    prefetched = _prefetch(base_with_constants, sp, out, cache)

    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base_with_constants, feature_cache=str(cache), runs=str(runs),
                             cwd=os.getcwd(), extract_budget=plan.extract_budget),
        placement_group_factory(head),
    )
    if restoring:
        log.info("resuming the study in %s", redact_text(str(_child(out, EXPERIMENT))))
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        sched = None
        if scheduler == "asha":
            sched = ASHAScheduler(time_attr="training_iteration", max_t=_max_rounds(base_cfg, sp),
                                  grace_period=grace_period, reduction_factor=reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=sp.param_space(),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", scheduler=sched, num_samples=num_samples,
                trial_dirname_creator=_trial_dirname,
                # The generator limits concurrency itself (Tune ignores max_concurrent_trials
                # next to a SearchAlgorithm); seeded, so a study draws the same trials each time.
                search_alg=BasicVariantGenerator(random_state=base_cfg.seed, max_concurrent=plan.max_concurrent),
            ),
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=root, storage_filesystem=fs, verbose=verbose, callbacks=callbacks,
                # Checkpoints are a few bytes naming the round; keeping all of them avoids the forced
                # experiment snapshot Tune takes whenever a trial outgrows num_to_keep.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    grid = tuner.fit()
    return write_results(out, grid, sp, base_with_constants, restored=restoring, prefetched=prefetched)


def _saved_statuses(exp_path: str, fs=None) -> Dict[str, str]:
    """Trial statuses in Tune's saved experiment state. After an interruption (Ctrl+C), the
    ResultGrid that ``fit`` returns shows every trial TERMINATED; the state saved for a restore
    keeps the unfinished ones RUNNING, PENDING or PAUSED."""
    from ray.tune import ExperimentAnalysis

    if fs is None and not Path(exp_path).is_dir():
        return {}
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # trials that never started have no results yet: expected
    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(exp_path, storage_filesystem=fs).trials}
    except Exception as e:  # noqa: BLE001 - no saved state: the statuses come from the run directories
        log.warning("could not read Tune's saved state in %s (%s); trial statuses come from their runs",
                    redact_text(exp_path), e)
        return {}
    finally:
        quiet.setLevel(level)


# ---------------------------------------------------------------------------------- results
def _trial_row(out: Union[Path, str], res, sp: SearchSpace, saved_status: Optional[str]) -> Dict[str, Any]:
    trial_id = Path(res.path).name
    run_dir = _child(out, "runs", trial_id)
    summary = _run_summary(run_dir)
    rounds = summary.get("rounds", [])
    schedule = summary.get("schedule") or []
    accs = [r.get(METRIC) for r in rounds if r.get(METRIC) is not None]
    final = (summary.get("final") or {}).get("test_accuracy")
    if res.error is not None or saved_status == "ERROR":
        status = "error"
    elif rounds and summary.get("status") == "finished":
        status = "finished"
    elif rounds and len(rounds) == len(schedule) and not summary.get("status"):
        status = "finished"
    else:  # ended by the scheduler (ASHA), or not ended yet (an interrupted study)
        status = "stopped" if saved_status in ("TERMINATED", None) else "unfinished"
    row: Dict[str, Any] = {"trial": trial_id, "status": status}
    for key in sp.keys:
        row[key] = res.config.get(key) if res.config else None
    row.update({
        "rounds": len(rounds),
        "n_labeled": rounds[-1]["n_labeled"] if rounds else 0,
        METRIC: accs[-1] if accs else None,
        f"{METRIC}_mean": round(sum(accs) / len(accs), 6) if accs else None,
        "final_test_accuracy": final,
        **_cost_columns(summary),
        "run_dir": redact_text(str(run_dir)),
        "_curve": [(r["n_labeled"], r.get(METRIC)) for r in rounds],
        "_error": str(res.error).splitlines()[0][:300] if res.error is not None else "",
    })
    return row


def _cost_columns(summary: Dict[str, Any]) -> Dict[str, Any]:
    """``sampling_seconds`` (every round's work plus the feature versions the trial used, cached
    or not) and ``spent_seconds`` (what the trial's process ran), as in ``asvp-ray report``."""
    from asvp_ray.loop.ledger import sampling_seconds
    from asvp_ray.report import SAMPLING_PHASES_EXCLUDED

    if not (summary.get("cost") or {}).get("compute_seconds"):
        return {"sampling_seconds": None, "spent_seconds": None}
    return {k: round(v, 2) for k, v in sampling_seconds(summary["cost"], SAMPLING_PHASES_EXCLUDED).items()}


def _score(row: Dict[str, Any], use_final: bool) -> float:
    v = row["final_test_accuracy"] if use_final else row[METRIC]
    return float(v) if v is not None else -math.inf


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    if isinstance(v, list):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def format_table(rows: List[Dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as a fixed-width text table."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _plot(rows: List[Dict[str, Any]], best: Optional[Dict[str, Any]], path: Path, keys: Sequence[str]) -> None:
    """Proxy test accuracy per round (lines) and, for trials that trained one, the final model's test
    accuracy (stars, at the last round's labels); ``path`` with ``.json`` holds the plotted values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from asvp_ray.report import plain_axes, save_figure

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, row in enumerate(rows):
        pts = [(x, y) for x, y in row["_curve"] if y is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        is_best = best is not None and row["trial"] == best["trial"]
        name = row["trial"]
        if i < 12 or is_best:
            name += ": " + ", ".join(f"{k.split('.')[-1]}={_fmt(row[k])}" for k in keys)
        line, = ax.plot(xs, ys, marker="o", lw=2.5 if is_best else 1.0, alpha=1.0 if is_best else 0.6,
                        ls="-" if row["status"] == "finished" else "--", label=f"{name} (proxy)",
                        zorder=3 if is_best else 2)
        if row["final_test_accuracy"] is not None:
            ax.scatter([xs[-1]], [row["final_test_accuracy"]], marker="*", s=120, zorder=4, color=line.get_color(),
                       label=f"{row['trial']} final model")
    ax.set_xlabel("labelled images")
    ax.set_ylabel("test accuracy (lines: proxy per round; stars: final model)")
    ax.set_title(f"{len(rows)} trials (dashed: stopped early or unfinished)")
    ax.grid(alpha=0.3)
    plain_axes(ax)
    if any(r["_curve"] for r in rows):
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def write_results(out: Union[Path, str], grid, sp: SearchSpace, base: Dict[str, Any], *, restored: bool = False,
                  prefetched: Optional[List[str]] = None) -> StudyResult:
    """Write ``results.csv``, ``best_config.yaml`` and ``curves.png`` from a Tune ``ResultGrid``
    (for a study in a bucket: written to a local folder, then each uploaded whole)."""
    from asvp_ray.storage.locations import is_uri, resolve_uri
    from asvp_ray.storage.atomic import atomic_write_bytes

    remote = is_uri(out)
    if remote:
        fs, root = resolve_uri(str(out))
        saved = _saved_statuses(f"{root}/{EXPERIMENT}", fs)
        local = Path(tempfile.mkdtemp(prefix="asvp-study-"))
    else:
        saved = _saved_statuses(str(Path(out) / EXPERIMENT))
        local = Path(out)
    shown = redact_text(str(out))
    interrupted = any(s not in ("TERMINATED", "ERROR") for s in saved.values())
    rows = [_trial_row(out, res, sp, saved.get(Path(res.path).name)) for res in grid]
    use_final = any(r["final_test_accuracy"] is not None for r in rows if r["status"] == "finished")
    rows.sort(key=lambda r: (r["status"] != "finished", -_score(r, use_final), r["trial"]))
    best = next((r for r in rows if r["rounds"] > 0 and _score(r, use_final) > -math.inf), None)
    columns = ["trial", "status", *sp.keys, "rounds", "n_labeled", METRIC, f"{METRIC}_mean"]
    if any(r["final_test_accuracy"] is not None for r in rows):
        columns.append("final_test_accuracy")
    columns += ["sampling_seconds", "spent_seconds"]
    table = format_table(rows, columns)

    csv_path = local / "results.csv"
    fields = columns + ["run_dir", "error"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(r[k]) if isinstance(r.get(k), list) else r.get(k))
                        for k in columns + ["run_dir"]} | {"error": redact_text(r["_error"])})

    best_path = None
    if best is not None:
        cfg = trial_config(base, {k: best[k] for k in sp.keys}, str(_child(out, "feature_cache")))
        by = "final test accuracy" if use_final else "last-round proxy test accuracy"
        header = (f"# Best trial of the study in {shown}: {best['trial']} ({best['status']}), ranked by {by}\n"
                  f"# ({_fmt(best['final_test_accuracy'] if use_final else best[METRIC])} after {best['rounds']} rounds, "
                  f"{best['n_labeled']} labels). Searched values: "
                  + ", ".join(f"{k}={_fmt(best[k])}" for k in sp.keys) + ".\n"
                  f"# Run it with: asvp-ray run {'best_config.yaml' if remote else local / 'best_config.yaml'} "
                  "--out runs/best\n")
        best_path = local / "best_config.yaml"
        atomic_write_bytes(best_path, redact_text(header + dump_config(cfg)).encode())

    png = local / "curves.png"
    _plot(rows, best, png, sp.keys)
    if remote:  # each file uploaded whole; the local copies go
        for f in sorted(local.iterdir()):
            _write_bytes(_child(out, f.name), f.read_bytes())
        shutil.rmtree(local, ignore_errors=True)
        csv_path, png = _child(shown, "results.csv"), _child(shown, "curves.png")
        best_path = _child(shown, "best_config.yaml") if best_path is not None else None
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} | {"error": r["_error"]} for r in rows]
    return StudyResult(out=shown if remote else out, rows=clean, best=next((c for c in clean if best and c["trial"] == best["trial"]), None),
                       table=table, results_csv=csv_path, best_config=best_path, curves_png=png,
                       interrupted=interrupted, restored=restored, prefetched=list(prefetched or []))
