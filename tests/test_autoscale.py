"""Sizing that follows the autoscaler: the extraction pool's min/max plan, the wait for resources no
node has yet (with the error naming what never appeared), and a real Ray autoscaler (its fake node
provider, on this machine) adding the node an extraction's actors ask for."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from asvp_ray.config import ExtractConfig
from asvp_ray.core.errors import ConfigError
from asvp_ray.features.extract import extract
from asvp_ray.features.extract_plan import plan_actors
from asvp_ray.train.config import TrainConfig
from tests.conftest import ROOT
from tests.test_cluster import LoopbackCluster, _sid


# ------------------------------------------------------------------------------- planning (no Ray)
def test_pool_plan_defaults_follow_the_cluster_now():
    small = plan_actors(ExtractConfig(), {"CPU": 2.0})  # one CPU stays for the read tasks
    assert (small.min_actors, small.max_actors, small.num_cpus, small.device) == (1, 1, 1.0, "cpu")
    eight = plan_actors(ExtractConfig(), {"CPU": 8.0})
    assert (eight.min_actors, eight.max_actors) == (1, 7)
    gpu = plan_actors(ExtractConfig(), {"CPU": 32.0, "GPU": 4.0})
    assert (gpu.min_actors, gpu.max_actors, gpu.num_gpus, gpu.device) == (1, 4, 1.0, "cuda")
    half = plan_actors(ExtractConfig(num_gpus_per_actor=0.5), {"CPU": 32.0, "GPU": 4.0})
    assert half.max_actors == 8
    # explicit sizes: max past the cluster's size now (an autoscaler adds nodes), a fixed num_actors
    grow = plan_actors(ExtractConfig(min_actors=2, max_actors=16), {"CPU": 8.0})
    assert (grow.min_actors, grow.max_actors, grow.num_actors) == (2, 16, 16)
    fixed = plan_actors(ExtractConfig(num_actors=3), {"CPU": 8.0})
    assert (fixed.min_actors, fixed.max_actors) == (3, 3)
    pinned = plan_actors(ExtractConfig(resources_per_actor={"extract_node": 1}), {"CPU": 2.0})
    assert pinned.actor_bundle() == {"CPU": 1.0, "GPU": 0.0, "extract_node": 1.0}


def test_pool_plan_refuses_what_would_hang_or_contradict():
    with pytest.raises(ConfigError, match="extract.min_actors=2 .*starves the read tasks.*min_actors <= 1"):
        plan_actors(ExtractConfig(min_actors=2), {"CPU": 2.0})
    with pytest.raises(ValueError, match="min_actors=4 is more than extract.max_actors=2"):
        ExtractConfig(min_actors=4, max_actors=2)
    with pytest.raises(ValueError, match="num_actors=2 is a fixed pool size"):
        ExtractConfig(num_actors=2, max_actors=4)
    with pytest.raises(ValueError, match="names 'GPU'; set extract.num_gpus_per_actor"):
        ExtractConfig(resources_per_actor={"GPU": 1})
    with pytest.raises(ValueError, match="greater than 0"):
        ExtractConfig(resources_per_actor={"extract_node": 0})


def test_train_use_gpu_auto_says_what_it_chose(caplog):
    with caplog.at_level(logging.INFO, logger="asvp_ray.train.config"):
        cpu = TrainConfig().plan({"CPU": 2.0}, [{"CPU": 2.0}])
        gpu = TrainConfig(num_workers=2).plan({"CPU": 16.0, "GPU": 2.0}, [{"CPU": 16.0, "GPU": 2.0}])
    assert not cpu.use_gpu and gpu.use_gpu
    text = caplog.text
    assert "use_gpu=auto: no GPU in the cluster now (CPU: 2); training on CPU workers" in text
    assert "use_gpu=auto: the cluster has 2 GPU(s) for 2 worker(s); training on GPU workers" in text


# ------------------------------------------------------------------------------- waiting (local Ray)
def test_capacity_lines_arithmetic_and_fit_checks():
    """runtime.resources' pure helpers, which every plan's numbers and messages go through."""
    from asvp_ray.runtime.resources import (add_cpu_gpu, capacity_line, fits, format_bundle, format_cpu_gpu,
                                            max_cpu_gpu, placeable)

    assert capacity_line({"CPU": 2.0}, {"CPU": 10.0, "GPU": 4.0}, True) == "now 2 CPU, 0 GPU; can grow to 10 CPU, 4 GPU"
    assert capacity_line({"CPU": 2.0}, {"CPU": 2.0}, False) == "now 2 CPU, 0 GPU (no autoscaler)"
    nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 2.0}]
    assert placeable({"GPU": 1.0}, 1, nodes) and not placeable({"GPU": 1.0}, 2, nodes)
    assert placeable({"CPU": 2.0}, 3, nodes) and not placeable({"CPU": 2.0}, 4, nodes)
    assert nodes == [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 2.0}]  # not used up by the check
    assert fits({"CPU": 0.1 * 3}, {"CPU": 0.3}) and not fits({"CPU": 0.31}, {"CPU": 0.3})  # rounding slack only
    assert format_cpu_gpu({"CPU": 1.5, "GPU": 0.0}) == "1.5 CPU" and format_cpu_gpu({}) == "nothing"
    assert format_bundle({"GPU": 1.0, "memory": 1e9, "node:10.0.0.1": 1.0, "CPU": 2.0}) == "{CPU: 2, GPU: 1}"
    assert add_cpu_gpu({"CPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}) == {"CPU": 3.0, "GPU": 1.0}
    assert max_cpu_gpu({"CPU": 1.0, "GPU": 2.0}, {"CPU": 3.0}) == {"CPU": 3.0, "GPU": 2.0}


def test_a_resource_no_node_has_times_out_naming_it(ray_local, monkeypatch):
    from ray.util import placement_group_table

    from asvp_ray.data.fashion_mnist import FashionMNISTSource
    from asvp_ray.features.backbones import BackboneSpec

    monkeypatch.setenv("ASVP_RESOURCE_TIMEOUT_S", "2")
    cfg = ExtractConfig(batch_size=32, progress=False, resources_per_actor={"no_such_node": 1})
    source = FashionMNISTSource(split="train", limit=32)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"waited 2 s .*no node has 1 no_such_node .*change "
                                          r"extract.resources_per_actor"):
        next(extract(source, BackboneSpec("test_efficientnet", weights="none", image_size=32, crop_pct=1.0), cfg))
    assert 2.0 <= time.monotonic() - t0 < 30
    # train.use_gpu: true on a cluster without GPUs waits, then fails: it never trains on CPU
    with pytest.raises(ConfigError, match=r"train.use_gpu=true .*no node has 1 GPU .*set use_gpu: auto"):
        TrainConfig(use_gpu=True).plan()
    # the demand it placed is gone: nothing stays reserved or pending
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())


# ------------------------------------------------------------------------------- a real autoscaler
class FakeAutoscalingCluster(LoopbackCluster):
    """A one-node Ray cluster whose autoscaler (Ray's fake node provider: nodes are local processes)
    adds ``worker_types`` nodes for pending demand.

    ``ray.cluster_utils.AutoscalingCluster`` does the same but runs ``ray stop --force``, which would
    stop every Ray on this machine, and reads a provider template this Ray wheel does not ship; this
    starts the head like ``LoopbackCluster`` (own ports, temp dir and session, stopped by pid) with the
    provider loaded as an external module. The worker nodes are processes of the head's autoscaler,
    so they are in its session and stop with it.
    """

    def __init__(self, head_cpus: int, worker_types: dict, idle_timeout_minutes: float = 1.0):
        super().__init__(cpus_per_node=head_cpus)
        self.config = {
            "cluster_name": "asvp-autoscale-test", "max_workers": 4,
            "provider": {"type": "external",
                         "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                         "gcs_address": f"127.0.0.1:{self.gcs_port}", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "available_node_types": {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                                          "max_workers": 0}, **worker_types},
            "head_node_type": "ray.head.default", "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_minutes, "auth": {}, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
        }
        self.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")

    def start(self) -> "FakeAutoscalingCluster":
        path = self.tmp / "autoscaling.json"
        path.write_text(json.dumps(self.config))
        rc = self._start("head", ["--head", f"--port={self.gcs_port}", "--include-dashboard=false",
                                  f"--ray-client-server-port={self._free_port()}", f"--temp-dir={self.tmp / 'head'}",
                                  f"--autoscaling-config={path}", "--node-ip-address=127.0.0.1",
                                  f"--num-cpus={self.cpus}", "--num-gpus=0", "--object-store-memory=150000000",
                                  "--disable-usage-stats", *self._node_ports()])
        # On a loaded machine the raylet may register after `ray start` gave up waiting (30 s); its
        # processes keep running, so the cluster's own answer decides.
        deadline = time.monotonic() + (0 if rc == 0 else 90)
        while rc != 0 and time.monotonic() < deadline:
            r = self.ray("status", "--address", f"127.0.0.1:{self.gcs_port}", timeout=60)
            rc = 0 if r.returncode == 0 and re.search(r"Active:\n +1 ", r.stdout) else rc
            time.sleep(0 if rc == 0 else 2)
        assert rc == 0, f"ray start --head failed:\n{(self.tmp / 'head.log').read_text()[-3000:]}"
        return self

    def stop(self):
        """Stop the head and the nodes its autoscaler started (by pid), SIGKILL after a short grace."""
        for _ in range(2):
            pids = self.pids()
            for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and any(_sid(p) is not None for p in pids):
                    time.sleep(0.2)
        left = self.pids()
        if not left:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return left


# The driver: extraction whose actors ask for a resource only the worker node type declares.
DRIVER = r"""
import json, logging, ray
from asvp_ray.config import ExtractConfig
from asvp_ray.data.fashion_mnist import FashionMNISTSource
from asvp_ray.features.backbones import BackboneSpec
from asvp_ray.features.extract import extract
from asvp_ray.runtime.ray_utils import init_ray

logging.basicConfig(level=logging.INFO)
init_ray()
head = ray.get_runtime_context().get_node_id()
before = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
from asvp_ray.runtime.resources import cluster_capacity
capacity = cluster_capacity()
cfg = ExtractConfig(batch_size=32, progress=False, resources_per_actor={"extract_node": 1})
rows = 0
for ids, feats, skipped in extract(FashionMNISTSource(split="train", limit=96),
                                   BackboneSpec("test_efficientnet", weights="none", image_size=32, crop_pct=1.0), cfg):
    rows += len(ids)
    dim = feats.shape[1]
nodes = [{"id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]]
print("RESULT " + json.dumps({"head": head, "before": before, "nodes": nodes, "rows": rows, "dim": dim,
                             "capacity": capacity}))
"""


@pytest.mark.slow
def test_autoscaler_adds_the_node_the_extraction_actors_ask_for():
    cluster = FakeAutoscalingCluster(head_cpus=2, worker_types={
        "extract.worker": {"resources": {"CPU": 1, "extract_node": 1}, "node_config": {}, "min_workers": 0,
                           "max_workers": 1}})
    try:
        cluster.start()
        env = dict(cluster.env, PYTHONPATH=str(ROOT), ASVP_RESOURCE_TIMEOUT_S="90")
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=240,
                           cwd=ROOT)
        seconds = time.monotonic() - t0
        out = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
        assert r.returncode == 0 and out, f"driver failed ({seconds:.0f} s):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
        res = json.loads(out[-1][len("RESULT "):])
        assert res["before"] == [res["head"]], "a worker node was up before the extraction asked for one"
        # what the cluster can grow to, read from the autoscaler's own config (its monitor on the head)
        can, autoscaling = res["capacity"]
        assert autoscaling and can["CPU"] == 3.0 and can["extract_node"] == 1.0, res["capacity"]
        workers = [n for n in res["nodes"] if n["id"] != res["head"]]
        # the only place the actors (1 CPU + 1 extract_node each) fit: the node the autoscaler added
        assert len(workers) == 1 and workers[0]["resources"].get("extract_node") == 1.0
        head_res = next(n for n in res["nodes"] if n["id"] == res["head"])["resources"]
        assert "extract_node" not in head_res
        assert res["rows"] == 96 and res["dim"] > 0
        assert "asking the autoscaler for nodes" in r.stderr and "the resources appeared after" in r.stderr
    finally:
        left = cluster.stop()
        assert not left, f"cluster processes still alive: {left}"


def test_a_one_cpu_cluster_gets_a_pool_that_can_start():
    # before: an actor of 0.5 CPU beside a 1-CPU read task, 1.5 CPU on a 1-CPU cluster, waited forever
    one = plan_actors(ExtractConfig(), {"CPU": 1.0})
    assert (one.min_actors, one.max_actors, one.num_cpus) == (1, 1, 0.0)
    assert one.min_actors * one.num_cpus + 1.0 <= 1.0  # the actor and a read task, together
    assert plan_actors(ExtractConfig(), {"CPU": 1.5}).num_cpus == 0.5


def test_nested_work_the_cluster_can_never_hold_is_refused_at_once(ray_local):
    from asvp_ray.runtime.resources import check_nested, cluster_capacity

    can, autoscaling = cluster_capacity()
    assert not autoscaling and can["CPU"] >= 1
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"Ray Train workers need 64 CPU but the cluster can never have that many "
                                          r"\(now .* CPU, 0 GPU \(no autoscaler\)\).*shrink train.num_workers"):
        check_nested({"CPU": 64.0}, "Ray Train workers", "train.num_workers")
    assert time.monotonic() - t0 < 5
    check_nested({"CPU": 1.0}, "a read task", "nothing", grace_s=0.0)  # what fits passes
