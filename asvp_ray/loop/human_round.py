"""The human-labeller round: ``asvp-ray select`` closes the open round (training the proxy on the
labels imported so far) and opens the next one by writing its query files. The file formats and
the label import live in :mod:`asvp_ray.loop.human`.

The open round is part of the committed state (``state.json``'s ``open_round``), so a crash
between ``select`` and ``label`` loses nothing.
"""
from __future__ import annotations

import logging
from typing import Any, Dict

import numpy as np

from asvp_ray.core.errors import RunDirError

log = logging.getLogger("asvp_ray.driver")


def human_select(d: Any, close: bool = False) -> Dict[str, Any]:
    """Close the open round (if any) and open the next one for human labellers.

    Args:
        d: the run's :class:`~asvp_ray.loop.driver.Driver` (not imported here: the driver imports
            this module).
        close: close the open round even though some of its ids are still unlabelled (they
            return to the pool, unbought).

    Returns:
        ``{"closed": record or None, "opened": {...} or None, "done": bool}``.

    Raises:
        RunDirError: the open round still has pending ids and ``close`` is False.
    """
    from asvp_ray.loop.human import pending_ids, write_queries

    out: Dict[str, Any] = {"closed": None, "opened": None, "done": False}
    if d.open_round is not None:
        r = d.open_round["round"]
        pend = pending_ids(d.rd)
        n_done = int((d.labeled["round"] == r).sum())
        if len(pend) and not close:
            raise RunDirError(
                f"round {r} still has {len(pend)} pending id(s) (queries/round-{r}.csv); import their labels "
                f"with `asvp-ray label {d.rd.location} FILE`, or pass --close to close round {r} with the "
                f"{n_done} label(s) it has")
        if n_done == 0:
            raise RunDirError(f"round {r} has no labels yet; import some with `asvp-ray label` before closing it")
        batch = dict(d.open_round, ids=np.asarray(d.open_round["ids"], dtype=np.int64))
        out["closed"] = d.complete_round(batch)
    if d.rounds_done:
        out["done"] = True
        return out
    batch = d.select_batch()
    files = write_queries(d.rd, batch["round"], batch["ids"], d.pool, d.classes,
                          local_files_root=d.cfg.label.local_files_root)
    d.open_round = {"round": batch["round"], "ids": batch["ids"].tolist(), "selected_by": batch["selected_by"],
                    "seconds": batch["seconds"], "extra": batch["extra"]}
    d.commit()
    out["opened"] = {"round": batch["round"], "n": int(len(batch["ids"])), "selected_by": batch["selected_by"],
                     "files": [str(f) for f in files]}
    log.info("round %d opened: %d ids for labellers in %s", batch["round"], len(batch["ids"]), files[0])
    return out
