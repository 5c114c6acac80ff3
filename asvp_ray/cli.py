"""The ``asvp-ray`` command line."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from asvp_ray.errors import AsvpError

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
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
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
    out: Path = typer.Option(..., "--out", "-o", help="Run directory; features go to OUT/features/v{k}/."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    version: Optional[int] = typer.Option(None, help="Feature version to write (default: the next free one)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS or local)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Extract pool (and test) features with a timm backbone into a versioned feature store."""
    from asvp_ray.config import load_config
    from asvp_ray.data.sources import build_source
    from asvp_ray.features.backbones import BackboneSpec
    from asvp_ray.features.extract import extract_to_store
    from asvp_ray.features.store import FeatureStore
    from asvp_ray.ray_utils import init_ray

    _setup_logging(None, verbose)
    try:
        cfg = load_config(str(config), set_)
        _setup_logging(out / "extract.log", verbose)
        pool = build_source(cfg.data.pool, cfg.data.classes)
        test = build_source(cfg.data.test, cfg.data.classes) if cfg.data.test else None
        store = FeatureStore(out / "features")
        v = version if version is not None else (0 if store.latest() is None else store.latest() + 1)
        init_ray(address)
        meta = extract_to_store(store, v, pool, BackboneSpec(**cfg.backbone.model_dump()), cfg.extract, test=test,
                                skip_unreadable=cfg.data.skip_unreadable)
    except AsvpError as e:
        _fail(e)
    typer.echo(f"wrote {store.path(v)}: {meta['rows']} x {meta['dim']} features "
               f"({meta['backbone']}, weights {meta['weights']}) in {meta['seconds']:.1f}s"
               + (f"; skipped {len(meta['skipped'])} unreadable" if meta["skipped"] else ""))


def _round_line(rec) -> str:
    acc = rec.get("proxy_test_accuracy")
    secs = ", ".join(f"{k} {v:.2f}s" for k, v in rec["seconds"].items())
    return (f"round {rec['round']:>2}: +{rec['n_selected']} by {rec['selected_by']:<16} labelled {rec['n_labeled']:>6}"
            f"  proxy test acc {'-' if acc is None else f'{acc:.4f}'}  v{rec['feature_version']}  ({secs})")


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML config (see examples/smoke.yaml, examples/fashion_mnist.yaml)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory. Rerun the same command to resume it."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS or local)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Run a whole active-learning experiment (resumes an unfinished run directory).

    Extracts features once (v0), then each round of budget.schedule selects a batch (round 0 at
    random), buys its labels from the oracle, trains the proxy and evaluates it on the test set.
    OUT/summary.json holds one record per round; OUT/labeled.parquet every label bought.
    """
    import ray

    from asvp_ray.config import load_config
    from asvp_ray.features.extract import unwrap_error
    from asvp_ray.loop.driver import driver_actor
    from asvp_ray.ray_utils import init_ray

    _setup_logging(None, verbose)
    try:
        cfg = load_config(str(config), set_)
        init_ray(address)
        actor = driver_actor(cfg, str(out))
        status = ray.get(actor.prepare.remote())
        if status["finished"]:
            summ = ray.get(actor.get_summary.remote())
            last = summ["rounds"][-1] if summ["rounds"] else {}
            typer.echo(f"run in {out} is already finished ({status['rounds']} rounds, {status['n_labeled']} labels, "
                       f"last proxy test accuracy {last.get('proxy_test_accuracy')}); nothing to do")
            return
        if status["next_round"] > 0:
            typer.echo(f"resuming {out} at round {status['next_round']} ({status['n_labeled']} labels so far)")
        for _ in range(status["next_round"], status["rounds"]):
            rec = ray.get(actor.run_round.remote())
            typer.echo(_round_line(rec))
        final = ray.get(actor.run_final.remote())
        if final:
            typer.echo(f"final model: {final['training_method']} ({final['reason']}) -> test accuracy "
                       f"{final['test_accuracy']:.4f} in {final['seconds']:.1f}s")
        summ = ray.get(actor.get_summary.remote())
        ray.get(actor.close.remote())
        cost = summ.get("cost", {})
        typer.echo(f"cost: {cost.get('labels')} labels, {cost.get('wall_seconds_total', 0):.1f}s of compute, "
                   f"${cost.get('dollars', {}).get('total', 0):.2f} at the configured unit prices")
    except Exception as e:  # noqa: BLE001 - show the user-facing cause
        inner = unwrap_error(e)
        if isinstance(inner, AsvpError):
            _fail(inner)
        raise
    typer.echo(f"done: {out}/summary.json, {out}/labeled.parquet, log in {out}/run.log")


@app.command()
def report(
    runs: List[Path] = typer.Argument(..., help="Run directories to compare."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder: table.csv, table.md and PNG plots."),
) -> None:
    """Compare runs: a table (CSV, Markdown) and plots of accuracy against labels, cost and time."""
    from asvp_ray.report import make_report, markdown_table

    try:
        rep = make_report(runs, out)
    except AsvpError as e:
        _fail(e)
    typer.echo(markdown_table(rep["rows"]))
    typer.echo("wrote " + ", ".join(rep["files"]))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
