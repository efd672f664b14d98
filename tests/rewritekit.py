"""Drive a protocol rewriter through one connection with its bytes cut anywhere, and corrupt its input at random."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from forwarder.protocols import Rewriter


def run_connection(
    rewriter: Rewriter, client: bytes, reply: bytes, cuts: list[int], client_cuts: list[int] | None = None
) -> tuple[bytes, int]:
    """All client bytes (cut at `client_cuts`), then the reply cut at `cuts`, then the node's EOF.

    Returns everything sent to the client and how many bytes were held back just before the EOF.
    """
    previous = 0
    for cut in [*(client_cuts or []), len(client)]:
        rewriter.from_client(client[previous:cut])
        previous = cut
    out, previous = [], 0
    for cut in [*cuts, len(reply)]:
        out.append(rewriter.from_node(reply[previous:cut]))
        previous = cut
    held = rewriter.pending()
    out.append(rewriter.flush())
    assert rewriter.pending() == 0
    return b"".join(out), held


def random_cuts(rng: random.Random, size: int) -> list[int]:
    """Up to five sorted cut points in a stream of `size` bytes."""
    return sorted(rng.sample(range(size + 1), min(size + 1, rng.randrange(1, 6))))


def corrupted(rng: random.Random, sources: list[bytes]) -> bytes:
    """Two of `sources` back to back, with up to three spots overwritten by random bytes, cut short 30% of the time."""
    data = bytearray(rng.choice(sources) + rng.choice(sources))
    for _ in range(rng.randrange(4)):
        position = rng.randrange(len(data))
        data[position : position + rng.randrange(3)] = rng.randbytes(rng.randrange(3))
    return bytes(data[: rng.randrange(len(data) + 1)] if rng.random() < 0.3 else data)


def random_pipeline(rng: random.Random, cases: Sequence[tuple[Any, ...]]) -> tuple[bytes, bytes, bytes]:
    """One to four table cases `(id, client, node, expected, ...)` picked at random, each column joined in order."""
    picked = [rng.choice(cases) for _ in range(rng.randrange(1, 5))]
    client = b"".join(case[1] for case in picked)
    reply = b"".join(case[2] for case in picked)
    expected = b"".join(case[3] for case in picked)
    return client, reply, expected
