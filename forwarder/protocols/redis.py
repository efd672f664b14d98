"""Redis Cluster node addresses made public in whole values: MOVED/ASK errors, CLUSTER NODES text, and complete
CLUSTER SLOTS/SHARDS/NODES replies (the reference the streaming rewriter in redis_stream.py is tested against)."""

from __future__ import annotations

from forwarder.protocols import Mapper, resp

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


def error_edits(buf: bytes, value: resp.Value, mapper: Mapper, edits: list[resp.Edit]) -> None:
    if value.type == 0x2D:  # "-"
        new = rewrite_redirect(buf[value.body_start : value.body_end], mapper)
        if new is not None:
            edits.append((value.start, value.end, b"-" + new + b"\r\n"))
    for child in value.children:
        error_edits(buf, child, mapper, edits)


def slot_node_edits(buf: bytes, node: resp.Value, mapper: Mapper, edits: list[resp.Edit]) -> None:
    """One node of a CLUSTER SLOTS range: [host, port, id, {metadata}]."""
    if node.type != 0x2A or len(node.children) < 2:
        return
    host, port = node.children[0], node.children[1]
    meta = resp.pairs(buf, node.children[3]) if len(node.children) > 3 else {}
    hosts = [resp.string(buf, host)] + [resp.string(buf, meta[k]) for k in (b"ip", b"hostname") if k in meta]
    found = _lookup(mapper, hosts, [resp.integer(buf, port)])
    if found is None:
        return
    edits.append(resp.replace_string(buf, host, found[0]))
    edits.append(resp.replace_integer(buf, port, found[1]))
    for key in (b"ip", b"hostname"):
        if key in meta and resp.string(buf, meta[key]):
            edits.append(resp.replace_string(buf, meta[key], found[0]))


def _slots(buf: bytes, root: resp.Value, mapper: Mapper, edits: list[resp.Edit]) -> None:
    """CLUSTER SLOTS: [[start, end, [host, port, id, {metadata}], ...], ...]."""
    for slot_range in root.children if root.type == 0x2A else ():
        for node in slot_range.children[2:] if slot_range.type == 0x2A else ():
            slot_node_edits(buf, node, mapper, edits)


def shard_node_edits(buf: bytes, node: resp.Value, mapper: Mapper, edits: list[resp.Edit]) -> None:
    """One node of a CLUSTER SHARDS shard: {id, port, tls-port, ip, endpoint, hostname, ...}."""
    fields = resp.pairs(buf, node)
    host_fields = [fields[k] for k in (b"ip", b"endpoint", b"hostname") if k in fields]
    port_fields = [fields[k] for k in (b"port", b"tls-port") if k in fields]
    found = _lookup(
        mapper,
        [resp.string(buf, value) for value in host_fields],
        [resp.integer(buf, value) for value in port_fields],
    )
    if found is None:
        return
    edits.extend(resp.replace_string(buf, value, found[0]) for value in host_fields if resp.string(buf, value))
    edits.extend(resp.replace_integer(buf, value, found[1]) for value in port_fields)


def _shards(buf: bytes, root: resp.Value, mapper: Mapper, edits: list[resp.Edit]) -> None:
    """CLUSTER SHARDS: [{slots: [...], nodes: [{id, port, tls-port, ip, endpoint, hostname, ...}, ...]}, ...]."""
    for shard in root.children if root.type == 0x2A else ():
        nodes = resp.pairs(buf, shard).get(b"nodes")
        for node in nodes.children if nodes is not None and nodes.type == 0x2A else ():
            shard_node_edits(buf, node, mapper, edits)


def nodes_edits(buf: bytes, value: resp.Value, mapper: Mapper, edits: list[resp.Edit]) -> None:
    """CLUSTER NODES (one string) and CLUSTER REPLICAS (an array of one-line strings)."""
    text = resp.string(buf, value)
    if text is not None:
        new = rewrite_cluster_nodes(text, mapper)
        if new is not text:
            edits.append(resp.replace_string(buf, value, new))
    elif value.type == 0x2A:
        for child in value.children:
            nodes_edits(buf, child, mapper, edits)


_BY_KIND = {SLOTS: _slots, SHARDS: _shards, NODES: nodes_edits}


def rewrite_reply(buf: bytes, kind: Kind, mapper: Mapper) -> bytes:
    """One complete reply, rewritten for the command kind it answers; bytes outside rewritten fields are kept.

    Raises resp.RespError if `buf` is not one complete RESP value.
    """
    root = resp.parse(buf)
    edits: list[resp.Edit] = []
    error_edits(buf, root, mapper, edits)
    if isinstance(kind, tuple):
        # EXEC: element i answers queued command i, unless the transaction was aborted or the count is off.
        if root.type == 0x2A and len(root.children) == len(kind):
            for child, child_kind in zip(root.children, kind, strict=True):
                if child_kind in _BY_KIND:
                    _BY_KIND[child_kind](buf, child, mapper, edits)
    elif kind in _BY_KIND:
        _BY_KIND[kind](buf, root, mapper, edits)
    return resp.apply(buf, edits) if edits else buf


def command_kind(argv: list[bytes]) -> int:
    """The kind of reply a command (its arguments, the name first) gets."""
    name = argv[0].lower()
    if name in _UNTRACKABLE or (name == b"client" and len(argv) > 1 and argv[1].lower() == b"reply"):
        return PASSTHROUGH
    if name == b"cluster" and len(argv) > 1:
        return _CLUSTER_KINDS.get(argv[1].lower(), OTHER)
    return OTHER


def unquote(word: bytes) -> bytes:
    """An inline command's word without the quotes around it."""
    if len(word) >= 2 and word[0] == word[-1] and word[:1] in (b'"', b"'"):
        return word[1:-1]
    return word
