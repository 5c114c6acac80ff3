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

import csv
import io
import json
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from asvp_ray.core.errors import BadInputError, RunDirError
from asvp_ray.storage.atomic import atomic_write_bytes, atomic_write_json
from asvp_ray.loop.rundir import RunDir


def pending_ids(rd: RunDir, state: Optional[Dict[str, Any]] = None) -> np.ndarray:
    """Ids of the open round not labelled yet (sorted)."""
    state = state if state is not None else rd.read_state()
    if not state or not state.get("open_round"):
        return np.zeros(0, dtype=np.int64)
    opened = np.asarray(state["open_round"]["ids"], dtype=np.int64)
    done = rd.read_labeled()["id"]
    return np.sort(np.setdiff1d(opened, done))


def write_queries(rd: RunDir, round_: int, ids: np.ndarray, source, classes: Sequence[str],
                  local_files_root: str = "/") -> List[Path]:
    """``queries/round-K.csv`` (id, path), ``round-K.labelstudio.json`` (import tasks) and the Label
    Studio labelling config with the class choices.

    Images a labeller can open: sources backed by image files link those files (absolute local
    paths become Label Studio local-files URLs, URL-encoded, relative to ``local_files_root``;
    remote URIs stay as they are). Sources whose images are not files (Fashion-MNIST's IDX
    arrays, ...) get the round's images written as ``queries/round-K/ID.png`` and link those.
    """
    from asvp_ray.data.images import FileSource

    qdir = rd.path / "queries"
    ids = np.asarray(ids, dtype=np.int64)
    if isinstance(source, FileSource):
        paths = [p if "://" in p else os.path.abspath(p) for p in source.paths(ids)]
    else:
        paths = _write_query_pngs(qdir / f"round-{round_}", ids, source)
    lines = ["id,path"] + [f"{int(i)},{_csv_field(p)}" for i, p in zip(ids, paths)]
    csv_path = qdir / f"round-{round_}.csv"
    atomic_write_bytes(csv_path, ("\n".join(lines) + "\n").encode())
    tasks = [{"data": {"image": _ls_url(p, local_files_root), "asvp_id": int(i), "path": p, "round": round_,
                       "classes": list(classes)}} for i, p in zip(ids, paths)]
    ls_path = qdir / f"round-{round_}.labelstudio.json"
    atomic_write_json(ls_path, tasks)
    cfg_path = qdir / "labelstudio-config.xml"
    atomic_write_bytes(cfg_path, labelstudio_config(classes).encode())
    return [csv_path, ls_path, cfg_path]


def labelstudio_config(classes: Sequence[str]) -> str:
    """The Label Studio labelling config: the image and one single choice among the classes."""
    choices = "\n".join(f'    <Choice value="{_xml(c)}"/>' for c in classes)
    return (f'<View>\n  <Image name="image" value="$image"/>\n  <Choices name="{LS_FROM_NAME}" toName="image" '
            f'choice="single" showInline="true">\n{choices}\n  </Choices>\n</View>\n')


LS_FROM_NAME = "label"  # the Choices control's name: the label column of CSV/TSV/JSON_MIN exports


def _write_query_pngs(folder: Path, ids: np.ndarray, source) -> List[str]:
    """The images of ``ids`` as ``folder/ID.png`` (absolute paths, in ``ids`` order)."""
    from PIL import Image

    from asvp_ray.data.fashion_mnist import FashionMNISTSource

    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(source, FashionMNISTSource):  # direct read: no Ray needed for a few rows
        from asvp_ray.data.fashion_mnist import read_idx

        pos = np.searchsorted(source.ids, ids)
        images = dict(zip(ids.tolist(), read_idx(Path(source.images_path), pos)))
    else:  # any other source: its own Ray Dataset of decoded images
        rows = source.to_dataset(ids).take_all()
        images = {int(r["id"]): np.asarray(r["image"]) for r in rows}
    out = []
    for i in ids.tolist():
        path = folder / f"{i}.png"
        buf = io.BytesIO()
        Image.fromarray(np.asarray(images[i], dtype=np.uint8)).save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
        out.append(str(path.resolve()))
    return out


def _csv_field(p: str) -> str:
    return '"' + p.replace('"', '""') + '"' if ("," in p or '"' in p) else p


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def _ls_url(p: str, root: str = "/") -> str:
    """A Label Studio local-files URL for an absolute path under ``root`` (URIs stay as they are)."""
    if "://" in p:
        return p
    rel = os.path.relpath(p, root)
    if rel.startswith(".."):
        raise BadInputError(f"image {p} is not under label.local_files_root={root!r}; set label.local_files_root "
                            "to a folder that holds the images (the LOCAL_FILES_DOCUMENT_ROOT of Label Studio)")
    return "/data/local-files/?d=" + urllib.parse.quote(rel.replace(os.sep, "/"), safe="/")


# --------------------------------------------------------------------------- reading label files
@dataclass
class Vote:
    """One label for one pool id, as read from a file: ``where`` names it in error messages,
    ``order`` sorts votes of one id in time (for ``agreement: last``)."""

    where: str
    id: Any
    label: Any
    order: Tuple = ()
    round: Optional[int] = None  # the round the task was made for (Label Studio exports carry it)


LS_EXPORT_COLUMNS = ("annotation_id", "annotator", "lead_time", "created_at", "updated_at")
HOW_TO_EXPORT = ("import the tasks from queries/round-K.labelstudio.json (they carry data.asvp_id) and export "
                 "the project again (JSON, JSON_MIN, CSV or TSV)")


def read_label_file(path: Path) -> Tuple[str, List[Vote]]:
    """``(format, votes)`` of a label file, recognised by its shape.

    - Label Studio exports: JSON (tasks with ``data.asvp_id`` and ``annotations``), JSON_MIN
      (flat records with ``asvp_id``), CSV and TSV (a column ``asvp_id``). The pool id always
      comes from ``asvp_id``; Label Studio's own ``id`` (its task id) is never read. One vote per
      annotation that was not cancelled.
    - A table written by hand: CSV/TSV/Parquet with columns ``id,label`` and none of Label
      Studio's export columns (``annotation_id``, ``annotator``, ...).

    Raises:
        BadInputError: missing file, unknown shape, a Label Studio export without ``asvp_id``.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"label file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".csv", ".tsv", ".parquet"):
        return _read_table(path, suffix)
    raise BadInputError(f"{path}: unknown label file type {suffix!r}; use .csv or .parquet (columns id,label), or "
                        "a Label Studio export (.json JSON or JSON_MIN, .csv, .tsv)")


def _read_table(path: Path, suffix: str) -> Tuple[str, List[Vote]]:
    import pyarrow as pa

    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            t = pq.read_table(path)
            first_line = None
        else:
            import pyarrow.csv as pacsv

            with open(path, newline="") as f:
                header = next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), [])
            t = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
                               convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                                    strings_can_be_null=False))
            first_line = 2
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: cannot be parsed ({e})") from None
    cols = t.column_names
    rows = t.to_pylist()
    where = [f"{path.name} line {k + first_line}" if first_line else f"{path.name} row {k}" for k in range(len(rows))]
    ls_cols = [c for c in LS_EXPORT_COLUMNS if c in cols]
    if "asvp_id" in cols:  # a Label Studio CSV/TSV export (or any table that names the pool id asvp_id)
        if LS_FROM_NAME not in cols:
            raise BadInputError(f"{path}: has asvp_id but no {LS_FROM_NAME!r} column (it has {cols}); export the "
                                f"project whose labelling config is queries/labelstudio-config.xml")
        fmt = f"labelstudio-{suffix[1:]}" if ls_cols else f"table-asvp_id{suffix}"
        votes = [Vote(w, r["asvp_id"], r[LS_FROM_NAME], _order(r, k), _parse_id(r.get("round"))) for k, (w, r) in enumerate(zip(where, rows))
                 if not _blank(r[LS_FROM_NAME])]  # a task without annotation: still pending
        return fmt, votes
    if ls_cols:
        raise BadInputError(f"{path}: a Label Studio export (columns {ls_cols}) without an asvp_id "
                            f"column; its id column is Label Studio's task id, not the pool id, so it is not "
                            f"read. {HOW_TO_EXPORT[0].upper()}{HOW_TO_EXPORT[1:]}")
    missing = [c for c in ("id", "label") if c not in cols]
    if missing:
        raise BadInputError(f"{path}: missing column(s) {missing}; a label file has columns id,label "
                            f"(it has {cols}), or is a Label Studio export with asvp_id")
    return f"table{suffix}", [Vote(w, r["id"], r["label"], (k,)) for k, (w, r) in enumerate(zip(where, rows))]


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and v.strip() == "")


def _order(rec: Dict[str, Any], k: int) -> Tuple:
    """Time order of one annotation: updated_at, then annotation id, then position in the file."""
    ann = rec.get("annotation_id")
    try:
        ann = int(ann)
    except (TypeError, ValueError):
        ann = -1
    return (str(rec.get("updated_at") or rec.get("created_at") or ""), ann, k)


def _read_json(path: Path) -> Tuple[str, List[Vote]]:
    try:
        tasks = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise BadInputError(f"{path}: a Label Studio export is a JSON list of tasks (JSON) or of records (JSON_MIN)")
    if not tasks:
        return "labelstudio-json", []
    if all("data" in t for t in tasks):
        return "labelstudio-json", _votes_json(path, tasks)
    if any("data" in t for t in tasks):
        raise BadInputError(f"{path}: mixes JSON tasks (with data) and JSON_MIN records; export the project again")
    if not all("asvp_id" in t for t in tasks):
        k = next(k for k, t in enumerate(tasks) if "asvp_id" not in t)
        raise BadInputError(f"{path} record {k}: no asvp_id (keys {sorted(tasks[k])[:12]}); Label Studio's id is its "
                            f"task id, not the pool id, so it is not read. {HOW_TO_EXPORT[0].upper()}{HOW_TO_EXPORT[1:]}")
    votes = []
    for k, rec in enumerate(tasks):
        lab = rec.get(LS_FROM_NAME)
        if isinstance(lab, dict) and "choices" in lab:  # several choices: refused below as not a class
            lab = lab["choices"][0] if len(lab["choices"]) == 1 else lab["choices"]
        if _blank(lab):
            continue
        votes.append(Vote(f"{path.name} record {k}", rec["asvp_id"], lab, _order(rec, k), _parse_id(rec.get("round"))))
    return "labelstudio-json_min", votes


def _votes_json(path: Path, tasks: List[Dict[str, Any]]) -> List[Vote]:
    votes = []
    for k, task in enumerate(tasks):
        data = task.get("data") or {}
        where = f"{path.name} task {k}"
        if "asvp_id" not in data:
            raise BadInputError(f"{where}: no data.asvp_id (task id {task.get('id')}); Label Studio's id is its task "
                                f"id, not the pool id, so it is not read. {HOW_TO_EXPORT[0].upper()}{HOW_TO_EXPORT[1:]}")
        for a, ann in enumerate(task.get("annotations") or []):
            if ann.get("was_cancelled"):
                continue
            choices = [c for res in ann.get("result") or [] if res.get("from_name", LS_FROM_NAME) == LS_FROM_NAME
                       for c in ((res.get("value") or {}).get("choices") or [])]
            if not choices:
                continue  # an empty annotation gives no label
            lab = choices[0] if len(choices) == 1 else choices
            votes.append(Vote(f"{where} annotation {ann.get('id', a)}", data["asvp_id"], lab,
                              _order({"updated_at": ann.get("updated_at"), "created_at": ann.get("created_at"),
                                      "annotation_id": ann.get("id")}, a), _parse_id(data.get("round"))))
    return votes


def _parse_id(raw) -> Optional[int]:
    try:
        i = int(str(raw).strip())
        if str(raw).strip() not in (str(i), f"{i}.0"):
            raise ValueError
        return i
    except (TypeError, ValueError):
        return None


def _parse_label(raw, index: Dict[str, int], n: int) -> Optional[int]:
    lab_s = "" if raw is None or isinstance(raw, list) else str(raw).strip()
    if lab_s in index:
        return index[lab_s]
    if lab_s.isdigit() and int(lab_s) < n:
        return int(lab_s)
    return None


def validate_labels(votes: List[Vote], classes: Sequence[str], pending: np.ndarray,
                    labeled: Dict[int, Tuple[int, int]], open_round: Optional[int], origin: str,
                    agreement: str = "error") -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """Check every vote before anything changes; returns (ids, class indices) to append and counts.

    Votes of one id that agree give one label; votes that disagree follow ``agreement``. An id
    already labelled with the same label is skipped (counted: cumulative exports and repeated
    imports are idempotent); with another label it is an error.

    Args:
        labeled: id -> (class index, round) of the labels already stored.

    Raises:
        BadInputError: listing every offending row: bad ids, unknown labels, disagreements the
            policy does not settle, ids labelled differently before, ids never selected.
    """
    index = {c: k for k, c in enumerate(classes)}
    pend = set(pending.tolist())
    problems: List[str] = []
    by_id: Dict[int, List[Tuple[Vote, int]]] = {}
    for v in votes:
        i = _parse_id(v.id)
        if i is None:
            problems.append(f"{v.where}: id {v.id!r} is not an integer")
            continue
        lab = _parse_label(v.label, index, len(classes))
        if lab is None:
            shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            problems.append(f"{v.where}: label {v.label!r} is not one of the {len(classes)} classes ({shown}) "
                            f"or a class index 0..{len(classes) - 1}")
            continue
        by_id.setdefault(i, []).append((v, lab))
    counts = {"votes": len(votes), "ids": len(by_id), "multi_annotated": 0, "resolved_disagreements": 0,
              "already_stored": 0, "closed_unlabelled": 0}
    out_ids, out_labels, late = [], [], []
    for i, vs in by_id.items():
        labs = [lab for _, lab in vs]
        if len(vs) > 1:
            counts["multi_annotated"] += 1
        if len(set(labs)) > 1:
            detail = ", ".join(f"{classes[lab]!r} ({v.where})" for v, lab in vs)
            if agreement == "majority":
                tally = np.bincount(labs, minlength=len(classes))
                top = np.flatnonzero(tally == tally.max())
                if len(top) > 1:
                    problems.append(f"id {i}: conflicting labels with no majority (a tie): {detail}")
                    continue
                lab = int(top[0])
            elif agreement == "last":
                lab = max(vs, key=lambda t: t[0].order)[1]
            else:
                problems.append(f"id {i}: conflicting labels {detail} (set label.agreement to majority or last, "
                                "or fix the annotations)")
                continue
            counts["resolved_disagreements"] += 1
        else:
            lab = labs[0]
        where = vs[-1][0].where
        if i in labeled:
            old, r = labeled[i]
            if old == lab:
                counts["already_stored"] += 1
            else:
                problems.append(f"{where}: id {i} is already labelled {classes[old]!r} (round {r}) but this file "
                                f"says {classes[lab]!r}; a stored label is never changed")
            continue
        if i not in pend:
            r_task = vs[-1][0].round
            if r_task is not None and (open_round is None or r_task < open_round):
                late.append(i)  # annotated after its round was closed without it: not bought, not lost
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
    counts["closed_unlabelled"] = len(late)
    counts["closed_unlabelled_ids"] = sorted(late)[:20]
    return np.array(out_ids, dtype=np.int64), np.array(out_labels, dtype=np.int64), counts


def import_labels(rd: RunDir, file: Path, classes: Sequence[str], agreement: str = "error") -> Dict[str, Any]:
    """Validate a label file against the run and append its new labels to labeled.parquet atomically.

    The import is recorded in the open round (``state.json``), so the round's record in
    ``summary.json`` lists every file imported, its format and the agreement policy used.

    Returns:
        ``{"imported", "already_stored", "round", "pending", "format", ...}`` (the counts of
        ``validate_labels``).
    """
    state = rd.read_state()
    if not state:
        raise RunDirError(f"{rd.location} is not an initialised run; run `asvp-ray init CONFIG --out {rd.location}`")
    open_round = state.get("open_round")
    lab = rd.read_labeled()
    pend = pending_ids(rd, state)
    fmt, votes = read_label_file(file)
    labeled = {int(i): (int(lb), int(r)) for i, lb, r in zip(lab["id"], lab["label"], lab["round"])}
    ids, labels, counts = validate_labels(votes, classes, pend, labeled, open_round["round"] if open_round else None,
                                          origin=str(file), agreement=agreement)
    res = {"imported": int(len(ids)), "round": open_round["round"] if open_round else None,
           "pending": int(len(pend) - len(ids)), "format": fmt, "agreement": agreement, **counts}
    if len(ids):
        r = open_round["round"]
        rd.write_labeled(np.concatenate([lab["id"], ids]), np.concatenate([lab["label"], labels]),
                         np.concatenate([lab["round"], np.full(len(ids), r, dtype=np.int64)]))
    if open_round is not None:  # the round record keeps how its labels came in
        rec = {"file": str(file), **{k: v for k, v in res.items() if k not in ("round", "closed_unlabelled_ids")}}
        extra = open_round.setdefault("extra", {})
        extra.setdefault("label_imports", []).append(rec)
        extra["label_agreement"] = agreement
        rd.write_state(state)
    return res


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
