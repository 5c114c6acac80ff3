"""Human-in-the-loop rounds: queries for labellers, label imports validated before anything changes.

A round opened by ``asvp-ray select`` is recorded in ``state.json`` (``open_round``: its round,
selected ids and selection timings) and written for labellers to ``DIR/queries/round-K.csv`` and
``round-K.labelstudio.json``. ``asvp-ray label`` appends validated labels to ``labeled.parquet``
(one atomic replace); the ids still pending are always the open round's ids minus those
labelled, so there is one source of truth and a crash between two files cannot count a label
twice. The next ``select`` closes the open round (trains the proxy on everything labelled) and
opens the next.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from asvp_ray.errors import BadInputError, RunDirError
from asvp_ray.features.store import atomic_write_bytes, atomic_write_json
from asvp_ray.loop.rundir import RunDir


def pending_ids(rd: RunDir, state: Optional[Dict[str, Any]] = None) -> np.ndarray:
    """Ids of the open round not labelled yet (sorted)."""
    state = state if state is not None else rd.read_state()
    if not state or not state.get("open_round"):
        return np.zeros(0, dtype=np.int64)
    opened = np.asarray(state["open_round"]["ids"], dtype=np.int64)
    done = rd.read_labeled()["id"]
    return np.sort(np.setdiff1d(opened, done))


def write_queries(rd: RunDir, round_: int, ids: np.ndarray, paths: Sequence[str], classes: Sequence[str]) -> List[Path]:
    """``queries/round-K.csv`` (id, path) and ``round-K.labelstudio.json`` (import tasks) plus the
    Label Studio labelling config with the class choices."""
    qdir = rd.path / "queries"
    lines = ["id,path"] + [f"{int(i)},{_csv_field(p)}" for i, p in zip(ids, paths)]
    csv_path = qdir / f"round-{round_}.csv"
    atomic_write_bytes(csv_path, ("\n".join(lines) + "\n").encode())
    tasks = [{"data": {"image": _ls_url(p), "asvp_id": int(i), "path": p, "round": round_,
                       "classes": list(classes)}} for i, p in zip(ids, paths)]
    ls_path = qdir / f"round-{round_}.labelstudio.json"
    atomic_write_json(ls_path, tasks)
    choices = "\n".join(f'    <Choice value="{_xml(c)}"/>' for c in classes)
    xml = (f'<View>\n  <Image name="image" value="$image"/>\n  <Choices name="label" toName="image" '
           f'choice="single" showInline="true">\n{choices}\n  </Choices>\n</View>\n')
    cfg_path = qdir / "labelstudio-config.xml"
    atomic_write_bytes(cfg_path, xml.encode())
    return [csv_path, ls_path, cfg_path]


def _csv_field(p: str) -> str:
    return '"' + p.replace('"', '""') + '"' if ("," in p or '"' in p) else p


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def _ls_url(p: str) -> str:
    if "://" in p:
        return p
    return "/data/local-files/?d=" + p.lstrip("/")  # Label Studio's local-files storage


# --------------------------------------------------------------------------- reading label files
def read_label_file(path: Path) -> List[Tuple[str, Any, Any]]:
    """Rows ``(where, id, label)`` of a CSV (``id,label``), Parquet or Label Studio JSON export.

    ``where`` names the row for error messages (``labels.csv line 17``).

    Raises:
        BadInputError: missing file, wrong columns, unreadable content.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"label file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_labelstudio(path)
    if suffix in (".csv", ".parquet"):
        import pyarrow as pa

        try:
            if suffix == ".csv":
                import pyarrow.csv as pacsv

                t = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                    column_types={"label": pa.string(), "id": pa.string()}))
                first_line = 2
            else:
                import pyarrow.parquet as pq

                t = pq.read_table(path)
                first_line = None
        except pa.ArrowInvalid as e:
            raise BadInputError(f"{path}: cannot be parsed ({e})") from None
        missing = [c for c in ("id", "label") if c not in t.column_names]
        if missing:
            raise BadInputError(f"{path}: missing column(s) {missing}; a label file has columns id,label "
                                f"(it has {t.column_names})")
        ids, labels = t.column("id").to_pylist(), t.column("label").to_pylist()
        where = [f"{path.name} line {k + first_line}" if first_line else f"{path.name} row {k}" for k in range(len(ids))]
        return list(zip(where, ids, labels))
    raise BadInputError(f"{path}: unknown label file type {suffix!r}; use .csv (id,label), .parquet or a "
                        "Label Studio .json export")


def _read_labelstudio(path: Path) -> List[Tuple[str, Any, Any]]:
    try:
        tasks = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadInputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(tasks, list):
        raise BadInputError(f"{path}: a Label Studio export is a JSON list of tasks")
    rows = []
    for k, task in enumerate(tasks):
        where = f"{path.name} task {k}"
        data = task.get("data", {}) if isinstance(task, dict) else {}
        if "asvp_id" not in data:
            raise BadInputError(f"{where}: no data.asvp_id; import the tasks from queries/round-K.labelstudio.json")
        choice = None
        for ann in task.get("annotations", []) or []:
            if ann.get("was_cancelled"):
                continue
            for res in ann.get("result", []) or []:
                ch = (res.get("value") or {}).get("choices")
                if ch:
                    choice = ch[0]
        if choice is None:
            continue  # not annotated yet: still pending (a partial import)
        rows.append((where, data["asvp_id"], choice))
    return rows


def validate_labels(rows: List[Tuple[str, Any, Any]], classes: Sequence[str], pending: np.ndarray,
                    labeled_round: Dict[int, int], open_round: Optional[int], origin: str) -> Tuple[np.ndarray, np.ndarray]:
    """Check every row before anything changes; returns (ids, class indices) to append.

    Raises:
        BadInputError: listing every offending row: bad ids, ids not pending (already labelled,
            in a closed round, never selected), labels not among the classes, duplicates and conflicts.
    """
    index = {c: k for k, c in enumerate(classes)}
    pend = set(pending.tolist())
    problems: List[str] = []
    seen: Dict[int, Tuple[str, int]] = {}
    out_ids, out_labels = [], []
    for where, raw_id, raw_label in rows:
        try:
            i = int(str(raw_id).strip())
            if str(raw_id).strip() not in (str(i), f"{i}.0"):
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"{where}: id {raw_id!r} is not an integer")
            continue
        lab_s = "" if raw_label is None else str(raw_label).strip()
        if lab_s in index:
            lab = index[lab_s]
        elif lab_s.isdigit() and int(lab_s) < len(classes):
            lab = int(lab_s)
        else:
            shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            problems.append(f"{where}: label {raw_label!r} is not one of the {len(classes)} classes ({shown}) "
                            f"or a class index 0..{len(classes) - 1}")
            continue
        if i in seen:
            prev_where, prev_lab = seen[i]
            kind = "conflicting labels" if prev_lab != lab else "duplicate"
            problems.append(f"{where}: id {i} repeats {prev_where} ({kind}: {classes[prev_lab]!r} vs {classes[lab]!r})")
            continue
        seen[i] = (where, lab)
        if i not in pend:
            if i in labeled_round:
                r = labeled_round[i]
                problems.append(f"{where}: id {i} is already labelled (round {r}"
                                + (", which is closed)" if open_round is None or r != open_round else ")"))
            else:
                problems.append(f"{where}: id {i} is not pending" + (f" in the open round {open_round}"
                                                                      if open_round is not None else
                                                                      " (no round is open; run `asvp-ray select`)"))
            continue
        out_ids.append(i)
        out_labels.append(lab)
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise BadInputError(f"{origin}: {len(problems)} problem(s), nothing was imported: " + "; ".join(problems[:20])
                            + more + ". Fix the file and import it again.")
    return np.array(out_ids, dtype=np.int64), np.array(out_labels, dtype=np.int64)


def import_labels(rd: RunDir, file: Path, classes: Sequence[str]) -> Dict[str, Any]:
    """Validate a label file against the open round and append it to labeled.parquet atomically.

    Returns:
        ``{"imported", "round", "pending"}``.
    """
    state = rd.read_state()
    if not state:
        raise RunDirError(f"{rd.path} is not an initialised run; run `asvp-ray init CONFIG --out {rd.path}`")
    open_round = state.get("open_round")
    lab = rd.read_labeled()
    pend = pending_ids(rd, state)
    rows = read_label_file(file)
    ids, labels = validate_labels(rows, classes, pend, dict(zip(lab["id"].tolist(), lab["round"].tolist())),
                                  open_round["round"] if open_round else None, origin=str(file))
    if len(ids) == 0:
        return {"imported": 0, "round": open_round["round"] if open_round else None, "pending": int(len(pend))}
    r = open_round["round"]
    rd.write_labeled(np.concatenate([lab["id"], ids]), np.concatenate([lab["label"], labels]),
                     np.concatenate([lab["round"], np.full(len(ids), r, dtype=np.int64)]))
    return {"imported": int(len(ids)), "round": r, "pending": int(len(pend) - len(ids))}


def status_table(rd: RunDir) -> List[Dict[str, Any]]:
    """Per round: selected, labelled, pending, and whether it is closed."""
    state = rd.read_state() or {}
    summary = rd.read_summary() or {}
    lab = rd.read_labeled()
    rows = []
    for rec in summary.get("rounds", []):
        r = rec["round"]
        rows.append({"round": r, "selected": rec["n_selected"], "labelled": int((lab["round"] == r).sum()),
                     "pending": 0, "state": "closed", "proxy_test_accuracy": rec.get("proxy_test_accuracy")})
    op = state.get("open_round")
    if op:
        r = op["round"]
        rows.append({"round": r, "selected": len(op["ids"]), "labelled": int((lab["round"] == r).sum()),
                     "pending": int(len(pending_ids(rd, state))), "state": "open", "proxy_test_accuracy": None})
    return rows
