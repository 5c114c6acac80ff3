"""Placement on a cluster of labelled CPU and GPU nodes (the labels cluster/ declares): CPU-only
work (Ray Data's read/decode/write tasks, shard actors, the selection's helper tasks) never runs on
a GPU node; GPU extraction actors run on it. Checked with Ray's state API, on a real multi-node Ray
(``ray.cluster_utils.Cluster``; the GPU node's card is simulated with the test-only
``ASVP_TEST_GPU_ON_CPU`` switch, so scheduling is a GPU run's)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

DRIVER = r"""
import json, logging, os, time
import numpy as np, ray
from ray.cluster_utils import Cluster
from asvp_ray.runtime.placement import LABEL, cpu_selector

logging.basicConfig(level=logging.WARNING)
import torch  # before ray.init, as init_ray does
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "labels": {LABEL: "head"},
                                                  "object_store_memory": 100_000_000})
gpu = c.add_node(num_cpus=2, num_gpus=1, labels={LABEL: "gpu"}, object_store_memory=100_000_000)
cpu = c.add_node(num_cpus=2, labels={LABEL: "cpu"}, object_store_memory=100_000_000)
ray.init(address=c.address)
kind = {n["NodeID"]: n["Labels"].get(LABEL) for n in ray.nodes()}
out = {"selector": cpu_selector()}

from asvp_ray.config import ExtractConfig
from asvp_ray.data.fashion_mnist import FashionMNISTSource
from asvp_ray.features.backbones import BackboneSpec
from asvp_ray.features.extract import extract
cfg = ExtractConfig(batch_size=32, progress=False)
rows = 0
for ids, feats, skipped in extract(FashionMNISTSource(split="train", limit=128),
                                   BackboneSpec("test_efficientnet", weights="none", image_size=32, crop_pct=1.0), cfg):
    rows += len(ids)
out["rows"] = rows

from asvp_ray.pool.shards import PoolShards
shards = PoolShards(np.random.default_rng(0).random((1000, 8), dtype=np.float32), 1000, num_shards=2)
out["shard_rows"] = sum(ray.get([a.ready.remote() for a in shards.group.actors]))
time.sleep(2)  # the state API's task events arrive in batches
from ray.util.state import list_actors, list_tasks
out["tasks"] = sorted({(t.name, kind.get(t.node_id)) for t in list_tasks(limit=10000, raise_on_missing_output=False)
                       if t.node_id})
out["actors"] = sorted({(a.class_name, kind.get(a.node_id)) for a in list_actors(limit=10000) if a.node_id})
print("RESULT " + json.dumps(out))
ray.shutdown(); c.shutdown()
"""


def _run_driver(env_extra: dict) -> dict:
    """Run DRIVER in a fresh process (its own Ray cluster); its RESULT."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    r = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    out = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and out, f"driver failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return json.loads(out[-1][len("RESULT "):])


@pytest.mark.slow
def test_cpu_work_stays_off_the_labelled_gpu_node():
    res = _run_driver({"ASVP_TEST_GPU_ON_CPU": "1", "ASVP_RESOURCE_TIMEOUT_S": "120"})
    assert res["selector"] == {"asvp-ray/node-kind": "!gpu"}
    assert res["rows"] == 128 and res["shard_rows"] == 1000
    tasks = [tuple(t) for t in res["tasks"]]
    actors = [tuple(a) for a in res["actors"]]
    # the extraction's GPU actors ran on the GPU node: the only one with a GPU
    assert ("MapWorker(MapBatches(FeatureExtractor))", "gpu") in actors or \
        any(name.startswith("MapWorker") and k == "gpu" for name, k in actors), actors
    # ... and nothing else did: read/decode/write tasks, the shard actors, Ray Data's helpers
    on_gpu = [w for w in tasks + actors if w[1] == "gpu" and "FeatureExtractor" not in w[0]]
    assert not on_gpu, f"CPU-only work ran on the GPU node: {on_gpu}"
    assert any(k == "cpu" and "Read" in n for n, k in tasks), tasks
    assert ("ShardHolder", "cpu") in actors, actors
