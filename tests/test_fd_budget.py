"""Raw mode's descriptors come only from what the open-file limit leaves beyond max_connections' own needs."""

from __future__ import annotations

import asyncio
import resource

from conftest import free_port
from prometheus_client import CollectorRegistry

from forwarder import config
from forwarder.metrics import Metrics
from forwarder.relay import BufferPool
from forwarder.server import Worker, fds_needed


def soft_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def test_raw_mode_gets_only_the_descriptors_beyond_the_reservation() -> None:
    pool = BufferPool()
    pool.reserved_fds = soft_limit() - 6
    assert [pool.reserve_fds(2) for _ in range(4)] == [True, True, True, False]
    assert pool.extra_fds == 6


def test_a_limit_the_connections_already_fill_leaves_raw_mode_nothing() -> None:
    pool = BufferPool()
    pool.reserved_fds = soft_limit() + 100
    assert not pool.reserve_fds(2)
    assert pool.extra_fds == 0


def test_without_a_reservation_raw_mode_gets_a_quarter() -> None:
    pool = BufferPool()
    pool.reserve_fds(0)
    assert pool.fd_budget == soft_limit() // 4


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
            assert worker.pool.fd_budget == max(0, soft_limit() - 2064)
            assert await worker.reload(config_with(port, soft_limit()))  # a limit no descriptor budget can hold
            assert worker.pool.reserved_fds == fds_needed(soft_limit())
            assert not worker.pool.reserve_fds(2)
        finally:
            await worker.drain()

    asyncio.run(main())
