"""The ``asvp-ray`` command line."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from asvp_ray.core.errors import AsvpError

app = typer.Typer(
    name="asvp-ray",
    help="Efficient active learning with pre-trained image models on Ray (ASVP, SVPp, standard AL).\n\n"
         "Start with: asvp-ray run examples/smoke.yaml --out runs/smoke",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Efficient active learning with pre-trained image models on Ray."""


SET_HELP = "Override a config key, e.g. --set budget.schedule=[50,50] --set proxy.epochs=20 (repeatable)."


def _setup_logging(log_file: Optional[Path] = None, verbose: bool = False) -> None:
    from asvp_ray.core.redact import RedactingFormatter

    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:  # no credential of a storage URI in a log line
        h.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "filelock", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(e: BaseException) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def extract(
    config: Path = typer.Argument(..., help="YAML config (see examples/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory; features go to OUT/features/v{k}/ (with "
                             "the storage key, to this directory's folder there, named in OUT/storage.json)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    version: Optional[int] = typer.Option(None, help="Feature version to write (default: the next free one)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS or local)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Extract pool (and test) features with a timm backbone into a versioned feature store."""
    from asvp_ray import api

    _setup_logging(None, verbose)
    try:
        res = api.extract(str(config), out, overrides=set_, version=version, address=address)
    except AsvpError as e:
        _fail(e)
    meta = res.meta
    typer.echo(f"wrote {res.path}: {meta['rows']} x {meta['dim']} features "
               f"({meta['backbone']}, weights {meta['weights']}) in {meta['seconds']:.1f}s"
               + (f"; skipped {len(meta['skipped'])} unreadable" if meta["skipped"] else ""))


def _round_line(rec) -> str:
    acc = rec.get("proxy_test_accuracy")
    secs = ", ".join(f"{k} {v:.2f}s" for k, v in rec["seconds"].items())
    return (f"round {rec['round']:>2}: +{rec['n_selected']} by {rec['selected_by']:<16} labelled {rec['n_labeled']:>6}"
            f"  proxy test acc {'-' if acc is None else f'{acc:.4f}'}  v{rec['feature_version']}  ({secs})")


RUN_OUT_HELP = ("Run directory: a folder, or a bucket URI (s3://bucket/prefix, gs://bucket/prefix) that holds "
                "the whole run, no shared file system needed. Rerun the same command to resume it.")
FORCE_HELP = ("A run in a bucket: take its lease although another process holds it (only when you are sure that "
              "process is gone; by default a killed process's lease is taken over once it expires).")
RUN_DIR_HELP = "The run directory (a folder or a bucket URI)."


def _shown(location: str) -> str:
    """A run location as printed: credentials in a URI redacted."""
    from asvp_ray.core.redact import redact_uri

    return redact_uri(str(location))


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML config (see examples/smoke.yaml, examples/fashion_mnist.yaml)."),
    out: str = typer.Option(..., "--out", "-o", help=RUN_OUT_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS or local)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Run a whole active-learning experiment (resumes an unfinished run directory).

    Extracts features once (v0), then each round of budget.schedule selects a batch (round 0 at
    random), buys its labels from the oracle, trains the proxy and evaluates it on the test set.
    OUT/summary.json holds one record per round; OUT/labeled.parquet every label bought.
    """
    from asvp_ray import api

    def progress(event: str, data: dict) -> None:
        if event == "finished":
            last = data["last_round"] or {}
            typer.echo(f"run in {_shown(out)} is already finished ({data['rounds']} rounds, {data['n_labeled']} "
                       f"labels, last proxy test accuracy {last.get('proxy_test_accuracy')}); nothing to do")
        elif event == "resuming":
            typer.echo(f"resuming {_shown(out)} at round {data['next_round']} ({data['n_labeled']} labels so far)")
        elif event == "round":
            typer.echo(_round_line(data))
        elif event == "final":
            typer.echo(f"final model: {data['training_method']} ({data['reason']}) -> test accuracy "
                       f"{data['test_accuracy']:.4f} in {data['seconds']:.1f}s")

    _setup_logging(None, verbose)
    try:
        res = api.run(str(config), out, overrides=set_, address=address, force=force, progress=progress)
    except AsvpError as e:
        _fail(e)
    if res.already_finished:
        return
    cost = res.summary.get("cost", {})
    typer.echo(f"cost: {cost.get('labels')} labels, {cost.get('wall_seconds_total', 0):.1f}s of compute "
               f"({cost.get('spent_wall_seconds_total', cost.get('wall_seconds_total', 0)):.1f}s run here; "
               f"the rest is cached features), ${cost.get('dollars', {}).get('total', 0):.2f} at the "
               "configured unit prices" if cost.get("cached") else
               f"cost: {cost.get('labels')} labels, {cost.get('wall_seconds_total', 0):.1f}s of compute, "
               f"${cost.get('dollars', {}).get('total', 0):.2f} at the configured unit prices")
    o = _shown(out).split("?", 1)[0].rstrip("/")
    typer.echo(f"done: {o}/summary.json, {o}/labeled.parquet, log in {o}/run.log"
               + (" (in the bucket: `asvp-ray status` and `asvp-ray report` read them there)" if "://" in o else ""))


@app.command()
def init(
    config: Path = typer.Argument(..., help="YAML config; its oracle is set to human."),
    out: str = typer.Option(..., "--out", "-o", help="Run directory to create (a folder or a bucket URI)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS or local)."),
) -> None:
    """Prepare a human-in-the-loop run: extract features; then `select` and `label` round by round."""
    from asvp_ray import api

    _setup_logging(None)
    try:
        st = api.init(str(config), out, overrides=set_, address=address)
    except AsvpError as e:
        _fail(e)
    typer.echo(f"initialised {_shown(out)}: features v{st['feature_version']} ready. Next: asvp-ray select {_shown(out)}")


LS_URL_HELP = ("A Label Studio server, e.g. http://127.0.0.1:8080; the API token is read from the environment "
               "variable LABEL_STUDIO_API_KEY. Needs --project.")
LS_PROJECT_HELP = "The Label Studio project title (created when missing)."


def _check_ls(labelstudio: Optional[str], project: Optional[str]) -> None:
    if bool(labelstudio) != bool(project):
        raise typer.BadParameter("--labelstudio URL and --project NAME go together")


@app.command()
def select(
    run_dir: str = typer.Argument(..., help="A run directory made by `asvp-ray init` (a folder or a bucket URI)."),
    close: bool = typer.Option(False, "--close", help="Close the open round although some ids are unlabelled."),
    labelstudio: Optional[str] = typer.Option(None, "--labelstudio", help=LS_URL_HELP),
    project: Optional[str] = typer.Option(None, "--project", help=LS_PROJECT_HELP),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS or local)."),
) -> None:
    """Close the open round (train the proxy on all labels) and write the next batch for labellers.

    Writes DIR/queries/round-K.csv (id, path), round-K.labelstudio.json (Label Studio tasks),
    labelstudio-config.xml and, for sources whose images are not files (Fashion-MNIST), the
    images as queries/round-K/ID.png. With --labelstudio URL --project NAME the project is
    created (or its config updated) and the round's tasks are imported through the API; while
    a round is open with pending ids, --labelstudio pushes that round again (tasks already in the
    project are skipped) instead of refusing.
    """
    from asvp_ray import api

    def progress(event: str, data: dict) -> None:
        if event == "pushing":
            typer.echo(f"round {data['round']} is open with {data['pending']} pending id(s); pushing its tasks")
        elif event == "closed":
            typer.echo(_round_line(data))
        elif event == "done":
            typer.echo(f"all rounds are done ({data['n_labeled']} labels). Train the final model with "
                       f"`asvp-ray final {_shown(run_dir)}`")
        elif event == "opened":
            typer.echo(f"round {data['round']}: {data['n']} images selected by {data['selected_by']}; label them "
                       f"from {data['files'][0]} (or import {data['files'][1]} into Label Studio), then "
                       f"`asvp-ray label {_shown(run_dir)} FILE`")
        elif event == "pushed":
            _pushed(data, labelstudio, project)

    _setup_logging(None)
    _check_ls(labelstudio, project)
    try:
        api.select(run_dir, close=close, labelstudio=labelstudio, project=project, address=address,
                   progress=progress)
    except api.NotARunError as e:
        raise typer.BadParameter(str(e)) from None
    except AsvpError as e:
        _fail(e)


def _pushed(res: dict, url: str, project: str) -> None:
    typer.echo(f"Label Studio project {project!r} (id {res['project_id']}) at {url}: imported {res['imported']} "
               f"task(s)" + (f", {res['skipped']} already there" if res["skipped"] else ""))
    for folder, why in res["storage_problems"].items():
        typer.secho(f"warning: no Local Files storage for {folder}, so Label Studio will not show its images: {why}. "
                    "Start Label Studio with LOCAL_FILES_SERVING_ENABLED=true and LOCAL_FILES_DOCUMENT_ROOT set to a "
                    "folder above it (and label.local_files_root to the same folder); see docs/labelling.md.",
                    fg=typer.colors.YELLOW, err=True)


@app.command()
def label(
    run_dir: str = typer.Argument(..., help=RUN_DIR_HELP),
    file: Optional[Path] = typer.Argument(None, help="Labels: a Label Studio export (JSON, JSON_MIN, CSV or TSV), "
                                                      "or a CSV/Parquet file with columns id,label. Omit with "
                                                      "--labelstudio."),
    labelstudio: Optional[str] = typer.Option(None, "--labelstudio", help=LS_URL_HELP + " Pulls the project's "
                                              "annotations (a JSON export, kept in DIR/queries/) instead of FILE."),
    project: Optional[str] = typer.Option(None, "--project", help="The Label Studio project title."),
    agreement: Optional[str] = typer.Option(None, "--agreement", help="Several annotations of one image that "
                                            "disagree: error, majority or last (default: label.agreement of the "
                                            "run's config, itself error by default)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Import labels; everything is validated before anything changes.

    Several `label` commands at once (labellers importing their parts) run one after the other:
    each waits up to ASVP_LOCK_WAIT_S seconds (120) for the run. Label Studio exports are
    recognised by their shape and read through data.asvp_id (never Label Studio's task id). Cumulative exports can be imported again and again: labels already
    stored with the same value are skipped and counted; a different value is an error. The
    import (file, format, agreement policy, counts) is kept in the round's record.
    """
    from asvp_ray import api

    _setup_logging(None)
    _check_ls(labelstudio, project)
    if (file is None) == (labelstudio is None):
        raise typer.BadParameter("give either FILE or --labelstudio URL --project NAME")
    if agreement is not None and agreement not in ("error", "majority", "last"):
        raise typer.BadParameter(f"--agreement {agreement!r} is not one of error, majority, last")

    def progress(event: str, data: dict) -> None:
        if event == "pulled":
            typer.echo(f"pulled {data['file']} from Label Studio project {data['project']!r}")

    try:
        res = api.label(run_dir, file, labelstudio=labelstudio, project=project, agreement=agreement, force=force,
                        wait_s=float(os.environ.get("ASVP_LOCK_WAIT_S", "120")), progress=progress)
    except api.NotARunError as e:
        raise typer.BadParameter(str(e)) from None
    except AsvpError as e:
        _fail(e)
    extra = []
    if res["already_stored"]:
        extra.append(f"{res['already_stored']} already stored with the same label (skipped)")
    if res["resolved_disagreements"]:
        extra.append(f"{res['resolved_disagreements']} disagreement(s) settled by {res['agreement']}")
    if res["closed_unlabelled"]:
        extra.append(f"{res['closed_unlabelled']} for ids of rounds closed without them (ignored: "
                     f"{res['closed_unlabelled_ids']})")
    where = f"round {res['round']}" if res["round"] is not None else "no open round"
    typer.echo(f"imported {res['imported']} label(s) into {where}; {res['pending']} pending ({res['format']}"
               + (f"; {'; '.join(extra)}" if extra else "") + ")")


@app.command()
def status(run_dir: str = typer.Argument(..., help=RUN_DIR_HELP)) -> None:
    """Show selected, labelled and pending counts per round."""
    from asvp_ray import api

    try:
        rows = api.status(run_dir)
    except AsvpError as e:
        _fail(e)
    typer.echo(f"{'round':>5} {'state':>6} {'selected':>8} {'labelled':>8} {'pending':>7}  proxy test acc")
    for r in rows:
        acc = "-" if r["proxy_test_accuracy"] is None else f"{r['proxy_test_accuracy']:.4f}"
        typer.echo(f"{r['round']:>5} {r['state']:>6} {r['selected']:>8} {r['labelled']:>8} {r['pending']:>7}  {acc}")
    typer.echo(f"total labelled: {sum(r['labelled'] for r in rows)}; pending: {sum(r['pending'] for r in rows)}")


@app.command()
def strategies() -> None:
    """List the query strategies and their options.

    Set options in the config as ``strategy: {name: coreset, metric: cosine}`` or on the command
    line as ``--set 'strategy={name: cluster_margin, margin_factor: 10}'``. Score strategies
    (margin, entropy, least_confidence) and coreset, BADGE and Cluster-Margin take
    ``execution: sharded`` to score on Ray shard actors.
    """
    from asvp_ray import api

    for name, s in api.strategies().items():
        typer.echo(f"{name}: {s['doc']}")
        opts = s["options"]
        typer.echo("    options: " + (", ".join(f"{k}={v!r}" for k, v in opts.items()) if opts else "none"))


@app.command()
def final(
    run_dir: str = typer.Argument(..., help="The run directory, all rounds done (a folder or a bucket URI)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS or local)."),
) -> None:
    """Train the final model on the labelled set (final.training_method) and evaluate it."""
    from asvp_ray import api

    _setup_logging(None)
    try:
        fin = api.final(run_dir, address=address)
    except api.NotARunError as e:
        raise typer.BadParameter(str(e)) from None
    except AsvpError as e:
        _fail(e)
    typer.echo(f"final model: {fin}" if fin else "final.training_method is none: no final model")


@app.command()
def report(
    runs: List[str] = typer.Argument(..., help="Run directories to compare (folders or bucket URIs)."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder: table.csv, table.md and PNG plots."),
) -> None:
    """Compare runs: a table (CSV, Markdown) and plots of accuracy against labels, cost and time."""
    from asvp_ray import api
    from asvp_ray.report import markdown_table

    try:
        rep = api.report_runs(runs, out)
    except AsvpError as e:
        _fail(e)
    typer.echo(markdown_table(rep["rows"]))
    typer.echo("wrote " + ", ".join(rep["files"]))


@app.command("tune")
def tune_cmd(
    config: Path = typer.Argument(..., help="Base YAML config every trial starts from."),
    space: Path = typer.Option(..., "--space", "-s", help="YAML search space (see examples/space.yaml)."),
    out: str = typer.Option(..., "--out", "-o", help="Study directory, or a bucket (s3://bucket/prefix, "
                                                      "gs://bucket/prefix) where the trials' runs, the feature cache, "
                                                      "Tune's state and the results live. Rerun the same command to "
                                                      "resume it."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    num_samples: int = typer.Option(1, help="Samples of the space; each runs every grid combination."),
    scheduler: str = typer.Option("fifo", help="fifo (every trial runs every round) or asha (early stopping "
                                               "on the per-round proxy test accuracy)."),
    grace_period: int = typer.Option(1, help="ASHA: rounds every trial runs before it can be stopped."),
    max_concurrent: Optional[int] = typer.Option(None, help="Trials running at once (default and most: as many as "
                                                         "fit in the cluster together at their peak)."),
    cpus_per_trial: float = typer.Option(0.5, help="CPUs each trial's own actor reserves; its Ray Train workers "
                                                   "and extraction actors come on top, and only as many trials "
                                                   "start at once as fit in the cluster with them."),
    gpus_per_trial: float = typer.Option(0.0, help="GPUs each trial reserves (with proxy.device: auto the proxy is fitted on it)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS or local)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging and Tune's detailed output."),
) -> None:
    """Run a Ray Tune study whose trials are asvp-ray runs (resumes an interrupted study).

    Features are extracted once into OUT/feature_cache and shared by every trial. Each trial
    reports its proxy test accuracy per round. Writes OUT/results.csv, OUT/best_config.yaml
    (accepted by `asvp-ray run`) and OUT/curves.png. OUT may be a bucket (s3://, gs://): then
    nothing of the study needs a file system shared by the cluster's nodes.
    """
    from asvp_ray import api

    _setup_logging(None, verbose)
    try:
        res = api.study(str(config), str(space), out, overrides=set_, address=address, num_samples=num_samples,
                        scheduler=scheduler, grace_period=grace_period, max_concurrent=max_concurrent,
                        cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, verbose=2 if verbose else 1)
    except AsvpError as e:
        _fail(e)
    typer.echo(res.table)
    if res.interrupted:
        typer.secho(f"study interrupted; rerun the same command to resume it ({_shown(out)})", fg=typer.colors.YELLOW,
                    err=True)
        raise typer.Exit(code=130)
    typer.echo(f"done: {res.results_csv}, {res.curves_png}"
               + (f", best config {res.best_config}" if res.best_config else ", no trial finished a round"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
