"""The documentation: the command blocks it tells a user to run on one machine, run as written,
and fast checks of the Markdown itself.

Command blocks are taken from the Markdown (so the docs cannot drift from what is tested) and run
in bash, with the virtualenv first on PATH and none of the test session's RAY_* / ASVP_* / TQDM_*
settings. Covered here: the human-labelled workflow of docs/labelling.md ("Human labellers") and
the Ray Tune study of docs/studies.md ("Ray Tune studies"), both moved there from README.md;
docs/cluster.md's "`ray job submit` with a runtime environment" and "Studies on a cluster",
against the two-node cluster of its "Try it on one machine" block, whose every fixed port lies
outside Ray's worker port range (10002-19999). That block itself, run whole, is
`tests/test_cluster.py::test_cluster_docs_try_it_block_runs_verbatim`.

Left out: `make demo` / `make test` (the suite itself), bench/ (benchmarks of minutes to hours),
the Label Studio server steps (`tests/test_labelstudio.py` runs a real server), the GPU commands,
README.md's cluster quick start (a cluster and a bucket) and the cluster launcher / KubeRay blocks
(`ray up`, `docker build`, `kubectl`: a cloud account or a Kubernetes cluster, not one machine;
`tests/test_cluster.py` checks their files).

Fast (no mark): relative links and their anchors resolve in README.md, docs/, bench/README.md,
CONTRIBUTING.md and cluster/README.md; README.md stays at most 250 lines with "Two commands"
first; no command block is written twice; docs/configuration.md's generated reference matches
the pydantic schema (`scripts/gen_config_docs.py`)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.reference import check_proxy_against_reference
from tests.test_cluster import LoopbackCluster, _cmdline, _sid, markdown_block

README = ROOT / "README.md"
DOCS = ROOT / "docs"
LABELLING = DOCS / "labelling.md"
STUDIES = DOCS / "studies.md"
CLUSTER_DOCS = DOCS / "cluster.md"
BIN = Path(sys.executable).parent


def section_block(path: Path, heading: str) -> str:
    """``markdown_block``, checked to lie in ``heading``'s own section (no heading in between)."""
    text = path.read_text()
    at = text.index(heading) + len(heading)
    between = text[at:text.index("```bash\n", at)]
    assert not re.search(r"^#", between, flags=re.M), f"{path.name}: {heading!r} has no bash block of its own"
    return markdown_block(path, heading)


def user_env(**extra: str) -> Dict[str, str]:
    """A user's shell: the virtualenv active, no Ray/asvp settings of the test session."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ASVP_", "TQDM_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run_bash(script: str, cwd: Path, env: Dict[str, str], timeout: float) -> str:
    """Run ``script`` with ``set -euo pipefail`` in a session of its own; its output, or fail."""
    p = subprocess.Popen(["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            _stop([p.pid], sid=p.pid)
    assert p.returncode == 0, f"the block failed (exit {p.returncode}):\n{script}\n---\n{out[-6000:]}"
    return out


def _stop(pids: List[int], sid: Optional[int] = None, marker: Optional[str] = None) -> None:
    """Stop, by pid, the processes of session ``sid`` and those whose command line holds ``marker``."""
    found = [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != os.getpid()
             and ((sid is not None and _sid(int(d)) == sid) or (marker and marker in _cmdline(int(d))))]
    LoopbackCluster._signal_all(sorted(set(pids) | set(found)))


@pytest.fixture
def own_tmpdir():
    """A short private TMPDIR for the block's commands, the temp dir a user's shell may set anyway:
    Ray keeps its sessions and its `ray_current_cluster` file under it, so the block's `ray.init()`
    starts a local instance of its own instead of joining a cluster that other work on this shared
    machine started under /tmp/ray (a test's `ray.cluster_utils.Cluster`). Processes still running
    from it afterwards are stopped by pid."""
    d = tempfile.mkdtemp(prefix="asvp-docs-", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        yield d
    finally:
        _stop([], marker=d)
        shutil.rmtree(d, ignore_errors=True)


def user_checkout(tmp: Path) -> Path:
    """A working directory laid out like the user's checkout for the docs' relative paths
    (`examples/...`; `runs/` is created by the commands)."""
    work = tmp / "checkout"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    return work


# ---------------------------------------------------------------------------------- docs/labelling.md
def label_studio_json_export(tasks: List[dict], labels: List[str]) -> List[dict]:
    """What Label Studio's JSON export holds for ``tasks`` (as imported from
    `round-K.labelstudio.json`) annotated with ``labels`` through the `labelstudio-config.xml`
    view (Choices `label` on Image `image`): its own task and annotation ids, the task's data,
    one annotation each."""
    stamp = "2026-12-05T12:00:00.000000Z"
    out = []
    for n, (task, label) in enumerate(zip(tasks, labels), start=1):
        result = {"value": {"choices": [label]}, "id": f"r{n:05d}", "from_name": "label", "to_name": "image",
                  "type": "choices", "origin": "manual"}
        ann = {"id": 1000 + n, "completed_by": 1, "result": [result], "was_cancelled": False,
               "ground_truth": False, "created_at": stamp, "updated_at": stamp, "draft_created_at": None,
               "lead_time": 3.2, "prediction": {}, "result_count": 1, "unique_id": f"u{n:05d}",
               "import_id": None, "last_action": None, "bulk_created": False, "task": n, "project": 1,
               "updated_by": 1, "parent_prediction": None, "parent_annotation": None, "last_created_by": None}
        out.append({"id": n, "annotations": [ann], "file_upload": None, "drafts": [], "predictions": [],
                    "data": task["data"], "meta": {}, "created_at": stamp, "updated_at": stamp,
                    "inner_id": n, "total_annotations": 1, "cancelled_annotations": 0,
                    "total_predictions": 0, "comment_count": 0, "unresolved_comment_count": 0,
                    "last_comment_updated_at": None, "project": 1, "updated_by": 1, "comment_authors": []})
    return out


@pytest.mark.slow
@pytest.mark.long  # 72-86 s (feature extraction of 20,000 images): in make test-long, to keep make test under 25 min
def test_readme_human_labellers_block_runs_verbatim(tmp_path, own_tmpdir):
    """docs/labelling.md's "Human labellers" block (README.md's until it moved there) on
    examples/fashion_mnist.yaml, as written: init, select (round 0), the labeller's export.json,
    label, status, select (round 1). The one step the block leaves to the user, labelling in Label
    Studio, is done here: export.json is written in Label Studio's JSON export form with the true
    Fashion-MNIST labels of the queried ids."""
    from asvp_ray.data.fashion_mnist import CLASSES, FashionMNISTSource

    block = section_block(LABELLING, "# Human labellers")
    lines = block.splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if line.startswith("# ... label them"))
    before, after = "".join(lines[:cut]), "".join(lines[cut:])
    assert "asvp-ray label runs/hitl export.json" in after, block
    work = user_checkout(tmp_path)
    # ASVP_RAY_DASHBOARD=0: the docs' setting for runs that never look at the dashboard (CONTRIBUTING.md)
    env = user_env(ASVP_RAY_DASHBOARD="0", TMPDIR=own_tmpdir)
    t0 = time.monotonic()
    out = run_bash(before, work, env, timeout=900)
    run = work / "runs" / "hitl"
    assert "round 0: 200 images selected by random" in out, out[-3000:]
    tasks = json.loads((run / "queries" / "round-0.labelstudio.json").read_text())
    ids = [t["data"]["asvp_id"] for t in tasks]
    queried = [int(line.split(",")[0]) for line in (run / "queries" / "round-0.csv").read_text().splitlines()[1:]]
    assert ids == queried and len(ids) == 200
    assert all((run / "queries" / "round-0" / f"{i}.png").is_file() for i in ids)
    truth = FashionMNISTSource(split="train", limit=15000).labels
    (work / "export.json").write_text(json.dumps(label_studio_json_export(tasks, [CLASSES[truth[i]] for i in ids])))

    out = run_bash(after, work, env, timeout=900)
    seconds = time.monotonic() - t0
    assert "imported 200 label(s) into round 0; 0 pending (labelstudio-json)" in out, out[-3000:]
    assert "total labelled: 200; pending: 0" in out, out[-3000:]
    assert "round 1: 200 images selected by margin" in out, out[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert [r["n_labeled"] for r in summary["rounds"]] == [200]
    check_proxy_against_reference(run, [r["proxy_test_accuracy"] for r in summary["rounds"]])
    import pyarrow.parquet as pq

    lab = pq.read_table(run / "labeled.parquet").to_pydict()
    assert sorted(lab["id"]) == sorted(ids) and np.array_equal(np.asarray(lab["label"]), truth[np.asarray(lab["id"])])
    round1 = [int(line.split(",")[0]) for line in (run / "queries" / "round-1.csv").read_text().splitlines()[1:]]
    assert len(round1) == 200 and not set(round1) & set(ids)
    print(f"human labellers block: {seconds:.0f} s")


@pytest.mark.slow
@pytest.mark.long
def test_readme_tune_block_runs_verbatim(tmp_path, own_tmpdir):
    """docs/studies.md's "Ray Tune studies" block (README.md's until it moved there), as written,
    in a checkout-like working directory: the two-trial study over examples/smoke.yaml, one trial
    at a time on this 2-CPU machine, each with a final model; results.csv, best_config.yaml and
    curves agree with the trials' runs."""
    from tests.test_tune import _check_study_outputs

    block = section_block(STUDIES, "## Ray Tune studies")
    assert block.strip().startswith("asvp-ray tune"), block
    work = user_checkout(tmp_path)
    t0 = time.monotonic()
    run_bash(block, work, user_env(ASVP_RAY_DASHBOARD="0", TMPDIR=own_tmpdir), timeout=1200)
    seconds = time.monotonic() - t0
    rows = _check_study_outputs(work / "runs" / "study", 2, tmp_path, rerun_best=False)
    assert {row["strategy"] for row in rows} == {"margin", "entropy"}
    print(f"tune block: {seconds:.0f} s")


# ---------------------------------------------------------------------------------- docs/cluster.md
def fill_placeholders(block: str, head: str, shared: str) -> str:
    """A block of docs/cluster.md with its placeholders filled in as its text says a user does:
    `HEAD:8265` is the head's job server, `/shared` the shared file system, `RAY_AUTH_TOKEN=...`
    the cluster's token (already exported by the block that started the cluster) and `JOB_ID`
    the id `ray job submit` printed (kept in $JOB_ID below)."""
    assert "http://HEAD:8265" in block and "/shared/" in block, block
    return (block.replace("http://HEAD:8265", f"http://{head}")
                 .replace("/shared/", shared.rstrip("/") + "/")
                 .replace("RAY_AUTH_TOKEN=...", 'RAY_AUTH_TOKEN="$RAY_AUTH_TOKEN"')
                 .replace("JOB_ID", '"$JOB_ID"'))


def _with_job_id(block: str, log: str) -> str:
    """``block`` with its `ray job submit` command's output kept in ``log`` and its job id in
    $JOB_ID for the commands after it (they name `JOB_ID`)."""
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ray job submit"))
    end = start
    while lines[end].rstrip().endswith("\\"):
        end += 1
    lines[end] += f" 2>&1 | tee {log}"
    lines.insert(end + 1, f"JOB_ID=$(grep -o 'raysubmit_[A-Za-z0-9]*' {log} | head -n 1)")
    return "\n".join(lines) + "\n"


@pytest.mark.slow
@pytest.mark.long
def test_cluster_docs_job_submit_and_study_blocks_run_on_the_try_it_cluster():
    """docs/cluster.md's "`ray job submit` with a runtime environment" and "Studies on a
    cluster" blocks, against the two-node cluster that "Try it on one machine" starts (its lines up
    to its own job submission: the token, the private temp dir, the two `ray start`). Each block's
    placeholders are filled in as a user does (HEAD:8265 -> that cluster's job server; /shared ->
    a folder in its temp dir; JOB_ID -> the id `ray job submit` printed); every other word runs as
    written, from the repository root with the virtualenv active."""
    try_it = markdown_block(CLUSTER_DOCS, "## Try it on one machine")
    start = try_it[:try_it.index("\nray job submit") + 1]
    assert "ray start --head" in start and re.search(r"^T=", start, flags=re.M), start
    ports = [int(p) for p in re.findall(r"port=(\d+)", start)]
    dashboard = re.search(r"--dashboard-port=(\d+)", start).group(1)
    head = f"127.0.0.1:{dashboard}"
    assert ports and not [p for p in ports if 10002 <= p <= 19999], ports
    submit = section_block(CLUSTER_DOCS, "## `ray job submit` with a runtime environment")
    study = section_block(CLUSTER_DOCS, "## Studies on a cluster")
    assert "JOB_ID" in submit and "asvp-ray tune" in study
    script = (start + 'echo "TEMP_DIR=$T"\n'
              + _with_job_id(fill_placeholders(submit, head, "$T/shared"), "$T/submit.log")
              + 'echo "JOB=$JOB_ID"\n'
              + fill_placeholders(study, head, "$T/shared"))
    env = user_env()
    p = subprocess.Popen(["bash", "-c", "set -euo pipefail\n" + script], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    sid, tmp, t0 = p.pid, None, time.monotonic()
    try:
        out, _ = p.communicate(timeout=1500)
        seconds = time.monotonic() - t0
        out = re.sub(r"\x1b\[[0-9;]*m", "", out)  # the Ray CLI's colours
        tmp = next((line.split("=", 1)[1] for line in out.splitlines() if line.startswith("TEMP_DIR=")), None)
        assert p.returncode == 0 and tmp, f"the blocks failed (exit {p.returncode}):\n{script}\n---\n{out[-8000:]}"
        job = next((line.split("=", 1)[1] for line in out.splitlines() if line.startswith("JOB=")), "")
        assert job.startswith("raysubmit_"), out[-6000:]
        assert "FATAL" not in out, out[-6000:]
        # `ray job submit` and then `ray job status` said it succeeded; `ray job logs` showed the rounds
        assert out.count(f"Job '{job}' succeeded") == 2, out[-6000:]
        logs = out[out.index(f"Job '{job}' succeeded"):]
        assert f"Running entrypoint for job {job}" in logs and "round  2: +40 by margin" in logs, out[-6000:]
        summary = json.loads((Path(tmp) / "shared" / "runs" / "smoke" / "summary.json").read_text())
        assert summary["status"] == "finished" and [x["n_labeled"] for x in summary["rounds"]] == [40, 80, 120]
        # the study: the grid's two trials, run on the shared path; `--scheduler asha` may stop
        # the weaker one early, the best (first) finished with a final model
        from tests.test_tune import _rows

        study_dir = Path(tmp) / "shared" / "studies" / "smoke"
        rows = _rows(study_dir)
        assert len(rows) == 2 and {r["strategy"] for r in rows} == {"margin", "entropy"}, rows
        assert {r["status"] for r in rows} <= {"finished", "stopped"} and rows[0]["status"] == "finished", rows
        assert all(0 < int(r["rounds"]) < 3 for r in rows if r["status"] == "stopped"), rows
        for row in rows:
            assert Path(row["run_dir"]).is_relative_to(study_dir / "runs")
        best = json.loads((Path(rows[0]["run_dir"]) / "summary.json").read_text())
        assert best["status"] == "finished" and best["final"]["test_accuracy"] is not None
        assert (study_dir / "best_config.yaml").is_file() and (study_dir / "curves.png").is_file()
        print(f"job submit + study blocks: {seconds:.0f} s")
    finally:
        if p.poll() is None:
            p.kill()
        _stop([], sid=sid, marker=tmp)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------- the Markdown itself
MARKDOWN = [README, ROOT / "CONTRIBUTING.md", ROOT / "bench" / "README.md", ROOT / "cluster" / "README.md",
            *sorted(DOCS.glob("*.md"))]
GEN_CONFIG_DOCS = ROOT / "scripts" / "gen_config_docs.py"


def _outside_fences(text: str) -> List[str]:
    """``text``'s lines outside fenced code blocks."""
    out, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence:
            out.append(line)
    return out


def github_anchors(path: Path) -> set:
    """The anchors GitHub gives ``path``'s headings: lower case, inline code marks and punctuation
    but ``-`` and ``_`` dropped, spaces as ``-``; a repeated one gets ``-1``, ``-2``, ..."""
    seen: Dict[str, int] = {}
    for line in _outside_fences(path.read_text()):
        m = re.match(r"#{1,6} +(.*?) *#* *$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        if n:
            seen[f"{slug}-{n}"] = 1
    return set(seen)


def _gen_config_docs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_config_docs", GEN_CONFIG_DOCS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bash_blocks(path: Path) -> List[str]:
    return re.findall(r"^```bash\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def test_readme_is_short_and_starts_with_the_two_commands():
    """README.md: at most 250 lines; the first section is "Two commands" (`make demo`, `make test`);
    the demo's measured table and the Python API stay in it; the rest is one link away."""
    text = README.read_text()
    assert len(text.splitlines()) <= 250, f"README.md has {len(text.splitlines())} lines; move a section to docs/"
    sections = [line for line in _outside_fences(text) if line.startswith("## ")]
    assert sections[:2] == ["## Two commands", "## What the demo shows"], sections
    assert _bash_blocks(README)[0].startswith("make demo ") and "\nmake test " in _bash_blocks(README)[0]
    assert "| proxy test accuracy | 0.656 |" in text and "### From Python" in text
    for target in ["docs/run-directory.md", "docs/methods.md", "docs/labelling.md", "docs/studies.md",
                   "docs/configuration.md", "docs/gpus.md", "docs/bad-input.md", "bench/README.md",
                   "CONTRIBUTING.md", "docs/cluster.md"]:
        assert f"]({target}" in text, f"README.md does not link {target}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(path):
    """Every relative link (and image) of the documentation names a file of the checkout, and its
    ``#anchor`` a heading of that file (GitHub's anchors)."""
    bad = []
    for line in _outside_fences(path.read_text()):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{target}: no such file {dest}")
            elif anchor and dest.suffix == ".md" and anchor not in github_anchors(dest):
                bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{path.relative_to(ROOT)}: " + "; ".join(bad)


def test_each_command_block_is_written_once():
    """A bash block lives in one document (a moved section is moved, not copied): the tests above
    run the copy a user reads."""
    where: Dict[str, List[str]] = {}
    for path in MARKDOWN:
        for block in _bash_blocks(path):
            where.setdefault(block, []).append(str(path.relative_to(ROOT)))
    twice = {b.splitlines()[0]: paths for b, paths in where.items() if len(paths) > 1}
    assert not twice, twice


def test_configuration_reference_is_up_to_date():
    """docs/configuration.md below its marker is what scripts/gen_config_docs.py writes from the
    schema today (generated in memory, nothing written)."""
    gen = _gen_config_docs()
    current = gen.DOC.read_text()
    assert gen.render(current) == current, (
        "docs/configuration.md is out of date with asvp_ray.config.Config: run `python scripts/gen_config_docs.py`")


def test_config_docs_generator_lists_every_key_and_keeps_the_prose():
    """The generator writes only below the marker, lists every key of the schema (nested sections
    included, with the section's own defaults: data.test is a test split), and refuses a file
    without the marker."""
    from pydantic import BaseModel

    from asvp_ray.config import Config, model_of

    gen = _gen_config_docs()
    prose = "# Configuration\n\nHand-written | kept as it is.\n\n"
    out = gen.render(prose + gen.MARKER + "\nstale generated text\n")
    assert out.startswith(prose + gen.MARKER + "\n") and "stale generated text" not in out

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            yield prefix + name
            sub = model_of(field.annotation)
            if sub is not None and issubclass(sub, BaseModel):
                yield from keys(sub, f"{prefix}{name}.")

    rows = {line.split("|")[1].strip().strip("`"): line for line in out.splitlines() if line.startswith("| `")}
    missing = [k for k in keys(Config) if k not in rows]
    assert not missing, missing
    assert "| `tf_efficientnet_lite0` |" in rows["backbone.name"]
    assert "| `test` |" in rows["data.test.split"] and "| `train` |" in rows["data.pool.split"]
    assert "| `[100, 100, 100]` |" in rows["budget.schedule"] and "labels bought per round" in rows["budget.schedule"]
    assert "float > 0, <= 1 \\| null" in rows["backbone.crop_pct"], rows["backbone.crop_pct"]
    with pytest.raises(ValueError, match="no marker line"):
        gen.render(prose)
