"""Starting or joining Ray, what of Ray reaches the console, and the one place that spells Ray's
actor-pool arguments.

Ray's map_batches arguments have moved between releases (`compute=`, `concurrency=`,
`ActorPoolStrategy(size=...)`, extra remote args -> named parameters); every stage goes through
`actor_pool_args` / `map_actor_pool` (model actors) or `task_args` (CPU tasks and remote
functions), so a Ray upgrade is a change here alone.

The console is capfilt's: Ray Data's INFO lines (session paths, execution plans), the workers'
output, the token-authentication notice and the core worker's error line per restartable actor
(ray-project/ray#53727, harmless for ours) stay in Ray's session folder (`ray_logs()`), unless
CAPFILT_VERBOSE=1 (`--verbose`) asks for them on the console too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from typing import Any

from capfilt.stages.common import CHAOS_DIR_ENV, CHAOS_ENV

LOOPBACK = "127.0.0.1"
MAP_STORAGE_RETRIES = 3  # runs again of a map task whose storage call kept failing, before its stage fails
VERBOSE_ENV = "CAPFILT_VERBOSE"  # "1": Ray's own lines on the console as well
# What Ray's C++ core worker writes to the driver's stderr for every model actor: its restarts
# (max_restarts > 0) would fail if Ray Data's constructor arguments were lost, which they are not.
CORE_WORKER_NOISE = re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in "
                               rb"the object store and max_restarts > 0")
# glibc hands every freed block over its mmap threshold (which grows to at most 32 MB) back to the
# kernel, so a model actor's per-batch buffers (its block's pixels and their normalised floats, 1.7
# MB per 384-px image; the models' activations) were faulted in and zeroed again on every batch:
# about 0.8 core-ms of kernel time per 384-px image. Model actors keep them in the heap instead
# (their resident memory stays at its peak between batches); a value the user exported wins.
# One arena: Ray runs the actor's batches off the main thread, and a thread arena maps each big
# block afresh whatever the thresholds say.
ACTOR_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
                "MALLOC_ARENA_MAX": "1"}
_session_logs: list[str] = []  # the logs folder of each Ray this process started or joined

log = logging.getLogger("capfilt.ray")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def ray_logs() -> str | None:
    """The logs folder of the Ray this process last started or joined (it outlives the session)."""
    return _session_logs[-1] if _session_logs else None


@contextlib.contextmanager
def quiet_stderr():
    """While open, drop `CORE_WORKER_NOISE` lines written to this process's stderr (fd 2, where
    Ray's C++ core worker writes them; they stay in its python-core-driver log); pass the rest.

    A pipe takes fd 2's place and a thread forwards its lines to the real stderr; at the end fd 2
    is restored and whatever is still in the pipe is forwarded. With CAPFILT_VERBOSE nothing is dropped.
    """
    if verbose():
        yield
        return
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not CORE_WORKER_NOISE.search(line):
                    os.write(real, line)

    thread = threading.Thread(target=forward, name="capfilt-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes this process's write end: the thread drains the pipe and ends
        thread.join(timeout=2.0)
        if not thread.is_alive():  # else a process started meanwhile holds the pipe: its lines still pass
            os.close(real)


def _quiet_ray_loggers() -> None:
    """Ray's Python lines that are not for a person running capfilt: kept in Ray's files, off the console."""
    quiet = not verbose()
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR if quiet else logging.NOTSET)
    # Ray Data logs to its session file (all levels) and a handler named "console" (INFO).
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING if quiet else logging.INFO)


@contextlib.contextmanager
def loopback_addresses():
    """Keep 127.0.0.1 as this process's Ray node address while Ray starts or joins.

    Ray turns a node address of 127.0.0.1 into the host's network address, and its servers then
    listen on every interface, unless it runs without cluster support (its Windows/macOS mode,
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). That flag is read when the address is resolved, so it
    is switched off for one start or join only: a later `ray.init` joining a real cluster in the
    same process must still find its real address.
    """
    from ray._private import ray_constants

    cluster_support = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_support


def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host in ("localhost", "::1") or host.startswith("127.")


def init_ray(address: str = "", num_cpus: int | None = None, num_gpus: int | None = None,
             object_store_memory: int = 0) -> bool:
    """Join `address` ("auto", "ray://host:port", "host:port") or start a local Ray on loopback;
    False when this process already had Ray, so that only the caller that started it shuts it down.

    A local Ray's node address is 127.0.0.1, so every server it starts (GCS, raylet, object
    manager, workers, agents) listens on 127.0.0.1 only, and no dashboard is started: nothing
    this CLI starts is reachable from another machine (tests/pipelines/test_ray_env.py checks
    every listening socket). Joining a cluster whose address is a loopback one (a test cluster,
    `ray start --node-ip-address 127.0.0.1`) keeps this driver on loopback too.
    """
    import ray

    if ray.is_initialized():
        configure_data_context()
        return False
    _quiet_ray_loggers()
    if address:
        with loopback_addresses() if _is_loopback(address) else contextlib.nullcontext():
            ray.init(address=address, log_to_driver=verbose(), configure_logging=False)
    else:
        with loopback_addresses():
            ray.init(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                object_store_memory=object_store_memory or None,
                include_dashboard=False,
                dashboard_host=LOOPBACK,
                _node_ip_address=LOOPBACK,
                configure_logging=False,
                log_to_driver=verbose(),  # the workers' output stays in their log files
            )
        node = ray.util.get_node_ip_address()
        if node != LOOPBACK:  # a Ray upgrade changed the rule above: fail closed
            ray.shutdown()
            raise RuntimeError(f"the local Ray came up on {node}, not {LOOPBACK}, so its ports would be "
                               "reachable from the network; start a cluster yourself and pass --address "
                               "(docs/cluster.md)")
    configure_data_context()
    _session_logs.append(ray._private.worker._global_node.get_logs_dir_path())  # as Ray Data finds its own
    resources = ray.cluster_resources()
    log.info("Ray: %s, %g CPUs, %g GPUs; its logs: %s", f"joined {address}" if address else "a local Ray",
             resources.get("CPU", 0), resources.get("GPU", 0), ray_logs())
    return True


def configure_data_context() -> None:
    """Ray Data settings every capfilt job relies on, whether it started Ray or joined a cluster."""
    import warnings

    from ray.data import DataContext

    with warnings.catch_warnings():
        # Ray 2.60's DataContext warns about its own deprecated fields when it is first created.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\.context")
        ctx = DataContext.get_current()
    _quiet_ray_loggers()  # ray.data set its handlers up when it was imported
    ctx.max_errored_blocks = 0  # a non-zero value silently drops blocks
    # A map task whose storage call outlasted its retries (capfilt/storage.py) runs again, up to
    # MAP_STORAGE_RETRIES times (every capfilt map task may: its writes are whole and named after
    # their rows); Ray Data matches the error's message, not its class.
    from capfilt.storage import UNAVAILABLE

    ctx.retried_map_errors = [UNAVAILABLE]
    ctx.max_map_retries = MAP_STORAGE_RETRIES
    # capfilt's own progress line (pipelines/progress.py) replaces the per-operator bars, which turn
    # into noise in `ray job logs`; Ray's one-time notice that they are off goes with them.
    ctx.enable_progress_bars = False
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")


def _runtime_env() -> dict[str, Any] | None:
    """Fault injection and storage settings, forwarded so they reach workers on any cluster (not only
    via inherited env); none when neither is set, so tasks share the job's workers."""
    from capfilt.storage import forwarded_settings

    chaos = {name: os.environ[name] for name in (CHAOS_ENV, CHAOS_DIR_ENV) if name in os.environ}
    env = chaos | forwarded_settings()
    return {"env_vars": env} if env else None


def task_args(num_cpus: float) -> dict[str, Any]:
    """Ray arguments of a stateless CPU task stage (map_batches) or remote function (`.options`)."""
    args: dict[str, Any] = {"num_cpus": num_cpus}
    if _runtime_env():
        args["runtime_env"] = _runtime_env()
    return args


def actor_pool_args(actors: int, batch_size: int, num_cpus: float = 1.0, num_gpus: float = 0.0, *,
                    max_restarts: int, tasks_in_flight: int = 4) -> dict[str, Any]:
    """map_batches keyword arguments for a fixed-size pool of `actors` stateful workers.

    An actor that dies (segfault, OOM kill, lost node) is restarted and its batch retried, up
    to `max_restarts` times per actor; Ray Data's default is forever, which turns an actor that
    always dies into a job that never ends. Up to `tasks_in_flight` batches are sent to each
    actor ahead of the one it runs (Ray's `max_tasks_in_flight_per_actor`), so their blocks are
    fetched to its node while the model works and it never waits for input; it still runs one
    batch at a time. Each actor's process starts with `ACTOR_MALLOC` in its environment.
    """
    from ray.data import ActorPoolStrategy

    pool = ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=tasks_in_flight)
    malloc = {name: os.environ.get(name, value) for name, value in ACTOR_MALLOC.items()}  # read at the actor's start
    env = malloc | (_runtime_env() or {}).get("env_vars", {})
    return {"compute": pool, "batch_size": batch_size, "num_gpus": num_gpus, "max_restarts": max_restarts,
            "max_task_retries": max_restarts, "num_cpus": num_cpus, "runtime_env": {"env_vars": env}}


def map_actor_pool(ds: Any, cls: type, constructor_kwargs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    """`ds.map_batches(cls)` on pyarrow batches with `actor_pool_args(*args, **kwargs)`."""
    import warnings

    with warnings.catch_warnings():
        # Ray 2.60 deprecates extra remote args but has no named parameter for the restart bound
        # yet; this is the one call that still passes them (revisit before Ray 2.64).
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        return ds.map_batches(cls, fn_constructor_kwargs=constructor_kwargs, batch_format="pyarrow",
                              **actor_pool_args(*args, **kwargs))


def operator_output_bytes(ds: Any) -> dict[str, int]:
    """Bytes of the blocks each operator of an executed dataset put in the object store, by operator.

    Read from Ray Data's execution stats (Ray 2.60: `get_stats_summary()`, each operator's
    `output_size_bytes`); {} where a Ray release does not report them.
    """
    out: dict[str, int] = {}

    def visit(summary: Any) -> None:
        for parent in getattr(summary, "parents", []) or []:
            visit(parent)
        for op in getattr(summary, "operators_stats", []) or []:
            size = getattr(op, "output_size_bytes", None)
            if size is not None and getattr(size, "sum", None) is not None:
                out[op.operator_name] = out.get(op.operator_name, 0) + int(size.sum)

    try:
        visit(ds.get_stats_summary())
    except AttributeError:
        return {}
    return out
