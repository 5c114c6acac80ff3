"""The Python API: what the CLI does, as functions that return objects.

    import asvp_ray

    res = asvp_ray.run("examples/smoke.yaml", "runs/smoke", overrides=["budget.schedule=[40,40]"])
    print(res.rounds[-1]["proxy_test_accuracy"], len(res.labeled["id"]), res.final_model)
    asvp_ray.report_runs(["runs/smoke", "runs/other"], "report")

    asvp_ray.init("examples/smoke.yaml", "runs/hitl")   # a human-labelled run: features v0
    sel = asvp_ray.select("runs/hitl")            # round 0's ids, in runs/hitl/queries/round-0.csv
    asvp_ray.label("runs/hitl", "labels.csv")     # their labels; select again, ..., then
    asvp_ray.final("runs/hitl")                   # the final model
    asvp_ray.status("runs/hitl")                  # per round: selected, labelled, pending

``config`` is a YAML path, a mapping (the YAML's content) or a :class:`~asvp_ray.config.Config`;
``out`` a folder or a bucket URI (``s3://``, ``gs://``). Errors are the package's own
(:mod:`asvp_ray.core.errors`: ``ConfigError``, ``RunDirError``, ``BadInputError``), never Ray's wrappers.
Every ``asvp-ray`` command is one of these functions; the CLI only parses arguments and prints.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from asvp_ray.config import Config, load_config
from asvp_ray.core.errors import ConfigError, RunDirError

ConfigLike = Union[str, os.PathLike, Mapping[str, Any], Config]
#: ``progress(event, data)`` of :func:`run`: ``"resuming"`` / ``"finished"`` (the status dict;
#: ``"finished"`` with the last round's record as ``last_round``),
#: ``"round"`` (the round's record), ``"final"`` (the final model's record)
Progress = Callable[[str, Dict[str, Any]], None]


@dataclass
class RunResult:
    """What a run holds, read back from its run directory.

    Attributes:
        out: the run directory (a bucket URI with credentials redacted).
        summary: ``summary.json``: per-round records, feature versions, cost, final model.
        labeled: the labelled set, arrays ``id``, ``label``, ``round``.
        finished: every round and the final model (when configured) are done.
        already_finished: :func:`run` found the run finished and did nothing.
    """

    out: str
    summary: Dict[str, Any]
    labeled: Dict[str, np.ndarray] = field(repr=False)
    finished: bool
    already_finished: bool = False

    @property
    def rounds(self) -> List[Dict[str, Any]]:
        """One record per round (``n_labeled``, ``selected_by``, ``proxy_test_accuracy``, ...)."""
        return list(self.summary.get("rounds", []))

    @property
    def final_model(self) -> Optional[str]:
        """The final model file (its URI with credentials redacted in a bucket), or None."""
        return (self.summary.get("final") or {}).get("checkpoint")

    @property
    def final_test_accuracy(self) -> Optional[float]:
        return (self.summary.get("final") or {}).get("test_accuracy")


class NotARunError(RunDirError):
    """``out`` holds no run (no ``config.yaml``): :func:`select`, :func:`final` and :func:`label`
    need one that :func:`init` (or :func:`run`) made. The CLI shows it as a usage error."""


@dataclass
class Extracted:
    """A feature version written by :func:`extract`.

    Attributes:
        version: ``k`` of ``OUT/features/v{k}``.
        path: its folder (on a storage: the URI, credentials redacted).
        meta: its ``meta.json``: ``rows``, ``dim``, ``backbone``, ``weights``, ``seconds``, ``skipped``, ...
    """

    version: int
    path: str
    meta: Dict[str, Any]


@dataclass
class Selection:
    """What :func:`select` did: the round it closed, and the round whose queries it wrote.

    Attributes:
        out: the run directory (a bucket URI with credentials redacted).
        round: the round now open for labellers (None when every round is done).
        ids: that round's selected pool ids (int64), in the order of ``queries/round-K.csv``.
        files: ``[round-K.csv, round-K.labelstudio.json, labelstudio-config.xml]`` on this machine
            (for a run in a bucket, copies in ``./<run name>-queries/``); empty when done.
        selected_by: the strategy that chose them (``random`` in round 0).
        closed: the record of the round this call closed (as in ``summary.json``), or None.
        done: every round is closed; :func:`final` trains the final model.
        n_labeled: labels bought so far.
        pushed: the Label Studio import (``project_id``, ``imported``, ``skipped``,
            ``storage_problems``) when ``labelstudio`` was given.
        pushed_again: the round was already open with pending ids, and only its tasks were pushed.
    """

    out: str
    round: Optional[int]
    ids: np.ndarray = field(repr=False)
    files: List[str]
    selected_by: Optional[str] = None
    closed: Optional[Dict[str, Any]] = None
    done: bool = False
    n_labeled: int = 0
    pushed: Optional[Dict[str, Any]] = None
    pushed_again: bool = False


def as_config(config: ConfigLike, overrides: Sequence[str] = ()) -> Config:
    """A :class:`Config` from a YAML path, a mapping or a Config, with ``key=value`` overrides."""
    if isinstance(config, Config):
        return load_config(raw=config.model_dump(mode="json"), overrides=overrides) if overrides else config
    if isinstance(config, Mapping):
        return load_config(raw=dict(config), overrides=overrides)
    return load_config(str(config), list(overrides))


def _location(out: Union[str, os.PathLike]) -> str:
    from asvp_ray.storage.locations import is_uri

    return str(out) if is_uri(out) else str(Path(out).resolve())


def result(out: Union[str, os.PathLike]) -> RunResult:
    """The run in ``out`` as it is now (its last commit, for a run in a bucket).

    Raises:
        RunDirError: ``out`` holds no run.
    """
    import json

    from asvp_ray.loop.rundir import RunDir

    rd = RunDir(_location(out))
    if not rd.summary_path.is_file():
        raise RunDirError(f"{rd.location} holds no asvp-ray run (no summary.json); start one with asvp_ray.run")
    summary = json.loads(rd.summary_path.read_text())
    return RunResult(out=rd.location, summary=summary, labeled=rd.read_labeled(),
                     finished=summary.get("status") == "finished")


def run(config: ConfigLike, out: Union[str, os.PathLike], *, overrides: Sequence[str] = (),
        address: Optional[str] = None, force: bool = False, progress: Optional[Progress] = None) -> RunResult:
    """Run a whole experiment, or resume the unfinished run in ``out``, on Ray (a local instance,
    or the cluster at ``address`` / ``$RAY_ADDRESS``), as ``asvp-ray run`` does.

    Args:
        config: the run's config (see :func:`as_config`); resuming needs the same one.
        out: the run directory: a folder or a bucket URI.
        overrides: ``key=value`` settings, as ``--set``.
        force: a run in a bucket: take the lease a (surely gone) process still holds.
        progress: called with each event (see :data:`Progress`).

    Returns:
        the finished run (:func:`result`).
    """
    import ray

    from asvp_ray.loop.actor import driver_actor
    from asvp_ray.runtime.ray_utils import asvp_errors_unwrapped, init_ray

    say = progress or (lambda event, data: None)
    with asvp_errors_unwrapped():  # an asvp-ray error raised inside Ray, as itself
        cfg = as_config(config, overrides)
        init_ray(address)
        if force:
            os.environ["ASVP_LEASE_FORCE"] = "1"  # forwarded to the driver actor with the ASVP_* variables
        actor = driver_actor(cfg, _location(out))
        try:
            status = ray.get(actor.prepare.remote())
            if status["finished"]:
                rounds = ray.get(actor.get_summary.remote())["rounds"]
                say("finished", {**status, "last_round": rounds[-1] if rounds else {}})
            else:
                if status["next_round"] > 0:
                    say("resuming", status)
                for _ in range(status["next_round"], status["rounds"]):
                    say("round", ray.get(actor.run_round.remote()))
                final = ray.get(actor.run_final.remote())
                if final:
                    say("final", final)
        except BaseException as e:
            # the failed call has returned, so closing races no work of the actor's; an interrupt
            # (Ctrl+C) may leave a round in flight: the actor is killed as a crash would (the run's
            # commits make that safe), never closed under it
            if isinstance(e, Exception):
                try:
                    ray.get(actor.close.remote())
                except Exception:  # noqa: BLE001 - the original error is the one to raise
                    pass
            ray.kill(actor)
            raise
        ray.get(actor.close.remote())  # pushes a bucket run's last log lines, releases the lock or lease
        ray.kill(actor)
    res = result(out)
    res.already_finished = bool(status["finished"])
    return res


def resume(out: Union[str, os.PathLike], *, address: Optional[str] = None, force: bool = False,
           progress: Optional[Progress] = None) -> RunResult:
    """Resume the run in ``out`` with the config it was started with (its ``config.yaml``)."""
    from asvp_ray.loop.rundir import RunDir

    rd = RunDir(_location(out))
    if not rd.config_path.is_file():
        raise RunDirError(f"{rd.location} holds no asvp-ray run (no config.yaml); start one with asvp_ray.run")
    return run(str(rd.config_path), out, address=address, force=force, progress=progress)


def _shown(out: Union[str, os.PathLike]) -> str:
    """A run location as messages show it: as given, credentials in a URI redacted."""
    from asvp_ray.core.redact import redact_uri

    return redact_uri(str(out))


@contextmanager
def _log_file(path: Path) -> Iterator[None]:
    """Write the log records (those the loggers pass; ``asvp_ray``'s from INFO) to ``path`` too
    while the block runs."""
    import logging

    from asvp_ray.core.redact import RedactingFormatter

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root, pkg = logging.getLogger(), logging.getLogger("asvp_ray")
    level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        pkg.setLevel(level)


def extract(config: ConfigLike, out: Union[str, os.PathLike], *, overrides: Sequence[str] = (),
            version: Optional[int] = None, address: Optional[str] = None) -> Extracted:
    """Extract the pool's (and test set's) features with the config's backbone into the run's
    versioned feature store (``asvp-ray extract``), on Ray. The log goes to ``OUT/extract.log`` too.

    Args:
        config: see :func:`as_config`.
        out: the run directory; the version goes to ``OUT/features/v{k}/`` (with ``storage`` set,
            to the run's folder there).
        version: ``k`` (default: the next free one).

    Returns:
        the version written and its ``meta.json``.
    """
    from asvp_ray.core.redact import redact_uri
    from asvp_ray.data.sources import build_source
    from asvp_ray.features.backbones import BackboneSpec
    from asvp_ray.features.extract import extract_to_store
    from asvp_ray.loop.rundir import RunDir
    from asvp_ray.runtime.ray_utils import asvp_errors_unwrapped, init_ray
    from asvp_ray.storage.locations import check_storage_reachable

    with asvp_errors_unwrapped():  # an asvp-ray error raised inside Ray, as itself
        cfg = as_config(config, overrides)
        rd = RunDir(out)
        with _log_file(rd.path / "extract.log"):
            init_ray(address)  # before the sources: indexed kinds index their files in Ray tasks
            pool = build_source(cfg.data.pool, cfg.data.classes, index_dir=rd.path / "index")
            test = build_source(cfg.data.test, cfg.data.classes, index_dir=rd.path / "index") if cfg.data.test else None
            check_storage_reachable(cfg.storage)
            store = rd.open_store(cfg.storage)
            v = version if version is not None else (0 if store.latest() is None else store.latest() + 1)
            meta = extract_to_store(store, v, pool, BackboneSpec(**cfg.backbone.model_dump()), cfg.extract,
                                    test=test, skip_unreadable=cfg.data.skip_unreadable)
    return Extracted(version=v, path=redact_uri(store.path(v)), meta=meta)


@contextmanager
def _driver(out: Union[str, os.PathLike], config: Optional[ConfigLike] = None, overrides: Sequence[str] = (),
            address: Optional[str] = None, need_ray: bool = True):
    """The run's :class:`~asvp_ray.loop.driver.Driver` in this process (holding the run's lock or
    lease until the block ends), with ``config`` or else the run's own ``config.yaml``."""
    from asvp_ray.loop.driver import Driver
    from asvp_ray.loop.rundir import RunDir
    from asvp_ray.runtime.ray_utils import asvp_errors_unwrapped, init_ray

    with asvp_errors_unwrapped():  # an asvp-ray error raised inside Ray, as itself
        if config is None:
            cfg_path = RunDir(str(out)).config_path
            if not cfg_path.is_file():
                raise NotARunError(f"{_shown(out)} has no config.yaml; create the run with "
                                   f"`asvp-ray init CONFIG --out {_shown(out)}`")
            cfg = load_config(str(cfg_path), list(overrides))
        else:
            cfg = as_config(config, overrides)
        if need_ray or cfg.method != "svpp":  # svpp selection is proxy-only: no cluster needed
            init_ray(address)
        d = Driver(cfg, str(out))
        try:
            yield d
        finally:
            d.close()


def init(config: ConfigLike, out: Union[str, os.PathLike], *, overrides: Sequence[str] = (),
         address: Optional[str] = None) -> Dict[str, Any]:
    """Create a human-labelled run (``asvp-ray init``): the config with ``oracle: human``, its
    features v0 extracted; then :func:`select` and :func:`label` round by round.

    Returns:
        the run's status: ``feature_version``, ``next_round``, ``rounds``, ``n_labeled``, ``path``, ...
    """
    with _driver(out, config, [*overrides, "oracle=human"], address) as d:
        return d.prepare()


def _queries_here(rd) -> Path:
    """Where the labellers' files of ``rd`` are on this machine: DIR/queries, or for a run in a
    bucket a copy in ./<run name>-queries/ (its paths rewritten to that folder), since the run's
    own folder here is a private cache."""
    import shutil

    q = rd.path / "queries"
    if rd.bucket is None or not q.is_dir():
        return q
    dest = Path.cwd() / f"{rd.name}-queries"
    shutil.copytree(q, dest, dirs_exist_ok=True)
    for f in list(dest.glob("*.csv")) + list(dest.glob("*.json")):
        text = f.read_text()
        if str(q) in text:
            f.write_text(text.replace(str(q), str(dest)))
    return dest


def _push(qdir: Path, files: Sequence[Union[str, Path]], url: str, project: str) -> Dict[str, Any]:
    """Import a round's tasks into the Label Studio project (made or updated), with a Local Files
    storage for the folder its images are in."""
    import json

    from asvp_ray.loop.labelstudio import push_round

    tasks = json.loads(Path(files[1]).read_text())
    local = [t["data"]["path"] for t in tasks if "://" not in t["data"]["path"]]
    qdir = os.path.abspath(qdir)
    if local and all(p.startswith(qdir + os.sep) for p in local):
        folders = [qdir]
    else:
        folders = [os.path.commonpath([os.path.dirname(p) for p in local])] if local else []
    return push_round(url, project, [Path(f) for f in files], folders)


def _check_labelstudio(labelstudio: Optional[str], project: Optional[str]) -> None:
    if bool(labelstudio) != bool(project):
        raise ConfigError("a Label Studio server and its project go together (labelstudio=URL, project=NAME)")


def select(out: Union[str, os.PathLike], *, close: bool = False, labelstudio: Optional[str] = None,
           project: Optional[str] = None, address: Optional[str] = None,
           progress: Optional[Progress] = None) -> Selection:
    """Close the open round (train the proxy on all its labels) and open the next one for
    labellers (``asvp-ray select``): its ids go to ``queries/round-K.csv`` (id, path),
    ``round-K.labelstudio.json`` (Label Studio tasks) and ``labelstudio-config.xml``.

    Args:
        out: a run made by :func:`init`.
        close: close the open round although some of its ids are unlabelled.
        labelstudio, project: a Label Studio server (its token in ``$LABEL_STUDIO_API_KEY``) and
            project title: the round's tasks are imported there. While a round is open with
            pending ids, only its tasks are pushed again (those already there are skipped).
        progress: called with ``"pushing"`` (``round``, ``pending``: the open round pushed again),
            ``"closed"`` (the closed round's record), ``"done"`` (``n_labeled``), ``"opened"``
            (``round``, ``n``, ``selected_by``, ``files``), ``"pushed"`` (the Label Studio import).

    Raises:
        NotARunError: ``out`` holds no run.
        RunDirError: the open round still has pending ids (and ``close`` is False).
    """
    from asvp_ray.loop.human import pending_ids
    from asvp_ray.loop.rundir import RunDir

    _check_labelstudio(labelstudio, project)
    say = progress or (lambda event, data: None)
    rd = RunDir(str(out))
    state = rd.read_state() if rd.state_path.is_file() else None
    opened = (state or {}).get("open_round")
    if labelstudio and not close and opened and len(pending_ids(rd, state)):
        r = opened["round"]  # (re)push the open round: tasks already there are skipped
        say("pushing", {"round": r, "pending": int(len(pending_ids(rd, state)))})
        q = _queries_here(rd)
        files = [q / f"round-{r}.csv", q / f"round-{r}.labelstudio.json", q / "labelstudio-config.xml"]
        pushed = _push(q, files, labelstudio, project)
        say("pushed", pushed)
        return Selection(out=rd.location, round=r, ids=np.asarray(opened["ids"], dtype=np.int64),
                         files=[str(f) for f in files], selected_by=opened.get("selected_by"),
                         n_labeled=int(len(rd.read_labeled()["id"])), pushed=pushed, pushed_again=True)
    with _driver(out, address=address, need_ray=False) as d:
        d.prepare()
        res = d.human_select(close=close)
        qdir = _queries_here(d.rd)
        if d.rd.bucket is not None and res.get("opened"):
            res["opened"]["files"] = [qdir / Path(f).relative_to(d.rd.path / "queries") for f in res["opened"]["files"]]
        n_labeled = d.status()["n_labeled"]
        ids = np.asarray(d.open_round["ids"] if res["opened"] else [], dtype=np.int64)
        location = d.rd.location
    if res["closed"]:
        say("closed", res["closed"])
    o = res["opened"]
    sel = Selection(out=location, round=o["round"] if o else None, ids=ids,
                    files=[str(f) for f in o["files"]] if o else [], selected_by=o["selected_by"] if o else None,
                    closed=res["closed"], done=bool(res["done"]), n_labeled=n_labeled)
    if res["done"]:
        say("done", {"n_labeled": n_labeled})
        return sel
    say("opened", o)
    if labelstudio:
        sel.pushed = _push(qdir, o["files"], labelstudio, project)
        say("pushed", sel.pushed)
    return sel


def label(out: Union[str, os.PathLike], file: Optional[Union[str, os.PathLike]] = None, *,
          labelstudio: Optional[str] = None, project: Optional[str] = None, agreement: Optional[str] = None,
          wait_s: float = 120.0, force: bool = False, progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Import labels into a human-labelled run (``asvp-ray label``), all validated before
    anything changes. Waits up to ``wait_s`` for another process writing the run.

    Args:
        file: a Label Studio export (JSON, JSON_MIN, CSV, TSV) or a CSV/Parquet file of ``id,label``.
        labelstudio, project: instead of ``file``, pull the project's annotations from that Label
            Studio server (a JSON export, kept in ``OUT/queries/``).
        agreement: annotations of one image that disagree: ``error``, ``majority`` or ``last``
            (default: the run's ``label.agreement``).
        force: a run in a bucket: take the lease a (surely gone) process still holds.
        progress: called with ``"pulled"`` (``file``, ``project``) once the export is here.

    Returns:
        the import's record: ``imported``, ``already_stored``, ``round``, ``pending``, ``format``,
        ``file`` (the file read), ...

    Raises:
        NotARunError: ``out`` holds no run.
        BadInputError: the file is not a label file of this run (nothing was imported).
    """
    from datetime import datetime, timezone

    from asvp_ray.loop.human import import_labels
    from asvp_ray.loop.rundir import RunDir

    _check_labelstudio(labelstudio, project)
    if (file is None) == (labelstudio is None):
        raise ConfigError("give either a label file or a Label Studio server (labelstudio=URL, project=NAME)")
    if agreement is not None and agreement not in ("error", "majority", "last"):
        raise ConfigError(f"agreement {agreement!r} is not one of error, majority, last")
    rd = RunDir(str(out))
    if not rd.config_path.is_file():
        raise NotARunError(f"{_shown(out)} is not a run directory (no config.yaml)")
    cfg = load_config(str(rd.config_path))
    # labellers importing at once queue behind each other (the lock, or a bucket run's lease)
    rd.lock(force=force, wait_s=wait_s)
    try:
        if labelstudio:
            from asvp_ray.loop.labelstudio import pull_export

            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            file = pull_export(labelstudio, project, rd.path / "queries" / f"labelstudio-export-{stamp}.json")
            (progress or (lambda event, data: None))("pulled", {"file": str(file), "project": project})
        classes = cfg.data.classes or _source_classes(cfg, rd.path / "index")
        res = import_labels(rd, Path(file), classes, agreement=agreement or cfg.label.agreement)
    finally:
        rd.unlock()
    return dict(res, file=str(file))


def status(out: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """Per round: ``round``, ``state`` (``open``/``closed``), ``selected``, ``labelled``,
    ``pending``, ``proxy_test_accuracy`` (``asvp-ray status``)."""
    from asvp_ray.loop.human import status_table
    from asvp_ray.loop.rundir import RunDir

    rd = RunDir(str(out))
    if not rd.state_path.is_file():
        raise RunDirError(f"{_shown(out)} is not an initialised run directory (no state.json)")
    return status_table(rd)


def final(out: Union[str, os.PathLike], *, address: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Train the final model on the labelled set (``final.training_method``) and evaluate it
    (``asvp-ray final``), once every round is done.

    Returns:
        the final model's record (``training_method``, ``reason``, ``test_accuracy``,
        ``checkpoint``, ...), or None with ``final.training_method: none``.

    Raises:
        NotARunError: ``out`` holds no run.
        RunDirError: rounds are left.
    """
    with _driver(out, address=address) as d:
        d.prepare()
        if not d.rounds_done:
            st = d.status()
            raise RunDirError(f"{_shown(out)} has rounds left ({st['next_round']} of {st['rounds']} done); "
                              "finish them first")
        return d.run_final()


def _source_classes(cfg: Config, index_dir=None):
    """The class names of the run's pool source (what label files may name; an indexed source's
    index is the run's, ``index_dir``)."""
    from asvp_ray.data.sources import build_source

    return build_source(cfg.data.pool, cfg.data.classes, index_dir=index_dir).classes


def strategies() -> Dict[str, Dict[str, Any]]:
    """The query strategies (``asvp-ray strategies``): per name, ``doc`` (its summary line) and
    ``options`` (each option's default; set them as ``strategy: {name: ..., option: value}``)."""
    from asvp_ray.selection import STRATEGIES
    from asvp_ray.selection.options import option_defaults

    return {name: {"doc": (STRATEGIES.get(name).__doc__ or "").strip().splitlines()[0],
                   "options": option_defaults(name)} for name in STRATEGIES.names()}


def report_runs(runs: Sequence[Union[str, os.PathLike]], out: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Compare runs (``asvp-ray report``): ``table.csv``, ``table.md`` and plots in ``out``.

    Returns:
        ``rows`` (one dict per run) and ``files`` (the paths written).
    """
    from asvp_ray.report import make_report

    return make_report([str(r) for r in runs], Path(out))


#: :func:`study`'s settings that are checked before Ray starts
_STUDY_CHECKED = ("num_samples", "scheduler", "grace_period", "max_concurrent", "cpus_per_trial", "gpus_per_trial")


def study(config: ConfigLike, space, out: Union[str, os.PathLike], *, overrides: Sequence[str] = (),
          address: Optional[str] = None, **settings):
    """Run (or resume) a Ray Tune study whose trials are runs (``asvp-ray tune``).

    Args:
        config: the base config every trial starts from (see :func:`as_config`).
        space: the search space: a YAML file, its mapping or a parsed ``SearchSpace``.
        out: the study directory: a folder or a bucket URI.
        settings: :func:`asvp_ray.tune.run_study`'s (``num_samples``, ``scheduler``, ...), all
            checked before Ray starts.

    Returns:
        the :class:`~asvp_ray.tune.StudyResult` (``table``, ``results_csv``, ``best_config``, ...).
    """
    from asvp_ray.runtime.ray_utils import asvp_errors_unwrapped, init_ray
    from asvp_ray.tune import SearchSpace, check_settings, parse_space, run_study

    with asvp_errors_unwrapped():  # an asvp-ray error raised inside Ray, as itself
        check_settings(**{k: v for k, v in settings.items() if k in _STUDY_CHECKED})  # every user error first
        cfg = as_config(config, overrides)
        sp = space if isinstance(space, SearchSpace) else parse_space(
            space if isinstance(space, Mapping) else str(space), base=cfg)
        init_ray(address)
        return run_study(cfg, sp, out, **settings)
