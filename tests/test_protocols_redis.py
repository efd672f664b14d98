"""Redis Cluster rewriter: exact bytes for every reply kind, every split point, pipelines, RESP3, fuzz, real cluster."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from rewritekit import corrupted, random_cuts, random_pipeline, run_connection

from forwarder.protocols import resp
from forwarder.protocols.redis import rewrite_cluster_nodes, rewrite_redirect
from forwarder.protocols.redis_stream import ClusterRewriter

PUBLIC = "203.0.113.73"
FORWARDS = {
    ("10.0.1.230", 6379): (PUBLIC, 11211),
    ("10.0.1.231", 6379): (PUBLIC, 11212),
    ("10.0.1.232", 6379): (PUBLIC, 11213),
    ("2001:db8::5", 6379): (PUBLIC, 11214),
    ("node-c.internal", 6380): (PUBLIC, 11215),
}


def mapper(host: str, port: int) -> tuple[str, int] | None:
    return FORWARDS.get((host, port))


def no_mapper(host: str, port: int) -> tuple[str, int] | None:
    return None


# -- RESP builders, so expected bytes read like the protocol --------------------------------------------------------


def bulk(text: bytes | str) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


def verbatim(text: bytes) -> bytes:
    return b"=%d\r\ntxt:%s\r\n" % (len(text) + 4, text)


def integer(number: int) -> bytes:
    return b":%d\r\n" % number


def array(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(items)


def resp3_map(*items: bytes) -> bytes:
    return b"%%%d\r\n" % (len(items) // 2) + b"".join(items)


def command(*words: str) -> bytes:
    return array(*(bulk(word) for word in words))


NODES_PRIVATE = (
    b"07c37dfeb235213a872192d90877d0cd55635b91 10.0.1.230:6379@16379 myself,master - 0 1426238317239 1 "
    b"connected 0-5460\n"
    b"67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 10.0.1.231:6379@16379,node-b.internal master - 0 1426238316232 2 "
    b"connected 5461-10922\n"
    b"292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 10.9.9.9:6379@16379 master - 0 1426238318243 3 connected 10923-16383\n"
    b"824fe116063bc5fcf9f4ffd895bc17aee7731ac3 :0@0 slave,noaddr 07c37dfeb235213a872192d90877d0cd55635b91 0 0 1 "
    b"disconnected\n"
)
NODES_PUBLIC = (
    b"07c37dfeb235213a872192d90877d0cd55635b91 203.0.113.73:11211@16379 myself,master - 0 1426238317239 1 "
    b"connected 0-5460\n"
    b"67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 203.0.113.73:11212@16379,203.0.113.73 master - 0 1426238316232 2 "
    b"connected 5461-10922\n"
    b"292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 10.9.9.9:6379@16379 master - 0 1426238318243 3 connected 10923-16383\n"
    b"824fe116063bc5fcf9f4ffd895bc17aee7731ac3 :0@0 slave,noaddr 07c37dfeb235213a872192d90877d0cd55635b91 0 0 1 "
    b"disconnected\n"
)
NODE_ID = bulk("07c37dfeb235213a872192d90877d0cd55635b91")
PUBLIC_REPLICA = (PUBLIC, 11213)  # the slots replies' replica, 10.0.1.232:6379, as clients see it


def slots_reply(
    host: bytes | str,
    port: int,
    meta: bytes,
    *,
    resp3: bool = False,
    second: bytes | None = None,
    replica: tuple[str, int] = ("10.0.1.232", 6379),
) -> bytes:
    """CLUSTER SLOTS: slots 0-5460 on `host:port` and a replica (no metadata), then the `second` range if given."""
    node = array(bulk(host), integer(port), NODE_ID, meta)
    replica_node = array(bulk(replica[0]), integer(replica[1]), NODE_ID, resp3_map() if resp3 else array())
    ranges = [array(integer(0), integer(5460), node, replica_node)]
    if second is not None:
        ranges.append(array(integer(5461), integer(16383), second))
    return array(*ranges)


def shard(ip: str, port: int, *, resp3: bool, tls_port: int | None = None, hostname: str | None = None) -> bytes:
    fields = [bulk("id"), NODE_ID, bulk("port"), integer(port)]
    if tls_port is not None:
        fields += [bulk("tls-port"), integer(tls_port)]
    fields += [bulk("ip"), bulk(ip), bulk("endpoint"), bulk(ip)]
    if hostname is not None:
        fields += [bulk("hostname"), bulk(hostname)]
    fields += [bulk("role"), bulk("master"), bulk("replication-offset"), integer(72156), bulk("health"), bulk("online")]
    node = resp3_map(*fields) if resp3 else array(*fields)
    outer = [bulk("slots"), array(integer(0), integer(5460)), bulk("nodes"), array(node)]
    return resp3_map(*outer) if resp3 else array(*outer)


MOVED_LOOKALIKE = b"-MOVED 1 10.0.1.230:6379\r\n"

# (id, client bytes, node bytes, expected bytes to the client)
CASES: list[tuple[str, bytes, bytes, bytes]] = [
    ("moved", command("GET", "k"), b"-MOVED 3999 10.0.1.231:6379\r\n", b"-MOVED 3999 203.0.113.73:11212\r\n"),
    ("ask", command("GET", "k"), b"-ASK 3999 10.0.1.232:6379\r\n", b"-ASK 3999 203.0.113.73:11213\r\n"),
    ("moved-ipv6", command("GET", "k"), b"-MOVED 1 2001:db8::5:6379\r\n", b"-MOVED 1 203.0.113.73:11214\r\n"),
    ("moved-hostname", command("GET", "k"), b"-MOVED 1 node-c.internal:6380\r\n", b"-MOVED 1 203.0.113.73:11215\r\n"),
    ("moved-unknown-node", command("GET", "k"), b"-MOVED 1 10.9.9.9:6379\r\n", b"-MOVED 1 10.9.9.9:6379\r\n"),
    ("moved-unknown-endpoint", command("GET", "k"), b"-MOVED 1 :6379\r\n", b"-MOVED 1 :6379\r\n"),
    ("moved-wrong-port", command("GET", "k"), b"-MOVED 1 10.0.1.230:6380\r\n", b"-MOVED 1 10.0.1.230:6380\r\n"),
    ("other-error", command("GET", "k"), b"-ERR MOVED 1 10.0.1.230:6379\r\n", b"-ERR MOVED 1 10.0.1.230:6379\r\n"),
    ("get-value-like-moved", command("GET", "k"), bulk(MOVED_LOOKALIKE), bulk(MOVED_LOOKALIKE)),
    ("status-like-moved", command("SET", "k", "v"), b"+MOVED 1 10.0.1.230:6379\r\n", b"+MOVED 1 10.0.1.230:6379\r\n"),
    ("get-value-like-nodes", command("GET", "k"), bulk(NODES_PRIVATE), bulk(NODES_PRIVATE)),
    (
        "blob-error-untouched",
        command("GET", "k"),
        b"!23\r\nMOVED 1 10.0.1.230:6379\r\n",
        b"!23\r\nMOVED 1 10.0.1.230:6379\r\n",
    ),
    ("nodes", command("CLUSTER", "NODES"), bulk(NODES_PRIVATE), bulk(NODES_PUBLIC)),
    ("nodes-lowercase-inline", b"cluster nodes\n", bulk(NODES_PRIVATE), bulk(NODES_PUBLIC)),
    ("nodes-quoted-inline", b'"cluster" "nodes"\r\n', bulk(NODES_PRIVATE), bulk(NODES_PUBLIC)),
    ("nodes-resp3-verbatim", command("CLUSTER", "NODES"), verbatim(NODES_PRIVATE), verbatim(NODES_PUBLIC)),
    (
        "nodes-7.2-aux-fields",
        command("CLUSTER", "NODES"),
        bulk(b"abc 10.0.1.230:6379@16379,,tls-port=0,shard-id=9f myself,master - 0 0 1 connected 0-16383\n"),
        bulk(b"abc 203.0.113.73:11211@16379,,tls-port=0,shard-id=9f myself,master - 0 0 1 connected 0-16383\n"),
    ),
    (
        "nodes-matched-by-hostname",
        command("CLUSTER", "NODES"),
        bulk(b"abc 10.0.2.9:6380@16380,node-c.internal master - 0 0 1 connected\n"),
        bulk(b"abc 203.0.113.73:11215@16380,203.0.113.73 master - 0 0 1 connected\n"),
    ),
    (
        "replicas",
        command("CLUSTER", "REPLICAS", "07c37dfeb235213a872192d90877d0cd55635b91"),
        array(bulk(b"aaa 10.0.1.231:6379@16379 slave 07c 0 0 1 connected\n"), bulk(b"bbb 10.0.1.99:6379@16379 x\n")),
        array(bulk(b"aaa 203.0.113.73:11212@16379 slave 07c 0 0 1 connected\n"), bulk(b"bbb 10.0.1.99:6379@16379 x\n")),
    ),
    (
        "slaves-inline",
        b"CLUSTER SLAVES 07c\r\n",
        array(bulk(b"aaa 10.0.1.231:6379@16379 slave 07c 0 0 1 connected\n")),
        array(bulk(b"aaa 203.0.113.73:11212@16379 slave 07c 0 0 1 connected\n")),
    ),
    (
        "slots-resp2-hostname-metadata",
        command("CLUSTER", "SLOTS"),
        slots_reply(b"10.0.1.230", 6379, array(bulk("hostname"), bulk("node-a.internal"))),
        slots_reply(PUBLIC, 11211, array(bulk("hostname"), bulk(PUBLIC)), replica=PUBLIC_REPLICA),
    ),
    (
        "slots-resp3-map-metadata",
        command("CLUSTER", "SLOTS"),
        slots_reply(b"10.0.1.230", 6379, resp3_map(bulk("hostname"), bulk("node-a.internal")), resp3=True),
        slots_reply(PUBLIC, 11211, resp3_map(bulk("hostname"), bulk(PUBLIC)), resp3=True, replica=PUBLIC_REPLICA),
    ),
    (
        "slots-preferred-hostname-matched-by-ip",
        command("CLUSTER", "SLOTS"),
        slots_reply(b"node-a.internal", 6379, array(bulk("ip"), bulk("10.0.1.230"))),
        slots_reply(PUBLIC, 11211, array(bulk("ip"), bulk(PUBLIC)), replica=PUBLIC_REPLICA),
    ),
    (
        "slots-unknown-endpoint-and-unmapped-node",
        command("CLUSTER", "SLOTS"),
        slots_reply(
            b"?",
            6379,
            resp3_map(bulk("ip"), bulk("10.0.1.231"), bulk("hostname"), bulk("")),
            resp3=True,
            second=array(bulk("10.9.9.9"), integer(6379), NODE_ID),
        ),
        slots_reply(
            PUBLIC,
            11212,
            resp3_map(bulk("ip"), bulk(PUBLIC), bulk("hostname"), bulk("")),
            resp3=True,
            second=array(bulk("10.9.9.9"), integer(6379), NODE_ID),
            replica=PUBLIC_REPLICA,
        ),
    ),
    (
        "shards-resp2",
        command("CLUSTER", "SHARDS"),
        array(shard("10.0.1.230", 6379, resp3=False, hostname="node-a.internal"), shard("10.9.9.9", 6379, resp3=False)),
        array(shard(PUBLIC, 11211, resp3=False, hostname=PUBLIC), shard("10.9.9.9", 6379, resp3=False)),
    ),
    (
        "shards-resp3-tls-port",
        command("cluster", "shards"),
        array(shard("10.0.1.231", 6379, resp3=True, tls_port=6390)),
        array(shard(PUBLIC, 11212, resp3=True, tls_port=11212)),
    ),
    (
        "shards-matched-on-tls-port",
        command("CLUSTER", "SHARDS"),
        array(shard("10.0.1.232", 6000, resp3=True, tls_port=6379)),
        array(shard(PUBLIC, 11213, resp3=True, tls_port=11213)),
    ),
    (
        "pipeline",
        command("GET", "a")
        + command("CLUSTER", "NODES")
        + command("GET", "b")
        + b"CLUSTER SLOTS\r\n"
        + command("GET", "c")
        + command("INCR", "n"),
        bulk(NODES_PRIVATE)
        + bulk(NODES_PRIVATE)
        + bulk(MOVED_LOOKALIKE)
        + slots_reply(b"10.0.1.230", 6379, array())
        + b"-MOVED 7 10.0.1.230:6379\r\n"
        + integer(5),
        bulk(NODES_PRIVATE)
        + bulk(NODES_PUBLIC)
        + bulk(MOVED_LOOKALIKE)
        + slots_reply(PUBLIC, 11211, array(), replica=PUBLIC_REPLICA)
        + b"-MOVED 7 203.0.113.73:11211\r\n"
        + integer(5),
    ),
    (
        "empty-commands-get-no-reply",
        b"\r\n*0\r\n \r\n" + command("CLUSTER", "NODES"),
        bulk(NODES_PRIVATE),
        bulk(NODES_PUBLIC),
    ),
    (
        "multi-exec",
        command("MULTI") + command("GET", "a") + command("CLUSTER", "NODES") + command("EXEC"),
        b"+OK\r\n+QUEUED\r\n+QUEUED\r\n" + array(bulk(NODES_PRIVATE), bulk(NODES_PRIVATE)),
        b"+OK\r\n+QUEUED\r\n+QUEUED\r\n" + array(bulk(NODES_PRIVATE), bulk(NODES_PUBLIC)),
    ),
    (
        "multi-execabort-then-nodes",
        command("MULTI") + command("CLUSTER", "NODES") + command("EXEC") + command("CLUSTER", "NODES"),
        b"+OK\r\n-MOVED 1 10.0.1.230:6379\r\n-EXECABORT Transaction discarded\r\n" + bulk(NODES_PRIVATE),
        b"+OK\r\n-MOVED 1 203.0.113.73:11211\r\n-EXECABORT Transaction discarded\r\n" + bulk(NODES_PUBLIC),
    ),
    (
        "multi-nested-multi-and-watch-are-not-queued",  # exact replies of redis-server 7.0
        command("MULTI") + command("MULTI") + command("WATCH", "x") + command("CLUSTER", "NODES") + command("EXEC"),
        b"+OK\r\n-ERR MULTI calls can not be nested\r\n-ERR WATCH inside MULTI is not allowed\r\n+QUEUED\r\n"
        + array(bulk(NODES_PRIVATE)),
        b"+OK\r\n-ERR MULTI calls can not be nested\r\n-ERR WATCH inside MULTI is not allowed\r\n+QUEUED\r\n"
        + array(bulk(NODES_PUBLIC)),
    ),
    (
        "multi-discard",
        command("MULTI") + command("CLUSTER", "NODES") + command("DISCARD") + command("GET", "x"),
        b"+OK\r\n+QUEUED\r\n+OK\r\n" + bulk(NODES_PRIVATE),
        b"+OK\r\n+QUEUED\r\n+OK\r\n" + bulk(NODES_PRIVATE),
    ),
    (
        "resp3-hello-push-and-attribute",
        command("HELLO", "3") + command("GET", "k") + command("CLUSTER", "NODES") + command("GET", "j"),
        resp3_map(bulk("proto"), integer(3), bulk("mode"), bulk("cluster"))
        + b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
        + b"|1\r\n+key-popularity\r\n%1\r\n$1\r\nk\r\n,0.1923\r\n"
        + bulk(NODES_PRIVATE)
        + b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n"
        + verbatim(NODES_PRIVATE)
        + b"|1\r\n+a\r\n#t\r\n"
        + verbatim(NODES_PRIVATE)
        + b"_\r\n",
        resp3_map(bulk("proto"), integer(3), bulk("mode"), bulk("cluster"))
        + b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
        + b"|1\r\n+key-popularity\r\n%1\r\n$1\r\nk\r\n,0.1923\r\n"
        + bulk(NODES_PRIVATE)
        + b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n"
        + verbatim(NODES_PRIVATE)
        + b"|1\r\n+a\r\n#t\r\n"
        + verbatim(NODES_PUBLIC)
        + b"_\r\n",
    ),
    (
        "resp3-streamed-aggregate-and-string",
        command("GET", "a") + command("CLUSTER", "SLOTS") + command("GET", "b"),
        b"$?\r\n;4\r\n-MOV\r\n;20\r\nED 1 10.0.1.230:6379\r\n;0\r\n"
        + b"*?\r\n*?\r\n:0\r\n:5460\r\n*2\r\n$10\r\n10.0.1.231\r\n:6379\r\n.\r\n.\r\n"
        + b"~2\r\n(12345678901234567890\r\n,inf\r\n",
        b"$?\r\n;4\r\n-MOV\r\n;20\r\nED 1 10.0.1.230:6379\r\n;0\r\n"
        + b"*?\r\n*?\r\n:0\r\n:5460\r\n*2\r\n$12\r\n203.0.113.73\r\n:11212\r\n.\r\n.\r\n"
        + b"~2\r\n(12345678901234567890\r\n,inf\r\n",
    ),
    (
        "nulls-and-errors",
        command("CLUSTER", "NODES") + command("CLUSTER", "SLOTS") + command("CLUSTER", "SHARDS") + command("GET", "z"),
        b"$-1\r\n*-1\r\n-ERR This instance has cluster support disabled\r\n_\r\n",
        b"$-1\r\n*-1\r\n-ERR This instance has cluster support disabled\r\n_\r\n",
    ),
    (
        "reply-without-command",
        b"",
        b"-MOVED 1 10.0.1.230:6379\r\n",
        b"-MOVED 1 203.0.113.73:11211\r\n",
    ),
    (
        "big-value-with-args-skipped",
        command("SET", "k", "x" * 5000) + command("CLUSTER", "NODES"),
        b"+OK\r\n" + bulk(NODES_PRIVATE),
        b"+OK\r\n" + bulk(NODES_PUBLIC),
    ),
]

# After these, the rest of the connection passes through unchanged (but earlier replies are still rewritten).
PASSTHROUGH_CASES: list[tuple[str, bytes, bytes, bytes]] = [
    (
        "subscribe",
        command("CLUSTER", "NODES") + command("SUBSCRIBE", "ch") + command("CLUSTER", "NODES"),
        bulk(NODES_PRIVATE)
        + array(bulk("subscribe"), bulk("ch"), integer(1))
        + array(bulk("message"), bulk("ch"), bulk(NODES_PRIVATE))
        + MOVED_LOOKALIKE,
        bulk(NODES_PUBLIC)
        + array(bulk("subscribe"), bulk("ch"), integer(1))
        + array(bulk("message"), bulk("ch"), bulk(NODES_PRIVATE))
        + MOVED_LOOKALIKE,
    ),
    (
        "monitor",
        b"MONITOR\r\n",
        b'+OK\r\n+1339518083.107412 [0 127.0.0.1:60866] "keys" "*"\r\n' + MOVED_LOOKALIKE,
        b'+OK\r\n+1339518083.107412 [0 127.0.0.1:60866] "keys" "*"\r\n' + MOVED_LOOKALIKE,
    ),
    (
        "client-reply-skip",
        command("GET", "a") + command("CLIENT", "REPLY", "SKIP") + command("CLUSTER", "NODES"),
        b"-MOVED 1 10.0.1.230:6379\r\n" + bulk(NODES_PRIVATE),
        b"-MOVED 1 203.0.113.73:11211\r\n" + bulk(NODES_PRIVATE),
    ),
    (
        "client-protocol-error",
        command("CLUSTER", "NODES") + b"*1\r\n+PING\r\n",
        bulk(NODES_PRIVATE) + b"-ERR Protocol error: expected '$', got '+'\r\n",
        bulk(NODES_PUBLIC) + b"-ERR Protocol error: expected '$', got '+'\r\n",
    ),
    (
        "garbage-reply",
        command("GET", "a") + command("GET", "b"),
        b"?what\r\n" + MOVED_LOOKALIKE,
        b"?what\r\n" + MOVED_LOOKALIKE,
    ),
    (
        "bulk-length-lies",
        command("GET", "a") + command("GET", "b"),
        b"$3\r\nabcd\r\n" + MOVED_LOOKALIKE,
        b"$3\r\nabcd\r\n" + MOVED_LOOKALIKE,
    ),
    (
        "bulk-not-followed-by-crlf",  # skipping by the length would land on a valid line; the CRLF check stops it
        command("GET", "a") + command("GET", "b"),
        b"$1\r\nXYZ" + MOVED_LOOKALIKE,
        b"$1\r\nXYZ" + MOVED_LOOKALIKE,
    ),
    (
        "garbage-inside-captured-reply",
        command("CLUSTER", "SLOTS") + command("GET", "b"),
        b"*1\r\n*3\r\n:0\r\n:1\r\n*2\r\n$10\r\n10.0.1.230\r\n!x\r\n" + MOVED_LOOKALIKE,
        b"*1\r\n*3\r\n:0\r\n:1\r\n*2\r\n$10\r\n10.0.1.230\r\n!x\r\n" + MOVED_LOOKALIKE,
    ),
]

ALL_CASES = CASES + PASSTHROUGH_CASES
PIPELINABLE = [case for case in CASES if case[0] != "reply-without-command"]  # that one would take the next command


def feed(client: bytes, reply: bytes, cuts: list[int], *, client_cuts: list[int] | None = None, the_mapper=mapper):
    """Run one connection: all client bytes (in pieces), then the reply in pieces cut at `cuts`; return all output."""
    return run_connection(ClusterRewriter(the_mapper), client, reply, cuts, client_cuts)


@pytest.mark.parametrize(("client", "reply", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_table_keeps_tracking_afterwards(client: bytes, reply: bytes, expected: bytes) -> None:
    """After each ordinary case the connection is still followed: a later MOVED is still rewritten."""
    probe = (command("GET", "later"), b"-MOVED 5 10.0.1.232:6379\r\n", b"-MOVED 5 203.0.113.73:11213\r\n")
    assert feed(client + probe[0], reply + probe[1], [])[0] == expected + probe[2]


@pytest.mark.parametrize(("client", "reply", "expected"), [c[1:] for c in ALL_CASES], ids=[c[0] for c in ALL_CASES])
def test_table_whole_and_every_split(client: bytes, reply: bytes, expected: bytes) -> None:
    whole, held = feed(client, reply, [])
    assert whole == expected
    assert held == 0, "a complete reply stream must not leave bytes held back"
    for cut in range(len(reply) + 1):
        assert feed(client, reply, [cut])[0] == expected, f"reply split at byte {cut}"
    assert feed(client, reply, list(range(1, len(reply))))[0] == expected, "reply fed byte by byte"


@pytest.mark.parametrize(("client", "reply", "expected"), [c[1:] for c in ALL_CASES], ids=[c[0] for c in ALL_CASES])
def test_table_client_split_at_every_byte(client: bytes, reply: bytes, expected: bytes) -> None:
    for cut in range(len(client) + 1):
        assert feed(client, reply, [], client_cuts=[cut])[0] == expected, f"request split at byte {cut}"
    assert feed(client, reply, [], client_cuts=list(range(1, len(client))))[0] == expected


@pytest.mark.parametrize(("over", "followed"), [(0, True), (1, False)], ids=["at-the-cap", "one-byte-over"])
def test_an_inline_command_over_the_cap_stops_rewriting_from_its_reply_on(over: int, followed: bool) -> None:
    """An inline command line longer than redis' own 64 KiB limit cannot be followed: from its reply on, every
    reply passes unchanged; one exactly at the limit is followed. The same however the line arrives cut."""
    cap = 1 << 16
    inline = b"PING " + b"x" * (cap - len(b"PING ") - 1 + over) + b"\r\n"  # cap + over bytes before the \n
    client = inline + command("GET", "later")
    reply = b"+OK\r\n-MOVED 5 10.0.1.232:6379\r\n"
    expected = b"+OK\r\n-MOVED 5 203.0.113.73:11213\r\n" if followed else reply
    for cuts in ([], [cap // 2], [cap - 1], [cap], [cap + 1], [len(inline) - 1], list(range(4096, len(inline), 4096))):
        assert feed(client, reply, [], client_cuts=cuts)[0] == expected, f"request cut at {cuts[:3]}"


def test_plain_values_stream_through_without_being_held() -> None:
    """A large GET value is passed on as it arrives: only a header line is ever held back."""
    value = (MOVED_LOOKALIKE + NODES_PRIVATE) * 2000
    reply = bulk(value)
    rewriter = ClusterRewriter(mapper)
    rewriter.from_client(command("GET", "k"))
    out = []
    for start in range(0, len(reply), 1000):
        chunk = reply[start : start + 1000]
        out.append(rewriter.from_node(chunk))
        assert rewriter.pending() < 16
    assert b"".join(out) == reply
    # a chunk entirely inside the value is returned as the very same object: no copy, no per-byte work
    rewriter.from_client(command("GET", "k"))
    rewriter.from_node(b"$100000\r\n")
    middle = b"x" * 4096
    assert rewriter.from_node(middle) is middle


def test_captured_reply_is_held_until_complete() -> None:
    rewriter = ClusterRewriter(mapper)
    rewriter.from_client(command("CLUSTER", "NODES"))
    reply = bulk(NODES_PRIVATE)
    assert rewriter.from_node(reply[:-1]) == b""
    assert rewriter.pending() == len(reply) - 1
    assert rewriter.from_node(reply[-1:]) == bulk(NODES_PUBLIC)
    assert rewriter.pending() == 0


def test_flush_releases_truncated_reply_unchanged() -> None:
    rewriter = ClusterRewriter(mapper)
    rewriter.from_client(command("CLUSTER", "NODES") + command("GET", "k"))
    truncated = bulk(NODES_PRIVATE)[:50]
    assert rewriter.from_node(truncated) == b""
    assert rewriter.flush() == truncated
    assert rewriter.from_node(MOVED_LOOKALIKE) == MOVED_LOOKALIKE  # after EOF handling, nothing is rewritten


def test_pure_helpers() -> None:
    assert rewrite_redirect(b"MOVED 3999 10.0.1.231:6379", mapper) == b"MOVED 3999 203.0.113.73:11212"
    assert rewrite_redirect(b"MOVED 3999 10.0.1.231:6379 extra", mapper) is None
    assert rewrite_redirect(b"MOVED x 10.0.1.231:6379", mapper) is None
    assert rewrite_redirect(b"MOVED 1 10.0.1.231", mapper) is None
    assert rewrite_cluster_nodes(NODES_PRIVATE, mapper) == NODES_PUBLIC
    assert rewrite_cluster_nodes(b"", mapper) == b""
    assert rewrite_cluster_nodes(NODES_PRIVATE, no_mapper) is NODES_PRIVATE


def test_resp_parse_rejects_malformed() -> None:
    for bad in (b"", b"*1\r\n", b"$3\r\nab\r\n", b"?x\r\n", b"*x\r\n", b"$?\r\n;x\r\n", b"*1\r\n" * 100 + b":1\r\n"):
        with pytest.raises(resp.RespError):
            resp.parse(bad)


# -- fuzz ------------------------------------------------------------------------------------------------------


def random_value(rng: random.Random, depth: int = 0) -> bytes:
    """A random, valid RESP2/RESP3 value that contains no MOVED/ASK error."""
    choice = rng.randrange(16 if depth < 3 else 9)
    text = rng.choice(
        [b"", b"x", MOVED_LOOKALIKE, NODES_PRIVATE[:90], b"\r\n\r\n", bytes(rng.randbytes(rng.randrange(40)))]
    )
    if choice == 0:
        return b"+OK\r\n"
    if choice == 1:
        return b"-ERR wrong type\r\n"
    if choice == 2:
        return b":%d\r\n" % rng.randrange(-(10**6), 10**6)
    if choice == 3:
        return bulk(text)
    if choice == 4:
        return rng.choice([b"$-1\r\n", b"*-1\r\n", b"_\r\n"])
    if choice == 5:
        return rng.choice([b",3.14\r\n", b"#f\r\n", b"(3492890328409238509324850943850943825024385\r\n", b",-inf\r\n"])
    if choice == 6:
        return b"=%d\r\ntxt:%s\r\n" % (len(text) + 4, text)
    if choice == 7:
        return b"!%d\r\n%s\r\n" % (len(text), text)
    if choice == 8:
        chunks = [text[k : k + 7] for k in range(0, len(text), 7)]
        return b"$?\r\n" + b"".join(b";%d\r\n%s\r\n" % (len(c), c) for c in chunks) + b";0\r\n"
    items = [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if choice in (9, 10):
        return array(*items)
    if choice == 11:
        return b"~%d\r\n" % len(items) + b"".join(items)
    if choice == 12:
        pairs = items + items[: len(items) % 2]
        return b"%%%d\r\n" % (len(pairs) // 2) + b"".join(pairs)
    if choice == 13:
        return b"*?\r\n" + b"".join(items) + b".\r\n"
    if choice == 14:
        return b"|1\r\n+ttl\r\n:3600\r\n" + random_value(rng, depth + 1)
    return b"%?\r\n" + b"".join(items * 2) + b".\r\n"


def test_fuzz_plain_replies_never_altered() -> None:
    """Replies to ordinary commands, however nested or cut, come out byte-identical."""
    rng = random.Random(20240501)
    for _ in range(1500):
        values = [random_value(rng) for _ in range(rng.randrange(1, 5))]
        client = b"".join(command("GET", "k") for _ in values)
        reply = b"".join(values)
        out, _ = feed(client, reply, random_cuts(rng, len(reply)))
        assert out == reply


def test_fuzz_random_pipelines_of_table_cases() -> None:
    """Random pipelines of the table cases, cut at random points, give the concatenated expected bytes."""
    rng = random.Random(7)
    for _ in range(600):
        client, reply, expected = random_pipeline(rng, PIPELINABLE)
        out, _ = feed(client, reply, random_cuts(rng, len(reply)), client_cuts=random_cuts(rng, len(client)))
        assert out == expected


def test_fuzz_corrupted_input_never_raises_and_never_invents_bytes() -> None:
    """Mutated, truncated or random bytes on both sides: no exception, and with no forwards the output is the input."""
    rng = random.Random(99)
    sources = [case[2] for case in ALL_CASES]
    for _ in range(3000):
        reply = corrupted(rng, sources)
        client = bytes(rng.choice([case[1] for case in ALL_CASES]))
        if rng.random() < 0.3:
            client = rng.randbytes(rng.randrange(30))
        cuts = random_cuts(rng, len(reply))
        assert feed(client, reply, cuts, the_mapper=no_mapper)[0] == reply
        feed(client, reply, cuts)  # with forwards: must not raise


# -- real cluster: capture reply bytes from redis-server --cluster-enabled ----------------------------------------


def talk(port: int, request: bytes, expected_replies: int) -> bytes:
    """Send pipelined commands, read until `expected_replies` complete top-level replies arrived."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data += sock.recv(65536)
            position, count = 0, 0
            try:
                while position < len(data):
                    position = resp.parse(data, position).end
                    count += 1
            except resp.RespError:
                continue
            if count >= expected_replies:
                return data
        raise AssertionError(f"no complete reply from 127.0.0.1:{port}: {data[:200]!r}")


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Three masters with hostnames announced, joined with redis-cli --cluster create, all on 127.0.0.1."""
    ports: list[int] = []
    processes: list[subprocess.Popen[bytes]] = []
    base: Path = tmp_path_factory.mktemp("redis-cluster")
    try:
        for index in range(3):
            port = free_port(cluster_bus=True)
            ports.append(port)
            directory = base / str(port)
            directory.mkdir()
            processes.append(
                subprocess.Popen(
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no",
                     "--cluster-announce-hostname", f"node{index}.private.example", "--dir", str(directory)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        for port in ports:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if talk(port, command("PING"), 1) == b"+PONG\r\n":
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while any(b"cluster_state:ok" not in talk(p, command("CLUSTER", "INFO"), 1) for p in ports):
            assert time.monotonic() < deadline, "cluster did not reach cluster_state:ok"
            time.sleep(0.1)
        yield ports
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_real_cluster_replies(redis_cluster: list[int]) -> None:
    """Real CLUSTER SLOTS/SHARDS/NODES/REPLICAS, MOVED and ASK bytes, RESP2 and RESP3, lose every private address."""
    ports = redis_cluster
    public = {("127.0.0.1", port): (PUBLIC, 11211 + index) for index, port in enumerate(ports)}

    def cluster_mapper(host: str, port: int) -> tuple[str, int] | None:
        return public.get((host, port))

    first = ports[0]
    my_id = talk(first, command("CLUSTER", "MYID"), 1).split(b"\r\n")[1].decode()
    # a key whose slot is not on the first node → MOVED; then make one of its own slots migrate → ASK
    moved_key = next(f"k{n}" for n in range(1000) if b"-MOVED" in talk(first, command("GET", f"k{n}"), 1))
    other_id = talk(ports[1], command("CLUSTER", "MYID"), 1).split(b"\r\n")[1].decode()
    own_key = next(f"k{n}" for n in range(1000) if not talk(first, command("GET", f"k{n}"), 1).startswith(b"-"))
    slot = int(talk(first, command("CLUSTER", "KEYSLOT", own_key), 1)[1:-2])
    value_key = "{" + own_key + "}x"
    assert talk(first, command("SET", value_key, f"MOVED 1 127.0.0.1:{first}"), 1) == b"+OK\r\n"
    assert talk(first, command("CLUSTER", "SETSLOT", str(slot), "MIGRATING", other_id), 1) == b"+OK\r\n"
    try:
        for protocol in ("2", "3"):
            commands = [
                command("HELLO", protocol),
                command("CLUSTER", "SLOTS"),
                command("CLUSTER", "SHARDS"),
                command("CLUSTER", "NODES"),
                command("CLUSTER", "REPLICAS", my_id),
                command("GET", moved_key),
                command("GET", own_key),
            ]
            request = b"".join(commands)
            reply = talk(first, request, len(commands))
            assert b"-MOVED" in reply and b"-ASK" in reply
            rewriter = ClusterRewriter(cluster_mapper)
            rewriter.from_client(request)
            out = rewriter.from_node(reply)
            assert rewriter.pending() == 0
            assert b"127.0.0.1" not in out and b"private.example" not in out, out
            for index in range(3):
                assert b"%d" % (11211 + index) in out
            # still well-formed RESP, same number of replies, and identical however the bytes are cut
            position, count = 0, 0
            while position < len(out):
                position = resp.parse(out, position).end
                count += 1
            assert count == len(commands)
            for cut in range(0, len(reply) + 1, 7):
                assert feed(request, reply, [cut], the_mapper=cluster_mapper)[0] == out
            assert feed(request, reply, list(range(1, len(reply))), the_mapper=cluster_mapper)[0] == out
            # a GET of a value holding redirect-like text comes back untouched
            value_request = command("GET", value_key)
            value_reply = talk(first, value_request, 1)
            assert b"127.0.0.1" in value_reply
            assert feed(value_request, value_reply, [], the_mapper=cluster_mapper)[0] == value_reply
    finally:
        talk(first, command("CLUSTER", "SETSLOT", str(slot), "STABLE"), 1)


# -- cluster replies as they stream: the one-shot rewrite is the reference, bombs are framed, never held -----------


def random_node_entry(rng: random.Random) -> bytes:
    host, port = rng.choice([("10.0.1.230", 6379), ("10.0.1.231", 6379), ("10.9.9.9", 6379), ("node-c.internal", 6380)])
    items = [bulk(host), integer(port), NODE_ID]
    if rng.random() < 0.5:
        meta = [bulk("hostname"), bulk(rng.choice(["node-c.internal", "x", ""])), bulk("ip"), bulk(host)]
        items.append(resp3_map(*meta) if rng.random() < 0.5 else array(*meta))
    if rng.random() < 0.2:
        items.append(random_value(rng, 2))
    return array(*items)


def random_slots_reply(rng: random.Random) -> bytes:
    ranges = []
    for _ in range(rng.randrange(4)):
        children = [integer(0), integer(5460)]
        children += [random_node_entry(rng) if rng.random() < 0.8 else random_value(rng, 2) for _ in range(3)]
        ranges.append(array(*children) if rng.random() < 0.9 else random_value(rng, 1))
    return array(*ranges)


def random_shards_reply(rng: random.Random) -> bytes:
    shards = []
    for _ in range(rng.randrange(3)):
        ip, port = rng.choice([("10.0.1.230", 6379), ("10.0.1.232", 6379), ("10.9.9.9", 6379)])
        resp3 = rng.random() < 0.5
        node = shard(ip, port, resp3=resp3, tls_port=rng.choice([None, 6390]), hostname=rng.choice([None, "h"]))
        if rng.random() < 0.3:  # a shard with an extra field before its nodes
            extra = [bulk(rng.choice(["NODES-not", "x"])), random_value(rng, 2)]
            node = (resp3_map if resp3 else array)(*extra) if rng.random() < 0.2 else node
        shards.append(node)
    return array(*shards)


def test_fuzz_streamed_cluster_replies_match_the_one_shot_rewrite() -> None:
    """CLUSTER SLOTS/SHARDS/NODES replies and EXEC replies holding them, with random values mixed in and cut at
    random: the streaming rewriter gives exactly what rewriting each whole reply at once gives."""
    from forwarder.protocols.redis import NODES, OTHER, SHARDS, SLOTS, rewrite_reply

    rng = random.Random(1919)
    makers = {
        SLOTS: (command("CLUSTER", "SLOTS"), random_slots_reply),
        SHARDS: (command("CLUSTER", "SHARDS"), random_shards_reply),
        NODES: (command("CLUSTER", "NODES"), lambda r: bulk(r.choice([NODES_PRIVATE, b"x 10.0.1.231:6379@1 m\n"]))),
        OTHER: (command("GET", "k"), lambda r: random_value(r)),
    }
    for _ in range(1500):
        kinds = [rng.choice(list(makers)) for _ in range(rng.randrange(1, 4))]
        if rng.random() < 0.5:
            client = command("MULTI") + b"".join(makers[k][0] for k in kinds) + command("EXEC")
            replies = [makers[k][1](rng) for k in kinds]
            exec_reply = array(*replies)
            reply = b"+OK\r\n" + b"+QUEUED\r\n" * len(kinds) + exec_reply
            kind: object = tuple(kinds) if any(kinds) else OTHER
            expected = b"+OK\r\n" + b"+QUEUED\r\n" * len(kinds) + rewrite_reply(exec_reply, kind, mapper)  # type: ignore[arg-type]
        else:
            client = b"".join(makers[k][0] for k in kinds)
            replies = [makers[k][1](rng) for k in kinds]
            reply = b"".join(replies)
            expected = b"".join(rewrite_reply(r, k, mapper) for r, k in zip(replies, kinds, strict=True))
        out, held = feed(client, reply, random_cuts(rng, len(reply)))
        assert out == expected, (kinds, reply)
        assert held == 0


def list_reply(items: int) -> bytes:
    return b"*%d\r\n" % items + b"".join(bulk(b"v%07d" % n) for n in range(items))


HUGE = [
    # (id, client, reply, expected, most bytes the rewriter may hold)
    ("lrange", command("LRANGE", "k", "0", "-1"), list_reply(200_000), list_reply(200_000), 16),
    (
        "exec-slots-and-lrange",
        command("MULTI") + command("CLUSTER", "SLOTS") + command("LRANGE", "k", "0", "-1") + command("EXEC"),
        b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n" + slots_reply(b"10.0.1.230", 6379, array()) + list_reply(200_000),
        b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n"
        + slots_reply(PUBLIC, 11211, array(), replica=PUBLIC_REPLICA)
        + list_reply(200_000),
        1024,
    ),
    ("slots-flat-bomb", command("CLUSTER", "SLOTS"), b"*1000000\r\n" + b":1\r\n" * 1_000_000, None, 16),
    (
        "slots-nested-bomb",
        command("CLUSTER", "SLOTS"),
        b"*16384\r\n" + (b"*366\r\n" + b":1\r\n" * 366) * 16384,
        None,
        16,
    ),
    (
        "slots-node-entries-bomb",
        command("CLUSTER", "SLOTS"),
        b"*100\r\n" + (b"*1026\r\n:1\r\n:1\r\n" + b"*2\r\n:1\r\n:1\r\n" * 1024) * 100,
        None,
        16,
    ),
    (
        "slots-one-huge-node-entry",  # beyond the size of any node entry: passes unchanged, held at most that much
        command("CLUSTER", "SLOTS"),
        b"*1\r\n*3\r\n:0\r\n:1\r\n*3\r\n$10\r\n10.0.1.230\r\n:6379\r\n" + list_reply(100_000),
        None,
        (16 << 10) + 16384,
    ),
    (
        "nodes-over-the-cap",  # CLUSTER NODES text beyond any cluster's: passes unchanged
        command("CLUSTER", "NODES"),
        bulk(NODES_PRIVATE * (1 + (1 << 20) // len(NODES_PRIVATE))),
        None,
        (1 << 20) + 16384,
    ),
    (
        "shards-with-huge-slots",
        command("CLUSTER", "SHARDS"),
        array(resp3_map(bulk("slots"), b"*400000\r\n" + b":1\r\n" * 400_000, bulk("nodes"), array())),
        None,
        1024,
    ),
]


@pytest.mark.parametrize(("client", "reply", "expected", "bound"), [c[1:] for c in HUGE], ids=[c[0] for c in HUGE])
def test_huge_replies_stream_with_bounded_holding_and_bounded_line_work(
    client: bytes, reply: bytes, expected: bytes | None, bound: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Huge or hostile replies to cluster commands, fed as a node sends them (16 KiB reads): what comes out is
    right, the rewriter never holds more than `bound` bytes, and the values framed one line at a time in Python
    stay far fewer than the values in the reply (the rest are skipped a run at a time)."""
    lines = 0
    framed_line = ClusterRewriter._on_reply_line

    def counted(self: ClusterRewriter, kind: int, line: bytes, role: int) -> bool:
        nonlocal lines
        lines += 1
        return framed_line(self, kind, line, role)

    monkeypatch.setattr(ClusterRewriter, "_on_reply_line", counted)
    rewriter = ClusterRewriter(mapper)
    rewriter.from_client(client)
    out = []
    for start in range(0, len(reply), 16384):
        out.append(rewriter.from_node(reply[start : start + 16384]))
        assert rewriter.pending() <= bound
    assert b"".join(out) == (reply if expected is None else expected)
    assert rewriter.pending() == 0
    values = reply.count(b"\r\n")
    assert lines <= values // 20 + 4, f"{lines} of {values} values framed line by line"


@pytest.mark.parametrize("kind", ["GET", "SLOTS"])
def test_an_absurd_element_count_is_framed_without_error(kind: str) -> None:
    """A count beyond any integer the skipping takes (in C, a long) is framed like any other, never raised on."""
    client = command("CLUSTER", "SLOTS") if kind == "SLOTS" else command("GET", "k")
    reply = b"*%d\r\n" % 10**30 + b":1\r\n" * 1000
    for cuts in ([], [7], list(range(3, len(reply), 5))):
        assert feed(client, reply, cuts)[0] == reply
