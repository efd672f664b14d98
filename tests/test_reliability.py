"""Reliability of a real `natfwd serve` on loopback: load, a node killed, backpressure, garbage, timeouts, limits."""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import free_ports, wait_for
from labkit import root, unique_name
from reliakit import (
    Serve,
    closed_by_peer,
    config_text,
    memcached_nodes,
    natfwd_serve,
    raised_fd_limit,
    read_exactly,
    read_line,
    round_trip,
)

from forwarder import netns

ACTIVE = "natfwd_connections_active"
REJECTED = "natfwd_connections_rejected_total"
HANG_S = 30  # far above any wait these tests expect: it only stops a hang
BYTES = "natfwd_bytes_total"


@contextmanager
def one_forward(
    tmp_path: Path, *, nofile: tuple[int, int] | None = None, **options: object
) -> Iterator[tuple[Serve, int]]:
    """natfwd forwarding one free port to a fresh memcached (-m 16), `options` added to its config; yields it and
    the port. `nofile` is natfwd's (soft, hard) open-file limit at start."""
    port, metrics_port = free_ports(2)
    with memcached_nodes(1, "-m", "16") as (node,):
        text = config_text([(port, node.address)], metrics_port, **options)
        with natfwd_serve(tmp_path, text, metrics_port, nofile=nofile) as serve:
            yield serve, port


# --- 8000 concurrent connections -------------------------------------------------------------------------------

CONNECTIONS = 8000
MAX_KIB_PER_CONNECTION = 6.0


async def _open_all(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Open `count` connections, each doing one memcached round trip, and return them all still open."""
    gate = asyncio.Semaphore(512)  # keep the SYN queue of one listener comfortably below its backlog

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"version\r\n")
            line = await asyncio.wait_for(reader.readline(), 30)
            assert line.startswith(b"VERSION "), line
            return reader, writer

    return await asyncio.gather(*(one() for _ in range(count)))


async def _close_all(connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in connections:
        writer.close()
    await asyncio.gather(*(writer.wait_closed() for _, writer in connections), return_exceptions=True)


# It loads the whole machine on purpose: CPU, and some 32000 loopback sockets at once.
@pytest.mark.exclusive
def test_8000_concurrent_connections_are_served_with_bounded_memory(tmp_path: Path) -> None:
    port, metrics_port = free_ports(2)
    with (
        raised_fd_limit(CONNECTIONS + 2048) as limit,
        memcached_nodes(1, "-c", "10000", "-b", "8192", "-t", "2", "-m", "16") as (node,),
    ):
        if limit < CONNECTIONS + 1024:
            pytest.fail(f"RLIMIT_NOFILE hard limit {limit} is too low for {CONNECTIONS} client sockets")
        text = config_text([(port, node.address)], metrics_port, max_connections=CONNECTIONS + 1000)
        with natfwd_serve(tmp_path, text, metrics_port) as serve:
            assert round_trip(port).startswith(b"VERSION ")  # warm the code paths before the baseline
            wait_for(lambda: serve.value(ACTIVE, forward=str(port)) == 0, "the warm-up connection to close")
            fds_before, rss_before = serve.settled_fds(), serve.rss_kib()

            async def scenario() -> tuple[int, int, float, float]:
                started = time.monotonic()
                connections = await _open_all(port, CONNECTIONS)
                opened_s = time.monotonic() - started
                rss_open, fds_open = serve.rss_kib(), serve.fds()
                active_open = serve.value(ACTIVE, forward=str(port))
                await _close_all(connections)
                return rss_open, fds_open, active_open, opened_s

            rss_open, fds_open, active_open, opened_s = asyncio.run(scenario())
            assert active_open == CONNECTIONS
            assert fds_open >= fds_before + 2 * CONNECTIONS  # a client and a node socket each: all really open
            wait_for(lambda: serve.value(ACTIVE, forward=str(port)) == 0, "natfwd_connections_active to be 0", 15)
            wait_for(lambda: serve.fds() == fds_before, f"natfwd's open fds to return to {fds_before}", 15)
            per_connection = (rss_open - rss_before) / CONNECTIONS
            print(
                f"\n{CONNECTIONS} connections opened in {opened_s:.2f} s; natfwd RSS {rss_before} KiB -> {rss_open} KiB "
                f"= {per_connection:.2f} KiB per connection; fds {fds_before} -> {fds_open} -> {serve.fds()}"
            )
            assert per_connection <= MAX_KIB_PER_CONNECTION
            assert serve.value("natfwd_connections_accepted_total", forward=str(port)) == CONNECTIONS + 1
            assert round_trip(port).startswith(b"VERSION ")
            assert serve.alive()
        assert serve.stop() == 0


@pytest.mark.parametrize(("hard", "warned"), [(1024, True), (8192, False)])
def test_natfwd_raises_its_fd_limit_to_the_hard_limit_and_says_when_that_is_too_low(
    tmp_path: Path, hard: int, warned: bool
) -> None:
    # 1000 connections need 2 * 1000 sockets plus a few: more than 1024, less than 8192.
    with one_forward(tmp_path, nofile=(256, hard), max_connections=1000) as (serve, port):
        assert serve.fd_limits() == (hard, hard)
        warning = "open-file limit is below what max_connections needs"
        assert (warning in serve.log()) is warned, serve.log()
        if warned:
            assert "limit=1024 needed=2064" in serve.log()
        assert round_trip(port).startswith(b"VERSION ")
    assert serve.stop() == 0


# --- a node killed ---------------------------------------------------------------------------------------------


def _reply_or_nothing(port: int, request: bytes = b"version\r\n") -> bytes:
    """One round trip; b"" when natfwd closes or resets the connection instead of relaying a reply."""
    try:
        return round_trip(port, request, timeout_s=HANG_S)
    except (ConnectionResetError, BrokenPipeError):
        return b""


def _version(sock: socket.socket) -> bytes:
    sock.sendall(b"version\r\n")
    return read_line(sock)


def test_a_killed_node_fails_only_its_forward_and_comes_back_without_a_restart(tmp_path: Path) -> None:
    *ports, metrics_port = free_ports(4)
    with memcached_nodes(3, "-m", "16") as nodes:
        forwards = list(zip(ports, (node.address for node in nodes), strict=True))
        with natfwd_serve(tmp_path, config_text(forwards, metrics_port), metrics_port) as serve:
            open_before = [socket.create_connection(("127.0.0.1", port), timeout=3) for port in ports]
            try:
                assert all(_version(sock).startswith(b"VERSION ") for sock in open_before)
                nodes[1].kill()
                # Its live connection ends with the node; new ones are refused by the node and closed by natfwd.
                assert closed_by_peer(open_before[1], 3)
                for _ in range(3):
                    assert _reply_or_nothing(ports[1]) == b""
                assert serve.value("natfwd_upstream_errors_total", forward=str(ports[1]), reason="refused") == 3
                # The other forwards keep serving, both their live connections and new ones.
                for index in (0, 2):
                    assert _version(open_before[index]).startswith(b"VERSION ")
                    assert round_trip(ports[index]).startswith(b"VERSION ")
                    assert serve.value("natfwd_upstream_errors_total", forward=str(ports[index]), reason="refused") == 0

                nodes[1].start()  # the same port, as when ElastiCache replaces a node behind the same address
                assert round_trip(ports[1], b"set back 0 0 3\r\nyes\r\n") == b"STORED\r\n"
                assert round_trip(ports[1], b"get back\r\n", until=b"END\r\n") == b"VALUE back 0 3\r\nyes\r\nEND\r\n"
                assert all(_version(open_before[index]).startswith(b"VERSION ") for index in (0, 2))
                assert serve.alive()
            finally:
                for sock in open_before:
                    sock.close()
        assert serve.stop() == 0


# --- a client that asks for large values and never reads --------------------------------------------------------

VALUE_SIZE = 1 << 20
STALLED_GETS = 96  # 96 MiB of replies: far more than every kernel socket buffer on the path can hold
MAX_RSS_GROWTH_KIB = 16 * 1024


def test_a_client_that_never_reads_is_held_back_and_others_are_unaffected(tmp_path: Path) -> None:
    port, other_port, metrics_port = free_ports(3)
    value = random.Random(3).randbytes(VALUE_SIZE)
    with memcached_nodes(1, "-m", "64", "-I", "2m") as (node,):
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as direct:
            direct.sendall(b"set big 0 0 %d\r\n%s\r\nset small 0 0 2\r\nok\r\n" % (VALUE_SIZE, value))
            assert read_exactly(direct, 16) == b"STORED\r\nSTORED\r\n"
        forwards = [(port, node.address), (other_port, node.address)]
        with natfwd_serve(tmp_path, config_text(forwards, metrics_port), metrics_port) as serve:
            assert round_trip(port).startswith(b"VERSION ")
            rss_before = serve.rss_kib()
            with socket.socket() as stalled:
                stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                stalled.settimeout(10)
                stalled.connect(("127.0.0.1", port))
                stalled.sendall(b"get big\r\n" * STALLED_GETS)
                rss_peak, slowest_s = rss_before, 0.0
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    for target in (port, other_port):
                        started = time.monotonic()
                        reply = round_trip(target, b"get small\r\n", until=b"END\r\n", timeout_s=HANG_S)
                        assert reply == b"VALUE small 0 2\r\nok\r\nEND\r\n"
                        slowest_s = max(slowest_s, time.monotonic() - started)
                    rss_peak = max(rss_peak, serve.rss_kib())
                    time.sleep(0.05)
                growth = rss_peak - rss_before
                print(
                    f"\nstalled client: natfwd RSS {rss_before} KiB -> peak {rss_peak} KiB (+{growth} KiB) with "
                    f"{STALLED_GETS} MiB requested; slowest other round trip {slowest_s * 1000:.1f} ms"
                )
                assert growth <= MAX_RSS_GROWTH_KIB
                # Reading at last gets every byte, in order, after all the pausing and resuming.
                reply = b"VALUE big 0 %d\r\n%s\r\nEND\r\n" % (VALUE_SIZE, value)
                for index in range(STALLED_GETS):
                    assert read_exactly(stalled, len(reply)) == reply, f"reply {index} differs"
            assert serve.alive()
        assert serve.stop() == 0


# --- random bytes from a client ---------------------------------------------------------------------------------


def test_random_bytes_are_relayed_and_natfwd_stays_healthy(tmp_path: Path) -> None:
    rng = random.Random(7)
    # Lines of random bytes without CR/LF, so memcached answers each one with exactly one ERROR.
    lines = [bytes(b for b in rng.randbytes(rng.randint(1, 200)) if b not in b"\r\n") or b"x" for _ in range(300)]
    assert lines[0][0] != 0x80  # that first byte would switch memcached to its binary protocol
    payload = b"".join(line + b"\r\n" for line in lines)
    with one_forward(tmp_path) as (serve, port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(payload)
            assert read_exactly(sock, 7 * len(lines)) == b"ERROR\r\n" * len(lines)
        wait_for(lambda: serve.value(ACTIVE, forward=str(port)) == 0, "the connection to be closed")
        assert serve.value(BYTES, forward=str(port), direction="client_to_node") == len(payload)
        assert serve.value(BYTES, forward=str(port), direction="node_to_client") == 7 * len(lines)
        # Unframed garbage too (binary-protocol magic, NULs, lone LFs), then half-close: whatever memcached
        # makes of it, natfwd relays and survives.
        blob = b"\x80" + rng.randbytes(1 << 20)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                try:
                    sock.sendall(blob)
                    sock.shutdown(socket.SHUT_WR)
                    closed_by_peer(sock, 5)
                except (ConnectionResetError, BrokenPipeError):
                    pass  # memcached may give up on the garbage before reading it all
                except OSError as exc:  # ... and natfwd pass that on before our shutdown(): "not connected"
                    if exc.errno != errno.ENOTCONN:
                        raise
        assert round_trip(port, b"set k 0 0 2\r\nok\r\n") == b"STORED\r\n"
        assert round_trip(port, b"get k\r\n", until=b"END\r\n") == b"VALUE k 0 2\r\nok\r\nEND\r\n"
        wait_for(lambda: serve.value(ACTIVE, forward=str(port)) == 0, "every connection to be closed")
        assert serve.alive()
        assert "Traceback" not in serve.log()
    assert serve.stop() == 0


# --- timeouts ---------------------------------------------------------------------------------------------------

IDLE_TIMEOUT_S = 0.5


# Its busy client must send more often than every IDLE_TIMEOUT_S: a stall of this process on a loaded machine would
# make it idle. Alone, it is not stalled by the other workers.
@pytest.mark.exclusive
def test_idle_and_stalled_connections_are_closed_and_busy_ones_are_not(tmp_path: Path) -> None:
    with one_forward(tmp_path, idle_timeout_s=IDLE_TIMEOUT_S) as (serve, port):
        idle = socket.create_connection(("127.0.0.1", port), timeout=3)
        stalled = socket.create_connection(("127.0.0.1", port), timeout=3)
        busy = socket.create_connection(("127.0.0.1", port), timeout=3)
        try:
            assert _version(idle).startswith(b"VERSION ")
            stalled.sendall(b"get half-a-comm")  # a request that never completes: nothing more ever flows
            started = time.monotonic()
            # A busy client with gaps shorter than the timeout is never cut off.
            while time.monotonic() - started < 3 * IDLE_TIMEOUT_S:
                assert _version(busy).startswith(b"VERSION ")
                time.sleep(IDLE_TIMEOUT_S / 3)
            assert not closed_by_peer(busy, 0.01)
            busy.settimeout(3)
            assert _version(busy).startswith(b"VERSION ")
            assert closed_by_peer(idle, HANG_S)
            assert closed_by_peer(stalled, HANG_S)
        finally:
            for sock in (idle, stalled, busy):
                sock.close()
        # How fast: a fresh idle connection goes between the timeout and a couple of sweeper ticks later.
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            assert _version(sock).startswith(b"VERSION ")
            started = time.monotonic()
            assert closed_by_peer(sock, HANG_S)
            closed_after_s = time.monotonic() - started
        print(f"\nidle connection closed {closed_after_s:.2f} s after its last byte (idle_timeout_s {IDLE_TIMEOUT_S})")
        assert closed_after_s >= IDLE_TIMEOUT_S * 0.9  # not before the timeout; how long after depends on the machine
        assert serve.value(REJECTED, forward=str(port), reason="idle_timeout") == 3
    assert serve.stop() == 0


CONNECT_TIMEOUT_S = 0.5


@root
def test_connect_timeout_is_honoured_for_a_node_that_never_answers(tmp_path: Path) -> None:
    namespace = unique_name("rel")
    public_port, black_hole_port, metrics_port = 11211, 11299, 9108  # a fresh namespace: every port is free
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        # SYNs to the node port vanish: the connect neither succeeds nor is refused, like a dead host.
        subprocess.run(["ip", "netns", "exec", namespace, "iptables", "-A", "INPUT", "-p", "tcp", "--syn",
                        "--dport", str(black_hole_port), "-j", "DROP"], check=True)  # fmt: skip
        text = config_text([(public_port, f"127.0.0.1:{black_hole_port}")], metrics_port,
                           connect_timeout_s=CONNECT_TIMEOUT_S)  # fmt: skip
        with natfwd_serve(tmp_path, text, metrics_port, namespace=namespace) as serve:
            with netns.entered(namespace):
                sock = socket.socket()
            with sock:
                sock.settimeout(3)
                sock.connect(("127.0.0.1", public_port))
                sock.sendall(b"version\r\n")
                started = time.monotonic()
                assert closed_by_peer(sock, HANG_S)
                closed_after_s = time.monotonic() - started
            print(
                f"\nnode that never answers: client closed {closed_after_s:.2f} s after connecting "
                f"(connect_timeout_s {CONNECT_TIMEOUT_S})"
            )
            assert closed_after_s >= CONNECT_TIMEOUT_S * 0.9  # not before the timeout
            errors = serve.value("natfwd_upstream_errors_total", forward=str(public_port), reason="timeout")
            assert errors == 1
            assert serve.value("natfwd_upstream_connect_seconds_count") == 0
            wait_for(lambda: serve.value(ACTIVE, forward=str(public_port)) == 0, "the connection to be gone")
            assert serve.alive()
        assert serve.stop() == 0
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)


# --- the connection limit ---------------------------------------------------------------------------------------

LIMIT = 50
OVER_LIMIT = 20


def test_connections_over_max_connections_are_refused_at_accept_and_counted(tmp_path: Path) -> None:
    with one_forward(tmp_path, max_connections=LIMIT) as (serve, port):
        fds_before = serve.settled_fds()
        served = [socket.create_connection(("127.0.0.1", port), timeout=3) for _ in range(LIMIT)]
        try:
            assert all(_version(sock).startswith(b"VERSION ") for sock in served)
            refuse_s: list[float] = []
            for _ in range(OVER_LIMIT):  # refused, not queued: a queued client would get neither a reply nor a close
                started = time.monotonic()
                assert _reply_or_nothing(port) == b""
                refuse_s.append(time.monotonic() - started)
            # A refused client can see its close before natfwd has counted it: on a loaded machine, wait for the count.
            wait_for(
                lambda: serve.value(REJECTED, forward=str(port), reason="limit") == OVER_LIMIT, "every refusal counted"
            )
            assert serve.value(ACTIVE, forward=str(port)) == LIMIT
            assert serve.value("natfwd_connections_accepted_total", forward=str(port)) == LIMIT
            assert serve.settled_fds() <= fds_before + 2 * LIMIT  # refused sockets are not kept
            print(
                f"\nover the limit: refused in {max(refuse_s) * 1000:.2f} ms at most "
                f"(median {sorted(refuse_s)[len(refuse_s) // 2] * 1000:.2f} ms)"
            )
            # The limit holds a place, not a grudge: one leaves, the next one is served.
            served.pop().close()
            wait_for(lambda: serve.value(ACTIVE, forward=str(port)) == LIMIT - 1, "one connection to close")
            assert round_trip(port).startswith(b"VERSION ")
            assert all(_version(sock).startswith(b"VERSION ") for sock in served)
        finally:
            for sock in served:
                sock.close()
        wait_for(lambda: serve.settled_fds() == fds_before, f"natfwd's open fds to return to {fds_before}", 10)
    assert serve.stop() == 0
