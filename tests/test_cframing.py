"""Differential fuzz of forwarder/protocols/_cframing.c against framing.py's pure-Python scanners, the reference:
seeded valid RESP and memcached traffic, then mutated (flipped bytes, cuts, stray CR/LF/space/tab/NUL, odd and huge
numbers), must give the same results from both, or FramingError from both. And the module's plumbing: constants,
argument checks, the framers that use it, NATFWD_NO_EXTENSIONS."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_framing import PY, TRICKY, Impl, bulk, cmd, implementation, store, value

from forwarder.protocols import framing
from forwarder.protocols.framing import (
    KEY_MAX,
    REDIS_BULK_MAX,
    REDIS_COMMANDS,
    REDIS_MAX_ARGS,
    RESP2,
    FramingError,
)

SAMPLES = 2500  # per test; each sample is checked at several positions, both buffer types and (requests) both lanes
BIG = 64 * 1024  # a big value's length: replies with one are cut before its data is all in


@pytest.fixture
def c() -> Impl:
    return implementation("c")


def outcome(scan: Callable[..., Any], *args: Any) -> Any:
    try:
        return scan(*args)
    except FramingError:
        return FramingError  # the type only: the messages may differ


class Compare:
    """Runs each scanner of both implementations on the same arguments and counts the cases."""

    def __init__(self, c: Impl) -> None:
        self.c, self.cases = c, 0

    def __call__(self, name: str, *args: Any) -> None:
        expected = outcome(getattr(PY, name), *args)
        assert outcome(getattr(self.c, name), *args) == expected, (name, args)
        self.cases += 1

    def requests(self, name: str, buf: bytes) -> None:
        for data in (buf, bytearray(buf)):
            for lane in (2, 3):
                self(name, data, lane)
        self(name, buf)  # the default lane

    def replies(self, names: tuple[str, ...], buf: bytes, rng: random.Random, positions: int = 3) -> None:
        spots = {0, *(rng.randrange(len(buf) + 3) for _ in range(positions))}
        for pos in spots:
            data = buf if rng.randrange(2) else bytearray(buf)
            for name in names:
                if name.endswith("_replies"):
                    self(name, data, pos, rng.randrange(6))
                else:
                    self(name, data, pos)


# --- valid traffic ----------------------------------------------------------------------------------------------------
def huge(rng: random.Random) -> bytes:
    return b"%d" % rng.randrange(10**18, 10**25)


def blob(rng: random.Random) -> bytes:
    pieces = [*TRICKY, b">1\r\n", b"%1\r\n", bytes(rng.randrange(256) for _ in range(rng.randrange(8)))]
    return b"".join(rng.choice(pieces) for _ in range(rng.randrange(4)))


def mixed_case(rng: random.Random, word: bytes) -> bytes:
    return bytes(ch ^ 32 if 97 <= ch | 32 <= 122 and rng.randrange(3) == 0 else ch for ch in word)


COMMANDS = sorted(REDIS_COMMANDS)
ODD_NAMES = [b"SELECT", b"AUTH", b"MULTI", b"BLPOP", b"EVAL", b"", b"G\x00ET", b"GET ", b"A" * 31, b"A" * 33]


def redis_request(rng: random.Random) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return cmd(mixed_case(rng, b"HELLO"), *rng.choice([[b"2"], [b"3"], [b"4"], [], [b"3", b"AUTH", b"u", b"p"]]))
    if kind == 1:
        sub = rng.choice([b"SETINFO", b"MAINT_NOTIFICATIONS", b"SETNAME", b"TRACKING", b"setinfo"])
        return cmd(mixed_case(rng, b"CLIENT"), *[sub, b"lib-name", b"x"][: rng.randrange(4)])
    if kind == 2:
        return cmd(rng.choice(ODD_NAMES), blob(rng))
    if kind == 3:
        return rng.choice([b"PING\r\n", b"*1\r\n$4\r\nPING\r\n", b"*%d\r\n" % rng.randrange(REDIS_MAX_ARGS + 3)])
    name = mixed_case(rng, rng.choice(COMMANDS))
    return cmd(name, *(blob(rng) for _ in range(rng.randrange(5))))


def redis_reply(rng: random.Random, depth: int = 0) -> bytes:
    kind = rng.randrange(14 if depth < 4 else 5)
    if kind == 0:
        simple = [b"+OK", b"-ERR x", b":-7", b":" + huge(rng), b"_", b"#t", b",1e3", b",-inf", b"(" + huge(rng)]
        return rng.choice(simple) + b"\r\n"
    if kind <= 2:
        return bulk(rng.choice([b"$", b"=", b"!"]), blob(rng))
    if kind == 3:
        return rng.choice([b"$-1\r\n", b"*-1\r\n", b"%-1\r\n", b"!-1\r\n", b"*0\r\n", b"%0\r\n", b"~0\r\n", b">0\r\n"])
    if kind == 4:
        return b"$%d\r\n" % rng.choice([BIG - 1, BIG, BIG + 1, 10**6])  # a big bulk's header
    size = rng.randrange(4)
    if kind <= 8:
        kids = b"".join(redis_reply(rng, depth + 1) for _ in range(size))
        return b"%s%d\r\n%s" % (rng.choice([b"*", b"~", b">"]), size, kids)
    if kind <= 11:
        kids = b"".join(redis_reply(rng, depth + 1) for _ in range(2 * size))
        return b"%%%d\r\n%s" % (size, kids)
    pairs = b"".join(redis_reply(rng, depth + 1) for _ in range(2 * size))  # attributes, then what they describe
    return b"|%d\r\n%s%s" % (size, pairs, redis_reply(rng, depth + 1))


MC_ODD_KEY_BYTES = [bytes([byte]) for byte in [*range(0x20), 0x7F, 0x80, 0xFF]]


def mc_key(rng: random.Random) -> bytes:
    key = bytes(rng.randrange(33, 127) for _ in range(rng.choice([1, 3, KEY_MAX - 1, KEY_MAX, KEY_MAX + 1])))
    if rng.randrange(6) == 0:  # a control byte (NUL included) or a byte past ASCII inside it
        at = rng.randrange(len(key) + 1)
        key = key[:at] + rng.choice(MC_ODD_KEY_BYTES) + key[at:]
    return key


def mc_number(rng: random.Random) -> bytes:
    plain = [b"0", b"7", b"%d" % rng.randrange(2**33), b"%d" % (2**32 - 1), b"%d" % 2**32, huge(rng)]
    odd = [b"07", b"00", b"+7", b"-7", b"-0", b"%d" % (2**31 - 1), b"%d" % 2**31, b"%d" % (2**64 - 1), b"%d" % 2**64]
    return rng.choice(plain if rng.randrange(3) else odd)


def mc_request(rng: random.Random) -> bytes:
    eol, kind = rng.choice([b"\r\n", b"\r\n", b"\n"]), rng.randrange(8)
    keys = b"".join(b" " + mc_key(rng) for _ in range(rng.choice([0, 1, 1, 2, 5])))
    noreply = b" noreply" if rng.randrange(8) == 0 else b""
    if kind == 0:
        return rng.choice([b"get", b"gets"]) + keys + eol
    if kind == 1:
        return rng.choice([b"gat", b"gats"]) + b" " + mc_number(rng) + keys + eol
    if kind <= 3:
        verb = rng.choice([b"set", b"add", b"replace", b"append", b"prepend", b"cas"])
        extra = b" " + mc_number(rng) if verb == b"cas" else b""
        if rng.randrange(4):
            return store(verb, mc_key(rng), blob(rng), extra + noreply, eol)
        numbers = b" ".join(mc_number(rng) for _ in range(3))
        return b"%s %s %s%s%s%sx\r\n" % (verb, mc_key(rng), numbers, extra, noreply, eol)
    if kind == 4:
        return b"delete" + keys[: rng.choice([0, len(keys)])] + noreply + eol
    if kind == 5:
        verb = rng.choice([b"incr", b"decr", b"touch"])
        return b"%s %s %s%s%s" % (verb, mc_key(rng), mc_number(rng), noreply, eol)
    if kind == 6:
        return rng.choice([b"version", b"stats", b"flush_all", b"mg k v", b"GET a", b"quit", b""]) + eol
    return b"get" + b" k" * rng.choice([1020, 1100, 4094, 4095, 4097]) + eol  # around the line limits


MC_LINES = [b"END", b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND", b"DELETED", b"TOUCHED", b"42", b"ERROR"]
MC_LINES += [b"VERSION 1.6.21", b"CLIENT_ERROR bad command line format", b"SERVER_ERROR out of memory", b""]


def mc_reply(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice(MC_LINES) + rng.choice([b"\r\n", b"\n"])
    if kind == 1:  # a big block's line, its data not in yet
        sep = rng.choice([b" ", b"  ", b"\t", b" \x0b"])
        size = rng.choice([BIG - 1, BIG, 10**7, 10**20])
        return b"VALUE%sk%s0%s%d%s\r\n" % (sep, sep, sep, size, rng.choice([b"", b" 5", b" 5 6"]))
    blocks = (value(mc_key(rng), blob(rng), rng.choice([b"", b" 9", b" " + huge(rng)])) for _ in range(kind))
    return b"".join(blocks) + b"END\r\n"


def sequence(rng: random.Random, make: Callable[[random.Random], bytes]) -> bytes:
    return b"".join(make(rng) for _ in range(rng.choice([1, 1, 2, 3, 5])))


# --- mutations --------------------------------------------------------------------------------------------------------
STRAYS = [b"\r", b"\n", b"\r\n", b" ", b"  ", b"\t", b"\x00", b"\x0b", b"\x0c", b"\xff", b"_", b"-", b"+", b"0"]
STRAYS += [b"\x01", b"\x1f", b"\x7f", b"\x80"]
NUMBERS = [b"+5", b"-5", b" 5", b"5 ", b"\t5", b"5\x0c", b"1_0", b"1__0", b"_1", b"1_", b"05", b"00", b"0", b"-0"]
NUMBERS += [b"-1", b"-2", b"", b"+", b"-", b"_", b" ", b"1.5", b"1e3", b"\xd9\xa3", b"\x00", b"+-1", b" -1_0 "]
NUMBERS += [b"%d" % (BIG - 1), b"%d" % BIG, b"%d" % (2**31 - 3), b"%d" % (2**31 - 2), b"%d" % 2**64]
NUMBERS += [b"%d" % (REDIS_BULK_MAX - 1), b"%d" % REDIS_BULK_MAX, b"%d" % (REDIS_BULK_MAX + 1), b"%d" % (2**64 - 1)]
NUMBER = re.compile(rb"-?[0-9]+")
RESP_TYPES = [bytes([kind]) for kind in b"*$%|~>!=:+-_#,(?"]


def odd_number(rng: random.Random) -> bytes:
    if rng.randrange(3) == 0:
        number = huge(rng)
        return rng.choice([number, b"-" + number, b"+" + number, number[:3] + b"_" + number[3:]])
    return rng.choice(NUMBERS)


def mutate(rng: random.Random, buf: bytes, other: bytes) -> bytes:
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        at = rng.randrange(len(buf) + 1)
        kind = rng.randrange(7)
        if kind == 0 and buf:  # flip a byte
            at = min(at, len(buf) - 1)
            buf = buf[:at] + bytes([rng.randrange(256)]) + buf[at + 1 :]
        elif kind == 1:
            buf = buf[:at]
        elif kind == 2:
            buf = buf[:at] + rng.choice(STRAYS) + buf[at:]
        elif kind == 3:
            buf = buf[:at] + buf[at + rng.randrange(1, 4) :]
        elif kind == 4:  # another number where one was
            numbers = list(NUMBER.finditer(buf))
            if numbers:
                match = rng.choice(numbers)
                buf = buf[: match.start()] + odd_number(rng) + buf[match.end() :]
        elif kind == 5:
            buf = buf[:at] + other[rng.randrange(len(other) + 1) :]
        else:  # a RESP type byte and a length
            buf = buf[:at] + rng.choice(RESP_TYPES) + odd_number(rng) + buf[at:]
    return buf


def samples(seed: int, make: Callable[[random.Random], bytes]) -> tuple[random.Random, list[bytes]]:
    """Valid sequences and mutations of them, a third each unchanged."""
    rng = random.Random(seed)
    out = []
    for _ in range(SAMPLES):
        buf = sequence(rng, make)
        out.append(buf if rng.randrange(3) == 0 else mutate(rng, buf, sequence(rng, make)))
    return rng, out


# --- C and Python agree -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seed", "name", "make"),
    [(1, "redis_requests", redis_request), (2, "memcached_requests", mc_request)],
    ids=["redis", "mc"],
)
def test_requests_agree(c: Impl, seed: int, name: str, make: Callable[[random.Random], bytes]) -> None:
    compare = Compare(c)
    rng, bufs = samples(seed, make)
    for index, buf in enumerate(bufs):
        compare.requests(name, buf)
        if index % 100 == 0:  # and at every cut
            for cut in range(len(buf) if len(buf) < 600 else 0):
                compare(name, buf[:cut], rng.choice([2, 3]))
    assert compare.cases > 5 * SAMPLES


def test_every_command_name_and_its_near_misses_agree(c: Impl) -> None:
    """The C scanner looks names up in a hash set: each known name (any case) is found, and a name one letter off,
    one letter longer or shorter, is not, exactly as framing.py decides."""
    compare = Compare(c)
    for name in COMMANDS:
        near = {name.lower(), name[:-1], name + b"X", name[1:], b"Q" + name[1:], name[:-1] + b"Q"}
        for word in (name, *near):
            compare.requests("redis_requests", cmd(word, b"k") * 3)
    assert compare.cases >= 5 * 6 * len(COMMANDS)


@pytest.mark.parametrize(
    ("seed", "names", "make"),
    [
        (3, ("redis_replies", "redis_push"), redis_reply),
        (4, ("memcached_replies",), mc_reply),
    ],
    ids=["redis", "mc"],
)
def test_replies_agree(c: Impl, seed: int, names: tuple[str, ...], make: Callable[[random.Random], bytes]) -> None:
    compare = Compare(c)
    rng, bufs = samples(seed, make)
    for index, buf in enumerate(bufs):
        compare.replies(names, buf, rng)
        if index % 100 == 0:  # and at every cut
            for cut in range(len(buf) if len(buf) < 600 else 0):
                compare.replies(names, buf[:cut], rng, positions=1)
    assert compare.cases > 5 * SAMPLES


@pytest.mark.parametrize(
    "buf",
    [
        b"$%d\r\n" % BIG,  # a big bulk's header
        b"$" + b"9" * 20 + b"\r\n",  # from 20 digits on, an int64_t overflowed in _cframing.c once
        b"$" + b"9" * 21 + b"\r\n",
        b"$" + b"9" * 25 + b"\r\n",
        b"VALUE k 0 %d\r\n" % BIG,
        b"VALUE k 0 " + b"9" * 25 + b" 1\r\n",
        b"VALUE " + b"k" * 490 + b" 0 %d\r\n" % BIG,  # long VALUE lines
        b"VALUE " + b"k" * 500 + b" 0 %d\r\n" % BIG,
        b"*1\r\n$" + b"9" * 25 + b"\r\nGET",
        b"*" + b"9" * 25 + b"\r\n",
        b"*3\r\n%1\r\n|" + b"9" * 19 + b"\r\n",
        b"set k 0 0 " + b"9" * 25 + b"\r\n",
        b"set k 0 0 2147483645\r\n" + b"x" * 30,
        b"VALUE k 0 " + b"0" * 20 + b"\r\nERROR\r\n",  # framing.py once took 19+ digits as too long, zeros or not
        b"VALUE k 0 " + b"0" * 19 + b"5\r\nhello\r\nEND\r\n",
    ],
)
def test_long_numbers_and_limits_agree(c: Impl, buf: bytes) -> None:
    compare = Compare(c)
    for cut in range(len(buf) + 1):
        for pos in range(min(cut, 3) + 1):
            compare("redis_push", buf[:cut], pos)
            for name in ("redis_replies", "memcached_replies"):
                compare(name, buf[:cut], pos, 2)
        compare.requests("redis_requests", buf[:cut])
        compare.requests("memcached_requests", buf[:cut])


# What a hostile client sends to get a request shared that the node reads otherwise (issue 19): both scanners pin
# each at the same place, at every cut, and alone, after a shared request, and before one.
HOSTILE = [
    b"set k\x00 0 0 17\r\nget victim-secret\r\n",  # the NUL smuggling
    *(b"set k%s 0 0 5\r\nget x\r\n" % bytes([byte]) for byte in [0x01, 0x09, 0x0B, 0x0C, 0x0D, 0x1F, 0x7F]),
    b"get a\x0bb\r\n",
    b"get a b\x00c\r\n",
    b"delete k\x00\r\n",
    b"set k 01 0 1\r\nx\r\n",
    b"set k 0 +1 1\r\nx\r\n",
    b"set k 0 0 +5\r\nget x\r\n",
    b"set k 0 0 05\r\nhello\r\n",
    b"cas k 0 0 1 01\r\nx\r\n",
    b"gat 01 k\r\n",
    b"touch k +1\r\n",
    b"incr k 18446744073709551616\r\n",
    b"incr k 18446744073709551615\r\n",
    b"\x80\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00k",  # binary GET
    b"\x80\x0a\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",  # binary NOOP: 0x0a is LF
    b"get " + b"k" * (KEY_MAX + 1) + b"\r\n",
    b"*1\r\n$%d\r\n" % (REDIS_BULK_MAX + 1),
    b"*2\r\n$3\r\nGET\r\n$%d\r\n" % REDIS_BULK_MAX,
    b"*1\r\n$4\r\nPI\x00G\r\n",
    b"*1\r\n$4\r\nPING\n\n",
    b"*1\n$4\r\nPING\r\n",
    b"PING\r\n",
]


@pytest.mark.parametrize("buf", HOSTILE)
def test_hostile_requests_agree(c: Impl, buf: bytes) -> None:
    compare = Compare(c)
    for before, after in [(b"", b""), (b"get a\r\n", b""), (b"", b"get a\r\n"), (cmd(b"GET", b"a"), b"")]:
        data = before + buf + after
        for cut in range(len(data) + 1):
            compare.requests("redis_requests", data[:cut])
            compare.requests("memcached_requests", data[:cut])
    assert compare.cases > 4 * len(buf)


@pytest.mark.parametrize("digits", [4300, 4301])
@pytest.mark.parametrize("kind", [b"*", b"$", b"%", b"|", b">"])
def test_int_digit_limit_agrees(c: Impl, kind: bytes, digits: int) -> None:
    """int() refuses more than 4300 digits: a malformed reply for both."""
    for number in (b"1" * digits, b"0" * digits, b"-" + b"1" * digits, b"1_" * (digits - 1) + b"1"):
        buf = kind + number + b"\r\n"
        Compare(c)("redis_replies", buf, 0, 1)
        Compare(c)("redis_push", b">1\r\n" + buf, 0)


@pytest.mark.parametrize(
    "buf",
    [
        b"*" + b"1" * 5000 + b"\r\n",  # a client's argument count
        b"*1\r\n$" + b"1" * 5000 + b"\r\nGET\r\n",  # a client's bulk length
        b"VALUE k 0 " + b"1" * 5000 + b"\r\n",  # a node's value length
    ],
)
def test_numbers_int_refuses_are_lengths_too_big_for_both(c: Impl, buf: bytes) -> None:
    """More than 4300 digits once raised ValueError from framing.py, which no caller catches: now neither raises."""
    compare = Compare(c)
    compare.requests("redis_requests", buf)
    compare("memcached_replies", buf, 0, 1)
    for name in ("redis_requests", "memcached_requests"):
        getattr(framing, name)(buf, RESP2)
    framing.memcached_replies(buf, 0, 1)


# --- the module -------------------------------------------------------------------------------------------------------
def test_constants_match_framing(c: Impl) -> None:
    for name in (
        "KEY_MAX",
        "REDIS_MAX_ARGS",
        "REDIS_BULK_MAX",
        "MEMCACHED_LINE_MAX",
        "MEMCACHED_SHORT_LINE_MAX",
        "REPLY_LINE_MAX",
    ):
        assert getattr(framing.C, name) == getattr(framing, name), name


@pytest.mark.parametrize("name", ["redis_replies", "redis_push", "memcached_replies"])
def test_a_negative_position_is_refused(c: Impl, name: str) -> None:
    args = (-1, 1) if name.endswith("_replies") else (-1,)
    with pytest.raises(ValueError, match="negative") as raised:
        getattr(c, name)(b"+OK\r\n", *args)
    assert raised.type is ValueError  # not FramingError: a caller's mistake, not a node's


def test_the_framers_use_the_c_scanners(c: Impl) -> None:
    assert framing.C is not None
    assert (
        framing.REDIS_PY._replace(
            requests=framing.C.redis_requests,
            replies=framing.C.redis_replies,
            push=framing.C.redis_push,
            scan=framing.C.redis_scan,
            skip_push=framing.C.redis_skip_push,
        )
        == framing.REDIS
    )
    assert (
        framing.MEMCACHED_PY._replace(
            requests=framing.C.memcached_requests,
            replies=framing.C.memcached_replies,
            scan=framing.C.memcached_scan,
        )
        == framing.MEMCACHED
    )
    with pytest.raises(FramingError):  # the one framing.py handed over
        c.redis_replies(b"?\r\n", 0, 1)


def test_natfwd_no_extensions_turns_it_off() -> None:
    check = (
        "from forwarder.protocols import framing as f;"
        "assert f.C is None and f.REDIS is f.REDIS_PY and f.MEMCACHED is f.MEMCACHED_PY"
    )
    env = {**os.environ, "NATFWD_NO_EXTENSIONS": "1"}
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", check], env=env, cwd=root, check=True, timeout=60)


# --- resumed scans (a pipe's walk of replies that arrive in pieces) agree ----------------------------------------------
def walk_in_pieces(impl: Any, name: str, buf: bytes, cuts: list[int], want: int) -> list[Any]:
    """What a pipe does with `buf` arriving cut at `cuts`: every scan's (and push skip's) result and the state after
    it, up to the first FramingError."""
    scan = getattr(impl, name)
    skip_push = getattr(impl, "redis_skip_push", None) if name == "redis_scan" else None
    state = framing.scan_state()
    seen: list[Any] = []
    held = b""
    for start, stop in zip([0, *cuts], [*cuts, len(buf)], strict=True):
        data = held + buf[start:stop]
        data = data if len(seen) % 2 else bytearray(data)
        pos = 0
        try:
            while pos < len(data):
                if not state[2]:
                    end, got = scan(data, pos, want, state)
                    seen.append((end, got, list(state)))
                    pos = end
                    if got == want or skip_push is None:
                        break
                if skip_push is None:
                    break
                end = skip_push(data, pos, state)
                seen.append((end, list(state)))
                if end < 0 or state[2]:
                    break
                pos = end
        except FramingError:
            seen.append(FramingError)
            return seen
        held = bytes(data[pos:])
    return seen


@pytest.mark.parametrize(
    ("seed", "name", "make"), [(5, "redis_scan", redis_reply), (6, "memcached_scan", mc_reply)], ids=["redis", "mc"]
)
def test_resumed_scans_agree(c: Impl, seed: int, name: str, make: Callable[[random.Random], bytes]) -> None:
    rng, bufs = samples(seed, make)
    cases = 0
    for buf in bufs:
        for _ in range(3):
            cuts = sorted(rng.sample(range(len(buf) + 1), min(rng.randrange(6), len(buf) + 1)))
            want = rng.randrange(1, 6)
            expected = walk_in_pieces(framing, name, buf, cuts, want)
            assert walk_in_pieces(framing.C, name, buf, cuts, want) == expected, (name, buf, cuts, want)
            cases += len(expected)
    assert cases > 5 * SAMPLES


@pytest.mark.parametrize("name", ["redis_scan", "memcached_scan", "redis_skip_push"])
@pytest.mark.parametrize(
    "state", [[0, 0], [0, 0, 0, 0], (0, 0, 0), [-1, 0, 0], [0, 2**62 + 1, 0], [0, "1", 0]], ids=str
)
def test_a_bad_scan_state_is_refused_alike(c: Impl, name: str, state: Any) -> None:
    """The C scanners check the state they are handed: a caller's mistake, never a silent wrong walk."""
    args = (b"+OK\r\n", 0, 1) if name != "redis_skip_push" else (b">0\r\n", 0)
    with pytest.raises((TypeError, ValueError)) as raised:
        getattr(framing.C, name)(*args, state)
    assert raised.type is not FramingError


@pytest.mark.parametrize("size", [framing.REPLY_LINE_MAX - 2, framing.REPLY_LINE_MAX - 1, framing.REPLY_LINE_MAX])
def test_the_line_limit_agrees_at_its_edge(c: Impl, size: int) -> None:
    compare = Compare(c)
    for line in (b"+" + b"x" * size, b"$" + b"1" * size, b"VALUE k 0 " + b"1" * size, b"E" * size):
        for tail in (b"", b"\r", b"\r\n", b"\n", b"x\r\n", b"xx\r\n"):
            for name in ("redis_replies", "memcached_replies"):
                compare(name, line + tail, 0, 1)
            compare("redis_push", b">1\r\n" + line + tail, 0)


@pytest.mark.parametrize("buf", [b"MN\r\n", b"MN\n", b"MN \r\n", b"MNX\r\n", b"END\r\nMN\r\n", b"MN\r", b"M"])
def test_the_sentinels_reply_in_a_clients_place_agrees(c: Impl, buf: bytes) -> None:
    compare = Compare(c)
    for want in (1, 2):
        compare("memcached_replies", buf, 0, want)
