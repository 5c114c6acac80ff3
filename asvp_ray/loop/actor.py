"""The driver as a Ray actor (what `asvp-ray run` talks to)."""
from __future__ import annotations

from pathlib import Path

from asvp_ray._faults import fault_env
from asvp_ray.config import Config


def driver_actor(config: Config, out: str):
    """Start the driver as a Ray actor pinned to this node (the head, for a submitted job).

    It asks for no CPU so that it never competes with extraction actors or training workers.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from asvp_ray.loop.driver import Driver

    node = ray.get_runtime_context().get_node_id()
    Actor = ray.remote(Driver)
    env = fault_env()
    return Actor.options(num_cpus=0, max_concurrency=4, runtime_env={"env_vars": env} if env else None,
                         scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
                         ).remote(config.model_dump(mode="json"), str(Path(out).resolve()))
