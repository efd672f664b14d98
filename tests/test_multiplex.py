"""`multiplex: true`: real clients share one node connection through a real `natfwd serve`, and get their own replies."""

from __future__ import annotations

import contextlib
import hashlib
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from conftest import Node, free_port, node_clients, wait_for, write_config
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheUnexpectedCloseError
from servekit import Serve, mux_config, serving, serving_mux

from forwarder.protocols import framing

CLIENTS = 24


def value(seed: str, size: int) -> bytes:
    # Bytes that look like protocol (CRLF, '*', '$', 'VALUE ', 'END') inside values must not confuse the framing.
    unit = hashlib.sha256(seed.encode()).digest() + b"\r\n*3\r\n$-1\r\nVALUE k 0 1\r\nEND\r\n"
    return (unit * (size // len(unit) + 1))[:size]


def test_redis_clients_share_one_node_connection_and_each_gets_its_own_replies(
    redis_mux: tuple[Node, int, Serve],
) -> None:
    node, port, serve = redis_mux
    clients = [redis.Redis(port=port, socket_timeout=20) for _ in range(CLIENTS)]
    ready = threading.Barrier(CLIENTS)

    def work(index: int) -> int:
        client = clients[index]
        rng = random.Random(index)
        client.ping()
        ready.wait(20)  # every client connected at once, so their requests really interleave
        checked = 0
        for j in range(150):
            key = f"k{index}:{j}"
            data = value(key, rng.choice((0, 1, 9, 300, 4000, 30_000)))
            assert client.set(key, data)
            assert client.get(key) == data
            assert client.incr(f"n{index}") == j + 1
            assert client.mget([key, "missing", key]) == [data, None, data]
            checked += 4
        assert client.delete(f"n{index}") == 1
        return checked

    with ThreadPoolExecutor(CLIENTS) as pool:
        assert sum(pool.map(work, range(CLIENTS))) == CLIENTS * 150 * 4
        assert node_clients(node) == 1  # 24 clients, one node connection
        assert serve.metric("natfwd_multiplex_node_connections", forward=str(port)) == 1
    for client in clients:
        client.close()
    assert "shared node connection lost" not in serve.log()


def test_memcached_clients_share_one_node_connection_and_each_gets_its_own_replies(
    memcached_mux: tuple[Node, int, Serve],
) -> None:
    node, port, serve = memcached_mux
    direct = Client(("127.0.0.1", node.port))
    before = int(direct.stats()[b"curr_connections"])
    big = value("big", 300_000)
    assert direct.set("big", big, noreply=False)  # read through natfwd, it streams
    clients = [Client(("127.0.0.1", port), connect_timeout=5, timeout=20) for _ in range(CLIENTS)]
    ready = threading.Barrier(CLIENTS)

    def work(index: int) -> int:
        client = clients[index]
        rng = random.Random(index)
        client.version()
        ready.wait(20)
        for j in range(100):
            if j % 10 == index % 10:
                assert client.get("big") == big
            key = f"k{index}:{j}"
            data = value(key, rng.choice((0, 1, 100, 5000, 40_000)))
            assert client.set(key, data, noreply=False)
            assert client.get(key) == data
            assert client.get_many([key, "missing"]) == {key: data}
            got, cas = client.gets(key)
            assert got == data
            assert client.cas(key, b"swapped", cas, noreply=False)
            assert client.get(key) == b"swapped"
            assert client.incr(f"n{index}", 1, noreply=False) is None  # no such key: NOT_FOUND
            assert client.delete(key, noreply=False)
        return 100

    with ThreadPoolExecutor(CLIENTS) as pool:
        assert sum(pool.map(work, range(CLIENTS))) == CLIENTS * 100
        assert int(direct.stats()[b"curr_connections"]) == before + 1
    for client in clients:
        client.close()
    direct.close()
    assert "shared node connection lost" not in serve.log()


def test_stateful_commands_get_a_connection_of_their_own(redis_mux: tuple[Node, int, Serve]) -> None:
    node, port, serve = redis_mux
    shared = redis.Redis(port=port, socket_timeout=10)
    db2 = redis.Redis(port=port, db=2, socket_timeout=10)  # sends SELECT 2 on connect: pinned
    assert db2.set("x", "in db 2")
    assert shared.get("x") is None
    assert db2.get("x") == b"in db 2"
    with db2.pipeline(transaction=True) as tx:  # MULTI ... EXEC on the pinned connection
        tx.incr("counter").incr("counter")
        assert tx.execute() == [1, 2]
    assert node_clients(node) == 2

    # A blocking command must not stall the shared connection: BLPOP waits on its own one.
    popped: list[object] = []
    blocker = redis.Redis(port=port, socket_timeout=30)
    waiter = threading.Thread(target=lambda: popped.append(blocker.blpop(["queue"], timeout=25)))
    waiter.start()
    for j in range(200):
        assert shared.set(f"s{j}", j) and shared.get(f"s{j}") == str(j).encode()
    assert waiter.is_alive() and not popped  # still blocked, and the shared clients were served meanwhile
    assert shared.rpush("queue", "item") == 1
    waiter.join(20)
    assert popped == [(b"queue", b"item")]
    assert serve.metric("natfwd_multiplex_pinned_total", forward=str(port), reason="command") == 2  # SELECT, BLPOP
    for client in (shared, db2, blocker):
        client.close()


def pipeline_of_100(port: int) -> redis.Redis:
    """A client that has just pipelined 100 SETs and GETs, checked, still connected."""
    piped = redis.Redis(port=port)
    with piped.pipeline(transaction=False) as pipe:
        for j in range(100):
            pipe.set(f"p{j}", j).get(f"p{j}")
        results = pipe.execute()
    assert results == [x for j in range(100) for x in (True, str(j).encode())]
    return piped


@pytest.mark.skipif(framing.C is None, reason="the C scanners were not built (see pyproject.toml)")
def test_a_client_that_pipelines_shares_with_the_c_scanners(tmp_path: Path, start_redis: Callable[..., Node]) -> None:
    with serving_mux(tmp_path, start_redis(), "redis") as (node, port, serve):
        shared = redis.Redis(port=port)
        assert shared.ping()
        piped = pipeline_of_100(port)
        assert node_clients(node) == 1
        assert 'reason="pipelined"' not in serve.metrics()  # no client was ever pinned for it
        assert shared.get("p99") == b"99"
        assert "pure-Python scanners" not in serve.log()
        shared.close()
        piped.close()


def test_a_client_that_pipelines_gets_its_own_connection_with_the_python_scanners(
    tmp_path: Path, start_redis: Callable[..., Node]
) -> None:
    with serving_mux(tmp_path, start_redis(), "redis", wrapper=("env", "NATFWD_NO_EXTENSIONS=1")) as (
        node,
        port,
        serve,
    ):
        shared = redis.Redis(port=port)
        assert shared.ping()
        assert node_clients(node) == 1
        piped = pipeline_of_100(port)
        assert node_clients(node) == 2
        assert serve.metric("natfwd_multiplex_pinned_total", forward=str(port), reason="pipelined") == 1
        assert shared.get("p99") == b"99"
        shared.close()
        piped.close()
    assert "pure-Python scanners" not in serve.log()  # turned off on purpose: no advice to build them


def raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_requests_cut_anywhere_then_eof_get_every_reply(memcached_mux: tuple[Node, int, Serve]) -> None:
    _node, port, _serve = memcached_mux
    data = b"x" * 1000
    requests = b"set a 0 0 1000\r\n" + data + b"\r\nget a\r\nincr nothere 1\r\nversion\r\n"
    sock = raw(port)
    for cut in range(0, len(requests), 7):  # seven bytes per segment: every header and data block is cut
        sock.sendall(requests[cut : cut + 7])
    sock.shutdown(socket.SHUT_WR)
    reply = read_until_eof(sock)
    sock.close()
    assert reply.startswith(b"STORED\r\nVALUE a 0 1000\r\n" + data + b"\r\nEND\r\nNOT_FOUND\r\nVERSION ")


def test_unframed_bytes_reach_the_node_unchanged(memcached_mux: tuple[Node, int, Serve]) -> None:
    node, port, _serve = memcached_mux
    # `stats` and noreply are not multiplexed: the client is pinned, and memcached sees exactly what it sent.
    sock = raw(port)
    sock.sendall(b"get a\r\nset q 0 0 1 noreply\r\nz\r\nget q\r\nstats\r\nquit\r\n")
    reply = read_until_eof(sock)
    sock.close()
    assert reply.startswith(b"END\r\nVALUE q 0 1\r\nz\r\nEND\r\nSTAT pid ")
    assert reply.endswith(b"END\r\n")


def test_a_client_leaving_with_replies_owed_does_not_disturb_the_others(redis_mux: tuple[Node, int, Serve]) -> None:
    _node, port, serve = redis_mux
    keeper = redis.Redis(port=port)
    big = value("big", 500_000)
    assert keeper.set("big", big)
    for _ in range(20):
        sock = raw(port)
        sock.sendall(b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n" * 4)  # 2 MB of replies owed, then gone
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # a reset
        assert keeper.get("big") == big
    assert "shared node connection lost" not in serve.log()
    keeper.close()


def test_the_node_going_away_resets_its_clients_and_the_next_ones_reconnect(
    tmp_path: Path, start_redis: Callable[..., Node]
) -> None:
    node = start_redis()
    cfg, port, metrics_port = mux_config(tmp_path, node.address, "redis")
    with serving(cfg, [port], metrics_port) as serve:
        client = redis.Redis(port=port, socket_timeout=5)
        assert client.set("a", "1")
        node.kill()
        with pytest.raises(redis.ConnectionError):
            client.get("a")
        serve.wait_log("shared node connection lost")
        assert serve.metric("natfwd_multiplex_node_connections", forward=str(port)) == 0
        node = start_redis(node.port)
        fresh = redis.Redis(port=port, socket_timeout=5)
        assert fresh.get("a") is None  # a new node process: the shared connection was made again
        assert fresh.set("a", "2")
        client.close()
        fresh.close()


def test_sigterm_waits_for_a_multiplexed_client_then_exits_0(redis_mux: tuple[Node, int, Serve]) -> None:
    _node, port, serve = redis_mux
    client = redis.Redis(port=port)
    assert client.set("a", "1")
    serve.signal(signal.SIGTERM)
    serve.wait_log("draining")
    assert client.get("a") == b"1"  # still served while draining
    client.close()
    assert serve.proc.wait(10) == 0


def test_bytes_and_connections_are_counted(redis_mux: tuple[Node, int, Serve]) -> None:
    _node, port, serve = redis_mux
    client = redis.Redis(port=port)
    client.set("a", b"v" * 10_000)
    assert client.get("a") == b"v" * 10_000
    assert serve.metric("natfwd_connections_active", forward=str(port)) == 1
    client.close()
    deadline = time.monotonic() + 5  # byte counters are flushed once a second
    while serve.metric("natfwd_bytes_total", forward=str(port), direction="node_to_client") < 10_000:
        assert time.monotonic() < deadline, "bytes to the client were never counted"
        time.sleep(0.05)
    assert serve.metric("natfwd_bytes_total", forward=str(port), direction="client_to_node") > 10_000


def test_a_multiplexed_client_idle_for_idle_timeout_s_is_closed_and_counted(
    tmp_path: Path, start_redis: Callable[..., Node]
) -> None:
    cfg, port, metrics_port = mux_config(tmp_path, start_redis().address, "redis", "idle_timeout_s: 0.5\n")
    with serving(cfg, [port], metrics_port) as serve:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert sock.recv(100) == b"+PONG\r\n"
            assert sock.recv(100) == b""  # natfwd closed it, once idle
        assert serve.metric("natfwd_connections_rejected_total", forward=str(port), reason="idle_timeout") == 1
        assert serve.metric("natfwd_connections_active", forward=str(port)) == 0


@pytest.mark.parametrize(
    ("extra", "engine", "message"),
    [
        ("multiplex: yes-please\n", "redis", "multiplex: 'yes-please' is not valid; expected true or false"),
        ("multiplex: true\n", "redis-cluster", "multiplex: not available with engine redis-cluster"),
        ("multiplex: true\nupstream_tls: true\n", "redis", "multiplex: cannot be combined with upstream_tls yet"),
        ("multiplex: true\nmultiplex_connections: 0\n", "redis", "multiplex_connections: 0 is not valid"),
    ],
)
def test_bad_multiplex_settings_exit_2_naming_the_key(tmp_path: Path, extra: str, engine: str, message: str) -> None:
    cfg = write_config(tmp_path / "natfwd.yaml", [(free_port(), "127.0.0.1:6379")], engine=engine, extra=extra)
    done = subprocess.run(
        [sys.executable, "-m", "forwarder", "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def mc_connections(node: Node) -> int:
    """Established connections to the node. Counted by ss, not memcached's curr_connections: that one also counts
    a connection memcached has not yet seen close, such as a readiness probe's, and made a baseline one too high."""
    listing = subprocess.run(
        ["ss", "-Htn", "state", "established", "dst", f"127.0.0.1:{node.port}"], capture_output=True, text=True
    )
    return len(listing.stdout.splitlines())


def test_reload_retargets_new_clients_and_the_old_shared_connection_closes_with_its_last_client(
    tmp_path: Path, memcached_nodes: list[Node]
) -> None:
    a, b, _c = memcached_nodes
    for name, node in (("a", a), ("b", b)):
        with contextlib.closing(Client(("127.0.0.1", node.port))) as direct:
            direct.set("whoami", name)
    cfg, port, metrics_port = mux_config(tmp_path, a.address, "memcached")
    with serving(cfg, [port], metrics_port) as serve:
        baseline = mc_connections(a)
        old = [Client(("127.0.0.1", port)) for _ in range(3)]
        assert all(client.get("whoami") == b"a" for client in old)
        assert mc_connections(a) == baseline + 1  # three clients, one shared connection
        cfg.write_text(cfg.read_text().replace(a.address, b.address))
        serve.signal(signal.SIGHUP)
        serve.wait_log("config reloaded")
        new = Client(("127.0.0.1", port))
        assert new.get("whoami") == b"b"
        assert all(client.get("whoami") == b"a" for client in old)  # live clients keep their node
        for client in old:
            client.close()
        wait_for(lambda: mc_connections(a) == baseline, "the retired shared connection to a did not close")
        assert new.get("whoami") == b"b"

        # Multiplexing turned off by reload: new clients get a connection each again.
        cfg.write_text(cfg.read_text().replace("multiplex: true", "multiplex: false"))
        serve.signal(signal.SIGHUP)
        serve.wait_log("config reloaded", count=2)
        before = mc_connections(b)
        plain = [Client(("127.0.0.1", port)) for _ in range(2)]
        assert all(client.get("whoami") == b"b" for client in plain)
        assert mc_connections(b) == before + 2
        for client in [*plain, new]:
            client.close()


def test_a_node_that_refuses_is_counted_and_its_clients_are_closed(tmp_path: Path) -> None:
    cfg, port, metrics_port = mux_config(tmp_path, f"127.0.0.1:{free_port()}", "memcached")  # nothing listens there
    with serving(cfg, [port], metrics_port) as serve:
        client = Client(("127.0.0.1", port), connect_timeout=5, timeout=5)
        with pytest.raises(MemcacheUnexpectedCloseError):
            client.get("a")
        client.close()
        serve.wait_log("shared node connection failed")
        assert serve.metric("natfwd_upstream_errors_total", forward=str(port), reason="refused") == 1
        assert "Traceback" not in serve.log()


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def test_a_big_value_passes_through_without_being_held_whole(redis_mux: tuple[Node, int, Serve]) -> None:
    node, port, serve = redis_mux
    big = value("big", 48 * 1024 * 1024)
    with redis.Redis(port=node.port) as direct:
        assert direct.set("big", big)
    client = redis.Redis(port=port, socket_timeout=30)
    assert client.get("small") is None  # the shared connection is up before the baseline
    before = peak_rss_kib(serve.proc.pid)
    assert hashlib.sha256(client.get("big")).digest() == hashlib.sha256(big).digest()
    # Held whole, the value (and the copy sliced from it) would cost natfwd 96 MiB; passed on as it arrives, at most
    # what a client may have queued (8 MiB) and a read.
    assert peak_rss_kib(serve.proc.pid) - before < 32 * 1024
    client.close()


def test_a_slow_reader_gets_every_byte_and_the_others_are_served_after(redis_mux: tuple[Node, int, Serve]) -> None:
    node, port, serve = redis_mux
    big = value("slow", 20 * 1024 * 1024)
    with redis.Redis(port=node.port) as direct:
        assert direct.set("big", big)
    slow = raw(port)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    slow.sendall(b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n")
    others = redis.Redis(port=port, socket_timeout=30)
    results: list[bytes | None] = []
    worker = threading.Thread(target=lambda: results.extend(others.get(f"k{j}") for j in range(20)))
    worker.start()  # their replies queue behind the big one on the shared connection
    header = b"$%d\r\n" % len(big)
    received = bytearray()
    while len(received) < len(header) + len(big) + 2:
        chunk = slow.recv(64 * 1024)
        assert chunk, "natfwd closed the slow reader"
        received += chunk
        if len(received) < 4 * 1024 * 1024:
            time.sleep(0.002)  # slow for the first MiBs: the pipe stops reading the node meanwhile
    worker.join(30)
    assert bytes(received) == header + big + b"\r\n"
    assert results == [None] * 20
    assert "shared node connection lost" not in serve.log()
    slow.close()
    others.close()


def test_a_random_mix_of_clients_under_load_each_gets_exactly_its_own_replies(
    redis_mux: tuple[Node, int, Serve],
) -> None:
    """RESP2 and RESP3 clients, small and streamed values, pinning commands, pipelines and abrupt exits, all at once."""
    node, port, serve = redis_mux

    def client_life(seed: int) -> int:
        rng = random.Random(seed)
        checked = 0
        for _life in range(4):
            client = redis.Redis(port=port, protocol=rng.choice((2, 3)), socket_timeout=30)
            for j in range(rng.randrange(20, 60)):
                key = f"{seed}:{j}"
                action = rng.random()
                if action < 0.6:
                    data = value(key, rng.choice((0, 5, 500, 20_000, 100_000, 300_000)))
                    assert client.set(key, data) and client.get(key) == data
                elif action < 0.75:
                    assert client.incrby(f"n{seed}", 3) % 3 == 0
                elif action < 0.85:
                    with client.pipeline(transaction=False) as pipe:
                        for k in range(rng.randrange(1, 12)):
                            pipe.set(f"{key}:{k}", k).get(f"{key}:{k}")
                        results = pipe.execute()
                    assert results[1::2] == [str(k).encode() for k in range(len(results) // 2)]
                elif action < 0.9:
                    assert client.execute_command("SELECT", 0) in (True, b"OK")  # pins this client
                    assert client.set(key, "pinned") and client.get(key) == b"pinned"
                else:
                    sock = raw(port)  # a client that asks and leaves without reading
                    sock.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key.encode()))
                    sock.close()
                checked += 1
            client.close()
        return checked

    with ThreadPoolExecutor(12) as pool:
        assert sum(pool.map(client_life, range(12))) > 12 * 4 * 20
    log = serve.log()
    assert "shared node connection lost" not in log and "Traceback" not in log
    assert node_clients(node) <= 2  # every client gone: only the shared connections (RESP2 and RESP3) remain


def test_idle_clients_carry_on_when_the_node_closes_the_shared_connection(
    tmp_path: Path, start_redis: Callable[..., Node]
) -> None:
    node = start_redis()
    cfg, port, metrics_port = mux_config(tmp_path, node.address, "redis")
    with serving(cfg, [port], metrics_port) as serve:
        clients = [redis.Redis(port=port, socket_timeout=5) for _ in range(3)]
        assert all(client.set(f"k{i}", i) for i, client in enumerate(clients))
        with redis.Redis(port=node.port) as direct:  # what a node's idle `timeout` does: close the connection
            shared = [c for c in direct.client_list() if c["id"] != str(direct.client_id())]
            assert len(shared) == 1
            direct.client_kill_filter(_id=shared[0]["id"])
        serve.wait_log("shared node connection lost")
        # Nothing was in flight: the clients never notice, and their next requests go over a new shared connection.
        assert [client.get(f"k{i}") for i, client in enumerate(clients)] == [b"0", b"1", b"2"]
        assert node_clients(node) == 1
        for client in clients:
            client.close()


def test_the_shared_connection_is_kept_alive_with_probes(redis_mux: tuple[Node, int, Serve]) -> None:
    node, port, _serve = redis_mux
    client = redis.Redis(port=port)
    assert client.ping()
    sockets = subprocess.run(
        ["ss", "-tnoH", "state", "established", "dst", f"127.0.0.1:{node.port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "timer:(keepalive," in sockets, sockets  # found dead while idle, not by the next requests
    client.close()


def test_with_two_workers_each_shares_its_own_node_connection(
    tmp_path: Path, start_memcached: Callable[..., Node]
) -> None:
    node = start_memcached()
    cfg, port, metrics_port = mux_config(tmp_path, node.address, "memcached", extra="workers: 2\n")
    baseline = mc_connections(node)
    with serving(cfg, [port], metrics_port) as serve, contextlib.ExitStack() as closing:
        # The port listens once one worker has bound it; until the other has, every client would go to the first.
        serve.wait_log("forwarding listen=", count=2)
        clients = [Client(("127.0.0.1", port), connect_timeout=5, timeout=10) for _ in range(16)]
        for client in clients:
            closing.callback(client.close)  # also when an assertion fails: a socket left to the GC fails a later test
        for index, client in enumerate(clients):
            assert client.set(f"k{index}", f"v{index}", noreply=False)
        assert [client.get(f"k{index}") for index, client in enumerate(clients)] == [
            f"v{index}".encode() for index in range(16)
        ]
        # SO_REUSEPORT spreads 16 clients over both workers (all on one is 2 in 65536), one shared connection each.
        assert mc_connections(node) == baseline + 2
        assert serve.metric("natfwd_multiplex_node_connections", forward=str(port)) == 2


def test_a_big_request_gets_a_connection_of_its_own(redis_mux: tuple[Node, int, Serve]) -> None:
    node, port, serve = redis_mux
    shared = redis.Redis(port=port)
    assert shared.ping()
    bulk = redis.Redis(port=port)
    data = value("bulk", 300_000)
    assert bulk.set("bulk", data)  # 300 KB in one request: pinned, the value goes over raw mode's splice
    assert bulk.get("bulk") == data and shared.get("bulk") == data
    assert node_clients(node) == 2
    assert serve.metric("natfwd_multiplex_pinned_total", forward=str(port), reason="large_request") == 1
    shared.close()
    bulk.close()


def test_a_client_alone_for_long_gets_a_connection_of_its_own_and_company_keeps_sharing(
    redis_mux: tuple[Node, int, Serve],
) -> None:
    """Nobody to share with for ALONE_PIN reads in a row: the client is pinned (reason `alone`) and carries on over a
    connection of its own; two clients taking turns never are."""
    node, port, serve = redis_mux
    first, second = redis.Redis(port=port, socket_timeout=10), redis.Redis(port=port, socket_timeout=10)
    for j in range(600):  # 1200 reads, each with another client on the shared connection
        for client in (first, second):
            assert client.set(f"t{j}", j) and client.get(f"t{j}") == str(j).encode()
    assert 'reason="alone"' not in serve.metrics()
    assert node_clients(node) == 1
    second.close()
    for j in range(1200):
        assert first.get(f"t{j % 600}") == str(j % 600).encode()
    assert serve.metric("natfwd_multiplex_pinned_total", forward=str(port), reason="alone") == 1
    assert node_clients(node) == 2, "its own connection, and the shared one kept for the next clients"
    for j in range(100):  # still its own replies, now relayed
        assert first.set(f"a{j}", j) and first.get(f"a{j}") == str(j).encode()
    first.close()


class HeldNode:
    """A redis node that answers only when told to: it counts the GETs it has read and owes a nil for each."""

    GET = b"*2\r\n$3\r\nGET\r\n"

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self.received = bytearray()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:  # closed before natfwd connected
            return
        self.conn = conn
        try:
            while chunk := conn.recv(65536):
                with self.lock:
                    self.received += chunk
        except OSError:  # closed under us by close()
            return

    def requests(self) -> int:
        with self.lock:
            return self.received.count(self.GET)

    def wait_requests(self, count: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.requests() < count:
            assert time.monotonic() < deadline, f"the node read {self.requests()} requests, expected {count}"
            time.sleep(0.01)

    def answer(self, count: int) -> None:
        assert self.conn is not None
        self.conn.sendall(b"$-1\r\n" * count)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a thread still in accept()
        self.listener.close()
        self.thread.join(5)


def test_requests_that_arrive_while_the_node_is_busy_wait_for_its_reply_then_go_together(tmp_path: Path) -> None:
    """The node is busy with one client's GET: the next clients' GETs are held until it answers, then sent
    together; each client still gets its own reply."""
    node = HeldNode()
    cfg, port, metrics_port = mux_config(tmp_path, f"127.0.0.1:{node.port}", "redis")
    clients: list[socket.socket] = []
    try:
        with serving(cfg, [port], metrics_port):
            clients = [raw(port) for _ in range(3)]
            clients[0].sendall(HeldNode.GET + b"$1\r\na\r\n")
            node.wait_requests(1)  # an idle node gets a request at once
            for name, client in zip((b"b", b"c"), clients[1:], strict=True):
                client.sendall(HeldNode.GET + b"$1\r\n" + name + b"\r\n")
            time.sleep(0.5)
            assert node.requests() == 1, "requests reached a node that had not answered the one before"
            node.answer(1)
            assert clients[0].recv(64) == b"$-1\r\n"
            node.wait_requests(3)
            node.answer(2)
            for client in clients[1:]:
                assert client.recv(64) == b"$-1\r\n"
    finally:
        for client in clients:
            client.close()
        node.close()
