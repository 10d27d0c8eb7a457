"""Starting or joining Ray, and the one place that spells Ray's actor-pool arguments.

Ray's map_batches arguments for actor pools have moved between releases (`compute=`,
`concurrency=`, `ActorPoolStrategy(size=...)`); every stage goes through `actor_pool_args`, so
a Ray upgrade is a one-function change.
"""

from __future__ import annotations

import os
from typing import Any

LOOPBACK = "127.0.0.1"


def init_ray(address: str = "", num_cpus: int | None = None, num_gpus: int | None = None,
             object_store_memory: int = 0) -> None:
    """Join `address` ("auto", "ray://host:port", "host:port") or start a local Ray on loopback.

    A local Ray binds the node and the dashboard to 127.0.0.1 and starts no dashboard, so
    nothing this CLI starts listens beyond this machine.
    """
    import ray

    if ray.is_initialized():
        configure_data_context()
        return
    # Ray reads this before it picks the node address for a local start.
    os.environ.setdefault("RAY_NODE_IP_ADDRESS", LOOPBACK)
    if address:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    else:
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
    configure_data_context()


def configure_data_context() -> None:
    """Ray Data settings every capfilt job relies on, whether it started Ray or joined a cluster."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.max_errored_blocks = 0  # a non-zero value silently drops blocks
    ctx.enable_progress_bars = False


def actor_pool_args(actors: int, batch_size: int, num_cpus: float = 1.0,
                    num_gpus: float = 0.0) -> dict[str, Any]:
    """map_batches keyword arguments for a fixed-size pool of `actors` stateful workers."""
    from ray.data import ActorPoolStrategy

    return {
        "compute": ActorPoolStrategy(size=actors),
        "batch_size": batch_size,
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
    }
