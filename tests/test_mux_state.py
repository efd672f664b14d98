"""`multiplex: true` keeps connection state the client's own: a pinned RESP3 client stays RESP3, and no client ever
uses a login it did not make (a real redis-server through a real `natfwd serve`, each test with both scanners)."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from conftest import SCANNERS, Node, wait_for
from redis.backoff import NoBackoff
from redis.retry import Retry
from servekit import Serve, mux_config, serving, serving_mux

from forwarder.protocols import framing

TIMEOUT_S = 20  # only stops a hang


def command(*args: str | bytes) -> bytes:
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class Raw:
    """A raw RESP client: sends commands and reads whole replies (parsed with redis-py's own parser)."""

    def __init__(self, port: int) -> None:
        self.conn = redis.Connection(port=port, protocol=3, socket_timeout=TIMEOUT_S)
        self.conn.connect()  # sends HELLO 3 (and CLIENT SETINFO), as redis-py protocol=3 clients do

    def call(self, *args: str | bytes) -> object:
        self.conn.send_packed_command([command(*args)])
        return self.conn.read_response()

    def wire(self, *args: str | bytes) -> bytes:
        """The reply's first bytes as they arrived: the RESP type byte says RESP2 or RESP3."""
        sock = self.conn._sock
        assert sock is not None
        sock.sendall(command(*args))
        return sock.recv(1)

    def close(self) -> None:
        self.conn.disconnect()


def test_a_resp3_client_stays_resp3_once_pinned(redis_mux: tuple[Node, int, Serve]) -> None:
    node, port, serve = redis_mux
    warm = redis.Redis(port=port, protocol=3, socket_timeout=TIMEOUT_S)  # the RESP3 shared connection is in use
    assert warm.hset("h", mapping={"a": "1", "b": "2"}) == 2
    client = redis.Redis(port=port, protocol=3, socket_timeout=TIMEOUT_S)
    assert client.hgetall("h") == {b"a": b"1", b"b": b"2"}  # shared
    with client.pipeline(transaction=True) as tx:  # MULTI pins: HGETALL now runs on a connection of its own
        tx.hgetall("h").hlen("h")
        assert tx.execute() == [{b"a": b"1", b"b": b"2"}, 2]
    raw = Raw(port)
    assert raw.call("HGETALL", "h") == {b"a": b"1", b"b": b"2"}
    assert raw.call("SELECT", "0") == b"OK"  # pins
    assert raw.wire("HGETALL", "h") == b"%"  # a RESP3 map, not a RESP2 array ('*')
    raw.close()
    assert serve.metric("natfwd_multiplex_pinned_total", forward=str(port), reason="command") >= 2
    warm.close()
    client.close()


def test_config_get_answers_a_map_to_a_resp3_client(redis_mux: tuple[Node, int, Serve]) -> None:
    node, port, serve = redis_mux
    raw = Raw(port)
    assert raw.call("GET", "x") is None  # shared first
    assert raw.wire("CONFIG", "GET", "maxmemory") == b"%"  # CONFIG pins; RESP3 answers a map
    raw.close()
    client = redis.Redis(port=port, protocol=3, socket_timeout=TIMEOUT_S)
    assert client.ping()
    assert client.config_get("maxmemory") == {"maxmemory": "0"}
    client.close()


def test_client_tracking_invalidations_arrive_once_pinned(redis_mux: tuple[Node, int, Serve]) -> None:
    node, port, serve = redis_mux
    other = redis.Redis(port=port, protocol=2, socket_timeout=TIMEOUT_S)
    assert other.set("tracked", "v1")
    raw = Raw(port)
    assert raw.call("GET", "tracked") == b"v1"  # shared, RESP3 lane
    assert raw.call("CLIENT", "TRACKING", "ON") == b"OK"  # pins
    assert raw.call("GET", "tracked") == b"v1"  # now tracked
    assert other.set("tracked", "v2")  # another client changes the key: the node pushes an invalidation
    sock = raw.conn._sock
    assert sock is not None
    sock.settimeout(TIMEOUT_S)
    want = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$7\r\ntracked\r\n"
    got = b""
    while len(got) < len(want):
        chunk = sock.recv(len(want) - len(got))
        assert chunk, "natfwd closed the tracking client"
        got += chunk
    assert got == want
    raw.close()
    other.close()


def once(port: int, protocol: int, password: str | None = None) -> redis.Redis:
    """A redis-py client that reports a refusal at once (its default is to retry, with backoff)."""
    return redis.Redis(
        port=port, protocol=protocol, password=password, socket_timeout=TIMEOUT_S, retry=Retry(NoBackoff(), 0)
    )


def refusal(port: int, protocol: int, password: str | None = None) -> str:
    """What a new redis-py client is told when it reads secret-key: the error, or the value's repr."""
    client = once(port, protocol, password)
    try:
        return repr(client.get("secret-key"))
    except redis.AuthenticationError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def test_a_password_turned_on_is_enforced_for_new_clients_as_directly(redis_mux: tuple[Node, int, Serve]) -> None:
    node, port, serve = redis_mux
    early = [once(port, protocol) for protocol in (2, 3)]
    for client in early:
        assert client.set("secret-key", "hunter2")  # the shared connections are up and logged in (no password)
    with redis.Redis(port=node.port) as direct:
        assert direct.config_set("requirepass", "sesame")
    # A new client through natfwd gets exactly what a new direct connection gets: NOAUTH, never the value.
    for protocol in (2, 3, 2, 3):
        directly = refusal(node.port, protocol)
        assert directly.startswith("AuthenticationError")
        assert refusal(port, protocol) == directly
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)  # no client library at all
    raw.sendall(command("GET", "secret-key"))
    assert raw.recv(64).startswith(b"-NOAUTH")
    raw.close()
    # A client that logs in gets in (AUTH gives it a connection of its own), and after a rotation the new one does.
    assert refusal(port, 3, "sesame") == refusal(node.port, 3, "sesame") == repr(b"hunter2")
    authed = redis.Redis(port=port, protocol=2, password="sesame", socket_timeout=TIMEOUT_S)
    assert authed.get("secret-key") == b"hunter2"
    assert authed.config_set("requirepass", "rotated")
    assert refusal(port, 2, "sesame") == refusal(node.port, 2, "sesame") != repr(b"hunter2")
    rotated = redis.Redis(port=port, password="rotated", protocol=3, socket_timeout=TIMEOUT_S)
    assert rotated.get("secret-key") == b"hunter2"
    # Clients that joined before the password keep no borrowed login either: once a new client has joined their
    # shared connection, or once they are pinned, they are asked to AUTH (directly they would keep their access).
    for client in early:
        with pytest.raises(redis.AuthenticationError):
            client.get("secret-key")
        # Pinned, a RESP3 client's own connection cannot switch to RESP3 before AUTH: natfwd resets it rather than
        # let it go on in RESP2 unawares.
        refused = (
            redis.AuthenticationError if client.get_connection_kwargs()["protocol"] == 2 else redis.ConnectionError
        )
        with pytest.raises(refused), client.pipeline(transaction=True) as tx:
            tx.get("secret-key").execute()
        client.close()
    for client in (authed, rotated):
        client.close()
    log = serve.log()
    assert "shared node connection lost" not in log and "Traceback" not in log


def test_a_password_turned_off_lets_new_clients_in_as_directly(redis_mux: tuple[Node, int, Serve]) -> None:
    node, port, serve = redis_mux
    with redis.Redis(port=node.port) as direct:
        assert direct.config_set("requirepass", "rotated")
    locked = once(port, 2)
    with pytest.raises(redis.AuthenticationError):
        locked.get("k")  # the shared connection is up, and not logged in
    # A RESP3 client is refused its HELLO 3 as directly; the RESP3 shared connection made for it could not switch.
    assert refusal(port, 3) == refusal(node.port, 3) != repr(None)
    with redis.Redis(port=node.port, password="rotated") as direct:
        assert direct.config_set("requirepass", "")
    for protocol in (2, 3):
        newcomer = redis.Redis(port=port, protocol=protocol, socket_timeout=TIMEOUT_S)
        assert newcomer.set("k", "open") and newcomer.get("k") == b"open"
        assert newcomer.hset("h", "f", "v") in (0, 1)
        assert newcomer.hgetall("h") == {b"f": b"v"}  # RESP3 speaks RESP3 now that HELLO 3 is allowed
        newcomer.close()
    assert locked.get("k") == b"open"  # as directly: the node asks only while the default user has a password
    locked.close()


def test_many_clients_joining_shared_connections_keep_their_replies(redis_mux: tuple[Node, int, Serve]) -> None:
    """Clients joining busy shared connections (each join resets the connection for the newcomer) while others
    keep working: every reply still reaches the client that asked."""
    node, port, serve = redis_mux
    stop = threading.Event()
    errors: list[BaseException] = []

    def busy(index: int) -> None:
        client = redis.Redis(port=port, protocol=2 + index % 2, socket_timeout=TIMEOUT_S)
        j = 0
        try:
            while not stop.is_set():
                key = f"busy{index}:{j}"
                assert client.set(key, key) and client.get(key) == key.encode()
                j += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    workers = [threading.Thread(target=busy, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    try:
        for j in range(60):
            newcomer = redis.Redis(port=port, protocol=2 + j % 2, socket_timeout=TIMEOUT_S)
            assert newcomer.set(f"new{j}", j) and newcomer.get(f"new{j}") == str(j).encode()
            if j % 3 == 0:
                assert newcomer.hset("h", "f", j) in (0, 1)
                with newcomer.pipeline(transaction=True) as tx:
                    tx.hgetall("h")
                    assert tx.execute() == [{b"f": str(j).encode()}]
            newcomer.close()
    finally:
        stop.set()
        for worker in workers:
            worker.join(TIMEOUT_S)
    assert not errors
    log = serve.log()
    assert "shared node connection lost" not in log and "Traceback" not in log


@pytest.mark.parametrize("wrapper", SCANNERS)
def test_a_node_without_reset_pins_clients_that_would_join_a_connection_in_use(
    tmp_path: Path, start_redis: Callable[..., Node], wrapper: tuple[str, ...]
) -> None:
    """Redis before 6.2 has no RESET (here: renamed away): the first client to join a shared connection in use is
    reset rather than served on another's login, and the next ones get connections of their own."""
    node = start_redis(None, "127.0.0.1", "--rename-command", "RESET", "")
    with serving_mux(tmp_path, node, "redis", wrapper) as (_node, port, serve):
        first = once(port, 2)
        assert first.set("secret-key", "hunter2")  # the shared connection is up, logged in (no password)
        with pytest.raises(redis.ConnectionError):
            once(port, 2).get("secret-key")  # behind a refused RESET: its reply is never delivered
        serve.wait_log("does not know RESET")
        with redis.Redis(port=node.port) as direct:
            assert direct.config_set("requirepass", "sesame")
        for protocol in (2, 3):
            assert refusal(port, protocol) == refusal(node.port, protocol) != repr(b"hunter2")
        assert refusal(port, 2, "sesame") == repr(b"hunter2")
        assert serve.metric("natfwd_multiplex_pinned_total", forward=str(port), reason="no_reset") >= 2
        first.close()


@pytest.mark.parametrize("framer", [framing.REDIS_PY, framing.REDIS], ids=["python", "c"])
def test_state_requests_are_found_in_any_case_and_only_they(framer: framing.Framer) -> None:
    assert framer.state is not None
    setinfo = command("client", "SetInfo", "lib-name", "redis-py")
    version = command("CLIENT", "SETINFO", "LIB-VER", "8.2")
    notifications = command("Client", "MAINT_NOTIFICATIONS", "on", "moving-endpoint-type", "internal-ip")
    other = command("SET", "client", command("CLIENT", "SETINFO", "LIB-NAME", "inside-a-value"))
    buf = other + setinfo + command("GET", "$6\r\nclient\r\n") + version + notifications + command("PING")
    end, count, leave = framer.requests(buf, framing.RESP2)
    assert (end, count, leave) == (len(buf), 6, framing.STAY)
    assert framer.state(buf, end) == [
        (b"SETINFO LIB-NAME", setinfo),
        (b"SETINFO LIB-VER", version),
        (b"MAINT_NOTIFICATIONS", notifications),
    ]
    plain = other + command("GET", "k")
    assert framer.requests(plain, framing.RESP2) == (len(plain), 2, framing.STAY)
    assert framer.state(plain, len(plain)) == []
    # An attribute Redis does not know is refused there: nothing to keep (and no way to grow what natfwd keeps).
    unknown = command("CLIENT", "SETINFO", "anything", "x")
    assert framer.state(unknown, len(unknown)) == []


def test_a_pinned_client_whose_own_connection_the_node_turns_away_is_closed_and_counted(
    redis_mux: tuple[Node, int, Serve],
) -> None:
    """The node has no room for a pinned client's own connection (maxclients): the client is closed, the failure
    counted, and the connection ends; nothing of its is sent over another connection."""
    node, port, serve = redis_mux
    client = Raw(port)  # HELLO 3 went over the shared connection: it is replayed first on a connection of its own
    assert client.call("SET", "k", "v") == b"OK"
    with redis.Redis(port=node.port) as direct:
        assert direct.config_set("maxclients", 1)  # the clients already in stay; a new one gets an error and a close
    with pytest.raises(redis.ConnectionError):
        client.call("SELECT", "1")  # pins
    client.close()
    serve.wait_log("node connection failed")
    assert serve.metric("natfwd_upstream_errors_total", forward=str(port)) == 1
    assert serve.metric("natfwd_multiplex_pinned_total", forward=str(port), reason="command") == 1
    wait_for(
        lambda: serve.metric("natfwd_connections_active", forward=str(port)) == 0,
        "the client whose pin failed to stop being counted live",
        TIMEOUT_S,
    )
    assert "Traceback" not in serve.log()


def test_a_drain_ends_a_client_whose_own_connection_is_still_being_made(
    tmp_path: Path, start_redis: Callable[..., Node]
) -> None:
    """SIGTERM while a pinned client's state is being replayed on its own connection (the node is busy): the drain
    aborts it at drain_timeout_s, and natfwd exits 0 while the node is still asleep, not once it answers."""
    node = start_redis(None, "127.0.0.1", "--enable-debug-command", "local")  # DEBUG SLEEP keeps it busy
    cfg, port, metrics_port = mux_config(tmp_path, node.address, "redis", "drain_timeout_s: 0.5\n")
    with serving(cfg, [port], metrics_port) as serve:
        client = Raw(port)  # HELLO 3 over the shared connection: replayed first on a connection of its own
        assert client.call("SET", "k", "v") == b"OK"
        asleep = redis.Redis(port=node.port, socket_timeout=TIMEOUT_S)  # redis-py's default timeout is shorter
        busy = threading.Thread(target=lambda: asleep.execute_command("DEBUG", "SLEEP", "8"))
        busy.start()
        try:
            time.sleep(0.3)  # the node is asleep: the replayed HELLO waits for its reply
            client.conn.send_packed_command([command("SELECT", "1")])  # pins
            time.sleep(0.3)
            assert serve.metric("natfwd_connections_active", forward=str(port)) == 1
            serve.signal(signal.SIGTERM)
            assert serve.proc.wait(TIMEOUT_S) == 0
            assert busy.is_alive(), "the drain waited for the node to answer the replay"
        finally:
            busy.join()
            asleep.close()
        client.close()
        log = serve.log()
        assert "grace period over, aborted connections" in log
        for bad in ("Traceback", "Task was destroyed", "never retrieved"):
            assert bad not in log
