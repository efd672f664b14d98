"""The real servers as the oracle for `multiplex: true`: ordinary and hostile requests (NUL, CR, LF, spaces and
control bytes in keys, odd numbers, noreply, meta and binary commands, malformed RESP, pipelines), sent by concurrent
clients to memcached and redis-server directly and through `natfwd serve`, must give each client the same bytes, and
never one client another's.

Each client keeps to keys of its own (`cNN:`) and tags its values (`<TNN>`), so what it gets directly does not
depend on the others. Through natfwd it shares a node connection with them, while one more client keeps the node busy
with a big value so that requests queue and go to the node together. Every step a client takes ends with a GET of its
own sentinel key, whose reply marks the end of the step's replies. The corpus is fixed-seed; NATFWD_FUZZ_CASES=N
generates N requests per engine instead, and NATFWD_FUZZ_SEED=S another corpus.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import Node, free_port, write_config
from servekit import Serve, serving

from forwarder.protocols import framing

CI_CASES = 12_000  # requests per engine and scanner in the fixed-seed corpus
CASES = int(os.environ.get("NATFWD_FUZZ_CASES") or CI_CASES)
SEED = int(os.environ.get("NATFWD_FUZZ_SEED") or 0)  # another corpus for a longer run
CLIENTS = 6
BIG = 900 * 1000  # the busy client's value: the node takes a while over each GET of it
STEP_TIMEOUT_S = 30.0  # only stops a hang: a step's replies come in milliseconds
CLOSED = b"<closed>"  # appended to a step's bytes when the node closed the connection after them

# Every test runs with each of natfwd's scanners: the C ones (_cframing.c) and the pure-Python reference.
SCANNERS = [pytest.param((), id="c"), pytest.param(("env", "NATFWD_NO_EXTENSIONS=1"), id="python")]


class Step(NamedTuple):
    data: bytes  # what the client sends, its sentinel request included
    until: bytes | None  # the reply that ends the step's replies; None: read until the node closes


Script = list[list[Step]]  # per connection, in order
Transcript = list[list[bytes]]  # per connection, what each step got


def prefix(client: int) -> bytes:
    return b"c%02d:" % client


def tag(client: int) -> bytes:
    return b"<T%02d>" % client


def sentinel_value(client: int) -> bytes:
    return b"end-of-step-%02d" % client


# --- talking to a server ------------------------------------------------------------------------------------------
def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def exchange(sock: socket.socket, step: Step) -> bytes:
    """Send a step and read its replies: up to `until`, or to the end when the node closes (then CLOSED follows)."""
    try:
        sock.sendall(step.data)
    except (BrokenPipeError, ConnectionResetError):
        return CLOSED
    got = bytearray()
    while step.until is None or not got.endswith(step.until):
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        except TimeoutError:
            raise AssertionError(
                f"no end of replies within {STEP_TIMEOUT_S}s after sending {step.data[:300]!r}; "
                f"got {len(got)} bytes ending {bytes(got[-300:])!r}"
            ) from None
        if not chunk:
            return bytes(got) + CLOSED
        got += chunk
    return bytes(got)


def play(port: int, script: Script, ready: threading.Barrier) -> Transcript:
    ready.wait(STEP_TIMEOUT_S)  # every client starts at once, so that their requests really interleave
    transcript: Transcript = []
    for steps in script:
        got: list[bytes] = []
        with connect(port) as sock:
            for step in steps:
                got.append(exchange(sock, step))
                if got[-1].endswith(CLOSED):
                    break
        transcript.append(got)
    return transcript


def keep_busy(port: int, request: bytes, reply: bytes, done: threading.Event, ready: threading.Barrier) -> int:
    """GET the big value again and again until `done`: each reply must be exactly `reply`. How many it got."""
    ready.wait(STEP_TIMEOUT_S)
    count = 0
    with connect(port) as sock:
        while not done.is_set():
            got = exchange(sock, Step(request, reply))
            assert got == reply, f"the busy client got {len(got)} bytes ending {got[-200:]!r}"
            count += 1
    return count


def run(port: int, scripts: list[Script], busy: tuple[bytes, bytes]) -> tuple[list[Transcript], int]:
    ready = threading.Barrier(len(scripts) + 1)
    done = threading.Event()
    with ThreadPoolExecutor(len(scripts) + 1) as pool:
        busy_future = pool.submit(keep_busy, port, *busy, done, ready)
        futures = [pool.submit(play, port, script, ready) for script in scripts]
        try:
            transcripts = [future.result() for future in futures]
        finally:
            done.set()
        return transcripts, busy_future.result()


# --- memcached ------------------------------------------------------------------------------------------------------
ODD_KEY_BYTES = [b"\x00", b"\r", b"\n", b" ", b"  ", b"\t", b"\x0b", b"\x0c", b"\x01", b"\x1f", b"\x7f", b"\xff"]
# No small positive number: as an exptime, the key would expire while the test runs, sooner or later by its timing.
ODD_NUMBERS = [b"+86400", b"-86400", b"086400", b"00", b"-0", b"1.5", b"0x10", b"", b"4294967296", b"2147483648"]
ODD_NUMBERS += [b"2147483647", b"18446744073709551615", b"18446744073709551616", b"9" * 30, b"86400 ", b" 86400"]
CAS_NEVER = b"%d" % (2**63 + 12345)
LONE = b"<lone>"  # mc_hostile's mark on a request that must start a step of its own  # a cas unique the node never hands out: cas answers are the same on any node


def mc_value(rng: random.Random, client: int) -> bytes:
    pieces = [b"\r\n", b"END\r\n", b"VALUE x 0 1\r\n", b"get x", b" ", b"\x00", b"ERROR", tag(client)]
    body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(5)))
    return tag(client) + body + bytes(rng.randrange(256) for _ in range(rng.randrange(6)))


def mc_key(rng: random.Random, client: int) -> bytes:
    return prefix(client) + rng.choice([b"k0", b"k1", b"k2", b"n", b"\xc3\xa9", b"k0k0k0"])


class McRequest(NamedTuple):
    tokens: list[bytes]
    keys: list[int]  # indexes of the tokens that are keys
    numbers: list[int]  # indexes of the tokens that are numbers
    data: bytes | None  # a storage command's data block
    size_index: int  # the token that gives the data's length, 0 when none


def mc_ordinary(rng: random.Random, client: int) -> McRequest:
    key = mc_key(rng, client)
    kind = rng.randrange(20)  # the meta commands (17 on) pin: rarer, so that clients share for longer
    if kind <= 5:
        verb = rng.choice([b"set", b"set", b"add", b"replace", b"append", b"prepend", b"cas"])
        data = mc_value(rng, client) if rng.randrange(4) else rng.choice([b"0", b"41"])
        tokens = [verb, key, rng.choice([b"0", b"7", b"4294967295"]), rng.choice([b"0", b"0", b"86400", b"2147483647"])]
        tokens.append(b"%d" % len(data))
        if verb == b"cas":
            tokens.append(CAS_NEVER)
        return McRequest(tokens, [1], list(range(2, len(tokens))), data, 4)
    if kind <= 11:
        verb = rng.choice([b"get", b"get", b"gets", b"gat", b"gats"])
        keys = [mc_key(rng, client) for _ in range(rng.choice([1, 1, 2, 4]))]
        if verb.startswith(b"gat"):
            return McRequest([verb, rng.choice([b"0", b"3600"]), *keys], list(range(2, 2 + len(keys))), [1], None, 0)
        return McRequest([verb, *keys], list(range(1, 1 + len(keys))), [], None, 0)
    if kind <= 13:
        return McRequest([b"delete", key], [1], [], None, 0)
    if kind <= 15:
        # memcached pads a number that gets shorter with spaces, or not, by whether another reply still holds it: by
        # timing. So numbers only grow, and never wrap (no decr but by 0, no delta near 2**64).
        verb = rng.choice([b"incr", b"decr", b"touch"])
        number = {b"touch": [b"0", b"3600"], b"decr": [b"0"]}.get(verb, [b"1", b"5", b"0", b"3600"])
        number = rng.choice(number)
        return McRequest([verb, key, number], [1], [2], None, 0)
    if kind == 16:
        return McRequest([b"version"], [], [], None, 0)
    if kind == 17:  # meta commands: flags whose answers do not depend on time or on other clients (no t, h, l, c)
        return McRequest([rng.choice([b"mg", b"md", b"ma"]), key, *rng.choice([[], [b"v"], [b"v", b"f", b"k"]])], [1],
                         [], None, 0)  # fmt: skip
    if kind == 18:
        data = mc_value(rng, client)
        return McRequest([b"ms", key, b"%d" % len(data), b"T0"], [1], [], data, 2)
    return McRequest([b"mn"], [], [], None, 0)


def mc_render(
    request: McRequest, eol: bytes = b"\r\n", terminator: bytes = b"\r\n", sep: list[bytes] | None = None
) -> bytes:
    tokens = request.tokens
    seps = sep or [b" "] * (len(tokens) - 1)
    line = tokens[0] + b"".join(s + t for s, t in zip(seps, tokens[1:], strict=True))
    return line + eol + (b"" if request.data is None else request.data + terminator)


def mc_hostile(rng: random.Random, client: int) -> bytes:
    """One request with one thing memcached may read otherwise than a careless scanner. Never one that leaves the
    node waiting for bytes that do not come: a data length is never made longer than the data sent.

    A key too long in a get makes memcached drop the replies it has not yet sent to earlier requests of the same
    read (proto_text.c's process_get_command: "Kill any stacked responses"), so how many replies come depends on how
    the bytes were batched: such a get goes first in a step of its own (mc_script), after every earlier reply is in.
    """
    request = mc_ordinary(rng, client)
    tokens = list(request.tokens)
    kind = rng.randrange(10)
    if kind == 0:  # the smuggling: the data block, read as a command of its own once the line ends early
        smuggled = rng.choice([b"get ", b"delete ", b"incr "]) + mc_key(rng, client) + rng.choice([b"", b" 1"])
        key = mc_key(rng, client)
        cut = rng.randrange(len(prefix(client)), len(key) + 1)
        odd = rng.choice([b"\x00", b"\x00", b"\x0b", b"\t", b" "])
        return b"set %s%s%s 0 0 %d\r\n%s\r\n" % (key[:cut], odd, key[cut:], len(smuggled), smuggled)
    if kind <= 2 and request.keys:  # an odd byte inside a key, after its owner's prefix
        index = rng.choice(request.keys)
        key = tokens[index]
        at = rng.randrange(len(prefix(client)), len(key) + 1)
        # A space in a storage command's key moves its numbers along: the exptime would become the data's length.
        odd = [byte for byte in ODD_KEY_BYTES if request.data is None or b" " not in byte]
        tokens[index] = key[:at] + rng.choice(odd) + key[at:]
    elif kind == 3 and request.keys:  # around memcached's key length limit
        tokens[rng.choice(request.keys)] = prefix(client) + b"x" * (rng.choice([250, 251]) - len(prefix(client)))
        if tokens[0] in (b"get", b"gets", b"gat", b"gats"):
            return LONE + mc_render(request._replace(tokens=tokens))
    elif kind <= 5 and (request.numbers or request.size_index):
        index = rng.choice(request.numbers or [request.size_index])
        if index == request.size_index:  # never longer than the data
            size = len(request.data or b"")
            tokens[index] = rng.choice([b"+%d" % size, b"0%d" % size, b"-1", b"%d" % max(size - 1, 0), b"%d " % size])
        elif tokens[0] in (b"incr", b"decr"):
            tokens[index] = rng.choice([b"+1", b"01", b"00", b"-1", b"1.5", b"", b"4294967296", b"9" * 30, b"1 "])
        else:
            tokens[index] = rng.choice(ODD_NUMBERS)
    elif kind == 6:  # spaces memcached skips
        seps = [b" "] * (len(tokens) - 1)
        if seps:
            seps[rng.randrange(len(seps))] = b"  "
        line = mc_render(request._replace(tokens=tokens), sep=seps)
        return rng.choice([b" ", b""]) + line if rng.randrange(2) else line.replace(b"\r\n", b" \r\n", 1)
    elif kind == 7:
        return mc_render(request._replace(tokens=tokens), eol=rng.choice([b"\n", b"\r\r\n"]))
    elif kind == 8 and request.data is not None:  # the block does not end in CRLF
        return mc_render(request._replace(tokens=tokens), terminator=rng.choice([b"XY", b"\n\r", b"\r\r", b"\n\n"]))
    elif tokens[0] not in (b"version", b"mn", b"mg", b"ms", b"md", b"ma", b"get", b"gets", b"gat", b"gats"):
        tokens.append(b"noreply")
    return mc_render(request._replace(tokens=tokens))


def mc_binary(rng: random.Random, client: int) -> bytes:
    """Binary protocol requests (memcached picks the protocol by a connection's first byte)."""
    out = b""
    for _ in range(rng.randrange(1, 4)):
        key = mc_key(rng, client)
        opcode = rng.choice([0x00, 0x01, 0x04, 0x0A, 0x0B])  # get, set, delete, noop, version
        extras = struct.pack(">II", 0, 0) if opcode == 0x01 else b""
        key = key if opcode in (0x00, 0x01, 0x04) else b""
        value = mc_value(rng, client) if opcode == 0x01 else b""
        body = extras + key + value
        out += struct.pack(">BBHBBHIIQ", 0x80, opcode, len(key), len(extras), 0, 0, len(body), 7, 0) + body
    return out


def mc_binary_get(key: bytes) -> bytes:
    return struct.pack(">BBHBBHIIQ", 0x80, 0x00, len(key), 0, 0, 0, len(key), 0, 0) + key


def mc_script(rng: random.Random, client: int, cases: int) -> tuple[Script, int]:
    """Connections of a few steps each; a step is a pipeline of requests, a fifth of them hostile."""
    text_sentinel = b"get %send\r\n" % prefix(client)
    end = sentinel_value(client)
    text_until = b"VALUE %send 0 %d\r\n%s\r\nEND\r\n" % (prefix(client), len(end), end)
    script: Script = []
    made = 0
    while made < cases:
        steps: list[Step] = []
        if rng.randrange(10) == 0:  # a binary connection, to its end
            for _ in range(rng.randrange(1, 4)):
                steps.append(Step(mc_binary(rng, client) + mc_binary_get(prefix(client) + b"end"), end))
                made += 1
            script.append(steps)
            continue
        for _ in range(rng.randrange(2, 10)):
            requests = [
                mc_hostile(rng, client) if rng.randrange(5) == 0 else mc_render(mc_ordinary(rng, client))
                for _ in range(rng.choice([1, 1, 1, 2, 3, 6]))
            ]
            lone = [request[len(LONE) :] for request in requests if request.startswith(LONE)]
            requests = lone[:1] + [request for request in requests if not request.startswith(LONE)]
            made += len(requests)
            if rng.randrange(40) == 0:  # the node closes the connection: the last step on it
                steps.append(Step(b"".join(requests) + b"quit\r\n", None))
                break
            steps.append(Step(b"".join(requests) + text_sentinel, text_until))
        script.append(steps)
    return script, made


CAS_IN_VALUE_LINE = re.compile(rb"(VALUE [^ \n]+ \d+ \d+) \d+\r\n")  # a key may hold a CR


def mc_normalize(got: bytes) -> bytes:
    """Cas uniques come from a counter global to the node, so they depend on the other clients: masked. In the
    binary protocol too, where each response header holds one."""
    if got.startswith(b"\x81"):
        out, at = bytearray(got), 0
        while at + 24 <= len(out) and out[at] == 0x81:
            out[at + 16 : at + 24] = bytes(8)
            at += 24 + struct.unpack_from(">I", out, at + 8)[0]
        return bytes(out)
    return CAS_IN_VALUE_LINE.sub(rb"\1 CAS\r\n", got)


def mc_store(port: int, key: bytes, data: bytes) -> None:
    with connect(port) as sock:
        assert exchange(sock, Step(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(data), data), b"\r\n")) == b"STORED\r\n"


# --- Redis ----------------------------------------------------------------------------------------------------------
def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args)


def redis_value(rng: random.Random, client: int) -> bytes:
    pieces = [b"\r\n", b"*1\r\n", b"$-1\r\n", b"+OK\r\n", b"\x00", b" ", tag(client)]
    return tag(client) + b"".join(rng.choice(pieces) for _ in range(rng.randrange(5)))


def redis_ordinary(rng: random.Random, client: int) -> list[bytes]:
    p = prefix(client)
    key = p + rng.choice([b"k0", b"k1", b"\x00\r\n", b"k k"])
    value = redis_value(rng, client)
    return rng.choice(
        [
            [b"SET", key, value],
            [b"GET", key],
            [b"get", key],
            [b"MGET", key, p + b"k1", p + b"missing"],
            [b"DEL", key],
            [b"INCR", p + b"n"],
            [b"INCRBY", p + b"n", b"5"],
            [b"APPEND", key, value],
            [b"STRLEN", key],
            [b"EXISTS", key, p + b"k1"],
            [b"HSET", p + b"h", rng.choice([b"f", b"g"]), value],
            [b"HGETALL", p + b"h"],
            [b"RPUSH", p + b"l", value],
            [b"LRANGE", p + b"l", b"0", b"-1"],
            [b"ZADD", p + b"z", b"%d" % rng.randrange(5), value],
            [b"ZRANGE", p + b"z", b"0", b"-1", b"WITHSCORES"],
            [b"PING"],
            [b"ECHO", value],
            [b"GETRANGE", key, b"0", b"3"],
            [b"TYPE", key],
            [b"SELECT", b"0"],  # pins; the same database
            [b"CLIENT", b"SETNAME", b"fuzz"],  # pins
            [b"GET"],  # the wrong number of arguments: one error
            [b"NOSUCHCOMMAND", key],
        ]
    )


def redis_hostile(rng: random.Random, client: int) -> tuple[bytes, bool]:
    """One malformed or unusual request, and whether Redis closes the connection over it (a protocol error). Never
    one that leaves the node waiting: a bulk length is never made longer than its argument."""
    args = redis_ordinary(rng, client)
    kind = rng.randrange(9)
    if kind in (0, 3, 5):  # what follows is read as inline commands, whose end Redis finds with strchr(): no NUL
        args = [arg.replace(b"\x00", b"") for arg in args]
    if kind == 0:  # inline
        line = b" ".join(args).replace(b"\r\n", b"")
        return line + rng.choice([b"\r\n", b"\n"]), False
    if kind == 1:  # a command name with odd bytes
        # Not NUL: Redis compares names with strcasecmp(), so `SET\0` runs SET when its hash (seeded per process)
        # lands where SET's does, and is unknown otherwise: the same bytes get either answer. natfwd pins it.
        odd = rng.choice([b"\r\n", b" ", b"\xff", b"\x01"])
        at = rng.randrange(len(args[0]) + 1)
        return resp(args[0][:at] + odd + args[0][at:], *args[1:]), False
    if kind == 2:  # an odd argument count
        body = resp(*args).split(b"\r\n", 1)[1]
        count = rng.choice([b"+%d", b"0%d", b" %d", b"%d "]) % len(args)
        return b"*" + count + b"\r\n" + body, True
    if kind == 3:
        body = resp(*args).split(b"\r\n", 1)[1]
        return b"*%d\r\n" % rng.choice([0, -1, len(args) - 1]) + body, False
    if kind == 4:  # an odd bulk length
        index = rng.randrange(len(args))
        pieces = [b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args]
        size = len(args[index])
        pieces[index] = b"$%s\r\n%s\r\n" % (rng.choice([b"+%d", b"0%d", b" %d", b"%d "]) % size, args[index])
        return b"*%d\r\n" % len(args) + b"".join(pieces), True
    if kind == 5:  # a bulk length short of its argument, so the rest is read as a command
        index = rng.randrange(len(args))
        if not args[index]:
            return resp(*args), False
        pieces = [b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args]
        pieces[index] = b"$%d\r\n%s\r\n" % (len(args[index]) - 1, args[index])
        return b"*%d\r\n" % len(args) + b"".join(pieces), False
    if kind == 6:  # an argument not followed by CRLF
        return resp(*args)[:-2] + b"XY", False
    if kind == 7:  # too many arguments to share, or a length past Redis's limit
        if rng.randrange(2):
            return resp(b"DEL", *[prefix(client) + b"k0"] * 1100), False
        return b"*2\r\n$3\r\nGET\r\n$%d\r\n" % rng.choice([2**40, 513 * 1024 * 1024]), True
    return resp(*args).replace(b"\r\n", b"\n", 1), True  # LF alone after the count


def redis_script(rng: random.Random, client: int, cases: int) -> tuple[Script, int]:
    sentinel = resp(b"GET", prefix(client) + b"end")
    end = sentinel_value(client)
    until = b"$%d\r\n%s\r\n" % (len(end), end)
    script: Script = []
    made = 0
    while made < cases:
        steps: list[Step] = []
        for _ in range(rng.randrange(2, 10)):
            data, closes = b"", False
            for _ in range(rng.choice([1, 1, 1, 2, 3, 6])):
                if rng.randrange(4) == 0:
                    request, closes = redis_hostile(rng, client)
                else:
                    request = resp(*redis_ordinary(rng, client))
                data += request
                made += 1
                if closes:
                    break
            steps.append(Step(data, None) if closes else Step(data + sentinel, until))
            if closes:
                break
        script.append(steps)
    return script, made


def redis_store(port: int, key: bytes, data: bytes) -> None:
    with connect(port) as sock:
        assert exchange(sock, Step(resp(b"SET", key, data), b"\r\n")) == b"+OK\r\n"


# --- the engines ----------------------------------------------------------------------------------------------------
class Engine(NamedTuple):
    name: str
    script: Callable[[random.Random, int, int], tuple[Script, int]]
    normalize: Callable[[bytes], bytes]
    store: Callable[[int, bytes, bytes], None]
    busy_request: bytes
    busy_reply: bytes


BIG_VALUE = random.Random(0).randbytes(BIG)
ENGINES = {
    "memcached": Engine(
        "memcached",
        mc_script,
        mc_normalize,
        mc_store,
        b"get big\r\n",
        b"VALUE big 0 %d\r\n%s\r\nEND\r\n" % (BIG, BIG_VALUE),
    ),
    "redis": Engine(
        "redis", redis_script, lambda got: got, redis_store, resp(b"GET", b"big"), b"$%d\r\n%s\r\n" % (BIG, BIG_VALUE)
    ),
}


@contextlib.contextmanager
def natfwd_in_front(tmp_path: Path, node: Node, engine: str, wrapper: tuple[str, ...]) -> Iterator[tuple[int, Serve]]:
    port, metrics_port = free_port(), free_port()
    cfg = write_config(
        tmp_path / "natfwd.yaml",
        [(port, node.address)],
        engine=engine,
        extra=f"multiplex: true\nmetrics: {{listen: 127.0.0.1:{metrics_port}}}\n",
    )
    with serving(cfg, [port], metrics_port, wrapper=wrapper) as serve:
        yield port, serve
        log = serve.log()
        assert "Traceback" not in log, log


def shared_requests(engine: str, scripts: list[Script]) -> int:
    """How many requests, sentinels included, the scanners let share before each connection was pinned."""
    scan = framing.framer(engine).requests
    return sum(scan(b"".join(step.data for step in steps), framing.RESP2)[1] for script in scripts for steps in script)


def prepare(engine: Engine, port: int) -> None:
    engine.store(port, b"big", BIG_VALUE)
    for client in range(CLIENTS):
        engine.store(port, prefix(client) + b"end", sentinel_value(client))


@pytest.mark.parametrize("wrapper", SCANNERS)
@pytest.mark.parametrize("engine_name", ["memcached", "redis"])
def test_every_client_gets_through_natfwd_exactly_what_it_gets_directly(
    tmp_path: Path,
    start_memcached: Callable[..., Node],
    start_redis: Callable[..., Node],
    engine_name: str,
    wrapper: tuple[str, ...],
) -> None:
    engine = ENGINES[engine_name]
    start = start_memcached if engine_name == "memcached" else start_redis
    direct_node, behind_node = start(), start()
    seed = SEED * 1000 + (19 if wrapper else 20)  # each scanner its own corpus: twice the coverage for the time
    scripts, made = [], 0
    for client in range(CLIENTS):
        script, count = engine.script(random.Random(seed * 100 + client), client, CASES // CLIENTS)
        scripts.append(script)
        made += count
    assert made >= CASES - CLIENTS
    for node in (direct_node, behind_node):
        prepare(engine, node.port)
    busy = (engine.busy_request, engine.busy_reply)
    direct, _ = run(direct_node.port, scripts, busy)
    with natfwd_in_front(tmp_path, behind_node, engine_name, wrapper) as (port, _serve):
        through, busy_gets = run(port, scripts, busy)
    assert busy_gets > 0  # the node was kept busy, so requests queued and went together
    # and many went over a shared node connection; each connection's first hostile request among them
    assert shared_requests(engine_name, scripts) > CASES // 8
    for client, (script, want, got) in enumerate(zip(scripts, direct, through, strict=True)):
        others = [mark for other in range(CLIENTS) if other != client for mark in (tag(other), prefix(other))]
        for connection, (steps, want_steps, got_steps) in enumerate(zip(script, want, got, strict=True)):
            for index, step in enumerate(steps[: len(want_steps)]):
                expected = engine.normalize(want_steps[index])
                actual = engine.normalize(got_steps[index]) if index < len(got_steps) else b"<nothing>"
                where = f"client {client}, connection {connection}, step {index}: sent {step.data[:400]!r}"
                leaked = [mark for mark in others if mark in actual]
                assert not leaked, f"{where}\ngot another client's {leaked}: {actual[:600]!r}"
                assert actual == expected, (
                    f"{where}\ndirectly:     {expected[:600]!r}\nthrough natfwd: {actual[:600]!r}"
                )
            assert len(got_steps) == len(want_steps), f"client {client}, connection {connection}"


# --- the reproduction -----------------------------------------------------------------------------------------
def read_reply(sock: socket.socket, end: bytes) -> bytes:
    got = b""
    while not got.endswith(end):
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    return got


ATTACKS = [
    # Issue 19's steps: memcached stops the line at the NUL (`set k`: ERROR) and runs the data block as a command of
    # its own, a get of the victim's key: two replies where the old scanners counted one.
    pytest.param(
        None,
        b"set k\x00 0 0 17\r\nget victim-secret\r\n",
        b"ERROR\r\nVALUE victim-secret 0 14\r\nhunter2-SECRET\r\nEND\r\n",
        id="nul-smuggling",
    ),
    # memcached keeps a vertical tab in a key and echoes it in the VALUE line, where whitespace-splitting reads a
    # length of 0: the reply looks over before its data, and the rest of it goes to the next client in line.
    pytest.param(
        b"k\x0bq",
        b"get k\x0bq\r\n",
        b"VALUE k\x0bq 0 14\r\nhunter2-SECRET\r\nEND\r\n",
        id="vertical-tab-key",
    ),
]


@pytest.mark.parametrize(("stored", "attack", "attacker_gets"), ATTACKS)
@pytest.mark.parametrize("wrapper", SCANNERS)
def test_a_key_memcached_reads_otherwise_never_steers_a_reply_to_another_client(
    tmp_path: Path,
    start_memcached: Callable[..., Node],
    wrapper: tuple[str, ...],
    stored: bytes | None,
    attack: bytes,
    attacker_gets: bytes,
) -> None:
    """The issue's reproduction: V has stored a secret; C keeps the node busy with a 900 KB get; the attacker A sends
    its request while B asks for its own key, so that both wait for C's reply and go to the node together. B must
    get exactly its own reply, never V's secret, and A what it gets directly. On the old scanners B got V's
    secret every time."""
    node = start_memcached()
    mc_store(node.port, stored or b"victim-secret", b"hunter2-SECRET")
    mc_store(node.port, b"big", BIG_VALUE)
    mc_store(node.port, b"b-own", b"bbbbb")
    with connect(node.port) as direct:
        assert exchange(direct, Step(attack, b"END\r\n")) == attacker_gets
    big_reply = ENGINES["memcached"].busy_reply
    own = b"VALUE b-own 0 5\r\nbbbbb\r\nEND\r\n"
    with natfwd_in_front(tmp_path, node, "memcached", wrapper) as (port, _serve):
        for _attempt in range(3):
            with connect(port) as c, connect(port) as a, connect(port) as b:
                for sock in (c, a, b):  # each on the shared connection
                    assert exchange(sock, Step(b"version\r\n", b"\r\n")).startswith(b"VERSION ")
                c.sendall(b"get big\r\n")
                a.sendall(attack)
                b.sendall(b"get b-own\r\n")
                assert read_reply(b, b"END\r\n") == own
                assert read_reply(a, b"END\r\n") == attacker_gets
                assert read_reply(c, b"END\r\n") == big_reply
                # and the shared connection carries on in step for everyone
                assert exchange(b, Step(b"get b-own\r\n", b"END\r\n")) == own
                assert exchange(c, Step(b"get b-own\r\n", b"END\r\n")) == own


def test_binary_bytes_after_text_get_what_they_get_directly(
    tmp_path: Path, start_memcached: Callable[..., Node]
) -> None:
    node = start_memcached()
    noop = struct.pack(">BBHBBHIIQ", 0x80, 0x0A, 0, 0, 0, 0, 0, 0, 0)  # 0x0a is also a LF: a line of its own
    step = Step(noop + b"version\r\n", b"\r\n")
    with connect(node.port) as direct:
        assert exchange(direct, Step(b"version\r\n", b"\r\n")).startswith(b"VERSION ")
        expected = exchange(direct, step)
    assert expected.startswith(b"ERROR\r\n")  # memcached stays in text: the binary header is a line it cannot read
    with natfwd_in_front(tmp_path, node, "memcached", ()) as (port, _serve), connect(port) as through:
        assert exchange(through, Step(b"version\r\n", b"\r\n")).startswith(b"VERSION ")
        through.settimeout(1)
        try:
            got = exchange(through, step)
        except AssertionError:  # the binary answer never ends in a CRLF: what came is in the message
            got = b"<no text reply>"
    assert got == expected
