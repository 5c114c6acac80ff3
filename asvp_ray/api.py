"""The Python API: what the CLI does, as functions that return objects.

    import asvp_ray

    res = asvp_ray.run("examples/smoke.yaml", "runs/smoke", overrides=["budget.schedule=[40,40]"])
    print(res.rounds[-1]["proxy_test_accuracy"], len(res.labeled["id"]), res.final_model)
    asvp_ray.status("runs/smoke")                 # per round: selected, labelled, pending
    asvp_ray.label("runs/hitl", "labels.csv")     # a human round's labels
    asvp_ray.report_runs(["runs/smoke", "runs/other"], "report")

``config`` is a YAML path, a mapping (the YAML's content) or a :class:`~asvp_ray.config.Config`;
``out`` a folder or a bucket URI (``s3://``, ``gs://``). Errors are the package's own
(:mod:`asvp_ray.core.errors`: ``ConfigError``, ``RunDirError``, ``BadInputError``), never Ray's wrappers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from asvp_ray.config import Config, load_config

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

    from asvp_ray.core.errors import RunDirError
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
    from asvp_ray.core.errors import RunDirError
    from asvp_ray.loop.rundir import RunDir

    rd = RunDir(_location(out))
    if not rd.config_path.is_file():
        raise RunDirError(f"{rd.location} holds no asvp-ray run (no config.yaml); start one with asvp_ray.run")
    return run(str(rd.config_path), out, address=address, force=force, progress=progress)


def status(out: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """Per round: ``round``, ``state``, ``selected``, ``labelled``, ``pending``,
    ``proxy_test_accuracy`` (``asvp-ray status``)."""
    from asvp_ray.core.errors import RunDirError
    from asvp_ray.loop.human import status_table
    from asvp_ray.loop.rundir import RunDir

    rd = RunDir(_location(out))
    if not rd.state_path.is_file():
        raise RunDirError(f"{rd.location} is not an initialised run directory (no state.json)")
    return status_table(rd)


def label(out: Union[str, os.PathLike], file: Union[str, os.PathLike], *, agreement: Optional[str] = None,
          wait_s: float = 120.0, force: bool = False) -> Dict[str, Any]:
    """Import labels into a human-labelled run (``asvp-ray label``): a Label Studio export or a
    CSV/Parquet file of ``id,label``, all validated before anything changes. Waits up to
    ``wait_s`` for another process writing the run.

    Returns:
        the import's record: ``imported``, ``already_stored``, ``pending``, ``format``, ...
    """
    from asvp_ray.core.errors import RunDirError
    from asvp_ray.loop.human import import_labels
    from asvp_ray.loop.rundir import RunDir

    rd = RunDir(_location(out))
    if not rd.config_path.is_file():
        raise RunDirError(f"{rd.location} is not a run directory (no config.yaml)")
    cfg = load_config(str(rd.config_path))
    rd.lock(force=force, wait_s=wait_s)
    try:
        classes = cfg.data.classes or _source_classes(cfg)
        return import_labels(rd, Path(file), classes, agreement=agreement or cfg.label.agreement)
    finally:
        rd.unlock()


def _source_classes(cfg: Config):
    """The class names of the run's pool source (what label files may name)."""
    from asvp_ray.data.sources import build_source

    return build_source(cfg.data.pool, cfg.data.classes).classes


def report_runs(runs: Sequence[Union[str, os.PathLike]], out: Union[str, os.PathLike]):
    """Compare runs (``asvp-ray report``): a table and plots in ``out``; returns the report."""
    from asvp_ray.report import make_report

    return make_report([str(r) for r in runs], Path(out))


def study(config: ConfigLike, space, out: Union[str, os.PathLike], **settings):
    """A Ray Tune study whose trials are runs (``asvp-ray tune``); see
    :func:`asvp_ray.tune.run_study` for the settings."""
    from asvp_ray.tune import run_study

    return run_study(as_config(config, settings.pop("overrides", ())), space, out, **settings)
