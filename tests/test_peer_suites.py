"""redis-py's and pymemcache's own test suites pass through `natfwd serve` wherever they pass against the node."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Node, free_port, write_config
from peerkit import PeerRun, fetch_suites, memcached_node, once_per_run, redis_node, run_suite
from servekit import serving

# What runs of redis-py's suite: the modules whose tests talk to one standalone Redis the most, picked by value per
# second. redis-py speaks RESP3 unless told otherwise, and so do these runs.
REDIS_PY_FILES = [
    "tests/test_commands.py",
    "tests/test_pipeline.py",
    "tests/test_pubsub.py",
    "tests/test_connection.py",
    "tests/test_multiprocessing.py",
    "tests/test_lock.py",
    "tests/test_scripting.py",
    "tests/test_function.py",
    "tests/test_encoding.py",
    "tests/test_cache.py",
    "tests/test_monitor.py",
    "tests/test_keyspace_notifications.py",
    "tests/test_asyncio/test_pipeline.py",
    "tests/test_asyncio/test_connection.py",
]
# Left out: tests of servers these runs do not give the suite (modules, replicas, TLS, cluster), and tests that
# reach fixed localhost ports whatever --redis-url says (their outcome is whatever happens to listen there, and they
# would flush it).
REDIS_PY_DESELECT = [
    "-m",
    "not redismod and not replica and not ssl",
    "--deselect",
    "tests/test_pubsub.py::TestPubSubSubscriberModeProtocol::test_subscriber_mode_rejects_regular_command_after_ssubscribe",  # localhost:16379
    "--deselect",
    "tests/test_connection.py::test_create_single_connection_client_from_url",  # localhost:6379
    "--deselect",
    "tests/test_connection.py::TestConnection::test_retry_connect_on_timeout_error",  # localhost:6379
    "--deselect",
    "tests/test_pubsub.py::TestPubSubRedisDown",  # expects nothing on localhost:6390
    # A race in the test itself, whatever is between it and the server: its reader thread holds a lock while blocked
    # in listen() with nothing left to read, and the main thread must take that lock in the reader's 10 ms sleep. On a
    # loaded machine it can miss it; then both wait until the suite's timeout ends the whole run. The get_message
    # variants of the same reconnects stay.
    "--deselect",
    "tests/test_pubsub.py::TestPubSubAutoReconnect::test_reconnect_socket_error[listen]",
    "--deselect",
    "tests/test_pubsub.py::TestPubSubAutoReconnect::test_reconnect_disconnect[listen]",
]
# Each run names the suite's own pytest config: found by walking up, it could otherwise be natfwd's (.peer-suites/
# is inside natfwd's tree), whose filterwarnings=error the suites are not written for.
# pymemcache's tests against a server are marked `integration` (and `benchmark`, run short here); its setup.cfg's
# addopts select only the unit tests and need pytest-cov, so they are replaced.
PYMEMCACHE_ARGS = [
    "-o",
    "addopts=",
    "-m",
    "integration or benchmark",
    "--count",
    "50",
    "pymemcache/test/test_integration.py",
    "pymemcache/test/test_benchmark.py",
]

# Tests that see the proxy itself, so cannot pass through any proxy: test id -> why.
EXCLUDED: dict[str, str] = {
    "tests.test_commands.TestRedisCommands::test_client_list_client_id": (
        "reads CLIENT LIST twice and expects its oldest client to be there both times; through a proxy, a connection "
        "the previous test closed reaches the node's close one hop later, and under load it vanishes in between"
    ),
    "tests.test_commands.TestRedisCommands::test_interrupted_command": (
        "gives a reconnect, its handshake and a SET 0.1 s of wall time (redis-py marks it timing-sensitive, for a "
        "co-located low-latency server); with the suite's parallel load on two cores, the extra hop missed it once"
    ),
}

# Tests that fail through `multiplex: true` because of one of issue 19's connection-state bugs (HELLO and AUTH not
# carried to a pinned client's own node connection): test id -> the bug. They are fixed by h19d.
FIXED_BY_H19D: dict[str, str] = {}

# A whole peer run takes about a minute; one that hangs test after test is cut off here and fails.
PEER_DEADLINE_S = 300


@pytest.fixture(scope="module")
def suites() -> dict[str, Path]:
    return fetch_suites()


def redis_py(suites: dict[str, Path], port: int, out: Path, name: str) -> PeerRun:
    url = f"redis://127.0.0.1:{port}/0"
    # --redis-mod-url too: the suite's session start asks it for INFO, by default on localhost:6479.
    args = ["-c", "pyproject.toml", "--redis-url", url, "--redis-mod-url", url, *REDIS_PY_DESELECT, *REDIS_PY_FILES]
    return run_suite(suites["redis"], args, out, name, PEER_DEADLINE_S)


def pymemcache(suites: dict[str, Path], port: int, out: Path, name: str) -> PeerRun:
    args = ["-c", "setup.cfg", "--server", "127.0.0.1", "--port", str(port), *PYMEMCACHE_ARGS]
    return run_suite(suites["pymemcache"], args, out, name, PEER_DEADLINE_S)


# The runs against the node itself are the same for every test here: one each per test run, even when pytest-xdist
# hands the tests that compare against them to several workers.
@pytest.fixture(scope="module")
def redis_py_direct(suites: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> PeerRun:
    def direct(out: Path) -> PeerRun:
        with redis_node(out / "node") as node:
            return complete(redis_py(suites, node.port, out, "direct"))

    return once_per_run("redis-py", tmp_path_factory, direct)


@pytest.fixture(scope="module")
def pymemcache_direct(suites: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> PeerRun:
    def direct(out: Path) -> PeerRun:
        with memcached_node() as node:
            return complete(pymemcache(suites, node.port, out, "direct"))

    return once_per_run("pymemcache", tmp_path_factory, direct)


def complete(direct: PeerRun) -> PeerRun:
    if direct.cut_off:
        pytest.fail(
            f"the peer suite did not finish within {PEER_DEADLINE_S}s against the node itself; log {direct.log}"
        )
    return direct


@contextlib.contextmanager
def natfwd(tmp_path: Path, node: Node, engine: str, multiplex: bool, wrapper: tuple[str, ...] = ()) -> Iterator[int]:
    """`natfwd serve` forwarding a free port to `node`; yields the port. Asserts natfwd outlived the suite."""
    port = free_port()
    config = write_config(
        tmp_path / "natfwd.yaml", [(port, node.address)], engine=engine, extra=f"multiplex: {str(multiplex).lower()}\n"
    )
    with serving(config, [port], wrapper=wrapper) as serve:
        yield port
        assert serve.proc.poll() is None, f"natfwd exited {serve.proc.returncode} during the suite:\n{serve.log()}"


def check(direct: PeerRun, through: PeerRun, known: dict[str, str]) -> None:
    """Every test that passed directly passed through natfwd, but for EXCLUDED; failures in `known` make it xfail."""
    broken = sorted(
        test for test in direct.having("passed") - EXCLUDED.keys() if through.outcomes.get(test) != "passed"
    )
    unexplained = [test for test in broken if test not in known]
    ran = [test for test in broken if test in through.outcomes]
    lines = [f"  {test}: {through.outcomes[test]}: {through.messages.get(test, '')}" for test in ran]
    summary = f"{len(broken)} of {len(direct.having('passed'))} directly passing tests did not pass through natfwd"
    if through.cut_off:
        summary += f"; the run was cut off after {PEER_DEADLINE_S}s, before {len(broken) - len(ran)} of them"
    details = "\n".join(lines)
    assert not unexplained and not through.cut_off, f"{summary} (log {through.log}):\n{details}"
    if broken:
        pytest.xfail(f"fixed by h19d: {summary}:\n{details}")


MULTIPLEX = [pytest.param(False, id="multiplex-false"), pytest.param(True, id="multiplex-true")]
# pymemcache's run is short enough to take natfwd's pure-Python scanners through too (the C ones are the default).
PYTHON_SCANNERS = ("env", "NATFWD_NO_EXTENSIONS=1")
MEMCACHED_NATFWD = [
    pytest.param(False, (), id="multiplex-false"),
    pytest.param(True, (), id="multiplex-true"),
    pytest.param(True, PYTHON_SCANNERS, id="multiplex-true-python"),
]


@pytest.mark.long
@pytest.mark.timeout(3 * PEER_DEADLINE_S)
@pytest.mark.parametrize("multiplex", MULTIPLEX)
def test_redis_py_suite_passes_through_natfwd(
    multiplex: bool, suites: dict[str, Path], redis_py_direct: PeerRun, tmp_path: Path
) -> None:
    with redis_node(tmp_path / "node") as node, natfwd(tmp_path, node, "redis", multiplex) as port:
        through = redis_py(suites, port, tmp_path, "through")
    check(redis_py_direct, through, FIXED_BY_H19D if multiplex else {})


@pytest.mark.timeout(3 * PEER_DEADLINE_S)
@pytest.mark.parametrize(("multiplex", "wrapper"), MEMCACHED_NATFWD)
def test_pymemcache_suite_passes_through_natfwd(
    multiplex: bool, wrapper: tuple[str, ...], suites: dict[str, Path], pymemcache_direct: PeerRun, tmp_path: Path
) -> None:
    with memcached_node() as node, natfwd(tmp_path, node, "memcached", multiplex, wrapper) as port:
        through = pymemcache(suites, port, tmp_path, "through")
    check(pymemcache_direct, through, FIXED_BY_H19D if multiplex else {})
