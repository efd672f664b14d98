"""Redis Cluster rewriter: node addresses in MOVED/ASK and CLUSTER SLOTS/SHARDS/NODES replies become public."""

from __future__ import annotations

import re
from collections import deque

from forwarder.protocols import Mapper, resp
from forwarder.protocols.lines import LineTooLong, take_line

# What a reply is, known from the command it answers. An EXEC reply is a tuple of its queued commands' kinds.
OTHER, SLOTS, SHARDS, NODES, PASSTHROUGH = range(5)
Kind = int | tuple[int, ...]

_CLUSTER_KINDS = {b"slots": SLOTS, b"shards": SHARDS, b"nodes": NODES, b"replicas": NODES, b"slaves": NODES}
# After these, replies stop matching commands one to one (pub/sub, MONITOR, replication, CLIENT REPLY OFF|SKIP).
_UNTRACKABLE = frozenset(
    (
        b"subscribe",
        b"psubscribe",
        b"ssubscribe",
        b"unsubscribe",
        b"punsubscribe",
        b"sunsubscribe",
        b"monitor",
        b"sync",
        b"psync",
        b"replconf",
    )
)
_MAX_LINE = 1 << 20  # header and simple-string lines; beyond this the stream is not RESP we can follow
_MAX_INLINE = 1 << 16  # redis refuses longer inline commands (PROTO_INLINE_MAX_SIZE)
_MAX_CAPTURE = 64 << 20  # CLUSTER NODES of a 1000-node cluster is ~200 KiB; bigger replies pass unchanged
_MAX_ARG = 64  # command names and subcommands are short; longer arguments are skipped, not copied
_ATTRIBUTE, _STREAMED = 1, 2  # frame flags
# Headers of a request as redis-cli and client libraries send them; anything else takes the general path.
_ARRAY_HEADER = re.compile(rb"\*(\d{1,9})\r\n")
_BULK_HEADER = re.compile(rb"\$(\d{1,10})\r\n")
_Chunk = bytes | bytearray | memoryview
_TYPES = frozenset(b"+-:_,#($!=*~>%|.;")


def _text(raw: bytes) -> str:
    return raw.decode("latin-1")


def _lookup(mapper: Mapper, hosts: list[bytes | None], ports: list[int | None]) -> tuple[bytes, int] | None:
    """The first forward the mapper knows for any (host, port) pair; unknown endpoints ("", "?") are skipped."""
    for host in hosts:
        if not host or host == b"?":
            continue
        for port in ports:
            if port is not None and (found := mapper(_text(host), port)) is not None:
                return found[0].encode("latin-1"), found[1]
    return None


def rewrite_redirect(message: bytes, mapper: Mapper) -> bytes | None:
    """`MOVED <slot> <host>:<port>` or `ASK ...` (error text without `-`) with the public address; None if unchanged."""
    words = message.split(b" ")
    if len(words) != 3 or words[0] not in (b"MOVED", b"ASK") or not words[1].isdigit():
        return None
    host, colon, port = words[2].rpartition(b":")  # IPv6 hosts are not bracketed: split at the last colon
    if not colon or not port.isdigit():
        return None
    found = _lookup(mapper, [host], [int(port)])
    if found is None:
        return None
    return b"%s %s %s:%d" % (words[0], words[1], found[0], found[1])


def _rewrite_node_address(address: bytes, mapper: Mapper) -> bytes | None:
    """`ip:port@cport[,hostname[,aux...]]` of CLUSTER NODES with the public address and port; None if unchanged."""
    host_port, at, bus = address.partition(b"@")
    host, colon, port = host_port.rpartition(b":")
    if not colon or not port.isdigit():
        return None
    bus_port, comma, extra = bus.partition(b",")
    hostname, comma2, aux = extra.partition(b",")
    found = _lookup(mapper, [host, hostname], [int(port)])
    if found is None:
        return None
    public, public_port = found
    if hostname:
        extra = public + comma2 + aux
    return b"%s:%d%s%s%s%s" % (public, public_port, at, bus_port, comma, extra)


def rewrite_cluster_nodes(text: bytes, mapper: Mapper) -> bytes:
    """CLUSTER NODES text (one node a line) with each known node's address made public; other bytes kept."""
    lines = text.split(b"\n")
    changed = False
    for index, line in enumerate(lines):
        fields = line.split(b" ")
        if len(fields) < 2 or (address := _rewrite_node_address(fields[1], mapper)) is None:
            continue
        fields[1] = address
        lines[index] = b" ".join(fields)
        changed = True
    return b"\n".join(lines) if changed else text


def _errors(buf: bytes, value: resp.Value, mapper: Mapper, edits: list[resp.Edit]) -> None:
    if value.type == 0x2D:  # "-"
        new = rewrite_redirect(buf[value.body_start : value.body_end], mapper)
        if new is not None:
            edits.append((value.start, value.end, b"-" + new + b"\r\n"))
    for child in value.children:
        _errors(buf, child, mapper, edits)


def _slots(buf: bytes, root: resp.Value, mapper: Mapper, edits: list[resp.Edit]) -> None:
    """CLUSTER SLOTS: [[start, end, [host, port, id, {metadata}], ...], ...]."""
    for slot_range in root.children if root.type == 0x2A else ():
        for node in slot_range.children[2:] if slot_range.type == 0x2A else ():
            if node.type != 0x2A or len(node.children) < 2:
                continue
            host, port = node.children[0], node.children[1]
            meta = resp.pairs(buf, node.children[3]) if len(node.children) > 3 else {}
            hosts = [resp.string(buf, host)] + [resp.string(buf, meta[k]) for k in (b"ip", b"hostname") if k in meta]
            found = _lookup(mapper, hosts, [resp.integer(buf, port)])
            if found is None:
                continue
            edits.append(resp.replace_string(buf, host, found[0]))
            edits.append(resp.replace_integer(buf, port, found[1]))
            for key in (b"ip", b"hostname"):
                if key in meta and resp.string(buf, meta[key]):
                    edits.append(resp.replace_string(buf, meta[key], found[0]))


def _shards(buf: bytes, root: resp.Value, mapper: Mapper, edits: list[resp.Edit]) -> None:
    """CLUSTER SHARDS: [{slots: [...], nodes: [{id, port, tls-port, ip, endpoint, hostname, ...}, ...]}, ...]."""
    for shard in root.children if root.type == 0x2A else ():
        nodes = resp.pairs(buf, shard).get(b"nodes")
        for node in nodes.children if nodes is not None and nodes.type == 0x2A else ():
            fields = resp.pairs(buf, node)
            host_fields = [fields[k] for k in (b"ip", b"endpoint", b"hostname") if k in fields]
            port_fields = [fields[k] for k in (b"port", b"tls-port") if k in fields]
            found = _lookup(
                mapper,
                [resp.string(buf, value) for value in host_fields],
                [resp.integer(buf, value) for value in port_fields],
            )
            if found is None:
                continue
            edits.extend(resp.replace_string(buf, value, found[0]) for value in host_fields if resp.string(buf, value))
            edits.extend(resp.replace_integer(buf, value, found[1]) for value in port_fields)


def _nodes(buf: bytes, value: resp.Value, mapper: Mapper, edits: list[resp.Edit]) -> None:
    """CLUSTER NODES (one string) and CLUSTER REPLICAS (an array of one-line strings)."""
    text = resp.string(buf, value)
    if text is not None:
        new = rewrite_cluster_nodes(text, mapper)
        if new is not text:
            edits.append(resp.replace_string(buf, value, new))
    elif value.type == 0x2A:
        for child in value.children:
            _nodes(buf, child, mapper, edits)


_BY_KIND = {SLOTS: _slots, SHARDS: _shards, NODES: _nodes}


def rewrite_reply(buf: bytes, kind: Kind, mapper: Mapper) -> bytes:
    """One complete reply, rewritten for the command kind it answers; bytes outside rewritten fields are kept.

    Raises resp.RespError if `buf` is not one complete RESP value.
    """
    root = resp.parse(buf)
    edits: list[resp.Edit] = []
    _errors(buf, root, mapper, edits)
    if isinstance(kind, tuple):
        # EXEC: element i answers queued command i, unless the transaction was aborted or the count is off.
        if root.type == 0x2A and len(root.children) == len(kind):
            for child, child_kind in zip(root.children, kind, strict=True):
                if child_kind in _BY_KIND:
                    _BY_KIND[child_kind](buf, child, mapper, edits)
    elif kind in _BY_KIND:
        _BY_KIND[kind](buf, root, mapper, edits)
    return resp.apply(buf, edits) if edits else buf


def _kind(argv: list[bytes]) -> int:
    name = argv[0].lower()
    if name in _UNTRACKABLE or (name == b"client" and len(argv) > 1 and argv[1].lower() == b"reply"):
        return PASSTHROUGH
    if name == b"cluster" and len(argv) > 1:
        return _CLUSTER_KINDS.get(argv[1].lower(), OTHER)
    return OTHER


def _unquote(word: bytes) -> bytes:
    if len(word) >= 2 and word[0] == word[-1] and word[:1] in (b'"', b"'"):
        return word[1:-1]
    return word


class ClusterRewriter:
    """Per-connection rewriter for a Redis Cluster node, RESP2 and RESP3.

    Client commands (RESP arrays or inline) are parsed to queue the kind of each expected reply. Replies are
    framed as a stream: plain replies flow through as slices of the input (only `-MOVED`/`-ASK` lines are
    replaced); a reply to CLUSTER SLOTS/SHARDS/NODES/REPLICAS (or an EXEC containing one) is held whole and
    rewritten. RESP3 pushes do not consume a command. After pub/sub, MONITOR, CLIENT REPLY or anything
    unparseable, the rest of the connection passes through unchanged.
    """

    __slots__ = (
        "_mapper",
        "_queue",
        "_passthrough",
        "_line",
        "_bulk",
        "_trailer",
        "_stack",
        "_stream_string",
        "_capture",
        "_capture_kind",
        "_client_done",
        "_client_line",
        "_args_left",
        "_arg_skip",
        "_arg",
        "_argv",
        "_in_multi",
        "_multi_kinds",
    )

    def __init__(self, mapper: Mapper) -> None:
        self._mapper = mapper
        self._queue: deque[Kind] = deque()
        self._passthrough = False
        # reply framing
        self._line = bytearray()  # incomplete header line
        self._bulk = 0  # bulk payload bytes still to pass
        self._trailer = 0  # bytes of a bulk payload's CRLF still to check
        self._stack: list[list[int]] = []  # open aggregates: [children left (-1: streamed), flags]
        self._stream_string = False  # inside `$?` chunks
        self._capture: bytearray | None = None  # the reply being held for rewriting
        self._capture_kind: Kind = OTHER
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
                line, i = take_line(self._client_line, data, i, _MAX_INLINE)
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
            self._on_command([_unquote(word) for word in words])
        return True

    def _end_argument(self) -> None:
        self._argv.append(bytes(self._arg[:-2]) if self._arg is not None else b"")
        self._arg = None
        self._args_left -= 1
        if not self._args_left:
            self._on_command(self._argv)

    def _on_command(self, argv: list[bytes]) -> None:
        kind = _kind(argv)
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
                        if not self._stream_string and self._element_done() and self._capture is not None:
                            self._capture += view[run:i]
                            run = i
                            out.append(self._finish_capture())
                continue
            if self._trailer:
                if data[i] != (13 if self._trailer == 2 else 10):
                    return self._give_up(out, view, run, i)
                i += 1
                self._trailer -= 1
                if self._trailer or self._stream_string or not self._element_done():
                    continue
                if self._capture is not None:
                    self._capture += view[run:i]
                    run = i
                    out.append(self._finish_capture())
                continue
            j = data.find(b"\n", i)
            if j < 0:
                if len(self._line) + n - i > _MAX_LINE:
                    return self._give_up(out, view, run, i)
                self._sink(out, view[run:i])
                self._line += view[i:]
                run = i = n
                break
            start, i = i, j + 1
            # A held line began in an earlier chunk, so then start == run == 0 and nothing is pending before it.
            held = bytes(self._line)
            self._line.clear()
            line = held + data[start:i] if held else data[start:i]
            if len(line) < 3 or line[-2] != 13 or line[0] not in _TYPES or len(line) - 1 > _MAX_LINE:
                self._line += held
                return self._give_up(out, view, run, start)
            kind = line[0]
            if not self._stack and not self._stream_string and kind != 0x7C and kind != 0x3E:
                # The first line of a reply (not an attribute prefix, not a push): which command does it answer?
                reply_kind = self._queue.popleft() if self._queue else OTHER
                if reply_kind == PASSTHROUGH:
                    self._line += held
                    return self._give_up(out, view, run, start)
                if reply_kind != OTHER:
                    out.append(view[run:start])
                    run = start
                    self._capture = bytearray()
                    self._capture_kind = reply_kind
            redirect = rewrite_redirect(line[1:-2], self._mapper) if kind == 0x2D and self._capture is None else None
            if redirect is not None:
                out.append(view[run:start])
                out.append(b"-" + redirect + b"\r\n")
                run = i  # the original line, held part included, is dropped
            elif held:
                self._sink(out, held)
            verdict = self._on_reply_line(kind, line)
            if verdict is None:  # held was already sunk in order; the rest goes out unchanged
                return self._give_up(out, view, run, start)
            if verdict and self._capture is not None:
                self._capture += view[run:i]
                run = i
                out.append(self._finish_capture())
        if self._capture is not None:
            self._capture += view[run:]
            if len(self._capture) > _MAX_CAPTURE:
                out.append(self._capture)  # too big to hold: this reply passes unchanged
                self._capture = None
            return b"".join(out)
        if run == 0 and not out:
            return data
        out.append(view[run:])
        return b"".join(out)

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

    def _on_reply_line(self, kind: int, line: bytes) -> bool | None:
        """Frame one header line: True if it completed a top-level reply, False if not, None if unparseable."""
        text = line[1:-2]
        if self._stream_string:
            if kind != 0x3B or not text.isdigit():  # ";<size>" chunks
                return None
            size = int(text)
            if size:
                self._bulk = size
                return False
            self._stream_string = False
            return self._element_done()
        if kind in resp.SIMPLE:
            return self._element_done()
        if kind in resp.BULK:
            if text == b"?" and kind == 0x24:
                self._stream_string = True
                return False
            if text.isdigit():
                size = int(text)
                if size:
                    self._bulk = size
                else:
                    self._trailer = 2
                return False
            return self._element_done() if text == b"-1" else None
        if kind == 0x2E:  # "." ends a streamed aggregate
            if not self._stack or self._stack[-1][0] >= 0:
                return None
            self._stack.pop()
            return self._element_done()
        # aggregates
        if text == b"?":
            self._stack.append([-1, _STREAMED])
            return False
        if text.isdigit():
            count = int(text) * (2 if kind in resp.PAIRED else 1)
            if count:
                self._stack.append([count, _ATTRIBUTE if kind == 0x7C else 0])
                return False
            return False if kind == 0x7C else self._element_done()
        return self._element_done() if text == b"-1" else None

    def _element_done(self) -> bool:
        """One value ended: count it in its parent; True if that completed a top-level reply or push."""
        stack = self._stack
        while stack:
            frame = stack[-1]
            if frame[0] < 0:
                return False  # streamed aggregate: ends with "."
            frame[0] -= 1
            if frame[0]:
                return False
            stack.pop()
            if frame[1] == _ATTRIBUTE:
                return False  # the attributed value follows and is the element
        return True

    def _finish_capture(self) -> bytes:
        assert self._capture is not None
        captured = bytes(self._capture)
        self._capture = None
        try:
            return rewrite_reply(captured, self._capture_kind, self._mapper)
        except (resp.RespError, ValueError):
            return captured  # framing accepted it, parsing did not (e.g. nested too deep): pass unchanged
