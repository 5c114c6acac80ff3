"""The autoscaler's node types: what a cluster can grow to, wherever the autoscaler publishes it.

Open-source Ray 2.60 does not put the autoscaler's node types where a driver can ask for them
(the GCS cluster config that ``ray._private.state`` reads is filled by hosted platforms only), so
every plan that asked "what can the cluster become" saw only the nodes up at that instant. This
module finds the node types where each way of running an autoscaler keeps them, first match wins:

1. Ray's cluster config in the GCS (hosted platforms; any future Ray that reports it);
2. ``ASVP_AUTOSCALING_CONFIG``: a file, either a Ray autoscaling config (``available_node_types``,
   as the cluster launcher's YAML) or a KubeRay ``RayCluster`` manifest;
3. KubeRay: the ``RayCluster`` named by ``RAY_CLUSTER_NAME`` (KubeRay sets it in every Ray
   container), read from the Kubernetes API with the pod's service account (the head pod's account
   may read its RayCluster: the in-tree autoscaler sidecar uses the same one) and turned into node
   types by Ray's own KubeRay autoscaler code;
4. the autoscaler running on this node (the cluster launcher's head, ``ray start --head
   --autoscaling-config=FILE``): its monitor process's ``--autoscaling-config`` file, for the
   monitor of this cluster's GCS only.

Each type is ``{"name", "resources", "labels", "min", "max", "head"}``; the answer is cached per
cluster (GCS address) and says where it came from (:func:`node_types_source`).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

ENV = "ASVP_AUTOSCALING_CONFIG"
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

_cache: Dict[str, Tuple[List[Dict[str, Any]], str]] = {}


def from_autoscaling_config(config: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Node types of a Ray autoscaling config (``available_node_types``, ``head_node_type``)."""
    head = config.get("head_node_type")
    out = []
    for name, t in (config.get("available_node_types") or {}).items():
        res = {str(k): float(v) for k, v in (t.get("resources") or {}).items()}
        is_head = name == head
        out.append({"name": str(name), "resources": res, "labels": dict(t.get("labels") or {}),
                    "min": int(t.get("min_workers", 0) or 0),
                    "max": 0 if is_head else int(t.get("max_workers", config.get("max_workers", 0)) or 0),
                    "head": is_head})
    return out


def from_raycluster(manifest: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Node types of a KubeRay ``RayCluster`` manifest, converted by Ray's own KubeRay autoscaler
    code (resources from the containers' limits and rayStartParams, labels, replicas)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = json.loads(json.dumps(manifest))  # a copy: Ray's code reads metadata.namespace
    cr.setdefault("metadata", {}).setdefault("namespace", "default")
    return from_autoscaling_config(_derive_autoscaling_config_from_ray_cr(cr))


def from_file(path: os.PathLike) -> List[Dict[str, Any]]:
    """Node types from a YAML/JSON file: an autoscaling config or a file holding a RayCluster."""
    import yaml

    docs = [d for d in yaml.safe_load_all(Path(path).expanduser().read_text()) if isinstance(d, dict)]
    for d in docs:
        if d.get("kind") == "RayCluster":
            return from_raycluster(d)
    for d in docs:
        if "available_node_types" in d:
            return from_autoscaling_config(d)
    raise ValueError(f"{path} holds neither a Ray autoscaling config (available_node_types) nor a RayCluster")


def _from_gcs() -> List[Dict[str, Any]]:
    from ray._private.state import state as ray_state

    config = ray_state.get_cluster_config()
    return [{"name": g.name, "resources": {str(k): float(v) for k, v in g.resources.items()},
             "labels": dict(getattr(g, "labels", {}) or {}), "min": int(g.min_count),
             "max": int(g.max_count), "head": False}
            for g in (getattr(config, "node_group_configs", None) or [])]


def _from_kuberay() -> List[Dict[str, Any]]:
    name = os.environ.get("RAY_CLUSTER_NAME")
    if not name or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return []
    from ray.autoscaler._private.kuberay.node_provider import KubernetesHttpApiClient

    namespace = _SA_NAMESPACE.read_text().strip() if _SA_NAMESPACE.is_file() else "default"
    return from_raycluster(KubernetesHttpApiClient(namespace=namespace).get(f"rayclusters/{name}"))


def _monitor_config_path(gcs_address: str) -> Optional[str]:
    """The ``--autoscaling-config`` of the autoscaler monitor on this node serving ``gcs_address``."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if not any(c.endswith(("monitor.py",)) for c in cmd):
            continue
        args = dict(c[2:].split("=", 1) for c in cmd if c.startswith("--") and "=" in c)
        if args.get("gcs-address") == gcs_address and args.get("autoscaling-config"):
            return args["autoscaling-config"]
    return None


def _gcs_address() -> str:
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - older runtime context: the worker's
        return ray._private.worker.global_worker.node.gcs_address


def node_types() -> List[Dict[str, Any]]:
    """The autoscaler's node types for the connected cluster ([] when there is no autoscaler or it
    keeps them nowhere this process can read). Cached per cluster."""
    import ray

    if not ray.is_initialized():
        return []
    key = _gcs_address()
    if key not in _cache:
        _cache[key] = _discover(key)
        types, source = _cache[key]
        if types:
            log.info("autoscaler node types from %s: %s", source, ", ".join(
                f"{t['name']} ({_fmt(t['resources'])}, {t['min']}-{t['max']})" for t in types if not t["head"]))
    return [dict(t) for t in _cache[key][0]]


def node_types_source() -> str:
    """Where :func:`node_types` found them ("" when nowhere)."""
    node_types()
    try:
        return _cache.get(_gcs_address(), ([], ""))[1]
    except Exception:  # noqa: BLE001 - Ray not initialised
        return ""


def _fmt(res: Dict[str, float]) -> str:
    return ", ".join(f"{k}: {v:g}" for k, v in res.items() if k in ("CPU", "GPU") or not k.startswith(
        ("memory", "object_store")))


def _discover(gcs_address: str) -> Tuple[List[Dict[str, Any]], str]:
    tries = [("Ray's cluster config in the GCS", _from_gcs)]
    path = os.environ.get(ENV)
    if path:
        tries.append((f"{ENV}={path}", lambda: from_file(path)))
    tries.append((f"the RayCluster {os.environ.get('RAY_CLUSTER_NAME')!r} (Kubernetes API)", _from_kuberay))

    def monitor():
        found = _monitor_config_path(gcs_address)
        return from_file(found) if found else []

    tries.append(("the autoscaler's config on this node (its monitor's --autoscaling-config)", monitor))
    for source, fn in tries:
        try:
            types = fn()
        except Exception as e:  # noqa: BLE001 - a source that cannot be read: say so, try the next
            (log.warning if source.startswith(ENV) else log.debug)(
                "autoscaler node types: %s could not be read (%s: %s)", source, type(e).__name__, e)
            continue
        if any(not t["head"] for t in types):
            return types, source
    return [], ""


def max_resources(now: Dict[str, float]) -> Optional[Dict[str, float]]:
    """Per resource, what the node types can add up to (the head once, each worker type
    ``max`` times), or None without node types."""
    types = node_types()
    if not any(not t["head"] for t in types):
        return None
    top: Dict[str, float] = {}
    for t in types:
        count = 1 if t["head"] else t["max"]
        for r, v in t["resources"].items():
            top[r] = top.get(r, 0.0) + count * float(v)
    if not any(t["head"] for t in types):  # the head is not among the types: count it as it is now
        import ray

        for n in ray.nodes():
            if n.get("Alive") and "node:__internal_head__" in (n.get("Resources") or {}):
                for r, v in n["Resources"].items():
                    if not str(r).startswith("node:"):
                        top[str(r)] = top.get(str(r), 0.0) + float(v)
    return top
