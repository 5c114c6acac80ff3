"""The cluster configs in cluster/ load and carry what a user needs; job submission works for real
on a two-node Ray cluster on this machine, and the work spreads over both nodes."""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import List, Set

import pytest
import yaml

from tests.conftest import ROOT
from tests.reference import check_proxy_against_reference, final_model_accuracy

CLUSTER = ROOT / "cluster"
CLUSTER_DOCS = ROOT / "docs" / "cluster.md"  # how to use cluster/'s files
BIN = Path(sys.executable).parent
IMAGE_ROOT = Path("/app")  # where cluster/Dockerfile puts the repository inside the image


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _load_all(name: str) -> List[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


# ---------------------------------------------------------------------------------- the configs
def test_every_cluster_yaml_loads_and_is_commented():
    files = sorted(CLUSTER.rglob("*.yaml"))
    names = {str(f.relative_to(CLUSTER)) for f in files}
    assert {"aws-gpu.yaml", "runtime_env.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"} <= names
    for f in files:
        text = f.read_text()
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f
        assert text.lstrip().startswith("#"), f"{f} starts without a comment saying how to use it"


def test_launcher_config_is_valid_for_the_ray_cluster_launcher():
    import jsonschema
    import ray.autoscaler

    cfg = _load("aws-gpu.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert "InstanceType" in head["node_config"]
    gpu = [v for v in workers.values() if v["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu, "no GPU worker type (g*/p* instance)"
    assert all(v["max_workers"] > v["min_workers"] for v in gpu), "GPU workers do not autoscale"
    # every node runs the project's image (the one cluster/kuberay uses, built by cluster/Dockerfile),
    # not the default AMI's Python, which cannot install torch 2.14 / Ray 2.60
    rc, _ = _raycluster()
    kube_image = _containers(rc["spec"]["headGroupSpec"])[0]["image"]
    assert cfg["docker"]["image"] == kube_image
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in (CLUSTER / "Dockerfile").read_text()
    cpu = [v for v in workers.values() if not v["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert cpu and all(v["min_workers"] == 0 < v["max_workers"] for v in cpu), "no CPU worker type scaling from zero"
    assert any(dst.endswith("asvp-ray") for dst in cfg["file_mounts"])
    setup = " ".join(cfg["initialization_commands"])
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(cfg[k]) for k in ("head_start_ray_commands",
                                                                      "worker_start_ray_commands"))
    # runs live in a bucket: no shared file system is mounted, every node gets the bucket's credentials
    # from the instance profile `ray up` creates for the head (ray-autoscaler-v1, with S3 access)
    assert "mount" not in setup and not any("/mnt/runs" in o for o in cfg["docker"]["run_options"])
    assert "IamInstanceProfile" not in head["node_config"], "the head must get the launcher's default profile"
    assert all(v["node_config"]["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"} for v in workers.values())


def _raycluster():
    docs = _load_all("kuberay/raycluster.yaml")
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    return rc, [d for d in docs if d["kind"] == "PersistentVolumeClaim"]


def _containers(group: dict) -> List[dict]:
    return group["template"]["spec"]["containers"]


def test_kuberay_raycluster_has_images_gpu_workers_and_bucket_credentials_and_needs_no_shared_volume():
    rc, pvcs = _raycluster()
    assert rc["apiVersion"] == "ray.io/v1"
    assert not pvcs, "runs live in a bucket: the shipped cluster needs no (ReadWriteMany) volume"
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    groups = [head] + spec["workerGroupSpecs"]
    for g in groups:
        c = _containers(g)[0]
        assert c["image"] and ":" in c["image"]
        assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
        assert not any("persistentVolumeClaim" in v for v in g["template"]["spec"]["volumes"])
        # every pod reaches the bucket: the driver commits runs, extraction actors and Train workers write
        assert {"secretRef": {"name": "asvp-bucket", "optional": True}} in c["envFrom"]
    gpu = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in _containers(g)[0]["resources"]["limits"]]
    assert gpu and all(int(_containers(g)[0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1 for g in gpu)
    assert all(g["maxReplicas"] > g["minReplicas"] == 0 for g in gpu), "GPU workers do not scale from zero"
    cpu = [g for g in spec["workerGroupSpecs"] if g not in gpu]
    assert cpu and all(g["maxReplicas"] > g["minReplicas"] == 0 for g in cpu), "no CPU worker group scaling from zero"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    # The Ray version of the image and of rayVersion agree.
    assert spec["rayVersion"] in (CLUSTER / "Dockerfile").read_text()


def test_rayjob_entrypoint_is_a_valid_asvp_ray_run_command():
    from typer.main import get_command

    from asvp_ray.cli import app
    from asvp_ray.config import load_config

    rc, _ = _raycluster()
    job = _load("kuberay/rayjob.yaml")
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["asvp-ray", "run"]
    group = get_command(app)
    cmd = group.get_command(None, argv[1])  # type: ignore[arg-type]
    ctx = cmd.make_context(argv[1], argv[2:])  # raises on an unknown option or a missing --out
    params = ctx.params
    # The config is the repository's file, baked into the image by cluster/Dockerfile.
    local = ROOT / Path(params["config"]).relative_to(IMAGE_ROOT)
    cfg = load_config(str(local), params["set_"])  # the overrides are valid config keys and values
    assert cfg.extract.device == "cuda" and cfg.train.use_gpu is True
    assert params["out"].startswith("s3://your-bucket/"), "the run directory is not in the bucket"
    assert "COPY --chown=ray:users examples ./examples" in (CLUSTER / "Dockerfile").read_text()


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = _load("runtime_env.yaml")
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    # An unanchored "data/" would also drop the package folder asvp_ray/data/.
    assert "/data/" in env["excludes"] and "data/" not in env["excludes"]
    assert "/.venv/" in env["excludes"]


def test_cluster_docs_walk_through_every_config():
    """docs/cluster.md explains every file of cluster/; cluster/README.md names them and links it."""
    text = CLUSTER_DOCS.read_text()
    for f in ["aws-gpu.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "runtime_env.yaml", "Dockerfile",
              "ray job submit", "RAY_AUTH_MODE", "asvp-ray tune"]:
        assert f in text, f
    pointer = (CLUSTER / "README.md").read_text()
    assert "](../docs/cluster.md)" in pointer
    for f in ["aws-gpu.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "runtime_env.yaml", "Dockerfile"]:
        assert f in pointer, f


# ---------------------------------------------------------------------------------- a real cluster
def _sid(pid: int):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[3])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class LoopbackCluster:
    """A two-node Ray cluster on this machine, started with ``ray start`` in new sessions.

    Its processes are found by their session id (each ``ray start`` runs in a session of its
    own, and every Ray process it starts stays in it) or by the cluster's private temp dir in
    their command line, and are stopped by pid: ``ray stop`` would stop every Ray on the machine.
    Every port is chosen free, and each node has its own ``--temp-dir``, so that neither this
    cluster nor the test session's local Ray find each other.
    """

    def __init__(self, cpus_per_node: int = 2):
        self.tmp = Path(tempfile.mkdtemp(prefix="asvp-rc-", dir="/tmp"))  # short: Ray's socket paths
        self.cpus = cpus_per_node
        self._ports: Set[int] = set()
        self.gcs_port, self.dashboard_port = self._free_port(), self._free_port()
        token = secrets.token_hex(32)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # Token authentication, the same token for both nodes and the job client.
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
            # Ray processes that look the cluster up (Ray Train's placement-group cleaner) find
            # this one, not another Ray instance on the machine.
            RAY_ADDRESS=f"127.0.0.1:{self.gcs_port}",
            RAY_USAGE_STATS_ENABLED="0", TQDM_DISABLE="1", RAY_DEDUP_LOGS="0",
        )
        self.sessions: List[int] = []

    def _free_port(self) -> int:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in self._ports and not 10002 <= port <= 19999:  # Ray's default worker ports
                self._ports.add(port)
                return port

    def _node_ports(self) -> List[str]:
        names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"]
        return [f"--{n}={self._free_port()}" for n in names]

    def _start(self, name: str, args: List[str]) -> int:
        log = self.tmp / f"{name}.log"
        with open(log, "w") as f:
            p = subprocess.Popen([str(BIN / "ray"), "start", *args], env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd=ROOT)
            self.sessions.append(p.pid)
            return p.wait(timeout=240)

    def start(self) -> "LoopbackCluster":
        common = ["--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}", "--num-gpus=0",
                  "--object-store-memory=150000000", "--disable-usage-stats"]
        rc = self._start("head", ["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                                  "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                  f"--ray-client-server-port={self._free_port()}", f"--temp-dir={self.tmp / 'head'}",
                                  *common, *self._node_ports()])
        assert rc == 0, f"ray start --head failed:\n{(self.tmp / 'head.log').read_text()[-3000:]}"
        # `ray start` gives a raylet 30 s to register; on a loaded machine it may register later,
        # so the node count decides, not the command's exit status; a worker that never joins is
        # stopped and started again.
        for attempt in range(3):
            name = f"worker{attempt}"
            rc = self._start(name, [f"--address=127.0.0.1:{self.gcs_port}", f"--temp-dir={self.tmp / name}",
                                    *common, *self._node_ports()])
            if self._wait_for_nodes(2, timeout=120 if rc == 0 else 60):
                return self
            self._signal_all([p for p in self.pids() if _sid(p) == self.sessions[-1]])
        raise AssertionError(f"the worker node did not join: {self.state('nodes')}\n{self._logs(name)}")

    def _wait_for_nodes(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.state("nodes")
            if nodes is not None and sum(x["state"] == "ALIVE" for x in nodes) == n:
                return True
            time.sleep(1)
        return False

    def _logs(self, name: str) -> str:
        text = (self.tmp / f"{name}.log").read_text()[-2000:]
        for f in sorted((self.tmp / name).glob("session_*/logs/raylet.out"))[-1:]:
            text += f"\n{f}:\n" + f.read_text()[-2000:]
        return text

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def wait_for_job(self, job_id: str, timeout: float) -> str:
        """The job's final status (SUCCEEDED, FAILED, STOPPED), or the last one seen at ``timeout``."""
        deadline = time.monotonic() + timeout
        status = "UNKNOWN"
        # `ray job status` prints "Job 'ID' succeeded" / "failed" / "was stopped" for a finished
        # job, and "Status for job 'ID': RUNNING" (or PENDING) otherwise.
        while time.monotonic() < deadline:
            r = self.ray("job", "status", "--address", self.url, job_id)
            out = r.stdout + r.stderr
            for word, state in ((f"'{job_id}' succeeded", "SUCCEEDED"), (f"'{job_id}' failed", "FAILED"),
                                (f"'{job_id}' was stopped", "STOPPED"), ("RUNNING", "RUNNING"), ("PENDING", "PENDING")):
                if word in out:
                    status = state
                    break
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(2)
        return status

    def diagnose(self, run_dir: Path) -> str:
        """What a hung job was waiting for: the cluster's resources and pending demands, the live
        actors and placement groups, and the tail of the run's log."""
        parts = []
        r = self.ray("status", "--address", f"127.0.0.1:{self.gcs_port}")
        parts.append("ray status:\n" + r.stdout[-3000:] + r.stderr[-1000:])
        actors = self.state("actors") or []
        parts.append("actors:\n" + "\n".join(f"  {a.get('class_name')} {a.get('state')} node={str(a.get('node_id'))[:8]} "
                                               f"res={a.get('required_resources')}" for a in actors))
        pgs = self.state("placement-groups") or []
        parts.append("placement groups:\n" + "\n".join(f"  {g.get('placement_group_id', '')[:8]} {g.get('state')} "
                                                         f"{g.get('bundles')}" for g in pgs))
        log = run_dir / "run.log"
        if log.is_file():
            parts.append("run.log (tail):\n" + log.read_text()[-4000:])
        return "\n".join(parts)

    def state(self, what: str):
        """``ray list WHAT`` through the dashboard's state API (dead actors included), or None."""
        r = self.ray("list", what, "--address", self.url, "--detail", "--format", "json", "--limit", "10000")
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            return None

    def pids(self) -> List[int]:
        me = os.getpid()
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != me and (_sid(int(d)) in self.sessions or str(self.tmp) in _cmdline(int(d))):
                out.append(int(d))
        return out

    @staticmethod
    def _signal_all(pids: List[int]) -> None:
        """SIGTERM ``pids``, then SIGKILL those still alive after a grace period."""
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and _sid(p) is not None
                                                      for p in pids):
                time.sleep(0.3)

    def stop(self) -> List[int]:
        """Stop this cluster's processes (by pid); returns pids still alive."""
        for _ in range(2):  # a second pass for processes started while the first one ran
            self._signal_all(self.pids())
        left = self.pids()
        if not left:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return left


@pytest.mark.slow
@pytest.mark.long
def test_job_submission_runs_asvp_ray_on_a_two_node_cluster_and_spreads_the_work():
    from asvp_ray.config import Config

    cluster = LoopbackCluster(cpus_per_node=2)
    try:
        cluster.start()
        run_dir = cluster.tmp / "runs" / "smoke"  # a path both nodes reach (same machine)
        job_id = f"asvp-smoke-{uuid.uuid4().hex[:8]}"
        # 3 extraction actors of 1 CPU and 3 training workers of 1 CPU cannot fit on one 2-CPU node.
        # ASVP with one refresh at 80 labels: a fine-tune and a re-extraction (v1) on both nodes too.
        sets = ["--set", "extract.num_actors=3", "--set", "extract.num_cpus_per_actor=1",
                "--set", "method=asvp", "--set", "refresh.policy=at_labels", "--set", "refresh.at=[80]"]
        if "train" in Config.model_fields and "final" in Config.model_fields:
            sets += ["--set", "train.num_workers=3", "--set", "train.cpus_per_worker=1",
                     "--set", "final.training_method=ft"]
        r = cluster.ray("job", "submit", "--no-wait", "--address", cluster.url, "--submission-id", job_id,
                        "--runtime-env", "cluster/runtime_env.yaml", "--",
                        "asvp-ray", "run", "examples/smoke.yaml", "--out", str(run_dir), *sets, timeout=300)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        state = cluster.wait_for_job(job_id, timeout=720)
        logs = cluster.ray("job", "logs", "--address", cluster.url, job_id).stdout
        assert state == "SUCCEEDED", f"job {state}:\n{logs[-5000:]}\n{cluster.diagnose(run_dir)}"
        assert "done:" in logs

        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "finished"
        assert [x["n_labeled"] for x in summary["rounds"]] == [40, 80, 120]
        # the proxy learns what the bought labels teach, on v0 and on the refreshed v1: each round near
        # the independent reference (tests/reference.py: logistic regression on the round's features)
        check_proxy_against_reference(run_dir, [x["proxy_test_accuracy"] for x in summary["rounds"]])
        assert (run_dir / "features" / "v0" / "meta.json").is_file()
        assert [x["refreshed"] for x in summary["rounds"]] == [False, True, False]
        assert (run_dir / "features" / "v1" / "meta.json").is_file()
        assert summary["rounds"][-1]["feature_version"] == 1

        nodes = [n for n in cluster.state("nodes") if n["state"] == "ALIVE"]
        head = next(n["node_id"] for n in nodes if n["is_head_node"])
        assert len({n["node_id"] for n in nodes}) == 2
        # Where each actor ran: its node_id, or (for an actor that ended before it reported
        # one) the node of its worker process.
        node_of_pid = {w["pid"]: w["node_id"] for w in cluster.state("workers")}
        placed = [(a["class_name"] or "", a["node_id"] or node_of_pid.get(a["pid"])) for a in cluster.state("actors")]
        extractors = [n for c, n in placed if "FeatureExtractor" in c]
        assert set(extractors) == {n["node_id"] for n in nodes}, f"extraction actors on {extractors}"
        # v0's pool and v1's (the refresh) each had 3 actors: one node alone could not hold 3
        assert len(extractors) >= 6, f"{len(extractors)} extraction actors: {placed}"
        assert {n for c, n in placed if c == "Driver"} == {head}, "the asvp-ray driver actor is not on the head node"
        if "train.num_workers=3" in sets:
            # the recorded accuracy is the final model file's, scored here on the test images
            assert summary["final"]["test_accuracy"] == pytest.approx(final_model_accuracy(run_dir), abs=0.011)
            trainers = {n for c, n in placed if c == "RayTrainWorker"}
            assert trainers == {n["node_id"] for n in nodes}, f"training workers on {trainers}"
    finally:
        left = cluster.stop()
    assert not left, f"cluster processes still alive: {left}"


# ---------------------------------------------------------------------------------- the console on a cluster
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What Ray printed on a cluster and a local instance hid (issue #27): Ray Train's preemption
# watcher's core-worker error, Ray Train's ExecutionOptions.exclude_resources deprecation, a
# raylet's worker-start warning, Ray Data's INFO lines and notices.
_NOISE = ("PreemptionWatcher", "RayDeprecationWarning", "exclude_resources", "worker processes have been started",
          "Progress bars disabled", "execution finished")


def _check_console(out: str, run_dir: Path, rounds: int) -> None:
    """asvp-ray's own lines, each once; none of Ray's noise; run.log still holds asvp-ray's lines."""
    out = _ANSI.sub("", out)
    lines = [line for line in out.splitlines() if line.strip()]
    assert [m.group(1) for m in map(re.compile(r"^round +(\d+): ").match, lines) if m] == \
        [str(i) for i in range(rounds)], out[-6000:]
    for ours in ("final model: ", "cost: ", "done: "):
        assert sum(line.startswith(ours) for line in lines) == 1, (ours, out[-6000:])
    noisy = [line for line in lines if any(n in line for n in _NOISE)]
    assert not noisy, "\n".join(noisy)
    twice = sorted({line for line in lines if lines.count(line) > 1})
    assert not twice, "lines printed more than once:\n" + "\n".join(twice)
    log = (run_dir / "run.log").read_text()
    for i in range(rounds):
        assert f"asvp_ray.driver: round {i}: " in log, log[-3000:]
    assert "asvp_ray.driver: final model" in log, log[-3000:]


@pytest.mark.slow
@pytest.mark.long
def test_console_on_a_cluster_shows_what_a_local_run_shows():
    """`asvp-ray run` joined to a two-node cluster (RAY_ADDRESS) and run as a job (`ray job
    submit`): the console holds asvp-ray's round lines, final model, cost and done lines once
    each, and none of the lines a local instance hides (before init_ray set up every worker of the
    job through runtime_env's worker_process_setup_hook, both showed Ray Train's PreemptionWatcher
    error, the exclude_resources RayDeprecationWarning and Ray Data's INFO lines); run.log still
    has asvp-ray's own lines."""
    cluster = LoopbackCluster(cpus_per_node=2)
    sets = ["--set", "budget.schedule=[40,40]", "--set", "train.epochs=1", "--set", "train.lp_epochs=1"]
    try:
        cluster.start()
        joined = cluster.tmp / "runs" / "joined"
        r = subprocess.run([str(BIN / "asvp-ray"), "run", "examples/smoke.yaml", "--out", str(joined), *sets],
                           env=cluster.env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        _check_console(r.stdout + r.stderr, joined, rounds=2)

        job = cluster.tmp / "runs" / "job"
        r = cluster.ray("job", "submit", "--address", cluster.url, "--runtime-env", "cluster/runtime_env.yaml", "--",
                        "asvp-ray", "run", "examples/smoke.yaml", "--out", str(job), *sets, timeout=600)
        assert r.returncode == 0 and "succeeded" in r.stdout + r.stderr, (r.stdout[-3000:], r.stderr[-3000:])
        _check_console(r.stdout + r.stderr, job, rounds=2)
    finally:
        left = cluster.stop()
    assert not left, f"cluster processes still alive: {left}"


def test_quiet_worker_ignores_only_the_exclude_resources_deprecation():
    """quiet_worker (every worker of an asvp-ray job runs it) hides Ray Train's exclude_resources
    deprecation and no other RayDeprecationWarning; its filter stands in front of the one Ray adds
    at import. Settings already in the environment (the node's, the job's env_vars) are kept."""
    code = ("import os, warnings\n"
            "os.environ['RAY_TRAIN_ENABLE_PREEMPTION_WATCHER'] = '1'\n"
            "from asvp_ray.runtime.ray_utils import quiet_worker, RAY_DATA_LOGGING_CONFIG\n"
            "quiet_worker()\n"
            "from ray.data import ExecutionOptions, ExecutionResources\n"
            "from ray.util.annotations import RayDeprecationWarning\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    ExecutionOptions(exclude_resources=ExecutionResources(cpu=1))\n"
            "    warnings.warn('something else is deprecated', RayDeprecationWarning)\n"
            "print('SEEN', [str(w.message) for w in seen])\n"
            "e = os.environ\n"
            "print('ENV', e['RAY_TRAIN_ENABLE_PREEMPTION_WATCHER'], e['RAY_DATA_DISABLE_PROGRESS_BARS'],\n"
            "      e['RAY_DATA_LOGGING_CONFIG'] == RAY_DATA_LOGGING_CONFIG)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTHONWARNINGS"))}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SEEN ['something else is deprecated']" in r.stdout, r.stdout
    assert "ENV 1 1 True" in r.stdout, r.stdout


def test_quiet_runtime_env_leaves_a_jobs_own_setup_hook(monkeypatch):
    """init_ray's runtime_env names quiet_worker as the setup hook, except in a submitted job whose
    runtime_env has its own: Ray refuses to merge two, and the job's wins."""
    from asvp_ray.runtime import ray_utils

    ours = {"worker_process_setup_hook": "asvp_ray.runtime.ray_utils.quiet_worker"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_utils._quiet_runtime_env() == ours
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"TQDM_DISABLE": "1"}}}))
    assert ray_utils._quiet_runtime_env() == ours
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"worker_process_setup_hook": "m.f"}}))
    assert ray_utils._quiet_runtime_env() == {}


# ---------------------------------------------------------------------------------- the docs, verbatim
def markdown_block(path: Path, heading: str) -> str:
    """The first ```bash block after ``heading`` in ``path``: the commands a user is told to run."""
    text = path.read_text()
    at = text.index(heading)
    start = text.index("```bash\n", at) + len("```bash\n")
    return text[start:text.index("```", start)]


def test_the_try_it_block_uses_no_port_in_rays_worker_range():
    import re

    block = markdown_block(CLUSTER_DOCS, "## Try it on one machine")
    ports = [int(p) for p in re.findall(r"port=(\d+)", block)] + [int(p) for p in re.findall(r":(\d{4,5})\b", block)]
    assert ports, block
    inside = [p for p in ports if 10002 <= p <= 19999]
    assert not inside, f"ports {inside} are in Ray's default worker port range 10002-19999: ray start refuses them"


@pytest.mark.slow
@pytest.mark.long
def test_cluster_docs_try_it_block_runs_verbatim():
    """docs/cluster.md's "Try it on one machine" block, run as a user runs it (bash, from the
    repository root, the virtualenv on PATH, no RAY_* settings of the test's own): two `ray start`
    nodes of 1 CPU each and the smoke run submitted with `ray job submit` as the cluster's first
    job. Before asvp-ray loaded torch ahead of ray.init, this job died in oneMKL's start-up
    ("Cannot load libtorch_cpu.so", exit 2)."""
    block = markdown_block(CLUSTER_DOCS, "## Try it on one machine")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ASVP_", "TQDM_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the virtualenv, active
    script = "set -euo pipefail\n" + block + '\necho "TEMP_DIR=$T"\n'
    p = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    sid, tmp = p.pid, None
    try:
        out, _ = p.communicate(timeout=900)
        tmp = next((line.split("=", 1)[1] for line in out.splitlines() if line.startswith("TEMP_DIR=")), None)
        assert p.returncode == 0 and tmp, f"the block failed (exit {p.returncode}):\n{out[-6000:]}"
        assert "succeeded" in out and "FATAL" not in out, out[-6000:]
        summary = json.loads((Path(tmp) / "runs" / "smoke" / "summary.json").read_text())
        assert summary["status"] == "finished"
        assert [x["n_labeled"] for x in summary["rounds"]] == [40, 80, 120]
        # the block's last command lists the actors: the Driver and the extraction actors ran
        assert "Driver" in out and "FeatureExtractor" in out
    finally:
        if p.poll() is None:
            p.kill()
        # tmp is set once the block got as far as printing it
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != os.getpid()
                and (_sid(int(d)) == sid or (tmp and tmp in _cmdline(int(d))))]
        LoopbackCluster._signal_all(pids)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def test_init_ray_loads_torch_before_it_connects():
    """`import torch` after `ray.init()` kills a job's entrypoint on a fresh cluster (oneMKL:
    "Cannot load libtorch_cpu.so"; reproduced with `ray start --head --num-cpus=1`, a second node,
    and `ray job submit -- python -c 'import ray; ray.init(); import torch'` as its first job), so
    init_ray loads torch first. Checked in a fresh process: torch is loaded when ray.init is called."""
    code = ("import sys, ray\n"
            "seen = []\n"
            "ray.init = lambda *a, **k: seen.append('torch' in sys.modules)\n"
            "ray.is_initialized = lambda: False\n"
            "from asvp_ray.runtime import ray_utils\n"
            "ray_utils.quiet_ray_data = lambda: None\n"
            "assert 'torch' not in sys.modules\n"
            "ray_utils.init_ray(address='127.0.0.1:1', quiet=False)\n"
            "print('SEEN', seen)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SEEN [True]" in r.stdout, r.stdout


def test_shipped_configs_label_every_node_group_for_placement():
    from asvp_ray.runtime.placement import LABEL

    rc, _ = _raycluster()
    spec = rc["spec"]
    assert spec["autoscalerOptions"]["version"] == "v2", "autoscaler v1 ignores label selectors when it scales"
    assert spec["headGroupSpec"]["labels"][LABEL] == "head"
    for g in spec["workerGroupSpecs"]:
        gpu = "nvidia.com/gpu" in _containers(g)[0]["resources"]["limits"]
        assert g["labels"][LABEL] == ("gpu" if gpu else "cpu"), g["groupName"]
    cfg = _load("aws-gpu.yaml")
    for name, t in cfg["available_node_types"].items():
        gpu = t["node_config"]["InstanceType"].startswith(("g", "p"))
        want = "head" if name == cfg["head_node_type"] else ("gpu" if gpu else "cpu")
        assert t["labels"][LABEL] == want, name
        if gpu:
            assert t["min_workers"] == 0, "GPU workers scale from zero (device/use_gpu auto read the autoscaler's types)"
