"""A rehearsal of the shipped KubeRay cluster on this machine: Ray's own autoscaler (v2, as
cluster/kuberay/raycluster.yaml asks) with its fake node provider (nodes are local processes) and
the node types, labels, minimums and maximums read from raycluster.yaml; the RayJob's entrypoint
from rayjob.yaml submitted with ``ray job submit``. The fake GPU nodes declare ``GPU: 1`` and have
no card: the test-only switch ``ASVP_TEST_GPU_ON_CPU`` makes work that reserved a GPU compute on
the CPU, so scheduling is exactly a GPU run's. The run directory is where the RayJob puts it, a
bucket (here a prefix of the suite's moto S3 server): no node shares a file system with another
for the run, as on the shipped cluster, which has no shared volume.

What a user of the shipped cluster would check: the job finishes; the GPU group scales up from
zero for the extraction, idles out, comes back for the refresh's fine-tune, and is gone at the
end; nothing CPU-only ran on a GPU node; the labelled set is the one the same run gives locally.
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT
from tests.test_autoscale import FakeAutoscalingCluster

CLUSTER = ROOT / "cluster"
BIN = Path(sys.executable).parent
#: this machine has 2 cores: a node type's CPUs are capped here (Ray's CPUs are logical; 8 per pod
#: would let Ray start 8 concurrent tasks per fake node on 2 real cores)
MAX_CPUS_PER_NODE = 2
#: the autoscaler's idle timeout (300 s in raycluster.yaml), shortened so that the GPU group idles
#: out between the extraction and the refresh's fine-tune, as GPU pods do on a real cluster while
#: the proxy trains on the head
IDLE_TIMEOUT_S = 4
#: the only changes to the RayJob's entrypoint: a smaller pool and fewer epochs and rounds, and a
#: refresh before round 0's selection (score_drop may not fire on so small a pool)
SMALLER = ["--set", "data.pool.limit=1200", "--set", "data.test.limit=300",
           "--set", "budget.schedule=[60,60,60]", "--set", "proxy.epochs=20",
           "--set", "train.epochs=1", "--set", "train.lp_epochs=1",
           "--set", "refresh.policy=at_labels", "--set", "refresh.at=[60]",
           # the fine-tune's threads (and prefetch) follow its CPUs: the same on the cluster and locally
           "--set", "train.cpus_per_worker=2"]


def shipped_node_types() -> Dict:
    """The autoscaler's node types from cluster/kuberay/raycluster.yaml as the KubeRay autoscaler
    derives them (Ray's own conversion: resources, labels, min and max replicas), CPUs capped at
    MAX_CPUS_PER_NODE and memory left to this machine; and the head's CPUs and labels."""
    from asvp_ray.runtime.node_types import from_file

    path = CLUSTER / "kuberay" / "raycluster.yaml"
    types = from_file(path)
    head = next(t for t in types if t["head"])
    workers = {}
    for t in types:
        if t["head"]:
            continue
        res = {"CPU": min(int(t["resources"]["CPU"]), MAX_CPUS_PER_NODE), "object_store_memory": 120_000_000}
        if t["resources"].get("GPU"):
            res["GPU"] = int(t["resources"]["GPU"])
        workers[t["name"]] = {"resources": res, "labels": t["labels"], "node_config": {},
                              "min_workers": t["min"], "max_workers": t["max"]}
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    spec = next(d for d in docs if d["kind"] == "RayCluster")["spec"]
    return {"head_cpus": int(head["resources"].get("CPU", MAX_CPUS_PER_NODE)), "head_labels": head["labels"],
            "workers": workers, "autoscaler_v2": (spec.get("autoscalerOptions") or {}).get("version") == "v2",
            "idle_timeout_s": (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")}


def rayjob_entrypoint() -> List[str]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / "rayjob.yaml").read_text()) if d]
    job = next(d for d in docs if d["kind"] == "RayJob")["spec"]
    return shlex.split(job["entrypoint"]), yaml.safe_load(job["runtimeEnvYAML"])


class ShippedCluster(FakeAutoscalingCluster):
    """The shipped cluster's shape on the fake autoscaler: head labels and CPUs as shipped, a
    dashboard (job server), and autoscaler v2 when the config asks for it."""

    def __init__(self, shape: Dict, idle_timeout_s: float):
        super().__init__(head_cpus=shape["head_cpus"], worker_types=shape["workers"],
                         idle_timeout_minutes=idle_timeout_s / 60.0)
        self.shape = shape
        self.config["available_node_types"]["ray.head.default"]["labels"] = shape["head_labels"]
        self.config["max_workers"] = sum(t["max_workers"] for t in shape["workers"].values())
        if shape["autoscaler_v2"]:
            from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

            self.config["provider"].update(launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
            self._head_env = {"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                              "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
        else:
            self._head_env = {}

    def start(self) -> "ShippedCluster":
        path = self.tmp / "autoscaling.json"
        path.write_text(json.dumps(self.config))
        client_env = self.env
        self.env = dict(client_env, **self._head_env)
        try:
            rc = self._start("head", [
                "--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={self._free_port()}",
                f"--temp-dir={self.tmp / 'head'}", f"--autoscaling-config={path}", "--node-ip-address=127.0.0.1",
                f"--num-cpus={self.cpus}", "--num-gpus=0", "--object-store-memory=200000000",
                f"--labels={json.dumps(self.shape['head_labels'])}", "--disable-usage-stats", *self._node_ports()])
        finally:
            self.env = client_env
        assert rc == 0 or self._wait_for_nodes(1, 90), \
            f"ray start --head failed:\n{(self.tmp / 'head.log').read_text()[-3000:]}"
        return self


def _kinds(nodes: List[dict]) -> Dict[str, str]:
    from asvp_ray.runtime.placement import LABEL

    return {n["node_id"]: (n.get("labels") or {}).get(LABEL, "?") for n in nodes}


def _labelled_set(run_dir: Path) -> List[tuple]:
    t = pq.read_table(run_dir / "labeled.parquet").to_pydict()
    keys = [k for k in ("id", "label") if k in t]
    return sorted(zip(*(t[k] for k in keys)))


BUCKET = "s3://your-bucket/"


def _job_argv(tmp: Path, s3_server: Optional[dict] = None):
    """The RayJob's entrypoint with this machine's paths and bucket, its runtime env with the test
    switches. The run goes to the bucket the entrypoint names, here a fresh prefix of the moto S3
    server; every fake node has its credentials in its environment, as every pod of raycluster.yaml
    has them from the asvp-bucket Secret."""
    argv, runtime_env = rayjob_entrypoint()
    assert argv[:2] == ["asvp-ray", "run"]
    out = argv[argv.index("--out") + 1]
    assert out.startswith(BUCKET), f"the RayJob's run directory is not in the bucket: {out}"
    argv = [a.replace("/app/", f"{ROOT}/") for a in argv]  # the image's copy of the repository
    if s3_server is not None:
        argv[argv.index("--out") + 1] = s3_server["uri"](f"rehearsal-{uuid.uuid4().hex[:8]}/{out[len(BUCKET):]}")
    runtime_env.setdefault("env_vars", {}).update(ASVP_TEST_GPU_ON_CPU="1", ASVP_RESOURCE_TIMEOUT_S="240")
    return argv, runtime_env, argv[argv.index("--out") + 1]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The same command on a local Ray instance that declares two GPUs (Ray's own resource override;
    computed on the CPU by the same test switch as the fake GPU nodes): its labelled set and rounds,
    which every rehearsal must reproduce."""
    tmp = tmp_path_factory.mktemp("local")
    argv, runtime_env, _ = _job_argv(tmp)
    local = tmp / "local"
    argv[argv.index("--out") + 1] = str(local)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ASVP_"))}
    env.update(runtime_env["env_vars"], RAY_OVERRIDE_RESOURCES=json.dumps({"GPU": 2}))
    r = subprocess.run([str(BIN / argv[0]), *argv[1:], *SMALLER], env=env, capture_output=True,
                       text=True, timeout=900, cwd=tmp)
    assert r.returncode == 0, r.stderr[-4000:]
    return local


def _submit(cluster: "ShippedCluster", argv: List[str], runtime_env: dict) -> Tuple[str, float]:
    job_id = f"asvp-rehearsal-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    r = cluster.ray("job", "submit", "--no-wait", "--address", cluster.url, "--submission-id", job_id,
                    "--runtime-env-json", json.dumps(runtime_env), "--", *argv, *SMALLER, timeout=300)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return job_id, t0


def _wait_for_head_only(cluster: "ShippedCluster", timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [n for n in cluster.state("nodes") or [] if n["state"] == "ALIVE"]
        if len(alive) == 1:
            return
        time.sleep(2)


def _timeline(nodes: List[dict], t0: float) -> List[tuple]:
    """(start, end, kind, node) of every worker node, in seconds after ``t0`` (end None: alive)."""
    kinds = _kinds(nodes)

    def _s(when):  # the state API gives a local date-time string ('' or absent while alive)
        if not when:
            return None
        try:
            return float(when) / 1000 - t0 if float(when) > 0 else None
        except ValueError:
            return datetime.datetime.fromisoformat(str(when)).timestamp() - t0

    return sorted((_s(n.get("start_time_ms")), _s(n.get("end_time_ms")), kinds[n["node_id"]], n["node_id"][-6:])
                  for n in nodes if not n["is_head_node"])


def _check_run_dir(uri: str, local: Path) -> None:
    """The run in the bucket: finished, the same labelled set and rounds as the local run, nothing
    lost or duplicated."""
    from asvp_ray.storage.locations import resolve_uri
    from asvp_ray.loop.rundir import RunDir

    out_dir = RunDir(uri).path  # the last commit, pulled
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    # at_labels [60]: the 60 initial labels reach it before round 0 selects (fine-tune + v1)
    assert [x["refreshed"] for x in summary["rounds"]] == [True, False, False]
    ids = pq.read_table(out_dir / "labeled.parquet").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 3 * 60  # budget.schedule [60, 60, 60]
    assert _labelled_set(local) == _labelled_set(out_dir)
    local_rounds = json.loads((local / "summary.json").read_text())["rounds"]
    assert [r["n_labeled"] for r in summary["rounds"]] == [r["n_labeled"] for r in local_rounds]
    fs, root = resolve_uri(uri)
    for v in ("v0", "v1"):  # every pool image once in each feature version (every part object there)
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/features/{v}", recursive=False))
        parts = sorted(i.path for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
        got = [i for part in parts for i in pq.read_table(part, columns=["id"], filesystem=fs).column("id").to_pylist()]
        assert len(got) == len(set(got)) == 1200, f"feature version {v}: {len(got)} rows, {len(set(got))} ids"


@pytest.mark.slow
@pytest.mark.long
def test_the_shipped_kuberay_cluster_rehearsed_on_the_fake_autoscaler(tmp_path, local_run, s3_server):
    shape = shipped_node_types()
    assert shape["head_cpus"] == 0 and shape["autoscaler_v2"]
    gpu_types = [n for n, t in shape["workers"].items() if t["resources"].get("GPU")]
    cpu_types = [n for n, t in shape["workers"].items() if not t["resources"].get("GPU")]
    assert gpu_types and cpu_types and all(t["min_workers"] == 0 for t in shape["workers"].values())
    argv, runtime_env, out_dir = _job_argv(tmp_path, s3_server)

    cluster = ShippedCluster(shape, IDLE_TIMEOUT_S)
    try:
        cluster.start()
        job_id, t0 = _submit(cluster, argv, runtime_env)
        state = cluster.wait_for_job(job_id, timeout=1500)
        logs = cluster.ray("job", "logs", "--address", cluster.url, job_id).stdout
        assert state == "SUCCEEDED", f"job {state}:\n{logs[-6000:]}\n{cluster.diagnose(tmp_path)}"
        t_end = time.time()
        _wait_for_head_only(cluster)  # the workers idle out after the job: the cluster is back to its head
        nodes = cluster.state("nodes")
        kinds = _kinds(nodes)
        timeline = _timeline(nodes, t0)
        print("TIMELINE (s after submit: start, end, kind, node)\n" + "\n".join(map(str, timeline)))
        print(f"job took {t_end - t0:.0f} s")
        assert len([n for n in nodes if n["state"] == "ALIVE"]) == 1, f"workers still up after the job: {timeline}"
        gpu = [(s, e) for s, e, k, _ in timeline if k == "gpu"]
        assert gpu, f"no GPU node ever started: {timeline}"
        # scaled up from zero, idled out, and up again (the final model's fine-tune after the rounds)
        assert any(s2 > e1 for s1, e1 in gpu for s2, _ in gpu if e1 is not None), f"GPU group never came back: {timeline}"
        assert any(k == "cpu" for _, _, k, _ in timeline), f"no CPU node for the CPU work: {timeline}"

        # no CPU-only task or actor on a GPU node (Ray's state API)
        node_of_pid = {w["pid"]: w["node_id"] for w in cluster.state("workers") or []}
        gpu_work = ("FeatureExtractor", "RayTrainWorker", "_probe_gpu")
        placed = [(a["class_name"] or "", a["node_id"] or node_of_pid.get(a["pid"])) for a in cluster.state("actors")]
        # (an actor's own method calls run where the actor is: the actors are checked here)
        tasks = [(t["name"] or "", t.get("node_id")) for t in cluster.state("tasks") or []
                 if t.get("type") != "ACTOR_TASK"]
        on_gpu = sorted({name for name, node in placed + tasks
                         if kinds.get(node) == "gpu" and not any(w in name for w in gpu_work)})
        assert not on_gpu, f"CPU-only work ran on GPU nodes: {on_gpu}"
        assert any("FeatureExtractor" in c and kinds.get(n) == "gpu" for c, n in placed), placed
        assert any(c == "RayTrainWorker" and kinds.get(n) == "gpu" for c, n in placed), placed
        print("JOB LOG (restarts):\n" + "\n".join(x for x in logs.splitlines() if any(
            w in x.lower() for w in ("restart", "retry", "retries", "died", "failure", "lost"))))
        _check_run_dir(out_dir, local_run)
    finally:
        left = cluster.stop()
    assert not left, f"cluster processes still alive: {left}"


#: what each phase leaves in the run's bucket once done: a feature version's manifest, the model file
DONE = {"extraction": "features/v0/meta.json", "fine-tune": "checkpoints/refresh-v1/model.pt"}


def _in_bucket(uri: str, rel: str) -> bool:
    import pyarrow.fs as pafs

    from asvp_ray.storage.locations import resolve_uri

    fs, root = resolve_uri(uri)
    return fs.get_file_info(f"{root}/{rel}").type == pafs.FileType.File


def _node_processes(cluster: "ShippedCluster") -> Dict[str, Tuple[str, List[int]]]:
    """{node id: (node type, pids)} of the fake worker nodes up now: the fake provider starts each
    node's raylet and agents with RAY_OVERRIDE_NODE_ID_FOR_TESTING and RAY_NODE_TYPE_NAME in their
    environment (their workers inherit it)."""
    out: Dict[str, Tuple[str, List[int]]] = {}
    pids = cluster.pids()
    for pid in pids:
        try:
            env = dict(x.split("=", 1) for x in Path(f"/proc/{pid}/environ").read_bytes().decode(
                errors="replace").split("\0") if "=" in x)
        except OSError:
            continue
        node = env.get("RAY_OVERRIDE_NODE_ID_FOR_TESTING")
        if node:
            out.setdefault(node, (env.get("RAY_NODE_TYPE_NAME", "?"), []))[1].append(pid)
    for pid in pids:  # processes that name their node on the command line only (its agents)
        cmd = _title(pid)
        for node, (_, mine) in out.items():
            if node in cmd and pid not in mine:
                mine.append(pid)
    return out


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").strip()
    except OSError:
        return ""


def _kill(pids: List[int]) -> None:
    """SIGKILL a node's processes, as a machine that is lost."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _job_finished(cluster: "ShippedCluster", job_id: str) -> bool:
    out = cluster.ray("job", "status", "--address", cluster.url, job_id)
    text = out.stdout + out.stderr
    return any(f"'{job_id}' {w}" in text for w in ("succeeded", "failed", "was stopped"))


@pytest.mark.slow
@pytest.mark.long
def test_gpu_nodes_lost_mid_extraction_and_mid_fine_tune(tmp_path, local_run, s3_server):
    """Machines go away on a real cluster (spot reclaims, node failures). Every GPU node is killed
    while the extraction actors work on them, and again while the refresh's Ray Train worker
    fine-tunes: Ray Data restarts the actors on nodes the autoscaler adds and retries the lost
    batches, Ray Train restarts the worker group (train.max_failures) from its last checkpoint,
    and the run ends as the local one did, nothing lost or written twice."""
    argv, runtime_env, out_dir = _job_argv(tmp_path, s3_server)
    cluster = ShippedCluster(shipped_node_types(), IDLE_TIMEOUT_S)
    killed: List[tuple] = []
    try:
        cluster.start()
        job_id, t0 = _submit(cluster, argv, runtime_env)
        deadline = time.monotonic() + 1500
        # Each phase's own workers, once up on GPU nodes (Ray titles a worker process after its actor:
        # ray::MapWorker(MapBatches(FeatureExtractor)) for the extraction, ray::RayTrainWorker for the
        # fine-tune): a second into their work, every GPU node up is lost. A fake node's processes
        # are found by the node id and type the provider puts in their environment.
        gpu_types = {n for n, t in shipped_node_types()["workers"].items() if t["resources"].get("GPU")}
        title = {"extraction": "ray::MapWorker(MapBatches(FeatureExtractor))", "fine-tune": "ray::RayTrainWorker"}
        for phase in ("extraction", "fine-tune"):
            targets: Dict[str, List[int]] = {}
            checked = time.monotonic()
            while time.monotonic() < deadline and not targets:
                gpu_nodes = {n: pids for n, (t, pids) in _node_processes(cluster).items() if t in gpu_types}
                if any(_title(p).startswith(title[phase]) for pids in gpu_nodes.values() for p in pids):
                    targets = gpu_nodes
                if not targets:
                    if time.monotonic() - checked > 5:
                        assert not _job_finished(cluster, job_id), f"the job ended before its {phase} ({killed})"
                        checked = time.monotonic()
                    time.sleep(0.2)
            time.sleep(1.0)  # into the work
            targets = {n: pids for n, (t, pids) in _node_processes(cluster).items() if n in targets}
            for pids in targets.values():
                _kill(pids)
            assert targets, f"no GPU node to lose during the {phase}"
            killed.append((phase, round(time.time() - t0, 1), [n[-6:] for n in targets],
                           sum(len(p) for p in targets.values())))
            # what the phase commits to the bucket is not there yet (checked to exist after the job)
            assert not _in_bucket(out_dir, DONE[phase]), \
                f"the {phase} had finished before its nodes were lost ({DONE[phase]}); the test must kill sooner"
        print("KILLED (phase, s after submit, node, processes):", killed)
        assert [k[0] for k in killed] == ["extraction", "fine-tune"]
        state = cluster.wait_for_job(job_id, timeout=1500)
        logs = cluster.ray("job", "logs", "--address", cluster.url, job_id).stdout
        assert state == "SUCCEEDED", f"job {state}:\n{logs[-6000:]}\n{cluster.diagnose(tmp_path)}"
        assert all(_in_bucket(out_dir, rel) for rel in DONE.values()), "the phases' outputs are named elsewhere"
        timeline = _timeline(cluster.state("nodes"), t0)
        print("TIMELINE (s after submit: start, end, kind, node)\n" + "\n".join(map(str, timeline)))
        print("JOB LOG (restarts):\n" + "\n".join(x for x in logs.splitlines() if any(
            w in x.lower() for w in ("restart", "retry", "retries", "died", "failure", "lost"))))
        _check_run_dir(out_dir, local_run)
    finally:
        left = cluster.stop()
    assert not left, f"cluster processes still alive: {left}"
