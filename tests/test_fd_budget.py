"""Raw mode's descriptors: what the open-file limit leaves beyond max_connections' needs, at least an eighth."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys

from conftest import free_port
from labkit import root
from prometheus_client import CollectorRegistry

from forwarder import config
from forwarder.fdlimit import RAW_FD_SHARE, fds_needed
from forwarder.metrics import Metrics
from forwarder.resources import Resources
from forwarder.worker import Worker


def soft_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def test_raw_mode_gets_only_the_descriptors_beyond_the_reservation() -> None:
    pool = Resources()
    spare = soft_limit() // RAW_FD_SHARE + 6
    pool.reserved_fds = soft_limit() - spare
    assert all(pool.reserve_fds(2) for _ in range(spare // 2))
    assert not pool.reserve_fds(2)
    assert pool.extra_fds == spare


def test_under_a_tight_limit_raw_mode_still_gets_an_eighth() -> None:
    pool = Resources()
    pool.reserved_fds = soft_limit()  # max_connections alone would take every descriptor
    pool.reserve_fds(0)
    assert pool.fd_budget == soft_limit() // RAW_FD_SHARE


def config_with(port: int, max_connections: int) -> config.Config:
    return config.parse(
        {
            "engine": "memcached",
            "public_address": "127.0.0.1",
            "listen_address": "127.0.0.1",
            "allowed_clients": ["127.0.0.0/8"],
            "forwards": [{"port": port, "target": "127.0.0.1:9"}],
            "max_connections": max_connections,
        }
    )


def test_the_worker_reserves_what_its_connection_limit_needs_and_follows_reloads() -> None:
    async def main() -> None:
        port = free_port()
        worker = Worker(config_with(port, 1000), None, Metrics(CollectorRegistry()), reuse_port=False)
        await worker.start()
        try:
            assert worker.pool.reserved_fds == fds_needed(1000) == 2064
            worker.pool.reserve_fds(0)
            assert worker.pool.fd_budget == max(soft_limit() - 2064, soft_limit() // RAW_FD_SHARE)
            assert await worker.reload(config_with(port, soft_limit()))  # more than the limit can hold
            assert worker.pool.reserved_fds == fds_needed(soft_limit())
            worker.pool.reserve_fds(0)
            assert worker.pool.fd_budget == soft_limit() // RAW_FD_SHARE
        finally:
            await worker.drain()

    asyncio.run(main())


def limits_after_raise(hard: int, max_connections: int) -> tuple[int, int]:
    """RLIMIT_NOFILE after raise_fd_limit, in a child process that starts from `hard` (this process keeps its own)."""
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({hard}, {hard}))\n"
        "from forwarder.fdlimit import raise_fd_limit\n"
        f"raise_fd_limit({max_connections})\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30).stdout
    soft, hard_after = out.split()
    return int(soft), int(hard_after)


def may_raise_hard_limit() -> bool:
    """Whether this process may raise a hard limit (CAP_SYS_RESOURCE); some sandboxes deny it even to root."""
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1000, 1000))\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1001, 1001))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode == 0


@root
def test_a_tight_hard_limit_is_raised_to_hold_raw_mode_as_well_when_allowed() -> None:
    expected = 2 * fds_needed(1000) if may_raise_hard_limit() else 1000
    assert limits_after_raise(1000, 1000) == (expected, expected)


def test_a_limit_that_already_holds_both_is_left_alone() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    assert hard >= 2 * fds_needed(100)
    assert limits_after_raise(hard, 100) == (hard, hard)
