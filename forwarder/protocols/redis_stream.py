"""A Redis Cluster connection's rewriter: it follows the requests, and makes node addresses public in the replies
(MOVED/ASK, CLUSTER SLOTS/SHARDS/NODES, also inside EXEC) as they stream, holding only the small parts that name a
node."""

from __future__ import annotations

import re
from collections import deque
from typing import Any

from forwarder.protocols import Mapper, framing, resp
from forwarder.protocols.lines import LineTooLong, take_line
from forwarder.protocols.redis import (
    NODES,
    OTHER,
    PASSTHROUGH,
    SHARDS,
    SLOTS,
    Kind,
    command_kind,
    error_edits,
    nodes_edits,
    rewrite_redirect,
    shard_node_edits,
    slot_node_edits,
    unquote,
)

_MAX_LINE = 1 << 20  # header and simple-string lines; beyond this the stream is not RESP we can follow
_MAX_INLINE = 1 << 16  # redis refuses longer inline commands (PROTO_INLINE_MAX_SIZE)
# Parts of cluster replies are held to be rewritten, each at most this big; bigger ones pass unchanged. A node
# entry of CLUSTER SLOTS or SHARDS is a few hundred bytes; CLUSTER NODES of a 1000-node cluster is ~200 KiB.
_MAX_PART = 16 << 10
_MAX_NODES_TEXT = 1 << 20
_MAX_NODES_LINES = 4096  # lines of CLUSTER NODES text rewritten one by one; more pass unchanged
_MAX_ARG = 64  # command names and subcommands are short; longer arguments are skipped, not copied
_ATTRIBUTE, _STREAMED = 1, 2  # frame flags
_ROLE, _INDEX, _EXTRA = 2, 3, 4  # frame fields after [children left (-1: streamed), flags]
# Headers of a request as redis-cli and client libraries send them; anything else takes the general path.
_ARRAY_HEADER = re.compile(rb"\*(\d{1,9})\r\n")
_BULK_HEADER = re.compile(rb"\$(\d{1,10})\r\n")
_Chunk = bytes | bytearray | memoryview
_TYPES = frozenset(b"+-:_,#($!=*~>%|.;")
_skip = framing.REDIS.replies  # (buf, pos, want) -> (end, got): complete values, in C when built
_SIMPLE_RUN = re.compile(rb"(?:[+:_,#(][^\r\n]*\r\n)+")  # one-line values but errors: one CRLF each

# Where a value stands in a reply (from its parent's role and its index there) ...
(_P_NONE, _P_SLOTS_ROOT, _P_SHARDS_ROOT, _P_NODES, _P_EXEC, _P_RANGE, _P_SLOT_NODE, _P_SHARD, _P_SHARD_KEY,
 _P_NODE_LIST, _P_SHARD_NODE, _P_NODES_TEXT) = range(12)  # fmt: skip
# ... what an aggregate's children are ...
_R_NONE, _R_EXEC, _R_SLOTS, _R_RANGE, _R_SHARDS, _R_SHARD, _R_NODE_LIST, _R_REPLICAS = range(8)
# ... and the small parts held whole to be rewritten.
_C_SLOT_NODE, _C_SHARD_NODE, _C_KEY, _C_NODES_TEXT = range(1, 5)
_TOP_PLACE = {OTHER: _P_NONE, SLOTS: _P_SLOTS_ROOT, SHARDS: _P_SHARDS_ROOT, NODES: _P_NODES, PASSTHROUGH: _P_NONE}
_CHILD_PLACE = {
    _R_SLOTS: _P_RANGE,
    _R_RANGE: _P_SLOT_NODE,
    _R_SHARDS: _P_SHARD,
    _R_NODE_LIST: _P_SHARD_NODE,
    _R_REPLICAS: _P_NODES_TEXT,
}
_AGGREGATE_ROLE = {
    _P_SLOTS_ROOT: _R_SLOTS,
    _P_SHARDS_ROOT: _R_SHARDS,
    _P_NODES: _R_REPLICAS,
    _P_RANGE: _R_RANGE,
    _P_SHARD: _R_SHARD,
    _P_NODE_LIST: _R_NODE_LIST,
}
# The most children a cluster reply's aggregate has (16384 slots; nodes per shard; fields of a shard); one
# announcing more is framed as a plain value, and children of a streamed one beyond it are plain values.
_ROLE_LIMIT = {
    _R_SLOTS: 16384,
    _R_SHARDS: 16384,
    _R_REPLICAS: 1024,
    _R_RANGE: 1026,
    _R_SHARD: 128,
    _R_NODE_LIST: 1024,
}
_CAPTURED_AGGREGATES = {_P_SLOT_NODE: _C_SLOT_NODE, _P_SHARD_NODE: _C_SHARD_NODE}
_SCALARS_PLAIN = frozenset((_R_SLOTS, _R_RANGE, _R_SHARDS, _R_NODE_LIST))  # roles whose one-line children need nothing


class ClusterRewriter:
    """Per-connection rewriter for a Redis Cluster node, RESP2 and RESP3.

    Client commands (RESP arrays or inline) are parsed to queue the kind of each expected reply. Replies are
    framed as a stream and flow through as slices of the input (only `-MOVED`/`-ASK` lines are replaced); values
    that need no rewriting are skipped a run at a time. Of a reply to CLUSTER SLOTS/SHARDS/NODES/REPLICAS (or an
    EXEC holding one) only the small parts that name a node are held and rewritten: a node entry, a shard's keys,
    CLUSTER NODES text, each within a cap, so no reply is ever held whole and each call's work is linear in its
    bytes. RESP3 pushes do not consume a command. After pub/sub, MONITOR, CLIENT REPLY or anything unparseable,
    the rest of the connection passes through unchanged.
    """

    __slots__ = ("_mapper", "_queue", "_passthrough", "_line", "_bulk", "_trailer", "_stack", "_stream_string",
                 "_top", "_capture", "_capture_role", "_capture_depth", "_capture_parent", "_capture_done",
                 "_client_done", "_client_line", "_args_left", "_arg_skip", "_arg", "_argv", "_in_multi",
                 "_multi_kinds")  # fmt: skip

    def __init__(self, mapper: Mapper) -> None:
        self._mapper = mapper
        self._queue: deque[Kind] = deque()
        self._passthrough = False
        # reply framing
        self._line = bytearray()  # incomplete header line
        self._bulk = 0  # bulk payload bytes still to pass
        self._trailer = 0  # bytes of a bulk payload's CRLF still to check
        # open aggregates: [children left (-1: streamed), flags, role of the children, children done, EXEC kinds
        # or the shard key just read]
        self._stack: list[list[Any]] = []
        self._stream_string = False  # inside `$?` chunks
        self._top: Kind = OTHER  # what the reply being framed answers
        self._capture: bytearray | None = None  # the part being held for rewriting
        self._capture_role = 0
        self._capture_depth = 0  # len(stack) at its start
        self._capture_parent: list[Any] | None = None
        self._capture_done = False
        # request tracking
        self._client_done = False
        self._client_line = bytearray()
        self._args_left = 0
        self._arg_skip = 0
        self._arg: bytearray | None = None
        self._argv: list[bytes] = []
        self._in_multi = False
        self._multi_kinds: list[int] = []

    # -- client side -------------------------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self._client_done or self._passthrough:
            return
        i, n = 0, len(data)
        while i < n and not self._client_done:
            if data[i] == 0x2A and not self._args_left and not self._client_line:
                end = self._whole_command(data, i)
                if end > 0:
                    i = end
                    continue
            if self._arg_skip:
                step = min(self._arg_skip, n - i)
                if self._arg is not None:
                    self._arg += data[i : i + step]
                i += step
                self._arg_skip -= step
                if not self._arg_skip:
                    self._end_argument()
                continue
            try:
                line, _, i = take_line(self._client_line, data, i, _MAX_INLINE)
            except LineTooLong:
                self._lose_track()
                return
            if line is None:
                return
            if not self._on_request_line(line):
                self._lose_track()
                return

    def _whole_command(self, data: bytes, i: int) -> int:
        """Fast path: a RESP command lying wholly in `data` at `i` is handled at once; returns its end, or 0."""
        match = _ARRAY_HEADER.match(data, i)
        if match is None:
            return 0
        argv: list[bytes] = []
        position = match.end()
        for index in range(int(match.group(1))):
            match = _BULK_HEADER.match(data, position)
            if match is None:
                return 0
            start = match.end()
            size = int(match.group(1))
            position = start + size + 2
            if position > len(data):
                return 0
            if index < 2:
                argv.append(data[start : start + size] if size <= _MAX_ARG else b"")
        if argv:
            self._on_command(argv)
        return position

    def _on_request_line(self, line: bytes) -> bool:
        """Handle one request header or inline command line; False if redis would reject it as a protocol error."""
        if self._args_left:
            if line[:1] != b"$" or not line[1:].strip().isdigit():
                return False
            size = int(line[1:].strip())
            self._arg = bytearray() if len(self._argv) < 2 and size <= _MAX_ARG else None
            self._arg_skip = size + 2
            return True
        if line[:1] == b"*":
            text = line[1:].strip()
            if text.startswith(b"-") and text[1:].isdigit():
                return True  # `*-1` / `*0`: redis ignores an empty command and sends nothing
            if not text.isdigit():
                return False
            self._args_left = int(text)
            self._argv = []
            return True
        words = line.split()
        if words:
            self._on_command([unquote(word) for word in words])
        return True

    def _end_argument(self) -> None:
        self._argv.append(bytes(self._arg[:-2]) if self._arg is not None else b"")
        self._arg = None
        self._args_left -= 1
        if not self._args_left:
            self._on_command(self._argv)

    def _on_command(self, argv: list[bytes]) -> None:
        kind = command_kind(argv)
        name = argv[0].lower()
        if kind == PASSTHROUGH:
            self._lose_track()
        elif not self._in_multi:
            self._in_multi = name == b"multi"
            self._multi_kinds = []
            self._queue.append(kind)
        elif name == b"exec":
            self._in_multi = False
            inner = tuple(self._multi_kinds)
            self._queue.append(inner if any(inner) else OTHER)
        elif name in (b"discard", b"reset"):
            self._in_multi = False
            self._queue.append(OTHER)
        else:
            if name not in (b"multi", b"watch", b"quit"):  # these run at once inside MULTI, not queued
                self._multi_kinds.append(kind)
            self._queue.append(OTHER)  # +QUEUED

    def _lose_track(self) -> None:
        """From the reply to this command on, replies can no longer be matched: pass them through."""
        self._queue.append(PASSTHROUGH)
        self._client_done = True
        self._client_line = bytearray()
        self._arg = None

    # -- node side ---------------------------------------------------------------------------------------------

    def pending(self) -> int:
        return len(self._line) + len(self._capture or b"")

    def flush(self) -> bytes:
        held = self._held()
        self._passthrough = True
        return held

    def _held(self) -> bytes:
        held = bytes(self._capture or b"") + self._line
        self._capture = None
        self._line.clear()
        return held

    def from_node(self, data: bytes) -> bytes:
        if self._passthrough:
            return self._held() + data if self.pending() else data
        out: list[_Chunk] = []
        view = memoryview(data)
        i, n = 0, len(data)
        run = 0  # data[run:i] goes unchanged to the current sink (out, or the capture), emitted lazily
        slow_until = 0  # no fast skipping before this offset (it holds a redirect look-alike, or is not plain RESP)
        stack = self._stack
        while i < n:
            if self._bulk:
                step = min(self._bulk, n - i)
                i += step
                self._bulk -= step
                if not self._bulk:
                    # the common case, the CRLF is in this chunk: check both bytes at once
                    self._trailer = 2 if data[i : i + 2] != b"\r\n" else 0
                    if not self._trailer:
                        i += 2
                        if not self._stream_string:
                            self._element_done()
                            if self._capture_done:
                                out.append(self._finish_capture(view[run:i]))
                                run = i
                continue
            if self._trailer:
                if data[i] != (13 if self._trailer == 2 else 10):
                    return self._give_up(out, view, run, i)
                i += 1
                self._trailer -= 1
                if self._trailer or self._stream_string:
                    continue
                self._element_done()
                if self._capture_done:
                    out.append(self._finish_capture(view[run:i]))
                    run = i
                continue
            if (
                i >= slow_until
                and stack
                and stack[-1][_ROLE] == _R_NONE
                and stack[-1][0] > 0
                and self._capture is None
                and not self._line
                and not self._stream_string
            ):
                # Inside a value that needs no rewriting: skip its remaining complete children in one call (C when
                # built), unless they hold something a redirect could be made of; then they take the way below.
                frame = stack[-1]
                try:
                    end, got = _skip(data, i, min(frame[0], n))  # no more fit in the chunk; and a C int
                except ValueError:  # not plain RESP (a streamed string...): framed line by line below
                    end, got = n, 0
                if got and data.find(b"MOVED ", i, end) < 0 and data.find(b"ASK ", i, end) < 0:
                    i = end
                    frame[_INDEX] += got - 1
                    frame[0] -= got - 1
                    self._element_done()  # the last one skipped: may close this aggregate and its parents
                    continue
                slow_until = max(end, i + 1)
            elif (
                stack
                and stack[-1][_ROLE] in _SCALARS_PLAIN
                and stack[-1][0] > 0
                and self._capture is None
                and not self._line
                and (match := _SIMPLE_RUN.match(data, i)) is not None
            ):
                # Inside a cluster reply, one-line children need no rewriting either: a run of them in one call.
                frame = stack[-1]
                end = match.end()
                got = data.count(b"\r\n", i, end)
                if got > frame[0]:
                    got = frame[0]
                    end = i
                    for _ in range(got):
                        end = data.index(b"\r\n", end) + 2
                i = end
                frame[_INDEX] += got - 1
                frame[0] -= got - 1
                self._element_done()
                continue
            try:
                line, held, end = take_line(self._line, data, i, _MAX_LINE)
            except LineTooLong:
                return self._give_up(out, view, run, i)
            if line is None:
                self._sink(out, view[run:i])
                run = i = n
                break
            start, i = i, end
            # A held line began in an earlier chunk, so then start == run == 0 and nothing is pending before it.
            if len(line) < 3 or line[-2] != 13 or line[0] not in _TYPES:
                self._line += held
                return self._give_up(out, view, run, start)
            kind = line[0]
            if not stack and not self._stream_string and kind != 0x7C and kind != 0x3E:
                # The first line of a reply (not an attribute prefix, not a push): which command does it answer?
                reply_kind = self._queue.popleft() if self._queue else OTHER
                if reply_kind == PASSTHROUGH:
                    self._line += held
                    return self._give_up(out, view, run, start)
                self._top = reply_kind
            role = _R_NONE
            if not self._stream_string and kind != 0x2E and self._capture is None:
                role, capture = self._place(kind, line)
                if capture and not held:
                    # The common case, the part lies whole in this chunk: find its end in one call, rewrite it.
                    try:
                        end, got = _skip(data, start, 1)
                    except ValueError:  # not plain RESP (a streamed aggregate...): held and framed line by line
                        got = 0
                    if got and end - start <= (_MAX_NODES_TEXT if capture == _C_NODES_TEXT else _MAX_PART):
                        new = self._rewrite_part(data[start:end], capture, stack[-1] if stack else None)
                        if new is None:
                            return self._give_up(out, view, run, start)
                        out.append(view[run:start])
                        out.append(new)
                        run = i = end
                        self._element_done()
                        continue
                if capture:
                    out.append(view[run:start])
                    run = start
                    self._capture = bytearray()
                    self._capture_role = capture
                    self._capture_depth = len(stack)
                    self._capture_parent = stack[-1] if stack else None
            redirect = rewrite_redirect(line[1:-2], self._mapper) if kind == 0x2D and self._capture is None else None
            if redirect is not None:
                out.append(view[run:start])
                out.append(b"-" + redirect + b"\r\n")
                run = i  # the original line, held part included, is dropped
            elif held:
                self._sink(out, held)
            if not self._on_reply_line(kind, line, role):  # held was already sunk in order; the rest goes unchanged
                return self._give_up(out, view, run, start)
            if self._capture_done:
                out.append(self._finish_capture(view[run:i]))
                run = i
        if self._capture is not None:
            self._capture += view[run:]
            if len(self._capture) > (_MAX_NODES_TEXT if self._capture_role == _C_NODES_TEXT else _MAX_PART):
                out.append(self._capture)  # too big to be what it should be: this part passes unchanged
                self._capture = None
            return b"".join(out)
        if run == 0 and not out:
            return data
        out.append(view[run:])
        return b"".join(out)

    def _place(self, kind: int, line: bytes) -> tuple[int, int]:
        """For a value starting with header `line`: (the role of its children, the capture it starts or 0).

        Where it stands (its parent's role, its index there) says what it is; counts beyond what a cluster reply
        can hold make it a plain value, so a huge or hostile reply is framed, never held.
        """
        stack = self._stack
        if not stack:
            if kind == 0x3E:  # a push: never a reply
                return _R_NONE, 0
            top = self._top
            place = _TOP_PLACE[top] if isinstance(top, int) else _P_EXEC
        else:
            frame = stack[-1]
            role = frame[_ROLE]
            index = frame[_INDEX]
            if role == _R_NONE or (role != _R_EXEC and index >= _ROLE_LIMIT[role]):
                return _R_NONE, 0
            if role == _R_EXEC:
                child_kind = frame[_EXTRA][index]
                place = _TOP_PLACE[child_kind]
            elif role == _R_SHARD:
                is_nodes = frame[_EXTRA] == b"nodes"
                place = _P_SHARD_KEY if index % 2 == 0 else _P_NODE_LIST if is_nodes else _P_NONE
            else:
                place = _CHILD_PLACE[role] if role != _R_RANGE or index >= 2 else _P_NONE
        if place == _P_NONE or kind == 0x7C:
            return _R_NONE, 0
        if kind in resp.AGGREGATE:
            text = line[1:-2]
            count = int(text) if text.isdigit() and len(text) < 10 else -1
            if kind == 0x2A or (kind == 0x25 and place in (_P_SHARD, _P_SHARD_NODE)):
                if place == _P_EXEC:
                    top = self._top
                    return (_R_EXEC if isinstance(top, tuple) and count == len(top) else _R_NONE), 0
                if place in _CAPTURED_AGGREGATES:  # a node has at least a host and a port
                    return _R_NONE, (_CAPTURED_AGGREGATES[place] if count < 0 or count >= 2 else 0)
                role = _AGGREGATE_ROLE.get(place, _R_NONE)
                if role != _R_NONE and (text == b"?" or 0 <= count <= _ROLE_LIMIT[role]):
                    return role, 0
            return _R_NONE, 0
        if kind in resp.STRING_TYPES:
            if place in (_P_NODES, _P_NODES_TEXT):
                return _R_NONE, _C_NODES_TEXT
            if place == _P_SHARD_KEY:
                return _R_NONE, _C_KEY
        return _R_NONE, 0

    def _sink(self, out: list[_Chunk], chunk: _Chunk) -> None:
        if self._capture is None:
            out.append(chunk)
        else:
            self._capture += chunk

    def _give_up(self, out: list[_Chunk], view: memoryview, run: int, at: int) -> bytes:
        """Switch to pass-through: what is held and the rest of the chunk go out unchanged."""
        self._passthrough = True
        self._queue.clear()
        self._stack.clear()
        if self._capture is not None:
            out.append(self._capture)
            self._capture = None
        out.append(view[run:at])
        out.append(self._held())
        out.append(view[at:])
        return b"".join(out)

    def _on_reply_line(self, kind: int, line: bytes, role: int) -> bool:
        """Frame one header line (an aggregate's children take `role`); False if it is not RESP."""
        text = line[1:-2]
        if self._stream_string:
            if kind != 0x3B or not text.isdigit():  # ";<size>" chunks
                return False
            size = int(text)
            if size:
                self._bulk = size
                return True
            self._stream_string = False
            self._element_done()
            return True
        if kind in resp.SIMPLE:
            self._element_done()
            return True
        if kind in resp.BULK:
            if text == b"?" and kind == 0x24:
                self._stream_string = True
                return True
            if text.isdigit():
                size = int(text)
                if size:
                    self._bulk = size
                else:
                    self._trailer = 2
                return True
            if text == b"-1":
                self._element_done()
                return True
            return False
        if kind == 0x2E:  # "." ends a streamed aggregate
            if not self._stack or self._stack[-1][0] >= 0:
                return False
            self._stack.pop()
            self._element_done()
            return True
        # aggregates
        if text == b"?":
            self._stack.append([-1, _STREAMED, role, 0, None])
            return True
        if text.isdigit():
            count = int(text) * (2 if kind in resp.PAIRED else 1)
            if count:
                extra = self._top if role == _R_EXEC else None
                self._stack.append([count, _ATTRIBUTE if kind == 0x7C else 0, role, 0, extra])
            elif kind != 0x7C:
                self._element_done()
            return True
        if text == b"-1":
            self._element_done()
            return True
        return False

    def _element_done(self) -> bool:
        """One value ended: count it in its parent; True if that completed a top-level reply or push.

        Marks the capture done when the value that ended is the captured one (its parent is then on top).
        """
        stack = self._stack
        depth = self._capture_depth if self._capture is not None else -1
        while stack:
            frame = stack[-1]
            if len(stack) == depth:
                self._capture_done = True
            frame[_INDEX] += 1
            if frame[0] < 0:
                return False  # streamed aggregate: ends with "."
            frame[0] -= 1
            if frame[0]:
                return False
            stack.pop()
            if frame[1] == _ATTRIBUTE:
                return False  # the attributed value follows and is the element
        if depth == 0:
            self._capture_done = True
        return True

    def _finish_capture(self, tail: _Chunk) -> bytes:
        """The held part, `tail` (its end in this chunk) added, rewritten; the capture is over."""
        assert self._capture is not None
        self._capture += tail
        captured = bytes(self._capture)
        role, parent = self._capture_role, self._capture_parent
        self._capture = self._capture_parent = None
        self._capture_done = False
        new = self._rewrite_part(captured, role, parent)
        return captured if new is None else new  # framing accepted it, parsing did not (nested too deep...)

    def _rewrite_part(self, part: bytes, role: int, parent: list[Any] | None) -> bytes | None:
        """One held part (a value whole, nothing more), rewritten for its role; None if it does not parse."""
        try:
            value = resp.parse(part)
            if value.end != len(part):
                return None
            edits: list[resp.Edit] = []
            error_edits(part, value, self._mapper, edits)
            if role == _C_KEY:
                if parent is not None:
                    key = resp.string(part, value)
                    parent[_EXTRA] = key.lower() if key is not None else None
            elif role == _C_SLOT_NODE:
                slot_node_edits(part, value, self._mapper, edits)
            elif role == _C_SHARD_NODE:
                shard_node_edits(part, value, self._mapper, edits)
            elif part.count(b"\n") <= _MAX_NODES_LINES:  # _C_NODES_TEXT
                nodes_edits(part, value, self._mapper, edits)
            return resp.apply(part, edits) if edits else part
        except (resp.RespError, ValueError):
            return None
