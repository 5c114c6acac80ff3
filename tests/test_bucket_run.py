"""A run directory kept in a bucket (``--out s3://...``), against the moto S3 server the suite runs:
commits by one record, the single-writer lease, crashes between uploads and the record, and whole
runs through the CLI as the docs show them (killed, then resumed from another folder with nothing
local)."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from asvp_ray.core.errors import RunDirError
from asvp_ray.loop.rundir import RunDir
from tests.conftest import ROOT, SMOKE
from tests.reference import check_proxy_against_reference

CLI = [str(Path(sys.executable).parent / "asvp-ray")]
RUN = ["budget.schedule=[30,20,20]", "proxy.epochs=10", "final.training_method=none"]


def _objects(fs, prefix):
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


def _fresh(s3_server, name="unit"):
    prefix = f"{name}-{uuid.uuid4().hex[:8]}"
    return s3_server["uri"](prefix), f"asvp/{prefix}"


def _commit_round(rd: RunDir, n: int) -> None:
    rd.write_labeled([*range(n)], [i % 3 for i in range(n)], [0] * n)
    rd.write_summary({"rounds": [{"round": 0, "n_labeled": n}]})
    rd.write_state({"next_round": 1, "n_labeled": n})


@pytest.mark.parametrize("store", ["s3_server", "gcs_server"])
def test_a_commit_is_one_record_and_readers_see_only_committed_rounds(store, request, monkeypatch):
    server = request.getfixturevalue(store)
    monkeypatch.setenv("ASVP_LEASE_SETTLE_S", "0.05")
    uri, prefix = _fresh(server)
    fs = server["fs"]
    rd = RunDir(uri).lock()
    try:
        rd.write_config("method: svpp\n")
        _commit_round(rd, 10)
        rec = json.loads(fs.open_input_stream(f"{prefix}/_commit.json").read())
        assert rec["generation"] == 1 and set(rec["files"]) == {"config.yaml", "labeled.parquet", "summary.json",
                                                                  "state.json"}
        # written but not committed: a reader in another folder sees the first round only
        rd.write_labeled([*range(20)], [0] * 20, [0] * 20)
        other = RunDir(uri)
        assert other.read_state() == {"next_round": 1, "n_labeled": 10}
        assert len(other.read_labeled()["id"]) == 10
        _commit_round(rd, 20)
        rec2 = json.loads(fs.open_input_stream(f"{prefix}/_commit.json").read())
        assert rec2["generation"] == 2
        assert rec2["files"]["config.yaml"] == rec["files"]["config.yaml"]  # unchanged: not uploaded again
        assert RunDir(uri).read_state()["n_labeled"] == 20
        # generation 1's replaced objects are gone: the bucket holds what the record names, no more
        named = sorted(f["object"] for f in rec2["files"].values())
        assert [o for o in _objects(fs, prefix) if o.startswith("gen/")] == named
    finally:
        rd.unlock()
    assert "_lease.json" not in _objects(fs, prefix)


def test_a_second_writer_is_refused_naming_the_holder_and_an_expired_lease_is_taken_over(s3_server, monkeypatch,
                                                                                        caplog):
    monkeypatch.setenv("ASVP_LEASE_SETTLE_S", "0.05")
    monkeypatch.setenv("ASVP_LEASE_TTL_S", "2")
    uri, prefix = _fresh(s3_server)
    first = RunDir(uri).lock()
    _commit_round(first, 10)
    with pytest.raises(RunDirError, match=r"in use by another asvp-ray process \(pid \d+ on .*\); its lease expires "
                                          r"at .*--force"):
        RunDir(uri).lock()
    time.sleep(3)  # renewed meanwhile: still refused
    with pytest.raises(RunDirError, match="in use by another asvp-ray process"):
        RunDir(uri).lock()
    # the first process dies without releasing (its renewals stop; the lease object stays)
    first.bucket.lease._stop.set()
    first.bucket.lease._thread.join()
    first.bucket.lease = None
    time.sleep(2.5)
    with caplog.at_level(logging.WARNING, logger="asvp_ray.loop.bucket"):
        second = RunDir(uri).lock()
    assert "taking over the lease" in caplog.text and "expired" in caplog.text
    assert second.read_state()["n_labeled"] == 10
    _commit_round(second, 30)
    second.unlock()
    assert RunDir(uri).read_state()["n_labeled"] == 30


def test_force_takes_a_valid_lease_with_a_warning(s3_server, monkeypatch, caplog):
    monkeypatch.setenv("ASVP_LEASE_SETTLE_S", "0.05")
    uri, _ = _fresh(s3_server)
    first = RunDir(uri).lock()
    with caplog.at_level(logging.WARNING, logger="asvp_ray.loop.bucket"):
        second = RunDir(uri).lock(force=True)
    assert "although it is valid" in caplog.text
    # the first writer finds out at its next renewal and refuses to commit
    deadline = time.monotonic() + 30
    while not first.bucket.lease.lost and time.monotonic() < deadline:
        time.sleep(0.2)
    monkeypatch.setenv("ASVP_LEASE_TTL_S", "60")
    assert first.bucket.lease.lost
    with pytest.raises(RunDirError, match="lost the lease"):
        _commit_round(first, 5)
    second.unlock()
    first.bucket.release()


KILLED_WRITER = r"""
import os, sys
from asvp_ray.loop.rundir import RunDir
rd = RunDir(sys.argv[1]).lock()
rd.write_labeled([*range(10)], [0] * 10, [0] * 10)
rd.write_state({"next_round": 1, "n_labeled": 10})
rd.write_labeled([*range(50)], [0] * 50, [0] * 50)
os.environ["ASVP_KILL_AT"] = sys.argv[2]
rd.write_state({"next_round": 2, "n_labeled": 50})
"""


@pytest.mark.parametrize("point,committed", [("bucket:before_commit", 10), ("bucket:after_commit", 50)])
def test_a_writer_killed_around_its_commit_record_leaves_one_whole_round(s3_server, tmp_path, point, committed):
    """Killed after its uploads but before the record: readers see the previous round; killed after
    the record but before removing the replaced objects: the new one. Either way the next writer
    removes every object the record does not name."""
    uri, prefix = _fresh(s3_server)
    fs = s3_server["fs"]
    env = dict(os.environ, ASVP_LEASE_SETTLE_S="0.05", ASVP_LEASE_TTL_S="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, uri, point], env=env, capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == -9, r.stderr[-2000:]
    rec = json.loads(fs.open_input_stream(f"{prefix}/_commit.json").read())
    stray = [o for o in _objects(fs, prefix) if o.startswith("gen/") and o not in
             {f["object"] for f in rec["files"].values()}]
    assert stray, "objects no record names should be left in the bucket by the kill"
    reader = RunDir(uri)
    assert reader.read_state() == {"next_round": 1 if committed == 10 else 2, "n_labeled": committed}
    assert len(reader.read_labeled()["id"]) == committed
    time.sleep(1.5)  # its lease expires
    nxt = RunDir(uri).lock()
    try:
        assert nxt.read_state()["n_labeled"] == committed
        assert not [o for o in _objects(fs, prefix) if o in stray], "the next writer removes what no record names"
    finally:
        nxt.unlock()


def test_credentials_in_the_run_uri_are_never_written(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("ASVP_LEASE_SETTLE_S", "0.05")
    key, secret = "AKIDSECRETRUNKEY", "verysecretrunsecret"
    prefix = f"creds-{uuid.uuid4().hex[:8]}"
    uri = s3_server["uri"](prefix).replace("s3://asvp/", f"s3://{key}:{secret}@asvp/")
    rd = RunDir(uri).lock()
    rd.write_config(f"storage: {uri}\n")
    rd.open_store(None)
    _commit_round(rd, 5)
    assert secret not in rd.location and key not in rd.location
    rd.unlock()
    fs = s3_server["fs"]
    for o in _objects(fs, f"asvp/{prefix}"):
        data = fs.open_input_stream(f"asvp/{prefix}/{o}").read()
        assert secret.encode() not in data and key.encode() not in data, o


# ---------------------------------------------------------------------------- whole runs, as the docs show
def _cli(*args, cwd, env_extra=None, timeout=900):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASVP_KILL", "RAY_ADDRESS"))}
    env.update(TQDM_DISABLE="1", **(env_extra or {}))
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd)


def _sets():
    return [x for s in RUN for x in ("--set", s)]


def _outcome_local(out: Path):
    lab = pq.read_table(out / "labeled.parquet").to_pydict()
    rounds = json.loads((out / "summary.json").read_text())["rounds"]
    return lab, [(r["round"], r["n_labeled"], r["selected_by"], r["proxy_test_accuracy"]) for r in rounds]


def _outcome_bucket(uri: str):
    rd = RunDir(uri)
    return _outcome_local(rd.path)


@pytest.mark.slow
@pytest.mark.long
def test_a_run_in_a_bucket_killed_and_resumed_from_another_folder_ends_as_a_local_run(s3_server, tmp_path):
    local = tmp_path / "local"
    r = _cli("run", SMOKE, "--out", local, *_sets(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    uri, prefix = _fresh(s3_server, "cli")
    first = tmp_path / "machine-a"
    first.mkdir()
    # killed as round 2 starts selecting (a kill -9: the lease stays until it expires)
    r = _cli("run", SMOKE, "--out", uri, *_sets(), cwd=first,
             env_extra={"ASVP_KILL_AT": "phase:select:r2", "ASVP_LEASE_TTL_S": "4"})
    assert r.returncode != 0
    st = _cli("status", uri, cwd=first)
    assert st.returncode == 0 and "total labelled: 50" in st.stdout, st.stdout + st.stderr
    # another machine (nothing local), at once: refused while the lease is valid, naming its holder
    second = tmp_path / "machine-b"
    second.mkdir()
    r = _cli("run", SMOKE, "--out", uri, *_sets(), cwd=second, env_extra={"ASVP_LEASE_TTL_S": "4"})
    if r.returncode != 0:  # the lease had not expired yet
        assert "in use by another asvp-ray process" in r.stderr + r.stdout, r.stderr[-2000:]
        time.sleep(5)
        r = _cli("run", SMOKE, "--out", uri, *_sets(), cwd=second, env_extra={"ASVP_LEASE_TTL_S": "4"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout and "at round 2" in r.stdout, r.stdout
    assert _outcome_bucket(uri) == _outcome_local(local)
    assert not list(second.iterdir()), "the run wrote into the folder it was started from"
    fs = s3_server["fs"]
    names = _objects(fs, prefix)
    assert "_commit.json" in names and "_lease.json" not in names
    assert any(n.startswith("features/v0/") for n in names)
    rep = _cli("report", uri, local, "--out", tmp_path / "report", cwd=second)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert (tmp_path / "report" / "table.csv").is_file()


def test_human_rounds_on_a_run_in_a_bucket_from_any_folder(s3_server, ray_local, feature_cache, tmp_path,
                                                            monkeypatch):
    """init / select / label / status against an s3:// run, each from a different folder (as from
    different laptops): the labellers' files come to ./<run>-queries/ with their image paths there,
    the labels go to the bucket, and nothing of the run stays in the folders."""
    from typer.testing import CliRunner

    from asvp_ray.cli import app
    from asvp_ray.data.fashion_mnist import FashionMNISTSource

    truth = FashionMNISTSource(split="train", limit=400).labels
    monkeypatch.setenv("ASVP_LEASE_SETTLE_S", "0.05")
    runner = CliRunner()

    def cli(where, *args):
        where.mkdir(exist_ok=True)
        monkeypatch.chdir(where)
        r = runner.invoke(app, [str(a) for a in args])
        return r.exit_code, r.output

    uri, prefix = _fresh(s3_server, "hitl")
    code, text = cli(tmp_path / "a", "init", SMOKE, "--out", uri, "--set", "budget.schedule=[30,20]",
                     "--set", "final.training_method=none", "--set", f"feature_cache={feature_cache}")
    assert code == 0, text
    code, text = cli(tmp_path / "b", "select", uri)
    assert code == 0, text
    name = prefix.rsplit("/", 1)[-1]
    q = tmp_path / "b" / f"{name}-queries"
    lines = (q / "round-0.csv").read_text().splitlines()
    ids = [int(x.split(",")[0]) for x in lines[1:]]
    assert len(ids) == 30 and str(q / "round-0.csv") in text
    tasks = json.loads((q / "round-0.labelstudio.json").read_text())
    assert all(Path(t["data"]["path"]).is_file() and str(q) in t["data"]["path"] for t in tasks)
    # three labellers import their thirds at the same moment, each from its own folder: the lease
    # queues them (each waits for the others), and every label lands on its image
    procs = []
    for k in range(3):
        part = tmp_path / f"labels-{k}.csv"
        part.write_text("id,label\n" + "".join(f"{i},{truth[i]}\n" for i in ids[k::3]))
        (tmp_path / f"c{k}").mkdir()
        procs.append(subprocess.Popen(CLI + ["label", uri, str(part)], cwd=tmp_path / f"c{k}", text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, TQDM_DISABLE="1", ASVP_LEASE_SETTLE_S="0.3")))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    pending = [re.search(r"imported 10 label\(s\) into round 0; (\d+) pending", o) for o in outs]
    assert all(pending), outs
    assert sorted(int(m.group(1)) for m in pending) == [0, 10, 20], outs  # one after the other
    code, text = cli(tmp_path / "d", "status", uri)
    assert code == 0 and "total labelled: 30; pending: 0" in text, text
    code, text = cli(tmp_path / "d", "select", uri)  # closes round 0, opens round 1
    assert code == 0 and "round 1: 20 images selected" in text, text
    rd = RunDir(uri)
    got = rd.read_labeled()
    assert sorted(got["id"].tolist()) == sorted(ids) and all(truth[i] == lab for i, lab in zip(got["id"], got["label"]))
    assert all(not list((tmp_path / f"c{k}").iterdir()) for k in range(3))
    assert [p.name for p in (tmp_path / "a").iterdir()] == []


# ---------------------------------------------------------------------------- a study in a bucket
def _trials_in_bucket(uri: str):
    """{trial id: its committed summary.json} of a study in a bucket."""
    from asvp_ray.storage.locations import child_folders, join_uri, resolve_uri
    from asvp_ray.loop.bucket import read_committed

    fs, root = resolve_uri(uri)
    out = {}
    for t in child_folders(fs, f"{root}/runs"):
        data = read_committed(join_uri(uri, "runs", t), "summary.json")
        out[t] = json.loads(data) if data else {}
    return out


@pytest.mark.slow
@pytest.mark.long
def test_a_study_in_a_bucket_interrupted_and_resumed_from_another_folder(s3_server, tmp_path):
    """`asvp-ray tune --out s3://...` (credentials in the URI): Ctrl+C once a trial has finished,
    then the same command from another folder. Trials' runs, the feature cache, Tune's state and the
    results all live in the bucket; every round ran once; features were extracted once; the folders
    the commands ran in stay empty and no object holds the secret."""
    import csv
    import io
    import signal

    from asvp_ray.storage.locations import child_folders, join_uri, resolve_uri
    from asvp_ray.loop.bucket import read_committed

    secret = f"sEcReT-{uuid.uuid4().hex[:10]}"
    prefix = f"study-{uuid.uuid4().hex[:8]}"
    uri = s3_server["uri"](prefix).replace("s3://asvp/", f"s3://asvp-test:{secret}@asvp/")
    space = tmp_path / "space.yaml"
    space.write_text("strategy: {grid: [margin, entropy]}\n")
    args = ["tune", SMOKE, "--space", space, "--out", uri, "--max-concurrent", "1", *_sets()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASVP_KILL", "RAY_ADDRESS"))}
    env.update(TQDM_DISABLE="1", ASVP_LEASE_TTL_S="5", ASVP_LEASE_SETTLE_S="0.1")
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    a.mkdir()
    b.mkdir()
    first = subprocess.Popen(CLI + [str(x) for x in args], cwd=a, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while first.poll() is None and time.monotonic() < deadline:
        trials = _trials_in_bucket(s3_server["uri"](prefix))
        if any(s.get("status") == "finished" for s in trials.values()) and len(trials) == 2:
            break
        time.sleep(1.0)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 130, (out[-2000:], err[-4000:])
    assert "study interrupted; rerun the same command to resume it" in err
    assert secret not in out + err
    before = {t: read_committed(join_uri(s3_server["uri"](prefix), "runs", t), "run.log")
              for t, s in _trials_in_bucket(s3_server["uri"](prefix)).items() if s.get("status") == "finished"}
    assert len(before) == 1

    second = subprocess.run(CLI + [str(x) for x in args], cwd=b, env=env, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    assert secret not in second.stdout + second.stderr
    fs, root = resolve_uri(s3_server["uri"](prefix))
    rows = list(csv.DictReader(io.StringIO(fs.open_input_stream(f"{root}/results.csv").read().decode())))
    assert sorted((r["strategy"], r["status"], r["rounds"], r["n_labeled"]) for r in rows) == [
        ("entropy", "finished", "3", "70"), ("margin", "finished", "3", "70")]
    assert all(r["trial"] in second.stdout for r in rows)
    for r in rows:
        assert r["run_dir"].startswith("s3://asvp-test:***@asvp/") or "***" in r["run_dir"], r["run_dir"]
        # the proxy learns what the bought labels teach: each round near the independent reference
        # (tests/reference.py), read from the bucket (committed files; feature objects as they are)
        run_uri = join_uri(s3_server["uri"](prefix), "runs", r["trial"])

        def read(rel, run_uri=run_uri, run_root=f"{root}/runs/{r['trial']}"):
            return read_committed(run_uri, rel) or fs.open_input_stream(f"{run_root}/{rel}").read()

        got = [x["proxy_test_accuracy"] for x in json.loads(read("summary.json"))["rounds"]]
        check_proxy_against_reference(read, got)
        assert float(r["proxy_test_accuracy"]) == pytest.approx(got[-1])
        log = read_committed(join_uri(s3_server["uri"](prefix), "runs", r["trial"]), "run.log").decode()
        for k in range(3):  # the resumed study kept the finished trial and resumed the other
            assert log.count(f"round {k}: +") == 1, (r["trial"], log)
        assert "extracting feature version" not in log and "reusing features v0 from the feature cache" in log
        if r["trial"] in before:
            assert log.encode() == before[r["trial"]]
        # Tune's own results, one report per round, in the bucket
        results = fs.open_input_stream(f"{root}/tune/{r['trial']}/result.json").read().decode().splitlines()
        assert [json.loads(x)["round"] for x in results][-3:] == [0, 1, 2]
    keys = child_folders(fs, f"{root}/feature_cache")
    assert len(keys) == 1 and "v0" in child_folders(fs, f"{root}/feature_cache/{keys[0]}")
    names = _objects(fs, root)
    assert {"study.yaml", "results.csv", "best_config.yaml", "curves.png"} <= set(names)
    for n in names:
        assert secret.encode() not in fs.open_input_stream(f"{root}/{n}").read(), n
    assert not list(a.iterdir()) and not list(b.iterdir()), "the study wrote into the folder it was started from"
