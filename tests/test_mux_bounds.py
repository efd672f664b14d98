"""What one client can cost the others on a shared node connection (`multiplex: true`): replies pass on as they
arrive, walked once (never re-scanned from their start), a client that takes none of its replies is reset after
`mux_stall_timeout_s`, natfwd's memory stays bounded under a client that never reads, and a node that answers more
than it was asked is caught before another client gets a byte of it. Real redis-server and memcached, and a real
`natfwd serve` (or an in-process worker where the scanners' work is counted)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import IN_CI, SCANNERS, Node, wait_for_async
from pymemcache.client.base import Client
from relaykit import run, worker_for
from servekit import serving_mux

from forwarder import config, mux
from forwarder.protocols import framing
from forwarder.protocols.framing import REPLY_LINE_MAX, Framer, FramingError

RSS_BOUND_KIB = 64 * 1024  # natfwd's RSS over its baseline under each attack (README: Multiplexing)
STALL_S = 5.0  # mux_stall_timeout_s's default: these tests run with it


def scanners(name: str) -> Any:
    """framing.py's scanners ("python") or _cframing.c's ("c"): skipped when it was not built, but not in CI."""
    if name == "python":
        return framing
    if framing.C is None:
        if IN_CI:
            pytest.fail("forwarder.protocols._cframing is not built: CI must test the C scanners")
        pytest.skip("forwarder.protocols._cframing is not built")
    return framing.C


@pytest.fixture(params=["python", "c"])
def impl(request: pytest.FixtureRequest) -> Any:
    return scanners(request.param)


# --- the scanners: a reply fed in pieces is walked once -------------------------------------------------------------
def lrange_reply(items: int) -> bytes:
    elements = (b"item-%d" % i for i in range(items))
    return b"*%d\r\n" % items + b"".join(b"$%d\r\n%s\r\n" % (len(e), e) for e in elements)


class Feed:
    """What a pipe does with a reply that arrives in pieces: scan from where it stopped, pass on what the scan
    consumed, keep only the rest. Counts the bytes handed to the scanner, the measure of its work."""

    def __init__(self, scan: Callable[..., tuple[int, int]]) -> None:
        self.scan = scan
        self.state = framing.scan_state()
        self.held = b""
        self.passed = bytearray()
        self.got = 0
        self.visited = 0
        self.most_held = 0

    def __call__(self, piece: bytes, want: int = 1) -> None:
        buf = self.held + piece
        self.visited += len(buf)
        end, got = self.scan(buf, 0, want - self.got, self.state)
        self.passed += buf[:end]
        self.got += got
        self.held = buf[end:]
        self.most_held = max(self.most_held, len(self.held))


@pytest.mark.parametrize("piece", [1, 7, 4096, 65536])
def test_a_huge_reply_in_pieces_is_walked_once_and_only_a_line_is_held(impl: Any, piece: int) -> None:
    reply = lrange_reply(20_000 if piece > 1 else 2_000)
    feed = Feed(impl.redis_scan)
    for at in range(0, len(reply), piece):
        feed(reply[at : at + piece])
    assert (bytes(feed.passed), feed.got, feed.held, feed.state) == (reply, 1, b"", [0, 0, 0])
    # Each piece is scanned with at most a line held from the one before: linear in the reply, whatever the pieces.
    assert feed.visited <= len(reply) + (len(reply) // piece + 1) * 32
    assert feed.most_held < 32


@pytest.mark.parametrize("piece", [1, 5, 4096, 65536])
def test_a_huge_memcached_multi_get_in_pieces_is_walked_once(impl: Any, piece: int) -> None:
    block = b"x" * 3000
    reply = b"".join(b"VALUE k%d 0 %d\r\n%s\r\n" % (i, len(block), block) for i in range(200 if piece > 1 else 20))
    reply += b"END\r\n"
    feed = Feed(impl.memcached_scan)
    for at in range(0, len(reply), piece):
        feed(reply[at : at + piece])
    assert (bytes(feed.passed), feed.got, feed.held, feed.state) == (reply, 1, b"", [0, 0, 0])
    assert feed.visited <= len(reply) + (len(reply) // piece + 1) * 32


def test_resumed_scans_find_the_same_replies_as_whole_ones(impl: Any) -> None:
    rng = random.Random(19)
    parts = [b"+OK\r\n", b"$5\r\nhe\r\nl\r\n", b"*2\r\n$1\r\na\r\n*-1\r\n", b"%1\r\n+k\r\n:7\r\n", b"_\r\n"]
    parts += [b"|1\r\n+a\r\n:1\r\n$0\r\n\r\n", b">2\r\n+x\r\n+y\r\n"]  # a push among them is skipped, not counted
    for _ in range(300):
        chosen = [rng.choice(parts) for _ in range(rng.randrange(1, 8))]
        data = b"".join(chosen)
        replies = [p for p in chosen if not p.startswith(b">")]
        feed = Feed(impl.redis_scan)
        pos, dropped = 0, b""
        cuts = sorted(rng.sample(range(len(data) + 1), min(4, len(data) + 1)))
        for start, stop in zip([0, *cuts], [*cuts, len(data)], strict=True):
            buf = feed.held + data[start:stop]
            pos = 0
            while pos < len(buf):
                if not feed.state[2]:  # as a pipe does: a push begun in an earlier piece goes on first
                    end, got = impl.redis_scan(buf, pos, 100, feed.state)
                    feed.passed += buf[pos:end]
                    feed.got += got
                    pos = end
                skipped = impl.redis_skip_push(buf, pos, feed.state)
                if skipped < 0:
                    break
                dropped += buf[pos:skipped]
                pos = skipped
                if feed.state[2]:
                    break
            feed.held = buf[pos:]
        assert (bytes(feed.passed), feed.got, feed.held) == (b"".join(replies), len(replies), b"")
        assert dropped == b"".join(p for p in chosen if p.startswith(b">"))


@pytest.mark.parametrize(
    ("scan", "pieces"),
    [
        ("redis_scan", [b"$3\r\nabcX\n"]),  # a bulk string not followed by CRLF: out of step
        ("redis_scan", [b"$3\r\nab", b"cX"]),  # ... found as the bytes arrive
        ("redis_scan", [b"$3\r\nabc\r", b"X"]),
        ("redis_scan", [b"+" + b"x" * (REPLY_LINE_MAX + 1)]),  # no line that long ends: out of step, never held whole
        ("memcached_scan", [b"VALUE k 0 2\r\nab", b"\n\n"]),
        ("memcached_scan", [b"VALUE k 0 1\r\nxEND\r\n"]),
        ("memcached_scan", [b"x" * (REPLY_LINE_MAX + 1)]),
        ("memcached_scan", [b"MN\r\n"]),  # the sentinel's reply where a client's is due: a request unanswered
        ("memcached_scan", [b"VALUE k 0 1\r\nx\r\nM", b"N\r\n"]),
    ],
)
def test_a_reply_out_of_step_raises_as_soon_as_it_shows(impl: Any, scan: str, pieces: list[bytes]) -> None:
    feed = Feed(getattr(impl, scan))
    with pytest.raises(FramingError):
        for piece in pieces:
            feed(piece)


def test_the_longest_line_is_still_a_reply(impl: Any) -> None:
    line = b"-" + b"e" * (REPLY_LINE_MAX - 1) + b"\r\n"
    assert impl.redis_scan(line, 0, 1, framing.scan_state()) == (len(line), 1)
    assert impl.redis_replies(line, 0, 1) == (len(line), 1)
    line = b"E" * (REPLY_LINE_MAX - 1) + b"\r\n"
    assert impl.memcached_scan(line, 0, 1, framing.scan_state()) == (len(line), 1)


# --- through a worker: the scanners' work on a huge incomplete reply is linear --------------------------------------
def counted(framer: Framer, visited: list[int]) -> Framer:
    """`framer` with every reply-side scanner counting the bytes from `pos` it is handed (what it may walk)."""

    def counting(scan: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(buf: bytes | bytearray, pos: int, *rest: Any) -> Any:
            visited[0] += len(buf) - pos
            return scan(buf, pos, *rest)

        return wrapper

    names = [name for name in ("replies", "push", "stream", "scan", "skip_push") if name in framer._fields]
    return framer._replace(**{name: counting(getattr(framer, name)) for name in names})


@pytest.mark.parametrize("name", ["python", "c"])
def test_a_huge_incomplete_reply_costs_the_scanners_linear_work(
    name: str, start_redis: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """LRANGE of 200k items (3 MB) through a multiplexed worker: re-scanned from its start at every 64 KiB read, the
    scanners would be handed some 50 times the reply; walked once, about the reply."""
    base = framing.REDIS_PY if name == "python" else scanners("c") and framing.REDIS
    visited = [0]
    monkeypatch.setattr(mux.pool, "framer", lambda _engine: counted(base, visited))
    node = start_redis()
    items = 200_000
    with redis.Redis(port=node.port) as direct:
        for start in range(0, items, 10_000):
            direct.rpush("list", *(b"item-%d" % i for i in range(start, start + 10_000)))
    expected = lrange_reply(items)

    async def main() -> None:
        async with worker_for(node.port, engine="redis", multiplex=True) as (worker, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"*4\r\n$6\r\nLRANGE\r\n$4\r\nlist\r\n$1\r\n0\r\n$2\r\n-1\r\n")
            got = await asyncio.wait_for(reader.readexactly(len(expected)), 120)
            assert got == expected
            writer.close()
            await writer.wait_closed()
            await wait_for_async(lambda: not worker.active, "the client to leave")
            for route in worker.routes.values():  # the worker's drain leaves shared connections to the process's end
                if route.mux is not None:
                    route.mux.retire()

    visited[0] = 0
    run("uvloop", main)
    assert visited[0] < 2 * len(expected), f"the scanners were handed {visited[0]} bytes for {len(expected)}"


# --- a client that never reads, against the real servers --------------------------------------------------------------
def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@contextlib.contextmanager
def rss_growth(pid: int) -> Iterator[list[int]]:
    """The peak RSS growth of `pid` (KiB) over the block, in the list yielded once it ends."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = rss_kib(pid, "VmRSS")
    growth: list[int] = []
    yield growth
    growth.append(rss_kib(pid, "VmHWM") - before)


def never_reads(port: int) -> socket.socket:
    """A client with a small receive buffer that will not read what it asks for."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def reset_or_closed(sock: socket.socket, reply_size: int) -> bool:
    """Reads what the socket got until natfwd cut it: True when that came before the whole reply."""
    got = 0
    try:
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return got < reply_size


@pytest.fixture(params=SCANNERS)
def scanner_wrapper(request: pytest.FixtureRequest) -> tuple[str, ...]:
    return tuple(request.param)


def test_redis_mget_of_big_values_from_a_client_that_never_reads_costs_bounded_memory(
    tmp_path: Path, start_redis: Callable[..., Node], scanner_wrapper: tuple[str, ...]
) -> None:
    with serving_mux(tmp_path, start_redis(), "redis", scanner_wrapper) as (node, port, serve):
        with redis.Redis(port=node.port) as direct:
            direct.set("big", b"v" * (2 * 1024 * 1024))
        other = redis.Redis(port=port, protocol=2, socket_timeout=120)  # RESP2: the attacker's lane
        assert other.get("small") is None  # the shared connection is up before the baseline
        attacker = never_reads(port)
        keys = 100  # 200 MB of reply
        with rss_growth(serve.proc.pid) as growth:
            attacker.sendall(b"*%d\r\n$4\r\nMGET\r\n" % (keys + 1) + b"$3\r\nbig\r\n" * keys)
            time.sleep(0.5)
            assert other.get("small") is None  # behind the attacker's reply on the same shared connection
        assert growth[0] < RSS_BOUND_KIB, f"natfwd grew {growth[0] // 1024} MiB"
        assert reset_or_closed(attacker, keys * 2 * 1024 * 1024)
        assert "took none of its replies for mux_stall_timeout_s" in serve.log()
        assert "shared node connection lost" not in serve.log()
        attacker.close()
        other.close()


def test_memcached_get_of_many_keys_from_a_client_that_never_reads_costs_bounded_memory(
    tmp_path: Path, start_memcached: Callable[..., Node], scanner_wrapper: tuple[str, ...]
) -> None:
    with serving_mux(tmp_path, start_memcached(), "memcached", scanner_wrapper) as (node, port, serve):
        with contextlib.closing(Client(("127.0.0.1", node.port))) as direct:
            assert direct.set("k60", b"v" * 60_000, noreply=False)
        other = Client(("127.0.0.1", port), timeout=120)
        assert other.get("small") is None
        attacker = never_reads(port)
        repeats = 1600  # 96 MB of reply, each value below the size that streamed before
        with rss_growth(serve.proc.pid) as growth:
            attacker.sendall(b"get" + b" k60" * repeats + b"\r\n")
            time.sleep(0.5)
            assert other.get("small") is None
        assert growth[0] < RSS_BOUND_KIB, f"natfwd grew {growth[0] // 1024} MiB"
        assert reset_or_closed(attacker, repeats * 60_000)
        assert "took none of its replies for mux_stall_timeout_s" in serve.log()
        attacker.close()
        other.close()


def test_many_clients_that_never_read_cost_bounded_memory_together(
    tmp_path: Path, start_redis: Callable[..., Node], scanner_wrapper: tuple[str, ...]
) -> None:
    """Each asks for 8 MB, under what one client may have queued (8 MiB): together they would have 192 MB queued
    (less what the kernel holds in their sockets), but a shared connection stops reading once its clients have 32 MiB."""
    with serving_mux(tmp_path, start_redis(), "redis", scanner_wrapper) as (node, port, serve):
        with redis.Redis(port=node.port) as direct:
            direct.set("eight", b"e" * (8 * 1000 * 1000))
        other = redis.Redis(port=port, protocol=2, socket_timeout=120)
        assert other.get("small") is None
        attackers = [never_reads(port) for _ in range(24)]
        with rss_growth(serve.proc.pid) as growth:
            for attacker in attackers:
                attacker.sendall(b"*2\r\n$3\r\nGET\r\n$5\r\neight\r\n")
            time.sleep(0.5)
            assert other.get("small") is None
        assert growth[0] < RSS_BOUND_KIB, f"natfwd grew {growth[0] // 1024} MiB"
        for attacker in attackers:
            attacker.close()
        other.close()


def test_a_client_that_stops_reading_is_cut_off_and_the_others_on_its_connection_go_on(
    tmp_path: Path, start_redis: Callable[..., Node], scanner_wrapper: tuple[str, ...]
) -> None:
    with serving_mux(tmp_path, start_redis(), "redis", scanner_wrapper) as (node, port, serve):
        with redis.Redis(port=node.port) as direct:
            direct.set("big", b"b" * (20 * 1024 * 1024))
        # RESP2, the staller's lane: redis-py 8 says HELLO 3 by default, which would put them on another connection.
        others = [redis.Redis(port=port, protocol=2, socket_timeout=4 * STALL_S) for _ in range(3)]
        for index, client in enumerate(others):
            assert client.set(f"k{index}", index)
        staller = never_reads(port)
        staller.sendall(b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n")
        time.sleep(0.5)  # its reply fills its socket and the 8 MiB natfwd queues for it: the node is not read
        assert "took none of its replies" not in serve.log()
        results: list[bytes | None] = []
        readers = [threading.Thread(target=lambda c=c, i=i: results.append(c.get(f"k{i}"))) for i, c in
                   enumerate(others)]  # fmt: skip
        for thread in readers:
            thread.start()
        for thread in readers:
            thread.join(6 * STALL_S)
        assert sorted(results, key=str) == [b"0", b"1", b"2"]
        # They waited for the cut, not for the staller: natfwd logged it before their replies were read from the node.
        assert "took none of its replies for mux_stall_timeout_s" in serve.log()
        assert reset_or_closed(staller, 20 * 1024 * 1024)
        for index, client in enumerate(others):  # and go on after it
            assert client.get(f"k{index}") == str(index).encode()
            client.close()
        assert "took none of its replies for mux_stall_timeout_s" in serve.log()
        assert "shared node connection lost" not in serve.log()
        staller.close()


# --- a node that answers more than it was asked ---------------------------------------------------------------------
def test_memcached_a_request_the_node_reads_as_two_never_gives_another_client_its_reply(
    tmp_path: Path, start_memcached: Callable[..., Node], scanner_wrapper: tuple[str, ...]
) -> None:
    """memcached stops a line at a NUL, so `set k<NUL> ...` is an ERROR and its data block a command of its own: a
    reply more than natfwd counted. The `mn` after each client's requests shows it before the next client's turn:
    that client is reset (or never shared the connection), and never gets the smuggled reply."""
    with serving_mux(tmp_path, start_memcached(), "memcached", scanner_wrapper) as (node, port, serve):
        with contextlib.closing(Client(("127.0.0.1", node.port))) as direct:
            assert direct.set("victim-secret", b"hunter2-SECRET", noreply=False)
            assert direct.set("busy", b"z" * 900_000, noreply=False)
        leaks = 0
        for _ in range(3):
            busy, attacker, innocent = (socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3))
            with busy, attacker, innocent:
                busy.sendall(b"get busy\r\n")  # keeps the node busy: the next two wait, then go in one write
                attacker.sendall(b"set k\x00 0 0 17\r\nget victim-secret\r\n")
                innocent.sendall(b"get nothing-here\r\n")
                got = b""
                with contextlib.suppress(OSError):
                    while not got.endswith(b"END\r\n") and (chunk := innocent.recv(65536)):
                        got += chunk
                leaks += b"SECRET" in got
                assert got in (b"END\r\n", b""), got
        assert leaks == 0
        assert "Traceback" not in serve.log()
        with contextlib.closing(Client(("127.0.0.1", port), timeout=10)) as after:  # and the forward goes on
            assert after.get("victim-secret") == b"hunter2-SECRET"


# --- the setting ------------------------------------------------------------------------------------------------------
def base_config(**extra: object) -> dict[str, object]:
    return {
        "engine": "redis",
        "public_address": "127.0.0.1",
        "allowed_clients": ["127.0.0.0/8"],
        "forwards": [{"port": 7000, "target": "127.0.0.1:6379"}],
        "multiplex": True,
        **extra,
    }


@pytest.mark.parametrize(
    ("value", "expected"), [(0, "a positive number of seconds"), (-1, "a positive number of seconds"),
                            ("5s", "a number of seconds"), (True, "a number of seconds")]
)  # fmt: skip
def test_mux_stall_timeout_s_is_checked_like_the_other_timeouts(value: object, expected: str) -> None:
    with pytest.raises(config.ConfigError, match=f"mux_stall_timeout_s: .* is not valid; expected {expected}"):
        config.parse(base_config(mux_stall_timeout_s=value))


def test_mux_stall_timeout_s_reaches_the_pools() -> None:
    assert config.parse(base_config()).mux_stall_timeout_s == STALL_S
    cfg = config.parse(base_config(mux_stall_timeout_s=1.5))
    loop = asyncio.new_event_loop()
    try:
        pool = mux.new_pool(loop, loop, cfg, cfg.forwards[0].target, None)  # type: ignore[arg-type]
        assert pool.stall_timeout_s == 1.5
    finally:
        loop.close()
