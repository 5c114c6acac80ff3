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

    _setup_logging(out / "extract.log", verbose)
    try:
        cfg = load_config(str(config), set_)
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
