"""Memcached Auto Discovery rewriter: exact bytes, every split point, pipelines, look-alikes, fuzz, real memcached."""

from __future__ import annotations

import random
import re
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import free_port, round_trip
from rewritekit import corrupted, random_cuts, random_pipeline, run_connection

from forwarder.protocols.memcached import (
    CLUSTER_KEY,
    MAX_CONFIG_BYTES,
    MAX_CONFIG_NODES,
    AutoDiscoveryRewriter,
    ClusterConfigError,
    ClusterNode,
    parse_cluster_config,
    render_cluster_config,
    render_config_reply,
    rewrite_cluster_config,
)

PUBLIC = "203.0.113.73"
FORWARDS = {
    ("mycluster.0001.use1.cache.amazonaws.com", 11211): (PUBLIC, 11211),
    ("10.0.1.231", 11211): (PUBLIC, 11212),  # known by IP only
    ("mycluster.0003.use1.cache.amazonaws.com", 11211): (PUBLIC, 11213),
}


def mapper(host: str, port: int) -> tuple[str, int] | None:
    return FORWARDS.get((host, port))


def no_mapper(host: str, port: int) -> tuple[str, int] | None:
    return None


NODE1 = ("mycluster.0001.use1.cache.amazonaws.com", "10.0.1.230", 11211)
NODE2 = ("mycluster.0002.use1.cache.amazonaws.com", "10.0.1.231", 11211)
NODE3 = ("mycluster.0003.use1.cache.amazonaws.com", "", 11211)  # the IP may be empty
STRANGER = ("mycluster.0004.use1.cache.amazonaws.com", "10.0.1.99", 11211)
PRIVATE = render_cluster_config(12, [NODE1, NODE2, NODE3])
PUBLIC_PAYLOAD = (
    b"12\n203.0.113.73|203.0.113.73|11211 203.0.113.73|203.0.113.73|11212 203.0.113.73|203.0.113.73|11213\n"
)


def value(key: bytes, data: bytes, flags: int = 0, cas: int | None = None) -> bytes:
    suffix = b"" if cas is None else b" %d" % cas
    return b"VALUE %s %d %d%s\r\n%s\r\n" % (key, flags, len(data), suffix, data)


def config(payload: bytes) -> bytes:
    return b"CONFIG cluster 0 %d\r\n%s\r\nEND\r\n" % (len(payload), payload)


def legacy_reply(payload: bytes, flags: int = 0, cas: int | None = None) -> bytes:
    """The reply to a get of the legacy cluster key: one VALUE block, then END."""
    return value(CLUSTER_KEY, payload, flags, cas) + b"END\r\n"


CONFIG_LOOKALIKE = config(PRIVATE)  # stored as a plain value, it must come back untouched
LEGACY_LOOKALIKE = legacy_reply(PRIVATE)

# (id, client bytes, node bytes, expected bytes, number of warnings)
CASES: list[tuple[str, bytes, bytes, bytes, int]] = [
    ("config-get-cluster", b"config get cluster\r\n", config(PRIVATE), config(PUBLIC_PAYLOAD), 0),
    ("config-get-cluster-lf", b"config get cluster\n", config(PRIVATE), config(PUBLIC_PAYLOAD), 0),
    (
        "exact-wire-bytes",
        b"config get cluster\r\n",
        b"CONFIG cluster 0 164\r\n12\nmycluster.0001.use1.cache.amazonaws.com|10.0.1.230|11211 "
        b"mycluster.0002.use1.cache.amazonaws.com|10.0.1.231|11211 mycluster.0003.use1.cache.amazonaws.com||11211\n"
        b"\r\nEND\r\n",
        b"CONFIG cluster 0 99\r\n12\n203.0.113.73|203.0.113.73|11211 203.0.113.73|203.0.113.73|11212 "
        b"203.0.113.73|203.0.113.73|11213\n\r\nEND\r\n",
        0,
    ),
    ("legacy-get", b"get AmazonElastiCache:cluster\r\n", legacy_reply(PRIVATE), legacy_reply(PUBLIC_PAYLOAD), 0),
    (
        "legacy-gets-keeps-flags-and-cas",
        b"gets AmazonElastiCache:cluster\r\n",
        legacy_reply(PRIVATE, flags=7, cas=12345),
        legacy_reply(PUBLIC_PAYLOAD, flags=7, cas=12345),
        0,
    ),
    ("legacy-gat", b"gat 300 AmazonElastiCache:cluster\r\n", legacy_reply(PRIVATE), legacy_reply(PUBLIC_PAYLOAD), 0),
    (
        "legacy-in-multiget",
        b"get a AmazonElastiCache:cluster b\r\n",
        value(b"a", CONFIG_LOOKALIKE) + value(CLUSTER_KEY, PRIVATE) + value(b"b", LEGACY_LOOKALIKE) + b"END\r\n",
        value(b"a", CONFIG_LOOKALIKE) + value(CLUSTER_KEY, PUBLIC_PAYLOAD) + value(b"b", LEGACY_LOOKALIKE) + b"END\r\n",
        0,
    ),
    (
        "node-without-forward-left-out",
        b"config get cluster\r\n",
        config(render_cluster_config(3, [STRANGER, NODE1])),
        config(b"3\n203.0.113.73|203.0.113.73|11211\n"),
        1,
    ),
    (
        "no-node-has-a-forward",
        b"config get cluster\r\n",
        config(render_cluster_config(4, [STRANGER])),
        config(b"4\n\n"),
        1,
    ),
    (
        "value-lookalikes-untouched",
        b"get a\r\nget b\r\n",
        value(b"a", CONFIG_LOOKALIKE) + b"END\r\n" + value(b"b", LEGACY_LOOKALIKE) + b"END\r\n",
        value(b"a", CONFIG_LOOKALIKE) + b"END\r\n" + value(b"b", LEGACY_LOOKALIKE) + b"END\r\n",
        0,
    ),
    (
        "pipeline",
        b"get a\r\nconfig get cluster\r\nset k 0 0 20\r\nconfig get cluster\r\n\r\nget b\r\n"
        b"delete k\r\nincr n 1\r\nversion\r\nstats\r\nget AmazonElastiCache:cluster\r\n",
        value(b"a", CONFIG_LOOKALIKE)
        + b"END\r\n"
        + config(PRIVATE)
        + b"STORED\r\n"
        + value(b"b", LEGACY_LOOKALIKE, cas=None)
        + b"END\r\nDELETED\r\n2\r\nVERSION 1.6.18\r\nSTAT pid 1\r\nSTAT uptime 9\r\nEND\r\n"
        + legacy_reply(PRIVATE),
        value(b"a", CONFIG_LOOKALIKE)
        + b"END\r\n"
        + config(PUBLIC_PAYLOAD)
        + b"STORED\r\n"
        + value(b"b", LEGACY_LOOKALIKE, cas=None)
        + b"END\r\nDELETED\r\n2\r\nVERSION 1.6.18\r\nSTAT pid 1\r\nSTAT uptime 9\r\nEND\r\n"
        + legacy_reply(PUBLIC_PAYLOAD),
        0,
    ),
    (
        "unrequested-config-untouched",  # the request text sits inside a set's data block: not a request
        b"set k 0 0 20\r\nconfig get cluster\r\n\r\nms k 31 T0\r\nget AmazonElastiCache:cluster\r\n\r\n",
        b"STORED\r\nHD\r\n" + config(PRIVATE) + legacy_reply(PRIVATE),
        b"STORED\r\nHD\r\n" + config(PRIVATE) + legacy_reply(PRIVATE),
        0,
    ),
    (
        "meta-get-skipped-by-length",
        b"mg AmazonElastiCache:cluster v\r\nms k 6 T0\r\nCONFIG\r\nconfig get cluster\r\n",
        b"VA %d\r\n%s\r\nHD\r\n" % (len(CONFIG_LOOKALIKE), CONFIG_LOOKALIKE) + config(PRIVATE),
        b"VA %d\r\n%s\r\nHD\r\n" % (len(CONFIG_LOOKALIKE), CONFIG_LOOKALIKE) + config(PUBLIC_PAYLOAD),
        0,
    ),
    (
        "plain-memcached-says-error-then-legacy-form",
        b"config get cluster\r\nget AmazonElastiCache:cluster\r\n",
        b"ERROR\r\n" + legacy_reply(PRIVATE),
        b"ERROR\r\n" + legacy_reply(PUBLIC_PAYLOAD),
        0,
    ),
    (
        "malformed-payload-unchanged",
        b"config get cluster\r\n",
        config(b"twelve\nhost|ip\n"),
        config(b"twelve\nhost|ip\n"),
        1,
    ),
    ("empty-value", b"get e\r\n", value(b"e", b"") + b"END\r\n", value(b"e", b"") + b"END\r\n", 0),
]

PASSTHROUGH_CASES: list[tuple[str, bytes, bytes, bytes, int]] = [
    (
        "binary-protocol",
        bytes([0x80, 0x00, 0x00, 0x01]) + b"\x00" * 20 + b"config get cluster\r\n",
        bytes([0x81]) + b"\x00" * 23 + config(PRIVATE),
        bytes([0x81]) + b"\x00" * 23 + config(PRIVATE),
        0,
    ),
    (
        "binary-client",  # memcached picks the protocol from the first byte; text that follows is not a request
        bytes([0x80]) + b"\nconfig get cluster\r\n",
        config(PRIVATE),
        config(PRIVATE),
        0,
    ),
    (
        "bad-value-header",
        b"get a\r\nconfig get cluster\r\n",
        b"VALUE a 0 many\r\nxx\r\nEND\r\n" + config(PRIVATE),
        b"VALUE a 0 many\r\nxx\r\nEND\r\n" + config(PRIVATE),
        0,
    ),
    (
        "value-length-lies",
        b"get a\r\nconfig get cluster\r\n",
        b"VALUE a 0 2\r\nxyz\r\nEND\r\n" + config(PRIVATE),
        b"VALUE a 0 2\r\nxyz\r\nEND\r\n" + config(PRIVATE),
        0,
    ),
    (
        "config-length-lies",
        b"config get cluster\r\nconfig get cluster\r\n",
        b"CONFIG cluster 0 3\r\n12\nxx\r\nEND\r\n" + config(PRIVATE),
        b"CONFIG cluster 0 3\r\n12\nxx\r\nEND\r\n" + config(PRIVATE),
        0,
    ),
    (
        "endless-line",
        b"stats\r\nconfig get cluster\r\n",
        b"STAT " + b"x" * 9000 + b"\r\nEND\r\n" + config(PRIVATE),
        b"STAT " + b"x" * 9000 + b"\r\nEND\r\n" + config(PRIVATE),
        0,
    ),
]

ALL_CASES = CASES + PASSTHROUGH_CASES


def feed(
    client: bytes,
    reply: bytes,
    cuts: list[int],
    *,
    client_cuts: list[int] | None = None,
    the_mapper=mapper,
) -> tuple[bytes, int, list[str]]:
    """One connection: client bytes (in pieces), then the reply cut at `cuts`; returns output, held count, warnings."""
    warnings: list[str] = []
    out, held = run_connection(AutoDiscoveryRewriter(the_mapper, warnings.append), client, reply, cuts, client_cuts)
    return out, held, warnings


@pytest.mark.parametrize(
    ("client", "reply", "expected", "warned"), [c[1:] for c in ALL_CASES], ids=[c[0] for c in ALL_CASES]
)
def test_table_whole_and_every_split(client: bytes, reply: bytes, expected: bytes, warned: int) -> None:
    whole, held, warnings = feed(client, reply, [])
    assert whole == expected
    assert held == 0, "a complete reply stream must not leave bytes held back"
    assert len(warnings) == warned, warnings
    for cut in range(len(reply) + 1):
        assert feed(client, reply, [cut])[0] == expected, f"reply split at byte {cut}"
    assert feed(client, reply, list(range(1, len(reply))))[0] == expected, "reply fed byte by byte"
    for cut in range(len(client) + 1):
        assert feed(client, reply, [], client_cuts=[cut])[0] == expected, f"request split at byte {cut}"
    assert feed(client, reply, [], client_cuts=list(range(1, len(client))))[0] == expected


# The unrequested CONFIG block is a server misbehaving on purpose: it uses up the next request's turn.
FOLLOWED = [case for case in CASES if case[0] != "unrequested-config-untouched"]


@pytest.mark.parametrize(
    ("client", "reply", "expected", "warned"), [c[1:] for c in FOLLOWED], ids=[c[0] for c in FOLLOWED]
)
def test_table_keeps_tracking_afterwards(client: bytes, reply: bytes, expected: bytes, warned: int) -> None:
    """After each ordinary case the connection is still followed: a later config request is still rewritten."""
    out, _, _ = feed(client + b"config get cluster\r\n", reply + config(PRIVATE), [])
    assert out == expected + config(PUBLIC_PAYLOAD)


@pytest.mark.parametrize(("over", "followed"), [(0, True), (1, False)], ids=["at-the-cap", "one-byte-over"])
def test_a_request_line_over_the_cap_switches_to_pass_through(over: int, followed: bool) -> None:
    """A request line longer than 1 MiB cannot be followed, so the connection passes through unchanged from then
    on; one exactly at the cap is followed. The same however the line arrives cut."""
    cap = 1 << 20
    get = b"get " + b"k" * (cap - len(b"get ") - 1 + over) + b"\r\n"  # cap + over bytes before the \n
    client = get + b"config get cluster\r\n"
    reply = b"END\r\n" + config(PRIVATE)
    expected = b"END\r\n" + config(PUBLIC_PAYLOAD) if followed else reply
    for cuts in ([], [cap // 2], [cap - 1], [cap], [cap + 1], [len(get) - 1], list(range(65536, len(get), 65536))):
        assert feed(client, reply, [], client_cuts=cuts)[0] == expected, f"request cut at {cuts[:3]}"


def test_warning_names_the_node() -> None:
    _, _, warnings = feed(b"config get cluster\r\n", config(render_cluster_config(3, [STRANGER, NODE1])), [])
    assert warnings == [
        "auto discovery: node mycluster.0004.use1.cache.amazonaws.com|10.0.1.99|11211 has no forward; "
        "left out of the node list"
    ]


def test_large_values_stream_through_without_being_held() -> None:
    data = CONFIG_LOOKALIKE * 5000
    reply = value(b"big", data) + b"END\r\n"
    rewriter = AutoDiscoveryRewriter(mapper, [].append)
    rewriter.from_client(b"get big\r\nconfig get cluster\r\n")
    out = []
    for start in range(0, len(reply), 4096):
        out.append(rewriter.from_node(reply[start : start + 4096]))
        assert rewriter.pending() < 64
    assert b"".join(out) == reply
    middle = b"y" * 4096
    rewriter.from_client(b"get big\r\n")
    rewriter.from_node(b"VALUE big 0 100000\r\n")
    assert rewriter.from_node(middle) is middle  # no copy of pass-through data


def test_captured_config_is_held_until_complete() -> None:
    rewriter = AutoDiscoveryRewriter(mapper, [].append)
    rewriter.from_client(b"config get cluster\r\n")
    reply = config(PRIVATE)
    end = reply.index(b"END")
    assert rewriter.from_node(reply[: end - 1]) == b""
    assert rewriter.pending() == end - 1
    assert rewriter.from_node(reply[end - 1 :]) == config(PUBLIC_PAYLOAD)


def test_flush_releases_truncated_reply_unchanged() -> None:
    rewriter = AutoDiscoveryRewriter(mapper, [].append)
    rewriter.from_client(b"config get cluster\r\n")
    truncated = config(PRIVATE)[:40]
    assert rewriter.from_node(truncated) == b""
    assert rewriter.flush() == truncated


def test_parse_and_render_helpers() -> None:
    version, nodes = parse_cluster_config(PRIVATE)
    assert version == 12
    assert nodes == [ClusterNode(*NODE1), ClusterNode(*NODE2), ClusterNode(*NODE3)]
    assert nodes[2].ip == ""
    assert render_cluster_config(version, nodes) == PRIVATE
    assert parse_cluster_config(b"1\n\n") == (1, [])
    assert render_config_reply(12, [NODE1]) == config(render_cluster_config(12, [NODE1]))
    assert render_config_reply(12, [NODE1], legacy=True) == legacy_reply(render_cluster_config(12, [NODE1]))
    assert rewrite_cluster_config(PRIVATE, mapper, [].append) == PUBLIC_PAYLOAD
    for bad in (b"", b"x\nh|i|1\n", b"1\nh|i\n", b"1\nh|i|port\n", b"1\nh|i|0\n", b"1\n||11211\n", b"1\na|b|1\nmore\n"):
        with pytest.raises(ClusterConfigError):
            parse_cluster_config(bad)


# -- fuzz ------------------------------------------------------------------------------------------------------


def test_fuzz_random_pipelines_of_table_cases() -> None:
    rng = random.Random(11211)
    for _ in range(800):
        client, reply, expected = random_pipeline(rng, FOLLOWED)
        out, _, _ = feed(client, reply, random_cuts(rng, len(reply)), client_cuts=random_cuts(rng, len(client)))
        assert out == expected


def test_fuzz_random_values_never_altered() -> None:
    """Replies to gets of random values (often holding look-alike text) come out byte-identical."""
    rng = random.Random(5)
    pieces = [CONFIG_LOOKALIKE, LEGACY_LOOKALIKE, b"\r\n", b"END\r\n", b"VALUE x 0 3\r\n", b"\n", b"CONFIG cluster"]
    for _ in range(1500):
        keys = [rng.choice([b"a", b"b", CLUSTER_KEY + b"x"]) for _ in range(rng.randrange(1, 4))]
        reply = b"".join(
            value(key, b"".join(rng.choice(pieces) for _ in range(rng.randrange(4))) + rng.randbytes(rng.randrange(9)))
            for key in keys
        )
        reply += b"END\r\n"
        client = b"get " + b" ".join(keys) + b"\r\nconfig get cluster\r\n"
        assert feed(client, reply, random_cuts(rng, len(reply)))[0] == reply


def test_fuzz_corrupted_input_never_raises_and_never_invents_bytes() -> None:
    """Mutated, truncated or random bytes: no exception; with no cluster request outstanding, output == input."""
    rng = random.Random(99)
    sources = [case[2] for case in ALL_CASES]
    requests = [case[1] for case in ALL_CASES]
    for _ in range(3000):
        mutated = corrupted(rng, sources)
        client = rng.choice(requests) if rng.random() < 0.7 else rng.randbytes(rng.randrange(30))
        cuts = random_cuts(rng, len(mutated))
        feed(client, mutated, cuts)  # must not raise
        unrequested = client.replace(b"cluster", b"clusterX")
        assert feed(unrequested, mutated, cuts)[0] == mutated


# -- real memcached: its replies pass unchanged, and it can play the legacy configuration endpoint ---------------


@pytest.fixture
def memcached_port() -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        ["memcached", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-u", "nobody", "-m", "16"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, "memcached exited"
                assert time.monotonic() < deadline, "memcached did not start"
                time.sleep(0.02)
        yield port
    finally:
        process.kill()
        process.wait()


def test_real_memcached_replies(memcached_port: int) -> None:
    """Real bytes: look-alike values stay, the legacy cluster key is rewritten, ERROR/stats/version pass."""
    setup = b"".join(
        b"set %s 0 0 %d\r\n%s\r\n" % (key, len(data), data)
        for key, data in ((b"a", CONFIG_LOOKALIKE), (b"b", LEGACY_LOOKALIKE), (CLUSTER_KEY, PRIVATE))
    )
    assert round_trip(memcached_port, setup, b"STORED\r\nSTORED\r\nSTORED\r\n", timeout_s=5) == b"STORED\r\n" * 3
    request = (
        b"get a b\r\nconfig get cluster\r\ngets AmazonElastiCache:cluster\r\nversion\r\n"
        b"mg a v\r\nget AmazonElastiCache:cluster a\r\nmn\r\n"
    )
    reply = round_trip(memcached_port, request, b"MN\r\n", timeout_s=5)
    cas = re.search(rb"VALUE AmazonElastiCache:cluster 0 \d+ (\d+)\r\n", reply)
    version = re.search(rb"VERSION [^\r]*\r\n", reply)
    assert cas is not None and version is not None, reply

    def expected(payload: bytes) -> bytes:
        return (
            value(b"a", CONFIG_LOOKALIKE)
            + value(b"b", LEGACY_LOOKALIKE)
            + b"END\r\nERROR\r\n"  # a plain memcached does not know `config get cluster`
            + legacy_reply(payload, cas=int(cas.group(1)))
            + version.group(0)
            + b"VA %d\r\n%s\r\n" % (len(CONFIG_LOOKALIKE), CONFIG_LOOKALIKE)
            + value(CLUSTER_KEY, payload)
            + value(b"a", CONFIG_LOOKALIKE)
            + b"END\r\nMN\r\n"
        )

    assert reply == expected(PRIVATE)
    out, held, warnings = feed(request, reply, [])
    assert out == expected(PUBLIC_PAYLOAD) and held == 0 and warnings == []
    for cut in range(len(reply) + 1):
        assert feed(request, reply, [cut])[0] == out
    assert feed(request, reply, list(range(1, len(reply))))[0] == out


def made_up_nodes(count: int) -> list[tuple[str, str, int]]:
    return [(f"made-up-{n}.example", f"10.200.{n >> 8 & 255}.{n & 255}", 11211) for n in range(count)]


@pytest.mark.parametrize(
    ("payload", "rewritten", "warned"),
    [
        # at the node cap, every node is looked at (and each unknown one warned about, rate-limited by the caller)
        (render_cluster_config(1, [NODE1, *made_up_nodes(MAX_CONFIG_NODES - 1)]), True, MAX_CONFIG_NODES - 1),
        # one node more, or more bytes than the cap: not a config natfwd rewrites; unchanged, one warning
        (render_cluster_config(1, [NODE1, *made_up_nodes(MAX_CONFIG_NODES)]), False, 1),
        (render_cluster_config(1, made_up_nodes(38_000)), False, 1),
        (b"1\n" + b"x" * MAX_CONFIG_BYTES + b"|1.2.3.4|11211\n", False, 1),
    ],
    ids=["at-the-node-cap", "one-node-over", "38000-nodes", "over-the-byte-cap"],
)
def test_configs_beyond_the_caps_pass_unchanged_with_one_warning(payload: bytes, rewritten: bool, warned: int) -> None:
    for client, reply in ((b"config get cluster\r\n", config(payload)), (b"get %s\r\n" % CLUSTER_KEY, None)):
        reply = reply or legacy_reply(payload)
        out, _, warnings = feed(client, reply, [len(reply) // 3])
        assert (out != reply) is rewritten
        if rewritten:
            assert b"203.0.113.73|203.0.113.73|11211" in out and b"made-up" not in out
        assert len(warnings) == warned, warnings[:3]


def test_rate_limited_warning_logs_a_bounded_number_of_lines_and_counts_the_rest() -> None:
    """Any number of distinct messages: at most `burst` lines a window, then one line with the count dropped."""
    import logging

    from forwarder.rewriting import RateLimitedWarning

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("natfwd.test.ratelimit")
    logger.propagate = False
    logger.addHandler(Keep())
    now = [100.0]
    warn = RateLimitedWarning(logger, interval_s=60.0, burst=10, clock=lambda: now[0])
    for n in range(38_000 * 5):
        warn(f"node {n % 38_000} has no forward")
    assert len(records) == 10
    assert len(warn.seen) == 10  # memory bounded by the burst, whatever the number of messages
    now[0] += 60.0
    warn("node 0 has no forward")
    assert records[10:] == ["189990 more rewriting warnings suppressed in the last 60 s", "node 0 has no forward"]
    warn("node 0 has no forward")  # the same message again in this window: dropped
    assert len(records) == 12
