"""Where work runs on a cluster with CPU and GPU node types: Ray node labels and label selectors.

The shipped cluster configs (cluster/kuberay/raycluster.yaml, cluster/aws-gpu.yaml) label their
nodes ``asvp-ray/node-kind: head | cpu | gpu``. CPU-only work (shard actors, Ray Data's read,
decode and write tasks, CPU Ray Train workers, the selection's helper tasks) carries the selector
``{"asvp-ray/node-kind": "!gpu"}`` whenever the cluster has, or its autoscaler can add, a node
with CPUs and no GPU, so it never lands on (or starts) a GPU node. GPU work asks for GPUs, which
only GPU nodes have; inside a Ray Data pipeline whose tasks carry the CPU selector, GPU actors
override it with ``!cpu``.

A node without the label matches ``!gpu`` (Ray's negative selectors accept a missing key), so on a
cluster that does not declare the labels, a laptop or plain ``ray start`` nodes, the selectors
change nothing. A cluster of GPU nodes only gets no selector (CPU work then shares the GPU nodes).
Autoscaler v2 reads selectors when it picks the node type to add (Ray >= 2.51; KubeRay:
``autoscalerOptions.version: v2``); ``ASVP_PLACEMENT=off`` turns the selectors off.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional

log = logging.getLogger(__name__)

#: the node label the shipped configs declare on every node group
LABEL = "asvp-ray/node-kind"
#: what CPU-only work carries: any node but a labelled GPU node
CPU_WORK = {LABEL: "!gpu"}
#: what GPU actors carry inside a pipeline that carries CPU_WORK (they need GPUs anyway)
GPU_WORK = {LABEL: "!cpu"}

_decided: Dict[str, Optional[Dict[str, str]]] = {}


def node_types() -> list:
    """The autoscaler's node types (name, resources, labels, min, max, head), wherever the
    autoscaler keeps them (:mod:`asvp_ray.runtime.node_types`); [] without an autoscaler."""
    from asvp_ray.runtime.node_types import node_types as _types

    return [t for t in _types() if not t["head"]]


def _cpu_node_possible() -> Optional[str]:
    """A node up now, or a node type the autoscaler may add, that has CPUs and no GPU (its name),
    else None."""
    import ray

    for n in ray.nodes():
        res = n.get("Resources") or {}
        if n.get("Alive") and res.get("CPU", 0) > 0 and not res.get("GPU", 0) \
                and (n.get("Labels") or {}).get(LABEL) != "gpu":
            return f"node {n['NodeID'][:8]} ({res.get('CPU', 0):g} CPU, no GPU) is up"
    for t in node_types():
        res = t["resources"]
        if t["max"] == 0:
            continue
        if res.get("CPU", 0) > 0 and not res.get("GPU", 0):
            return f"the autoscaler can add node type {t['name']!r} ({res['CPU']:g} CPU, no GPU)"
        if not res and t["labels"].get(LABEL) == "cpu":  # a launcher file before Ray fills resources in
            return f"the autoscaler can add node type {t['name']!r} (labelled {LABEL}: cpu)"
    return None


def cpu_selector() -> Optional[Dict[str, str]]:
    """The label selector CPU-only work carries on this cluster (``CPU_WORK``), or None (no node
    with CPUs and no GPU now or ever, or ``ASVP_PLACEMENT=off``). Decided once per Ray session."""
    import ray

    if os.environ.get("ASVP_PLACEMENT", "auto").lower() == "off" or not ray.is_initialized():
        return None
    key = ray.get_runtime_context().get_job_id()
    if key not in _decided:
        why = _cpu_node_possible()
        _decided[key] = dict(CPU_WORK) if why else None
        log.debug("placement: CPU-only work %s", f"carries {CPU_WORK} ({why})" if why else
                  "carries no label selector (no node type with CPUs and no GPU)")
    sel = _decided[key]
    return dict(sel) if sel else None


def gpu_actor_selector() -> Optional[Dict[str, str]]:
    """What a GPU actor in a CPU-selected Ray Data pipeline carries (overrides the pipeline's)."""
    return dict(GPU_WORK) if cpu_selector() else None


def apply_to_ray_data() -> Optional[Dict[str, str]]:
    """Make every Ray Data dataset this process builds from now on carry the CPU selector
    (``ExecutionOptions.label_selector``: read, map and write tasks, and actors that do not set
    their own). Returns the selector set (None: none)."""
    from ray.data import DataContext

    sel = cpu_selector()
    DataContext.get_current().execution_options.label_selector = sel
    return sel


def cpu_options() -> Dict[str, object]:
    """Remote options for a CPU-only task or actor: ``{"label_selector": ...}`` or ``{}``."""
    sel = cpu_selector()
    return {"label_selector": sel} if sel else {}
