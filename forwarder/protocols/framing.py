"""Where requests and replies end, for multiplexing many clients over one node connection (`multiplex: true`).

A `Framer` per engine, its functions pure and fast rather than complete:

- `requests(buf, lane)` finds the complete requests at the start of a client's bytes that may share a node
  connection, and returns the fields of a `Requests`: (end, complete, leave). `leave` is PIN when the request at
  `end` must not be multiplexed: it changes the connection's state (SELECT, AUTH, MULTI, SUBSCRIBE...), may block
  (BLPOP), asks for no reply (memcached `noreply`), or is anything the scanner does not know or cannot check; the
  client then gets a connection of its own, so the node sees its bytes unchanged (forwarder/mux/). For Redis,
  `leave` can also name a lane: `HELLO 3` moves a client to connections that speak RESP3.
- `replies(buf, pos, want)` finds up to `want` complete replies from `pos`: (end, got). A reply it cannot parse
  (a bad type byte or length, a value not followed by CRLF, a line longer than REPLY_LINE_MAX) raises FramingError:
  the shared connection is out of step and must close.
- `scan(buf, pos, want, state)` is `replies` resumed: a pipe passes every byte of a reply on as it arrives and keeps
  the walk's state between reads, so any reply costs one walk over its bytes and at most a line of memory.
- `push` and `skip_push` skip out-of-band messages (RESP3 pushes).

Only requests that get exactly one reply each are multiplexed, so counting replies is all the routing needs.

The functions here are the reference; `_cframing.c` is the same in C, 15-30x cheaper, and `REDIS` and
`MEMCACHED` use it when it was built (as aiohttp does with its parser; NATFWD_NO_EXTENSIONS=1 turns it off).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from forwarder import extensions

KEY_MAX = 250  # memcached's KEY_MAX_LENGTH
# A reply line (a RESP type byte and what follows it up to CRLF, or a memcached line) longer than this means the stream
# is out of step: no node sends one (lengths are digits, keys 250 bytes), and a line is the one thing a pipe holds
# until it is whole. Above 4300 digits, so that int() decides which lengths are malformed as it always did.
REPLY_LINE_MAX = 8192
SATURATED = 1 << 62  # counts and lengths stop here: more than any buffer holds (_cframing.c's int64_t)
REDIS_MAX_ARGS = 1024  # more arguments (a huge MSET) go to a connection of their own
# Redis refuses a longer argument (proto-max-bulk-len: 512 MiB by default, 1 MiB at the least) with an error that
# closes the connection: a longer one pins, whatever the node's setting.
REDIS_BULK_MAX = 1024 * 1024

# Redis commands with exactly one reply, no effect on the connection's state, and no blocking. Everything else
# (SELECT, AUTH, HELLO, MULTI/EXEC, WATCH, SUBSCRIBE, MONITOR, BLPOP, WAIT, EVAL...) pins the client. Of CLIENT,
# only SETINFO and MAINT_NOTIFICATIONS share: redis-py sends both on every connect; the first only labels the
# connection, and the pushes the second may turn on are dropped (redis_push).
REDIS_COMMANDS = frozenset(
    b"""
    GET SET SETNX SETEX PSETEX GETSET GETDEL GETEX MGET MSET MSETNX APPEND STRLEN GETRANGE SETRANGE
    INCR INCRBY INCRBYFLOAT DECR DECRBY DEL UNLINK EXISTS TOUCH TYPE EXPIRE PEXPIRE EXPIREAT PEXPIREAT PERSIST
    TTL PTTL EXPIRETIME PEXPIRETIME
    HGET HSET HSETNX HMGET HMSET HDEL HLEN HEXISTS HGETALL HKEYS HVALS HINCRBY HINCRBYFLOAT HSTRLEN HRANDFIELD
    LPUSH RPUSH LPUSHX RPUSHX LPOP RPOP LLEN LRANGE LINDEX LSET LREM LTRIM LPOS LINSERT
    SADD SREM SCARD SISMEMBER SMISMEMBER SMEMBERS SRANDMEMBER SPOP SINTER SUNION SDIFF
    ZADD ZREM ZCARD ZSCORE ZMSCORE ZINCRBY ZRANK ZREVRANK ZRANGE ZREVRANGE ZRANGEBYSCORE ZREVRANGEBYSCORE ZCOUNT
    PFADD PFCOUNT GETBIT SETBIT BITCOUNT PING ECHO
    """.split()
)

_REDIS_SPECIAL = frozenset((b"CLIENT", b"HELLO"))  # shared only in the forms redis_requests checks for

# memcached text commands with exactly one reply, and how many tokens they take (noreply forms have one more and pin).
_MC_RETRIEVAL = {b"get": 2, b"gets": 2, b"gat": 3, b"gats": 3}  # at least this many: any number of keys
_MC_STORAGE = {b"set": 5, b"add": 5, b"replace": 5, b"append": 5, b"prepend": 5, b"cas": 6}  # then a data block
_MC_OTHER = {b"delete": 2, b"incr": 3, b"decr": 3, b"touch": 3, b"version": 1}
_MC_STORAGE_LIMITS = (2**32 - 1, 2**31 - 1, 2**31 - 3, 2**64 - 1)  # flags, exptime, bytes, cas
_MC_EXPTIME_MAX, _MC_DELTA_MAX = 2**31 - 1, 2**64 - 1  # gat, gats and touch; incr and decr
# memcached reads a line up to a NUL (strlen), and keeps control characters other than LF in its tokens: they would
# end the line early, or split a key in natfwd's reading of the VALUE line that echoes it. Any of them pins.
_MC_CONTROL = re.compile(rb"[\x00-\x1f\x7f]").search
MEMCACHED_LINE_MAX = 8192  # a get/gets line longer than this pins (memcached's own limit for key lists is larger)
MEMCACHED_SHORT_LINE_MAX = 2048  # any other line longer than this pins

# A length with more digits is more than any buffer holds: treated as such without int(), which refuses more than
# 4300 digits with a ValueError (and takes quadratic time below that).
_LENGTH_DIGITS = 18

_SIMPLE = frozenset(b"+-:_,#(")
_BULK = frozenset(b"$!=")
_AGGREGATE = frozenset(b"*~>")


class FramingError(ValueError):
    """A node's reply is not what the protocol allows: the shared connection can no longer be followed."""


STAY = 0
PIN = -1  # the request at `end` must go over a connection of its own
RESP2, RESP3 = 2, 3  # lanes: the protocol version a shared Redis connection speaks
HELLO3 = b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n"
RESET = b"*1\r\n$5\r\nRESET\r\n"  # Redis 6.2+: the connection as if new (login included), see mux/shared.py


ReplyWalk = Callable[[bytes | bytearray, int, int, list[int]], int]  # _resp_walk, _memcached_walk
Replies = Callable[[bytes | bytearray, int, int], tuple[int, int]]
Scan = Callable[[bytes | bytearray, int, int, list[int]], tuple[int, int]]


class Requests(NamedTuple):
    end: int  # offset just past the last complete request that may be multiplexed
    complete: int  # how many requests that is (one reply each)
    leave: int  # STAY, PIN, or the lane the request at `end` needs (a client's `HELLO 3`)


class Framer(NamedTuple):
    requests: Callable[[bytes | bytearray, int], tuple[int, int, int]]  # (buf, the client's lane) -> Requests fields
    replies: Replies  # (buf, pos, want) -> (end, got): see _reply_scanners
    push: Callable[[bytes | bytearray, int], int]  # the end of an out-of-band message at pos, 0 if none, -1 if cut
    first_lane: int  # where clients start
    greeting: Callable[[int], bytes]  # what a new shared connection of a lane sends first (its reply is dropped)
    scan: Scan  # replies, resumed: see _reply_scanners
    skip_push: Callable[[bytes | bytearray, int, list[int]], int]  # a push, resumed: see redis_skip_push
    # A request a pipe adds after each client's requests, and the reply it must get for it there: any other bytes in
    # its place mean the node answered them with more or fewer replies than natfwd counted.
    sentinel: bytes
    sentinel_reply: bytes
    reset: bytes = b""  # makes a used connection look new to a client that joins it (no state to reset: b"")
    state: Callable[[bytes | bytearray, int], list[tuple[bytes, bytes]]] | None = None  # see redis_state
    # A cheap test of a read (one C call): state() need only run on the reads for which it is not None.
    state_hint: Callable[[bytes | bytearray], object] | None = None


def scan_state() -> list[int]:
    """A reply walk's state between buffers, for `Framer.scan`: [values still owed to the reply being walked (0
    between replies), bytes of a value and its CRLF still to pass, 1 while the reply is a push]."""
    return [0, 0, 0]


def redis_requests(buf: bytes | bytearray, lane: int = RESP2) -> tuple[int, int, int]:
    """Complete RESP requests (arrays of bulk strings) of known one-reply commands at the start of `buf`: the
    fields of a Requests, as a plain tuple (this runs once per client read, and a NamedTuple costs more to make).

    `HELLO 2` or `HELLO 3` (and nothing more) asks for that protocol version: on the client's own lane it is an
    ordinary request, otherwise the client moves to a connection of that lane first. Other HELLOs pin.

    A request shares only when Redis is sure to read it as here, one request with one reply: an array of bulk
    strings (an inline command pins), its count and lengths in plain decimal each ended by CRLF, each argument
    followed by CRLF, at most REDIS_MAX_ARGS arguments of at most REDIS_BULK_MAX bytes, and a name in
    REDIS_COMMANDS, byte for byte but for case (Redis compares names with strcasecmp(), which stops at a NUL).
    """
    n = len(buf)
    find = buf.find
    pos = 0
    count = 0
    while pos < n:
        if buf[pos] != 42:  # '*': an inline command, or not RESP at all
            return pos, count, PIN
        e = find(b"\r\n", pos)
        if e < 0:
            break
        digits = buf[pos + 1 : e]
        # Redis refuses a leading zero (a protocol error, and it closes the connection); no request has 0 arguments.
        # The length check first: int() refuses more than 4300 digits, with a ValueError no caller expects.
        if not digits.isdigit() or digits[0] == 48 or len(digits) > 6:
            return pos, count, PIN
        argc = int(digits)
        if argc > REDIS_MAX_ARGS:
            return pos, count, PIN
        name = b""
        argument = b""
        p = e + 2
        for index in range(argc):
            if p >= n:
                return pos, count, STAY
            if buf[p] != 36:  # '$'
                return pos, count, PIN
            e = find(b"\r\n", p)
            if e < 0:
                return pos, count, STAY
            digits = buf[p + 1 : e]
            # Redis's string2ll takes no sign, no leading zero and no space; the length check comes before int().
            if not digits.isdigit() or (digits[0] == 48 and len(digits) > 1) or len(digits) > 7:
                return pos, count, PIN
            size = int(digits)
            if size > REDIS_BULK_MAX:
                return pos, count, PIN
            start = e + 2
            p = start + size + 2
            if p > n:
                if not index and n - start >= 32:  # no command name is this long
                    return pos, count, PIN
                return pos, count, STAY
            if buf[p - 2] != 13 or buf[p - 1] != 10:
                return pos, count, PIN
            if not index:
                name = bytes(buf[start : p - 2])
                if name not in REDIS_COMMANDS:
                    name = name.upper()
                    if name not in REDIS_COMMANDS and name not in _REDIS_SPECIAL:
                        return pos, count, PIN
            elif index == 1 and name in _REDIS_SPECIAL:
                argument = bytes(buf[start : p - 2]).upper()
        if name in _REDIS_SPECIAL:
            if name == b"CLIENT":
                if argument not in (b"SETINFO", b"MAINT_NOTIFICATIONS"):
                    return pos, count, PIN
            elif argc != 2 or argument not in (b"2", b"3"):  # HELLO
                return pos, count, PIN
            elif int(argument) != lane:
                return pos, count, int(argument)
        pos = p
        count += 1
    return pos, count, STAY


def redis_push(buf: bytes | bytearray, pos: int) -> int:
    """The end of a complete push at `pos` (an out-of-band message to drop, never a reply); 0 when there is none
    there, -1 when it is incomplete. A shared connection only gets pushes its server sends on its own, such as the
    maintenance notifications redis-py 8 asks for with CLIENT MAINT_NOTIFICATIONS."""
    if pos >= len(buf) or buf[pos] != 62:
        return 0
    state = [1, 0, 0]
    end = _resp_walk(buf, pos, len(buf), state)
    return -1 if state[0] or state[1] else end


def redis_skip_push(buf: bytes | bytearray, pos: int, state: list[int]) -> int:
    """Walk a push at `pos`, or on in one begun earlier (state[2] set until it ends): the end of its bytes here,
    which the pipe drops. -1 when there is no push at `pos` (`state` is mid-reply, or another type byte)."""
    if not state[2]:
        if state[0] or state[1] or pos >= len(buf) or buf[pos] != 62:
            return -1
        state[0] = state[2] = 1
    end = _resp_walk(buf, pos, len(buf), state)
    if not state[0] and not state[1]:
        state[2] = 0
    return end


def _pass_body(buf: bytes | bytearray, p: int, n: int, skip: int) -> tuple[int, int]:
    """Pass `skip` bytes of a bulk string or data block and its CRLF, as far as `buf` goes: (p, skip still owed).
    The CRLF is checked as it arrives: a value not followed by one means the stream is out of step."""
    end = p + skip
    if end <= n:
        if buf[end - 1] != 10 or (skip >= 2 and buf[end - 2] != 13):
            raise FramingError("a value in a reply is not followed by CRLF")
        return end, 0
    if skip >= 2 and end - 2 < n and buf[end - 2] != 13:
        raise FramingError("a value in a reply is not followed by CRLF")
    return n, end - n


def _resp_walk(buf: bytes | bytearray, p: int, n: int, state: list[int]) -> int:
    """Walk on from `p` in the reply `state` describes until it ends (state[0] and state[1] both 0) or the bytes run
    out: where it stopped, the start of a line not all in included. FramingError when malformed."""
    # Aggregates are walked flat: `remaining` counts the values still owed to the reply.
    remaining, skip = state[0], state[1]
    try:
        while True:
            if skip:
                p, skip = _pass_body(buf, p, n, skip)
                if skip:
                    break
            if not remaining or p >= n:
                break
            kind = buf[p]
            e = buf.find(b"\r\n", p, p + REPLY_LINE_MAX + 2)
            if e < 0:
                if n - p >= REPLY_LINE_MAX + 2:
                    raise FramingError(f"a line of more than {REPLY_LINE_MAX} bytes in a reply")
                break
            if kind in _BULK:
                size = int(buf[p + 1 : e])
                if size >= 0:
                    skip = min(size + 2, SATURATED)
            elif kind in _AGGREGATE:
                remaining = min(remaining + max(int(buf[p + 1 : e]), 0), SATURATED)
            elif kind == 37:  # '%': a map, key and value per entry
                remaining = min(remaining + 2 * max(int(buf[p + 1 : e]), 0), SATURATED)
            elif kind == 124:  # '|': attributes, then the value they describe
                remaining = min(remaining + 2 * max(int(buf[p + 1 : e]), 0) + 1, SATURATED)
            elif kind not in _SIMPLE:
                raise FramingError(f"unexpected RESP type byte {kind!r} in a reply")
            p = e + 2
            remaining -= 1
    except ValueError as exc:
        if isinstance(exc, FramingError):
            raise
        raise FramingError(f"malformed RESP length in a reply: {exc}") from None
    state[0], state[1] = remaining, skip
    return p


def memcached_requests(buf: bytes | bytearray, lane: int = RESP2) -> tuple[int, int, int]:
    """Complete memcached text requests (get, set, delete, incr...; no noreply) at the start of `buf`: the fields
    of a Requests, as a plain tuple.

    A request shares only when memcached is sure to read it as here, one request with one reply: single spaces
    between tokens, no control character (NUL included) anywhere in its line, keys of at most KEY_MAX bytes, and
    numbers in plain decimal (no sign, no leading zero) within the range memcached keeps. Anything else pins.
    """
    n = len(buf)
    pos = 0
    count = 0
    while pos < n:
        e = buf.find(b"\n", pos)
        if e < 0:
            # Binary protocol requests have NULs in their headers, and maybe no LF at all: pin them at once.
            last = n - 1 if buf[n - 1] == 13 else n
            if n - pos > _memcached_line_limit(buf, pos) or _MC_CONTROL(buf, pos, last):
                return pos, count, PIN
            break
        if e - pos > MEMCACHED_SHORT_LINE_MAX and e - pos > _memcached_line_limit(buf, pos):
            return pos, count, PIN
        line = buf[pos : e - 1] if e > pos and buf[e - 1] == 13 else buf[pos:e]
        tokens = line.split(b" ")
        command = bytes(tokens[0])
        if b"" in tokens or _MC_CONTROL(line):
            return pos, count, PIN  # memcached splits on single spaces only: keep to what both agree on
        size = len(tokens)
        if command in _MC_RETRIEVAL:
            if size < _MC_RETRIEVAL[command]:
                return pos, count, PIN
            if command in (b"gat", b"gats") and not _mc_number(tokens[1], _MC_EXPTIME_MAX):
                return pos, count, PIN
            # A key too long and memcached drops the replies it has not yet sent to earlier requests in the same
            # read, other clients' among them. No key can be longer than its line.
            if len(line) > KEY_MAX and max(map(len, tokens[1:])) > KEY_MAX:
                return pos, count, PIN
            pos = e + 1
        elif command in _MC_STORAGE:
            if size != _MC_STORAGE[command] or len(tokens[1]) > KEY_MAX:
                return pos, count, PIN
            # Out of range, memcached answers CLIENT_ERROR and then runs the data block as a command: two replies.
            for index in range(2, size):
                if not _mc_number(tokens[index], _MC_STORAGE_LIMITS[index - 2]):
                    return pos, count, PIN
            end = e + 1 + int(tokens[4]) + 2
            if end > n:
                break
            if buf[end - 2] != 13 or buf[end - 1] != 10:
                return pos, count, PIN  # memcached would answer "bad data chunk" and read the rest as commands
            pos = end
        elif command in _MC_OTHER:
            if size != _MC_OTHER[command] or (size > 1 and len(tokens[1]) > KEY_MAX):
                return pos, count, PIN
            if size > 2 and not _mc_number(tokens[2], _MC_EXPTIME_MAX if command == b"touch" else _MC_DELTA_MAX):
                return pos, count, PIN
            pos = e + 1
        else:
            return pos, count, PIN
        count += 1
    return pos, count, STAY


def _mc_number(token: bytes | bytearray, limit: int) -> bool:
    """Whether memcached's strtoul/strtol read `token` as the same number natfwd does, and no more than `limit`. Its
    line is at most MEMCACHED_SHORT_LINE_MAX bytes, so int() takes it."""
    return token.isdigit() and (token[0] != 48 or len(token) == 1) and int(token) <= limit


def _memcached_line_limit(buf: bytes | bytearray, pos: int) -> int:
    # memcached closes a connection holding more than 2048 bytes of an unfinished line, except for get and gets.
    if buf.startswith(b"get ", pos) or buf.startswith(b"gets ", pos):
        return MEMCACHED_LINE_MAX
    return MEMCACHED_SHORT_LINE_MAX


def _no_push(_buf: bytes | bytearray, _pos: int, _state: list[int]) -> int:
    return -1  # memcached has no out-of-band messages


def _memcached_walk(buf: bytes | bytearray, p: int, n: int, state: list[int]) -> int:
    """_resp_walk for memcached: state[0] is 1 until the line that ends the reply (any line but VALUE)."""
    skip = state[1]
    while True:
        if skip:
            p, skip = _pass_body(buf, p, n, skip)
            if skip:
                break
        if p >= n:
            break
        e = buf.find(b"\n", p, p + REPLY_LINE_MAX + 1)
        if e < 0:
            if n - p > REPLY_LINE_MAX:
                raise FramingError(f"a line of more than {REPLY_LINE_MAX} bytes in a reply")
            break
        if not buf.startswith(b"VALUE ", p):
            if buf.startswith(b"MN\r\n", p):  # the sentinel's reply (MEMCACHED_PY) where a client's is due
                raise FramingError("the node answered fewer requests than were sent")
            p = e + 1
            state[0] = 0
            break
        tokens = buf[p:e].split()
        if len(tokens) not in (4, 5) or not tokens[3].isdigit():
            raise FramingError(f"malformed memcached VALUE line in a reply: {bytes(buf[p:e])[:80]!r}")
        significant = tokens[3].lstrip(b"0")
        skip = min(int(significant or b"0") + 2, SATURATED) if len(significant) <= _LENGTH_DIGITS + 1 else SATURATED
        p = e + 1
    state[1] = skip
    return p


def _reply_scanners(walk: ReplyWalk, push: int) -> tuple[Replies, Scan]:
    """An engine's `replies` and `scan` over its walk, stopping before a reply that starts with the type byte `push`
    (-1: none), as _cframing.c's whole_replies and resumed_replies do."""

    def replies(buf: bytes | bytearray, pos: int, want: int) -> tuple[int, int]:
        """Up to `want` complete replies from `pos`, each with any nesting: (end, got). Redis's stop early before a
        push (`>`), which is no reply: see redis_push."""
        n = len(buf)
        got = 0
        state = [0, 0, 0]
        while got < want and pos < n and buf[pos] != push:
            state[0] = 1
            end = walk(buf, pos, n, state)
            if state[0] or state[1]:
                break
            pos = end
            got += 1
        return pos, got

    def scan(buf: bytes | bytearray, pos: int, want: int, state: list[int]) -> tuple[int, int]:
        """`replies` that resumes: up to `want` replies from `pos`, the first of them possibly begun in an earlier
        buffer, as `state` says (see scan_state). Returns (end, got), `end` past every byte known to belong to the
        replies, the start of an incomplete one included: a pipe passes those on at once and keeps only a line that
        is not all in, so a reply of any size costs one walk over its bytes and never more than a read of memory.
        Stops before a push, and before a line not all in; `state` says whether a reply is left unfinished at `end`."""
        n = len(buf)
        got = 0
        if state[0] or state[1]:
            pos = walk(buf, pos, n, state)
            if state[0] or state[1]:
                return pos, 0
            got = 1
        while got < want and pos < n and buf[pos] != push:
            state[0] = 1
            pos = walk(buf, pos, n, state)
            if state[0] or state[1]:
                break
            got += 1
        return pos, got

    return replies, scan


redis_replies, redis_scan = _reply_scanners(_resp_walk, 62)  # '>': a push, see redis_push and redis_skip_push
# memcached's replies: VALUE blocks up to the next other line.
memcached_replies, memcached_scan = _reply_scanners(_memcached_walk, -1)


def _redis_greeting(lane: int) -> bytes:
    return HELLO3 if lane == RESP3 else b""


# A CLIENT command name in any case: only reads that have one are walked by redis_state.
_CLIENT = re.compile(rb"\$6\r\nclient\r\n", re.IGNORECASE)
_CLIENT_STATE = {b"SETINFO LIB-NAME", b"SETINFO LIB-VER", b"MAINT_NOTIFICATIONS"}


def redis_state(buf: bytes | bytearray, end: int) -> list[tuple[bytes, bytes]]:
    """The requests in buf[:end] (whole requests redis_requests let share) that set connection state while shared:
    CLIENT SETINFO LIB-NAME/LIB-VER and CLIENT MAINT_NOTIFICATIONS, as (what it sets, the request). A client's own
    connection replays them when it is pinned; a later request that sets the same thing replaces an earlier one,
    so what a client can make natfwd keep is bounded. HELLO is not here: its state is the client's lane."""
    if _CLIENT.search(buf, 0, end) is None:
        return []
    found: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < end:
        start = pos
        e = buf.find(b"\r\n", pos)
        argc = int(buf[pos + 1 : e])
        pos = e + 2
        args: list[bytes] = []
        for _ in range(argc):
            e = buf.find(b"\r\n", pos)
            size = int(buf[pos + 1 : e])
            if len(args) < 3:
                args.append(bytes(buf[e + 2 : e + 2 + size]).upper())
            pos = e + 2 + size + 2
        if args[0] == b"CLIENT" and len(args) > 1:
            key = b" ".join(args[1:3]) if args[1] == b"SETINFO" else args[1]
            if key in _CLIENT_STATE:
                found.append((key, bytes(buf[start:pos])))
    return found


REDIS_PY = Framer(
    redis_requests,
    redis_replies,
    redis_push,
    RESP2,
    _redis_greeting,
    redis_scan,
    redis_skip_push,
    b"",
    b"",
    reset=RESET,
    state=redis_state,
    state_hint=_CLIENT.search,
)
# memcached's meta no-op: its text protocol has no way to tell a reply from the next one's but counting, so a request
# memcached read differently from natfwd (as two, say) would shift every later reply to the wrong client, unseen.
# `mn` follows each client's requests, so a reply too many is found where `MN` is due, before any byte of it reaches
# the next client. It costs the node a no-op and natfwd 4 bytes each way per client read.
MEMCACHED_PY = Framer(
    memcached_requests,
    memcached_replies,
    lambda _buf, _pos: 0,
    RESP2,
    lambda _lane: b"",
    memcached_scan,
    _no_push,
    b"mn\r\n",
    b"MN\r\n",
)


C = extensions.load("protocols._cframing")
if C is None:
    REDIS, MEMCACHED = REDIS_PY, MEMCACHED_PY
else:
    C.init(FramingError, REDIS_COMMANDS)
    REDIS = REDIS_PY._replace(
        requests=C.redis_requests,
        replies=C.redis_replies,
        push=C.redis_push,
        scan=C.redis_scan,
        skip_push=C.redis_skip_push,
    )  # redis_state stays Python: it walks only reads that hold a CLIENT command
    MEMCACHED = MEMCACHED_PY._replace(requests=C.memcached_requests, replies=C.memcached_replies, scan=C.memcached_scan)


def framer(engine: str) -> Framer:
    """The scanners for a config's engine; redis-cluster is not multiplexed (config refuses it)."""
    if engine == "memcached":
        return MEMCACHED
    if engine == "redis":
        return REDIS
    raise ValueError(f"no multiplexing for engine {engine!r}")
