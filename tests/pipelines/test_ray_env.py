"""pipelines/ray_env.py: the local Ray the CLI starts listens on loopback only; actor-pool arguments.

Listening sockets are read from /proc (Linux): every TCP socket in LISTEN state owned by a Ray
process (this test process and its descendants: GCS, raylet, agents, workers), with its address.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from capfilt.stages.common import CHAOS_DIR_ENV, CHAOS_ENV
from capfilt.pipelines.ray_env import ACTOR_MALLOC, actor_pool_args

LISTEN = "0A"  # TCP state code in /proc/net/tcp*


def descendants(root: int) -> set[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    # /proc prints the address as 32-bit words in host (little-endian) order.
    ordered = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(ordered)
    return address.ipv4_mapped or address if isinstance(address, ipaddress.IPv6Address) else address


def listening_sockets(pids: set[int]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket the processes `pids` hold."""
    owners: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owners[target[8:-1]] = pid
        except OSError:  # exited, or not ours
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN and inode in owners:
                host, port = local.split(":")
                name = Path(f"/proc/{owners[inode]}/comm").read_text().strip()
                found.append((name, str(_address(host)), int(port, 16)))
    return found


def assert_loopback_only(root: int) -> list[tuple[str, str, int]]:
    """Every listening socket under `root` is on loopback; the GCS and the raylet are among them."""
    sockets = listening_sockets(descendants(root))
    exposed = [s for s in sockets if not ipaddress.ip_address(s[1]).is_loopback]
    assert not exposed, f"Ray listens beyond this machine: {exposed}"
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, f"Ray's servers were not found among {sorted(names)}"
    return sockets


def test_the_local_ray_listens_on_loopback_only(ray_local):
    """The suite's Ray is started by init_ray, exactly as `capfilt run` starts its own."""

    @ray_local.remote(num_cpus=0)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    probe = Probe.remote()  # a worker with its own gRPC server
    actor_pid = ray_local.get(probe.pid.remote())
    try:
        assert ray_local.util.get_node_ip_address() == "127.0.0.1"
        sockets = assert_loopback_only(os.getpid())
        assert any(port for name, _, port in sockets if name.startswith("ray::Probe")), sockets
        assert actor_pid in descendants(os.getpid())
    finally:
        ray_local.kill(probe)


def test_actor_pools_bound_restarts_and_forward_faults(monkeypatch, tmp_path):
    monkeypatch.delenv(CHAOS_ENV, raising=False)
    args = actor_pool_args(2, 8, max_restarts=3)
    # Ray Data's default (-1) retries an actor that always dies forever.
    assert args["max_restarts"] == args["max_task_retries"] == 3
    assert args["runtime_env"] == {"env_vars": ACTOR_MALLOC}
    # Batches queued per actor ahead of the running one (Ray's default is not relied on).
    assert args["compute"].max_tasks_in_flight_per_actor == 4
    assert actor_pool_args(2, 8, max_restarts=3, tasks_in_flight=7)["compute"].max_tasks_in_flight_per_actor == 7
    monkeypatch.setenv(CHAOS_ENV, "caption:2")
    monkeypatch.setenv(CHAOS_DIR_ENV, str(tmp_path))
    assert actor_pool_args(1, 8, max_restarts=3)["runtime_env"] == {
        "env_vars": {**ACTOR_MALLOC, CHAOS_ENV: "caption:2", CHAOS_DIR_ENV: str(tmp_path)}}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")  # the user's own setting wins
    assert actor_pool_args(1, 8, max_restarts=3)["runtime_env"]["env_vars"]["MALLOC_TRIM_THRESHOLD_"] == "1048576"


def test_model_actors_start_with_the_malloc_settings(ray_local, monkeypatch):
    """glibc reads its malloc settings once, from the environment the process was started with:
    the actor's own /proc/self/environ, not a variable set after it started."""
    for name in ACTOR_MALLOC:
        monkeypatch.delenv(name, raising=False)
    args = actor_pool_args(1, 8, max_restarts=0)

    @ray_local.remote(num_cpus=0, runtime_env=args["runtime_env"])
    class StartEnv:
        def read(self) -> dict[str, str]:
            pairs = Path("/proc/self/environ").read_bytes().split(b"\0")
            return dict(pair.decode().split("=", 1) for pair in pairs if b"=" in pair)

    actor = StartEnv.remote()
    try:
        started_with = ray_local.get(actor.read.remote())
    finally:
        ray_local.kill(actor)
    assert {name: started_with.get(name) for name in ACTOR_MALLOC} == ACTOR_MALLOC


@pytest.mark.parametrize("spec", ["caption:1:sometimes", "caption"])
def test_a_malformed_fault_spec_is_refused(monkeypatch, tmp_path, spec):
    from capfilt.stages.common import Chaos

    monkeypatch.setenv(CHAOS_ENV, spec)
    monkeypatch.setenv(CHAOS_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=CHAOS_ENV):
        Chaos("caption")
