"""Memcached Auto Discovery: cluster-config replies rewritten to public node addresses, all else untouched."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from forwarder.protocols import Mapper, Warn
from forwarder.protocols.lines import LineTooLong, take_line

CLUSTER_KEY = b"AmazonElastiCache:cluster"
"""The key the pre-1.4.14 `get` form of Auto Discovery reads."""

_MAX_REPLY_LINE = 8192  # VALUE/CONFIG/STAT lines are short; longer means this is not text protocol
_MAX_REQUEST_LINE = 1 << 20  # a multi-get of thousands of 250-byte keys still fits
# A config natfwd rewrites has at most this many nodes and bytes (an ElastiCache cluster has at most a few
# hundred nodes, ~100 bytes each); beyond them the block passes unchanged, with one warning.
MAX_CONFIG_NODES = 1024
MAX_CONFIG_BYTES = 128 << 10
_STORAGE = frozenset((b"set", b"add", b"replace", b"append", b"prepend", b"cas"))
_Chunk = bytes | bytearray | memoryview
_BINARY_MAGIC = (0x80, 0x81)  # request / response magic of the binary protocol


class ClusterConfigError(ValueError):
    """A cluster-config payload does not follow `<version>\\n<host>|<ip>|<port> ...\\n`."""


class ClusterNode(NamedTuple):
    """One `host|ip|port` entry of a cluster config; `ip` may be empty."""

    host: str
    ip: str
    port: int


def parse_cluster_config(payload: bytes) -> tuple[int, list[ClusterNode]]:
    """Parse a cluster-config payload (`<version>\\n<entries>\\n`) into its version and nodes.

    Raises ClusterConfigError when the payload is malformed (bad version, entry or port).
    """
    lines = payload.split(b"\n")
    if len(lines) < 2 or any(line.strip() for line in lines[2:]):
        raise ClusterConfigError(f"expected '<version>\\n<nodes>\\n', got {payload[:80]!r}")
    version_text = lines[0].strip()
    if not version_text.isdigit():
        raise ClusterConfigError(f"cluster config version must be a number, got {version_text[:40]!r}")
    nodes: list[ClusterNode] = []
    for entry in lines[1].split():
        fields = entry.split(b"|")
        if len(fields) != 3 or not fields[2].isdigit() or not 0 < int(fields[2]) < 65536 or not fields[0] + fields[1]:
            raise ClusterConfigError(f"cluster config entry must be 'host|ip|port', got {entry[:80]!r}")
        nodes.append(ClusterNode(fields[0].decode("latin-1"), fields[1].decode("latin-1"), int(fields[2])))
    return int(version_text), nodes


def render_cluster_config(version: int, nodes: Iterable[tuple[str, str, int]]) -> bytes:
    """Render a cluster-config payload: `<version>\\n<host>|<ip>|<port> ...\\n`."""
    entries = " ".join(f"{host}|{ip}|{port}" for host, ip, port in nodes)
    return f"{version}\n{entries}\n".encode("latin-1")


def render_config_reply(version: int, nodes: Iterable[tuple[str, str, int]], *, legacy: bool = False) -> bytes:
    """Render the whole reply a configuration endpoint sends, to `config get cluster` or (legacy) the `get` form."""
    payload = render_cluster_config(version, nodes)
    header = b"VALUE " + CLUSTER_KEY if legacy else b"CONFIG cluster"
    return b"%s 0 %d\r\n%s\r\nEND\r\n" % (header, len(payload), payload)


def rewrite_cluster_config(payload: bytes, mapper: Mapper, warn: Warn) -> bytes:
    """Return `payload` with every node as `public|public|port`; nodes without a forward are left out.

    The mapper is tried with the node's host name, then its IP. Raises ClusterConfigError on a malformed payload
    or one of more than MAX_CONFIG_NODES nodes (counted before any is parsed).
    """
    if len(payload) > MAX_CONFIG_BYTES:
        raise ClusterConfigError(f"{len(payload)} bytes, more than the {MAX_CONFIG_BYTES} natfwd rewrites")
    if payload.count(b"|") > 2 * MAX_CONFIG_NODES:
        raise ClusterConfigError(f"more than the {MAX_CONFIG_NODES} nodes natfwd rewrites")
    version, nodes = parse_cluster_config(payload)
    public: list[tuple[str, str, int]] = []
    for node in nodes:
        found = (mapper(node.host, node.port) if node.host else None) or (
            mapper(node.ip, node.port) if node.ip else None
        )
        if found is None:
            warn(f"auto discovery: node {node.host}|{node.ip}|{node.port} has no forward; left out of the node list")
            continue
        public.append((found[0], found[0], found[1]))
    return render_cluster_config(version, public)


def _length(token: bytes) -> int | None:
    return int(token) if token.isdigit() else None


class AutoDiscoveryRewriter:
    """Per-connection rewriter for a memcached configuration endpoint (text protocol; binary passes through).

    Replies are parsed as a stream: lines, plus `VALUE`/`CONFIG`/`VA` data blocks skipped by their length, so
    stored values are never inspected. A `CONFIG cluster` block (or a `VALUE AmazonElastiCache:cluster` block) is
    rewritten only while the client has such a request outstanding. Requests are counted rather than matched one
    to one with replies: the block header already names what it is, and counting stays right through `noreply`,
    quiet meta commands and errors that would derail a reply-by-reply match. Anything unparseable switches the
    connection to pass-through, releasing held bytes unchanged.
    """

    __slots__ = (
        "_mapper",
        "_warn",
        "_passthrough",
        "_reply_started",
        "_line",
        "_skip",
        "_trailer",
        "_header",
        "_capture",
        "_capture_left",
        "_want_config",
        "_want_value",
        "_request_started",
        "_request_line",
        "_request_skip",
    )

    def __init__(self, mapper: Mapper, warn: Warn) -> None:
        self._mapper = mapper
        self._warn = warn
        self._passthrough = False
        self._reply_started = False
        self._line = bytearray()  # incomplete reply line
        self._skip = 0  # data bytes left in an opaque block
        self._trailer = 0  # bytes of the block's closing CRLF still to check
        self._header = b""  # the header line of the block being captured
        self._capture: bytearray | None = None
        self._capture_left = 0
        self._want_config = 0  # outstanding `config get cluster` requests
        self._want_value = 0  # outstanding gets of CLUSTER_KEY
        self._request_started = False
        self._request_line = bytearray()
        self._request_skip = 0

    # -- client side -------------------------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self._passthrough or not data:
            return
        if not self._request_started:
            self._request_started = True
            if data[0] in _BINARY_MAGIC:
                self._passthrough = True
                return
        i, n = 0, len(data)
        while i < n:
            if self._request_skip:
                step = min(self._request_skip, n - i)
                i += step
                self._request_skip -= step
                continue
            try:
                line, _, i = take_line(self._request_line, data, i, _MAX_REQUEST_LINE)
            except LineTooLong:
                self._passthrough = True  # cannot follow the requests any more; stop rewriting
                return
            if line is None:
                return
            self._on_request(line.split())

    def _on_request(self, words: list[bytes]) -> None:
        if not words:
            return
        command = words[0]
        if command in (b"get", b"gets"):
            self._want_value += words[1:].count(CLUSTER_KEY)
        elif command in (b"gat", b"gats"):
            self._want_value += words[2:].count(CLUSTER_KEY)
        elif command == b"config":
            if words[1:3] == [b"get", b"cluster"]:
                self._want_config += 1
        elif command in _STORAGE:
            # memcached swallows the data block only when the command line parsed; mirror that.
            if len(words) >= 5 and words[2].isdigit() and words[3].lstrip(b"-").isdigit() and words[4].isdigit():
                self._request_skip = int(words[4]) + 2
        elif command == b"ms" and len(words) >= 3 and words[2].isdigit():
            self._request_skip = int(words[2]) + 2

    # -- node side ---------------------------------------------------------------------------------------------

    def pending(self) -> int:
        return len(self._line) + len(self._header) + len(self._capture or b"")

    def flush(self) -> bytes:
        held = self._held()
        self._passthrough = True
        return held

    def _held(self) -> bytes:
        """Everything held back, in stream order, unchanged; clears it."""
        held = self._header + (self._capture or b"") + self._line
        self._header, self._capture = b"", None
        self._line.clear()
        return held

    def from_node(self, data: bytes) -> bytes:
        if self._passthrough:
            return self._held() + data if self.pending() else data
        if not self._reply_started and data:
            self._reply_started = True
            if data[0] in _BINARY_MAGIC:
                self._passthrough = True
                return data
        out: list[_Chunk] = []
        view = memoryview(data)
        i, n = 0, len(data)
        run = 0  # data[run:i] is passed on unchanged, emitted lazily
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                i += step
                self._skip -= step
                continue
            if self._trailer:
                if data[i] != (13 if self._trailer == 2 else 10):
                    return self._give_up(out, view, run, i)
                i += 1
                self._trailer -= 1
                continue
            if self._capture is not None:
                step = min(self._capture_left, n - i)
                self._capture += view[i : i + step]
                i = run = i + step
                self._capture_left -= step
                if not self._capture_left:
                    out.append(self._finish_capture())
                    if self._passthrough:
                        out.append(view[i:])
                        return b"".join(out)
                continue
            try:
                line, held, end = take_line(self._line, data, i, _MAX_REPLY_LINE)
            except LineTooLong:
                return self._give_up(out, view, run, i)
            if line is None:
                out.append(view[run:i])
                run = i = n
                break
            start, i = i, end
            # A held line began in an earlier chunk, so then start == run == 0 and nothing is pending before it.
            verdict = self._on_reply_line(line)
            if verdict is None:
                if held:
                    out.append(held)
                continue
            out.append(view[run:start])
            if not verdict:  # unparseable: everything from this line on passes unchanged
                self._line += held
                return self._give_up(out, view, start, start)
            run = i  # captured as a block header: emitted later, rewritten
        if run == 0 and not out:
            return data
        out.append(view[run:])
        return b"".join(out)

    def _give_up(self, out: list[_Chunk], view: memoryview, run: int, at: int) -> bytes:
        """Switch to pass-through: emit what was decided, what is held and the rest of the chunk, unchanged."""
        self._passthrough = True
        out.append(view[run:at])
        out.append(self._held())
        out.append(view[at:])
        return b"".join(out)

    def _on_reply_line(self, line: bytes) -> bool | None:
        """Classify one complete reply line: None = pass it on; True = captured as a block header; False = give up."""
        first = line[:1]
        if first != b"V" and first != b"C":
            return None
        words = line.split()
        if words[0] == b"VALUE":
            if len(words) not in (4, 5) or (size := _length(words[3])) is None:
                return False
            if words[1] == CLUSTER_KEY and self._want_value:
                self._want_value -= 1
                if self._fits(size):
                    return self._start_capture(line, size)
        elif words[0] == b"CONFIG":
            if len(words) != 4 or (size := _length(words[3])) is None:
                return False
            if words[1] == b"cluster" and self._want_config:
                self._want_config -= 1
                if self._fits(size):
                    return self._start_capture(line, size)
        elif words[0] == b"VA":
            if len(words) < 2 or (size := _length(words[1])) is None:
                return False
        else:
            return None
        self._skip, self._trailer = size, 2
        return None

    def _fits(self, size: int) -> bool:
        """Whether a config block of `size` bytes is rewritten; a bigger one passes unchanged, with a warning."""
        if size <= MAX_CONFIG_BYTES:
            return True
        self._warn(f"auto discovery: cluster config passed unchanged: {size} bytes, more than the "
                   f"{MAX_CONFIG_BYTES} natfwd rewrites")  # fmt: skip
        return False

    def _start_capture(self, line: bytes, size: int) -> bool:
        self._header = line
        self._capture = bytearray()
        self._capture_left = size + 2
        return True

    def _finish_capture(self) -> bytes:
        """Rewrite the captured block (payload + CRLF) and return the new header line and block."""
        assert self._capture is not None
        header, block = self._header, bytes(self._capture)
        self._header, self._capture = b"", None
        if not block.endswith(b"\r\n"):
            self._passthrough = True  # the length lied; nothing after it can be trusted
            return header + block
        try:
            payload = rewrite_cluster_config(block[:-2], self._mapper, self._warn)
        except ClusterConfigError as error:
            self._warn(f"auto discovery: cluster config passed unchanged: {error}")
            return header + block
        words = header.split()
        words[3] = b"%d" % len(payload)
        return b" ".join(words) + b"\r\n" + payload + b"\r\n"
