"""Tests of forwarder/protocols/framing.py's scanners: boundaries at every cut, pins, RESP3, memcached blocks, seeded
fuzz. Each runs against both implementations, the pure Python (the reference) and _cframing.c (`impl`)."""

from __future__ import annotations

import bisect
import itertools
import random
import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import pytest
from conftest import IN_CI

from forwarder.protocols import framing
from forwarder.protocols.framing import (
    HELLO3,
    KEY_MAX,
    MEMCACHED,
    MEMCACHED_LINE_MAX,
    MEMCACHED_PY,
    PIN,
    REDIS,
    REDIS_BULK_MAX,
    REDIS_MAX_ARGS,
    REDIS_PY,
    RESP2,
    RESP3,
    STAY,
    Framer,
    FramingError,
    Requests,
    framer,
)


class Impl(NamedTuple):
    """One implementation of the scanners, with framing.py's names, and the Framers made of it."""

    redis_requests: Callable[..., tuple[int, int, int]]
    redis_replies: Callable[[bytes | bytearray, int, int], tuple[int, int]]
    redis_push: Callable[[bytes | bytearray, int], int]
    memcached_requests: Callable[..., tuple[int, int, int]]
    memcached_replies: Callable[[bytes | bytearray, int, int], tuple[int, int]]
    redis: Framer
    memcached: Framer


def _impl(scanners: Any, redis: Framer, memcached: Framer) -> Impl:
    return Impl(*(getattr(scanners, name) for name in Impl._fields[:5]), redis, memcached)


PY = _impl(framing, REDIS_PY, MEMCACHED_PY)
C = None if framing.C is None else _impl(framing.C, REDIS, MEMCACHED)


def implementation(name: str) -> Impl:
    """ "python", or "c": skipped when the extension was not built, but a failure in CI, which must test it."""
    if name == "python":
        return PY
    if C is None:
        why = "forwarder.protocols._cframing is not built (no compiler at install) or NATFWD_NO_EXTENSIONS is set"
        if IN_CI:
            pytest.fail(f"{why}: CI must test the C scanners")
        pytest.skip(why)
    return C


@pytest.fixture(params=["python", "c"])
def impl(request: pytest.FixtureRequest) -> Impl:
    return implementation(request.param)


RequestScan = Callable[[bytes | bytearray], Requests]
ReplyScan = Callable[[bytes | bytearray, int, int], tuple[int, int]]
# Bytes that look like framing, for values that must be skipped by length and not read.
TRICKY = [
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"*1\r\n$3\r\nGET\r\n",
    b"$-1\r\n",
    b"VALUE k 0 1\r\nx\r\n",
    b"END\r\n",
    b"get a\r\n",
]


def bulk(kind: bytes, data: bytes) -> bytes:
    return kind + b"%d\r\n" % len(data) + data + b"\r\n"


def cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(bulk(b"$", arg) for arg in args)


def store(verb: bytes, key: bytes, data: bytes, extra: bytes = b"", eol: bytes = b"\r\n") -> bytes:
    return b"%s %s 0 0 %d%s%s%s\r\n" % (verb, key, len(data), extra, eol, data)


def value(key: bytes, data: bytes, cas: bytes = b"") -> bytes:
    return b"VALUE %s 3 %d%s\r\n%s\r\n" % (key, len(data), cas, data)


def assert_requests_at_every_cut(scan: RequestScan, parts: Sequence[bytes]) -> None:
    """Every prefix ends at the last whole request in it, counts the whole ones, and stays."""
    data = b"".join(parts)
    ends = list(itertools.accumulate((len(part) for part in parts), initial=0))
    for cut in range(len(data) + 1):
        whole = bisect.bisect_right(ends, cut) - 1
        buf = data[:cut] if cut % 2 else bytearray(data[:cut])
        assert scan(buf) == Requests(ends[whole], whole, STAY), (cut, data[:cut])


def assert_replies_at_every_cut(scan: ReplyScan, parts: Sequence[bytes], prefix: bytes = b"") -> None:
    """From `pos` = len(prefix): every prefix counts only whole replies, and `want` caps the count."""
    data = prefix + b"".join(parts)
    ends = list(itertools.accumulate((len(part) for part in parts), initial=len(prefix)))
    for cut in range(len(prefix), len(data) + 1):
        whole = bisect.bisect_right(ends, cut) - 1
        buf = data[:cut] if cut % 2 else bytearray(data[:cut])
        assert scan(buf, len(prefix), len(parts) + 3) == (ends[whole], whole), (cut, data[:cut])
    for want in range(len(parts) + 1):
        assert scan(data, len(prefix), want) == (ends[want], want)


REDIS_REQUESTS = [
    cmd(b"GET", b"a"),
    cmd(b"set", b"k", b"v" + b"".join(TRICKY)),
    cmd(b"GeT", b"SELECT"),
    cmd(b"PING"),
    cmd(b"MSET", b"a", b"", b"b", b"*2\r\n"),
    cmd(b"hset", b"h", b"f", b"x" * 300),
    cmd(b"ZRANGEBYSCORE", b"z", b"-inf", b"+inf"),
    cmd(b"client", b"SETINFO", b"lib-name", b"redis-py"),
    cmd(b"Hello", b"2"),  # the client's own lane: an ordinary request
]
REDIS_REPLIES = [
    *(line + b"\r\n" for line in [b"+OK", b"-ERR wrong number of arguments", b":-42", b"$-1", b"*-1", b"*0"]),
    *(line + b"\r\n" for line in [b"$0\r\n", b"%0", b"~2\r\n_\r\n#t", b"(-12345678901234567890"]),
    bulk(b"$", b"".join(TRICKY)),
    b"*3\r\n*2\r\n:1\r\n$1\r\na\r\n*0\r\n$-1\r\n",
    b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n" + bulk(b"$", b"\r\n"),
    b"*4\r\n,3.5\r\n(123456789012345678901\r\n" + bulk(b"=", b"txt:a\r\nb") + bulk(b"!", b"ERR x"),
    b"|1\r\n+ttl\r\n:3\r\n" + bulk(b"$", b"v"),  # attributes, then the value they describe
    b"*2\r\n|2\r\n+a\r\n*0\r\n+b\r\n_\r\n%1\r\n+k\r\n|0\r\n:1\r\n:2\r\n",
]
MEMCACHED_REQUESTS = [
    *(line + b"\r\n" for line in [b"get a", b"get a noreply", b"gat 10 a b", b"gats 0 a", b"delete k", b"incr k 5"]),
    *(line + eol for line in [b"gets a b c", b"decr k 1", b"touch k 100", b"version"] for eol in [b"\r\n", b"\n"]),
    store(b"set", b"k", b"".join(TRICKY)),
    store(b"add", b"k", b""),
    store(b"append", b"k", b"\n\n\n", eol=b"\n"),
    store(b"prepend", b"k" * KEY_MAX, b"\r\n"),
    store(b"cas", b"k", b"x", extra=b" 99"),
    store(b"replace", b"k", b"END"),
    b"get " + b"k" * KEY_MAX + b" b\r\n",
]
MC_LINES = [line + b"\r\n" for line in b"END STORED NOT_STORED EXISTS NOT_FOUND DELETED TOUCHED 42 ERROR".split()]
MC_LINES += [b"VERSION 1.6.21\r\n", b"CLIENT_ERROR bad command line format\r\n", b"SERVER_ERROR out of memory\r\n"]
MEMCACHED_REPLIES = [
    b"VALUE a 0 5\r\nhello\r\nEND\r\n",
    *MC_LINES,
    value(b"a", b"END\r\n", b" 99") + value(b"b", b"") + b"END\r\n",
    value(b"a", b"".join(TRICKY)) + value(b"b", b"VALUE ") + b"END\r\n",
]


@pytest.mark.parametrize(
    ("scan", "parts"),
    [("redis_requests", REDIS_REQUESTS), ("memcached_requests", MEMCACHED_REQUESTS)],
    ids=["redis", "mc"],
)
def test_requests_at_every_cut(impl: Impl, scan: str, parts: list[bytes]) -> None:
    assert_requests_at_every_cut(getattr(impl, scan), parts)


@pytest.mark.parametrize(
    ("scan", "parts"), [("redis_replies", REDIS_REPLIES), ("memcached_replies", MEMCACHED_REPLIES)], ids=["redis", "mc"]
)
@pytest.mark.parametrize("prefix", [b"", b"+OK\r\nVALUE junk"])
def test_replies_at_every_cut(impl: Impl, scan: str, parts: list[bytes], prefix: bytes) -> None:
    assert_replies_at_every_cut(getattr(impl, scan), parts, prefix)


REDIS_PINS = [
    *(cmd(*args) for args in [[b"SELECT", b"1"], [b"select", b"1"], [b"AUTH", b"pw"], [b"MULTI"], [b"EXEC"]]),
    *(cmd(*args) for args in [[b"WATCH", b"k"], [b"SuBsCrIbE", b"ch"], [b"BLPOP", b"l", b"0"], [b"MONITOR"], [b""]]),
    *(cmd(*args) for args in [[b"CLIENT", b"TRACKING", b"on"], [b"client", b"SETNAME", b"x"], [b"CLIENT"]]),
    *(cmd(*args) for args in [[b"HELLO"], [b"HELLO", b"4"], [b"HELLO", b"3", b"AUTH", b"u", b"p"], [b"EVAL", b"1"]]),
    cmd(b"DEL", *[b"k"] * REDIS_MAX_ARGS),  # too many arguments
    b"PING\r\n",  # inline
    b"\r\n",
    *(b"*%s\r\n$4\r\nPING\r\n" % digits for digits in [b"-1", b"0", b"1_0", b" 1", b"+1", b"x", b""]),
    *(b"*1\r\n%s\r\nPING\r\n" % header for header in [b"$1_0", b"$-1", b"$ 4", b"$+4", b"$", b"+4", b":4"]),
    b"*1\r\n$4\r\nPINGxx",  # the bulk is not followed by CRLF
    b"*2\r\n$3\r\nGET\r\n$1\r\nab\r\n",
    b"*%d\r\n" % (REDIS_MAX_ARGS + 1),  # pins before the arguments arrive
    b"*1\r\n$40\r\n" + b"A" * 32,  # no command name is this long: pins before the name is complete
]


@pytest.mark.parametrize("pin", REDIS_PINS)
def test_redis_pins_at_the_request_that_cannot_share(impl: Impl, pin: bytes) -> None:
    first, last = cmd(b"GET", b"a"), cmd(b"GET", b"b")
    assert impl.redis_requests(pin) == Requests(0, 0, PIN)
    assert impl.redis_requests(first + pin + last) == Requests(len(first), 1, PIN)
    assert impl.redis_requests(bytearray(first + first + pin)) == Requests(2 * len(first), 2, PIN)


@pytest.mark.parametrize(("lane", "other"), [(RESP2, RESP3), (RESP3, RESP2)])
def test_redis_hello_moves_a_client_to_the_other_lane(impl: Impl, lane: int, other: int) -> None:
    get, stay, move = cmd(b"GET", b"a"), cmd(b"HELLO", b"%d" % lane), cmd(b"hello", b"%d" % other)
    assert impl.redis_requests(move, lane) == Requests(0, 0, other)
    assert impl.redis_requests(get + stay + move + get, lane) == Requests(len(get + stay), 2, other)
    assert impl.redis_requests(get + move[:-1], lane) == Requests(len(get), 1, STAY)  # not whole yet
    assert impl.redis_requests(move + get, other) == Requests(len(move + get), 2, STAY)


def test_redis_limits_are_inclusive(impl: Impl) -> None:
    most = cmd(b"DEL", *[b"k"] * (REDIS_MAX_ARGS - 1))
    assert impl.redis_requests(most) == Requests(len(most), 1, STAY)
    assert impl.redis_requests(b"*1\r\n$40\r\n" + b"A" * 31) == Requests(0, 0, STAY)  # may still be a name: wait
    assert impl.redis_requests(cmd(b"GET", b"a") + b"*1\r\n") == Requests(len(cmd(b"GET", b"a")), 1, STAY)


MEMCACHED_PINS = [
    store(b"set", b"k", b"x", extra=b" noreply"),
    store(b"cas", b"k", b"x", extra=b" 1 noreply"),
    *(line + b" noreply\r\n" for line in [b"delete k", b"incr k 1", b"decr k 1", b"touch k 1"]),
    *(b"%s\r\n" % line for line in [b"stats", b"flush_all", b"mg k v", b"ms k 1", b"GET a", b"quit", b"verbosity 1"]),
    *(
        b"%s\r\n" % line
        for line in [b"get", b"gat 10", b"gat x a", b"gat -1 a", b"delete", b"delete k 0", b"version 1"]
    ),
    *(b"%s\r\n" % line for line in [b"incr k x", b"incr k", b"touch k", b"set k 0 0", b"set k x 0 1", b"set k 0 0 -1"]),
    *(b"%s %s\r\n" % (verb, b"k" * (KEY_MAX + 1)) for verb in [b"get", b"gets a", b"gat 1", b"delete"]),
    store(b"set", b"k" * (KEY_MAX + 1), b"x"),
    b"incr %s 1\r\n" % (b"k" * (KEY_MAX + 1)),
    b"set k 0 0 1\r\nxy\r\n",  # bad data block terminator
    b"set k 0 0 1\r\nx\n\n",
    *(b"%s\r\n" % line for line in [b"get  a", b"get a ", b" get a", b"get\ta", b"get a\rb", b"", b"\r"]),
    b"\n",
    b"get " + b"k" * (MEMCACHED_LINE_MAX - 3),  # too long, and no newline yet
]


@pytest.mark.parametrize("pin", MEMCACHED_PINS)
def test_memcached_pins_at_the_request_that_cannot_share(impl: Impl, pin: bytes) -> None:
    first, last = b"get a\r\n", store(b"set", b"b", b"1")
    assert impl.memcached_requests(pin) == Requests(0, 0, PIN)
    assert impl.memcached_requests(first + pin + last) == Requests(len(first), 1, PIN)
    assert impl.memcached_requests(bytearray(first + first + pin)) == Requests(2 * len(first), 2, PIN)


def test_memcached_line_limit_is_inclusive(impl: Impl) -> None:
    assert impl.memcached_requests(b"get " + b"k" * (MEMCACHED_LINE_MAX - 4)) == Requests(0, 0, STAY)
    long_get = b"get" + b" k" * MEMCACHED_LINE_MAX + b"\r\n"  # a whole line that long pins too: always safe
    assert impl.memcached_requests(long_get) == Requests(0, 0, PIN)
    fits = b"get" + b" k" * (MEMCACHED_LINE_MAX // 2 - 2) + b"\r\n"
    assert impl.memcached_requests(fits) == Requests(len(fits), 1, STAY)
    big = store(b"set", b"k", b"x" * (3 * MEMCACHED_LINE_MAX))  # so may a data block, even cut off
    assert impl.memcached_requests(big[:-10]) == Requests(0, 0, STAY)


@pytest.mark.parametrize(
    "buf",
    [b"?\r\n", b"hello\r\n", b"\r\n", b"$x\r\n", b"$\r\n", b"*x\r\n", b"%-\r\n", b"~1.5\r\n", b"*2\r\n:1\r\n&\r\n"],
)
def test_redis_malformed_reply_raises(impl: Impl, buf: bytes) -> None:
    with pytest.raises(FramingError):
        impl.redis_replies(buf, 0, 5)
    with pytest.raises(FramingError):
        impl.redis_replies(b"+OK\r\n" + buf, 5, 5)


@pytest.mark.parametrize(
    "line", [b"VALUE k 0", b"VALUE k 0 x", b"VALUE k 0 -1", b"VALUE k 0 1 2 3", b"VALUE ", b"VALUE k 0 1.5"]
)
def test_memcached_malformed_value_line_raises(impl: Impl, line: bytes) -> None:
    with pytest.raises(FramingError):
        impl.memcached_replies(line + b"\r\nx\r\nEND\r\n", 0, 1)
    with pytest.raises(FramingError):
        impl.memcached_replies(b"STORED\r\n" + line + b"\r\n", 0, 2)


def test_framer_by_engine() -> None:
    scanners = framing if framing.C is None else framing.C  # the C ones whenever they were built
    assert framer("redis") is REDIS and REDIS.requests is scanners.redis_requests
    assert REDIS.replies is scanners.redis_replies and REDIS.push is scanners.redis_push
    assert framer("memcached") is MEMCACHED and MEMCACHED.requests is scanners.memcached_requests
    assert REDIS_PY.requests is framing.redis_requests and MEMCACHED_PY.replies is framing.memcached_replies
    assert REDIS.first_lane == MEMCACHED.first_lane == RESP2 and cmd(b"HELLO", b"3") == HELLO3
    assert (REDIS.greeting(RESP2), REDIS.greeting(RESP3), MEMCACHED.greeting(RESP2)) == (b"", HELLO3, b"")
    hello_reply = b"%1\r\n+server\r\n+redis\r\n"  # RESP3 answers the greeting with a map
    assert REDIS.replies(hello_reply + b"+OK\r\n", 0, 1) == (len(hello_reply), 1)
    with pytest.raises(ValueError, match="redis-cluster"):
        framer("redis-cluster")


def blob(rng: random.Random) -> bytes:
    pieces = [*TRICKY, bytes(rng.randrange(256) for _ in range(rng.randrange(6)))]
    return b"".join(rng.choice(pieces) for _ in range(rng.randrange(4)))


def mc_key(rng: random.Random) -> bytes:
    return bytes(rng.randrange(33, 127) for _ in range(rng.choice([1, 2, 8, KEY_MAX])))


def random_redis_request(rng: random.Random) -> bytes:
    name = rng.choice([b"GET", b"SET", b"MGET", b"HGETALL", b"LPUSH", b"ZADD", b"PING", b"EXPIRE", b"DEL"])
    name = b"".join(rng.choice([name[i : i + 1], name[i : i + 1].lower()]) for i in range(len(name)))
    return cmd(name, *(blob(rng) for _ in range(rng.randrange(4))))


def random_redis_reply(rng: random.Random, depth: int = 0) -> bytes:
    kind = rng.randrange(11 if depth < 3 else 6)
    if kind < 2:
        return rng.choice([b"+OK\r\n", b"-ERR x\r\n", b":-7\r\n", b"_\r\n", b"#f\r\n", b",1e3\r\n", b"(1\r\n"])
    if kind < 4:
        return bulk(rng.choice([b"$", b"=", b"!"]), blob(rng))
    if kind < 6:
        return rng.choice([b"$-1\r\n", b"*-1\r\n", b"*0\r\n", b"%0\r\n"])
    size = rng.randrange(4)
    if kind == 10:  # attributes, then the value they describe
        pairs = b"".join(random_redis_reply(rng, depth + 1) for _ in range(2 * size))
        return b"|%d\r\n%s%s" % (size, pairs, random_redis_reply(rng, depth + 1))
    children = b"".join(random_redis_reply(rng, depth + 1) for _ in range(size * (2 if kind >= 8 else 1)))
    return b"%s%d\r\n%s" % (rng.choice([b"%"] if kind >= 8 else [b"*", b"~"]), size, children)


def random_mc_request(rng: random.Random) -> bytes:
    eol, kind = rng.choice([b"\r\n", b"\n"]), rng.randrange(6)
    keys = b"".join(b" " + mc_key(rng) for _ in range(rng.randrange(1, 4)))
    if kind == 0:
        return rng.choice([b"get", b"gets"]) + keys + eol
    if kind == 1:
        return b"%s %d%s%s" % (rng.choice([b"gat", b"gats"]), rng.randrange(1000), keys, eol)
    if kind == 2:
        verb = rng.choice([b"set", b"add", b"replace", b"append", b"prepend", b"cas"])
        return store(verb, mc_key(rng), blob(rng), b" 7" if verb == b"cas" else b"", eol)
    if kind == 3:
        return b"delete " + mc_key(rng) + eol
    if kind == 4:
        return b"%s %s %d%s" % (rng.choice([b"incr", b"decr", b"touch"]), mc_key(rng), rng.randrange(99), eol)
    return b"version" + eol


def random_mc_reply(rng: random.Random) -> bytes:
    if rng.randrange(2):
        return rng.choice(MC_LINES)
    blocks = (value(mc_key(rng), blob(rng), rng.choice([b"", b" 9"])) for _ in range(rng.randrange(3)))
    return b"".join(blocks) + b"END\r\n"


@pytest.mark.parametrize("seed", range(12))
def test_fuzz_random_sequences(impl: Impl, seed: int) -> None:
    rng = random.Random(seed)
    cases: list[tuple[RequestScan, Callable[[random.Random], bytes], bytes]] = [
        (impl.redis_requests, random_redis_request, cmd(b"SELECT", b"1")),
        (impl.memcached_requests, random_mc_request, b"stats\r\n"),
    ]
    for scan, make, pin in cases:
        parts = [make(rng) for _ in range(rng.randrange(1, 8))]
        assert_requests_at_every_cut(scan, parts)
        at = rng.randrange(len(parts) + 1)
        assert scan(b"".join(parts[:at] + [pin] + parts[at:])) == Requests(len(b"".join(parts[:at])), at, PIN)
    prefix = blob(rng)
    assert_replies_at_every_cut(
        impl.redis_replies, [random_redis_reply(rng) for _ in range(rng.randrange(1, 8))], prefix
    )
    assert_replies_at_every_cut(
        impl.memcached_replies, [random_mc_reply(rng) for _ in range(rng.randrange(1, 6))], prefix
    )


# Bugs these tests found, each checked against redis-server 7.0.15 and memcached 1.6.18, and fixed.


@pytest.mark.parametrize("buf", [b"*1\r\n$04\r\nPING\r\n", b"*01\r\n$4\r\nPING\r\n"])
def test_redis_leading_zero_lengths_pin(impl: Impl, buf: bytes) -> None:
    assert impl.redis_requests(buf) == Requests(0, 0, PIN)


@pytest.mark.parametrize(
    "line", [b"set k 18446744073709551616 0 1", b"set k 0 9223372036854775808 1", b"cas k 0 0 1 18446744073709551616"]
)
def test_memcached_overflowing_storage_numbers_pin(impl: Impl, line: bytes) -> None:
    assert impl.memcached_requests(line + b"\r\nx\r\n") == Requests(0, 0, PIN)


def test_memcached_long_gat_line_pins(impl: Impl) -> None:
    assert impl.memcached_requests(b"gat 0" + b" k" * 1100 + b"\r\n")[2] == PIN


# The sharing rule (issue 19): a request shares only when the node is sure to read it exactly as natfwd does. Each of
# these was checked against memcached 1.6.18 (proto_text.c) or redis-server 7.0.15 (networking.c).
CONTROL_BYTES = [bytes([byte]) for byte in [*range(0x20), 0x7F]]


@pytest.mark.parametrize("byte", CONTROL_BYTES, ids=[f"0x{ord(b):02x}" for b in CONTROL_BYTES])
@pytest.mark.parametrize(
    "template",
    [b"set k%s 0 0 17\r\nget victim-secret\r\n", b"get a k%s\r\n", b"gets k%sk\r\n", b"delete k%s\r\n"]
    + [b"incr k%s 1\r\n", b"touch %sk 1\r\n", b"gat 1%s k\r\n", b"set k 0 0 1%s\r\nx\r\n", b"version%s\r\n"],
)
def test_memcached_a_control_byte_anywhere_in_a_line_pins(impl: Impl, template: bytes, byte: bytes) -> None:
    """memcached reads a line up to a NUL, so `set k\\0 0 0 17` is `set k` (ERROR) and its data block a command of its
    own: two replies where natfwd counted one, and every later reply on the shared connection goes to the wrong
    client. Other control bytes stay in memcached's tokens, where a key echoed in a VALUE line would split in two
    when read back. Any of them pins, LF aside (it ends the line, and what is left is a line of its own)."""
    buf = template % byte
    if byte == b"\n":
        assert impl.memcached_requests(buf)[2] == PIN  # whatever the line ends up as, it is not a whole request
        return
    assert impl.memcached_requests(buf) == Requests(0, 0, PIN)
    assert impl.memcached_requests(b"get a\r\n" + buf) == Requests(7, 1, PIN)


@pytest.mark.parametrize("byte", [b"\x00", b"\x0b", b"\t", b"\x7f"])
def test_memcached_a_control_byte_pins_before_the_line_is_whole(impl: Impl, byte: bytes) -> None:
    """And at once: memcached's binary protocol has NULs in every request header and maybe no LF at all, so waiting
    for the line to end would hold a binary client's request forever."""
    assert impl.memcached_requests(b"get k" + byte) == Requests(0, 0, PIN)
    assert impl.memcached_requests(b"get a\r\nset k" + byte + b"x 0") == Requests(7, 1, PIN)
    get = struct.pack(">BBHBBHIIQ", 0x80, 0x00, 1, 0, 0, 0, 1, 0, 0) + b"k"  # a binary GET: no LF in it
    assert impl.memcached_requests(get) == Requests(0, 0, PIN)
    assert impl.memcached_requests(get[:3]) == Requests(0, 0, PIN)
    assert impl.memcached_requests(b"get a\r") == Requests(0, 0, STAY)  # a CR may yet be the end of the line


@pytest.mark.parametrize(
    "line",
    [
        *(b"set k %s 0 1" % number for number in [b"01", b"+1", b"-1", b"00", b" 1", b"1.5", b"0x1", b"4294967296"]),
        *(b"set k 0 %s 1" % number for number in [b"01", b"+1", b"-1", b"-0", b"2147483648", b"9" * 30]),
        *(b"set k 0 0 %s" % number for number in [b"01", b"+1", b"001", b"2147483646"]),
        *(b"cas k 0 0 1 %s" % number for number in [b"01", b"+1", b"-1", b"18446744073709551616"]),
    ],
)
def test_memcached_numbers_not_in_plain_decimal_or_out_of_range_pin(impl: Impl, line: bytes) -> None:
    """memcached's safe_strtoul/strtol take a sign, leading zeros and values that wrap: natfwd reads only plain
    decimal within the range memcached keeps, and pins the rest rather than second-guess the node."""
    assert impl.memcached_requests(line + b"\r\nx\r\n") == Requests(0, 0, PIN)


@pytest.mark.parametrize(
    "line",
    [b"gat 01 k", b"gat +1 k", b"gats -1 k", b"gat 2147483648 k", b"touch k 01", b"touch k +5", b"touch k 2147483648"]
    + [b"incr k 01", b"incr k +1", b"decr k -1", b"incr k 18446744073709551616", b"decr k 00"],
)
def test_memcached_odd_numbers_pin_in_every_command(impl: Impl, line: bytes) -> None:
    assert impl.memcached_requests(line + b"\r\n") == Requests(0, 0, PIN)


def test_memcached_the_limits_themselves_share(impl: Impl) -> None:
    shared = [
        store(b"set", b"k" * KEY_MAX, b"x"),
        b"set k 4294967295 2147483647 1\r\nx\r\n",
        b"cas k 0 0 1 18446744073709551615\r\nx\r\n",
        b"gat 2147483647 k\r\n",
        b"gats 0 k\r\n",
        b"touch k 2147483647\r\n",
        b"incr k 18446744073709551615\r\n",
        b"decr k 0\r\n",
        b"get \xc3\xa9 \x80\xff k\r\n",  # bytes past ASCII are no control characters: memcached keeps them
        store(b"set", b"\xff", b"\x00\r\n\x7f"),  # and data blocks may hold anything
    ]
    buf = b"".join(shared)
    assert impl.memcached_requests(buf) == Requests(len(buf), len(shared), STAY)


@pytest.mark.parametrize(
    ("buf", "expected"),
    [
        (b"*1\r\n$%d\r\n" % (REDIS_BULK_MAX + 1), PIN),  # Redis refuses it and closes: pins before the data
        (b"*2\r\n$3\r\nGET\r\n$%d\r\n" % (REDIS_BULK_MAX + 1), PIN),
        (b"*2\r\n$3\r\nGET\r\n$" + b"9" * 8 + b"\r\n", PIN),
        (b"*2\r\n$3\r\nGET\r\n$%d\r\n" % REDIS_BULK_MAX, STAY),  # within the limit: waits for the data
        (b"*2\r\n$3\r\nGET\r\n$" + b"9" * 30 + b"\r\n", PIN),
    ],
)
def test_redis_an_argument_longer_than_redis_takes_pins(impl: Impl, buf: bytes, expected: int) -> None:
    assert impl.redis_requests(buf) == Requests(0, 0, expected)


@pytest.mark.parametrize(
    "buf",
    [
        b"GET k\r\n",  # inline
        b"*1\r\n$4\r\nPI\x00G\r\n",  # Redis compares names with strcasecmp(), which stops at a NUL
        b"*2\r\n$4\r\nGET\x00\r\n$1\r\nk\r\n",
        b"*2\r\n$3\r\nG\xc9T\r\n$1\r\nk\r\n",
        b"*+1\r\n$4\r\nPING\r\n",
        b"*1\r\n$+4\r\nPING\r\n",
        b"*1\n$4\r\nPING\r\n",  # Redis looks for CR and takes the byte after it as LF
        b"*1\r\n$4\nPING\r\n",
        b"*1\r\n$4\r\nPING\n\n",  # ...and skips the two bytes after an argument unread
    ],
)
def test_redis_what_redis_reads_otherwise_pins(impl: Impl, buf: bytes) -> None:
    assert impl.redis_requests(buf)[2] == PIN
    assert impl.redis_requests(cmd(b"GET", b"a") + buf)[:2] == (len(cmd(b"GET", b"a")), 1)


# --- a reply after a value block ---------------------------------------------------------------------------------
def test_what_follows_a_value_block_counts_as_one_reply_when_it_ends(impl: Impl) -> None:
    assert impl.memcached_replies(b"END\r\n", 0, 1) == (5, 1)
    more = b"VALUE j 0 1\r\nz\r\nEND\r\n"
    assert impl.memcached_replies(more, 0, 1) == (len(more), 1)


def test_pushes_are_not_replies(impl: Impl) -> None:
    push = b">2\r\n$7\r\nmessage\r\n$2\r\nhi\r\n"
    assert impl.redis_replies(push + b"+OK\r\n", 0, 1) == (0, 0)
    assert impl.redis_push(push + b"+OK\r\n", 0) == len(push)
    assert impl.redis_push(push[:-1], 0) == -1
    assert impl.redis_push(b"+OK\r\n", 0) == 0
