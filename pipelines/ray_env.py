"""Starting or joining Ray, and the one place that spells Ray's actor-pool arguments.

Ray's map_batches arguments for actor pools have moved between releases (`compute=`,
`concurrency=`, `ActorPoolStrategy(size=...)`); every stage goes through `actor_pool_args`, so
a Ray upgrade is a one-function change.
"""

from __future__ import annotations

import os
from typing import Any

from capfilt.stages.common import CHAOS_DIR_ENV, CHAOS_ENV

LOOPBACK = "127.0.0.1"


def init_ray(address: str = "", num_cpus: int | None = None, num_gpus: int | None = None,
             object_store_memory: int = 0) -> bool:
    """Join `address` ("auto", "ray://host:port", "host:port") or start a local Ray on loopback;
    False when this process already had Ray, so that only the caller that started it shuts it down.

    A local Ray's node address is 127.0.0.1, so every server it starts (GCS, raylet, object
    manager, workers, agents) listens on 127.0.0.1 only, and no dashboard is started: nothing
    this CLI starts is reachable from another machine (tests/pipelines/test_ray_env.py checks
    every listening socket).
    """
    import ray

    if ray.is_initialized():
        configure_data_context()
        return False
    if address:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    else:
        from ray._private import ray_constants

        # Ray turns a node address of 127.0.0.1 into the host's network address, and its servers
        # then listen on every interface, unless it runs without cluster support (its
        # Windows/macOS mode, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). That flag is read when the
        # address is resolved, so it is switched off for this start only: a later `ray.init`
        # joining a cluster in the same process must still find its real address.
        cluster_support = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                object_store_memory=object_store_memory or None,
                include_dashboard=False,
                dashboard_host=LOOPBACK,
                _node_ip_address=LOOPBACK,
                configure_logging=False,
                log_to_driver=True,
            )
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_support
        node = ray.util.get_node_ip_address()
        if node != LOOPBACK:  # a Ray upgrade changed the rule above: fail closed
            ray.shutdown()
            raise RuntimeError(f"the local Ray came up on {node}, not {LOOPBACK}, so its ports would be "
                               "reachable from the network; start a cluster yourself and pass --address "
                               "(docs/cluster.md)")
    configure_data_context()
    return True


def configure_data_context() -> None:
    """Ray Data settings every capfilt job relies on, whether it started Ray or joined a cluster."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.max_errored_blocks = 0  # a non-zero value silently drops blocks
    ctx.enable_progress_bars = False


def actor_pool_args(actors: int, batch_size: int, num_cpus: float = 1.0, num_gpus: float = 0.0, *,
                    max_restarts: int) -> dict[str, Any]:
    """map_batches keyword arguments for a fixed-size pool of `actors` stateful workers.

    An actor that dies (segfault, OOM kill, lost node) is restarted and its batch retried, up
    to `max_restarts` times per actor; Ray Data's default is forever, which turns an actor that
    always dies into a job that never ends.
    """
    from ray.data import ActorPoolStrategy

    args: dict[str, Any] = {
        "compute": ActorPoolStrategy(size=actors),
        "batch_size": batch_size,
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_restarts": max_restarts,
        "max_task_retries": max_restarts,
    }
    chaos = {name: os.environ[name] for name in (CHAOS_ENV, CHAOS_DIR_ENV) if name in os.environ}
    if chaos:  # fault injection reaches the actors on any cluster, not only via inherited env
        args["runtime_env"] = {"env_vars": chaos}
    return args
