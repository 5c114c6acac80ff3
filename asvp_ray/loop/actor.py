"""The driver as a Ray actor (what `asvp-ray run` talks to), pinned to this node and computing on
``driver_threads``."""
from __future__ import annotations

from pathlib import Path

from asvp_ray.runtime.faults import fault_env
from asvp_ray.config import Config
from asvp_ray.runtime.allocator import lean_memory_env
from asvp_ray.runtime.device import thread_env
from asvp_ray.runtime.resources import node_cpus


def driver_actor(config: Config, out: str):
    """Start the driver as a Ray actor pinned to this node (the head, for a submitted job).

    It asks for no CPU so that it never competes with extraction actors or training workers for
    a reservation; its own compute (proxy training, pool scoring, local selection) runs between
    their phases, on ``driver_threads`` threads (default: every CPU of the node). Without that
    Ray would give a zero-CPU actor ``OMP_NUM_THREADS=1``: one core for the proxy.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from asvp_ray.storage.locations import is_uri
    from asvp_ray.loop.driver import Driver

    node = ray.get_runtime_context().get_node_id()
    Actor = ray.remote(Driver)
    env = {**thread_env(config.driver_threads or node_cpus()), **fault_env(), **lean_memory_env()}
    return Actor.options(num_cpus=0, max_concurrency=4, runtime_env={"env_vars": env},
                         scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
                         ).remote(config.model_dump(mode="json"), out if is_uri(out) else str(Path(out).resolve()))
