"""Lines (requests and replies alike) that may arrive cut across chunks, joined whole, with a cap on their length."""

from __future__ import annotations


class LineTooLong(ValueError):
    """A line is longer than the cap: the rewriter can no longer follow the stream."""


def take_line(held: bytearray, data: bytes, start: int, limit: int) -> tuple[bytes | None, bytes, int]:
    """The next complete line (with its `\\n`) at `data[start:]`, after the start of it that `held` kept.

    Returns the line, the part of it `held` kept from earlier chunks (b"" when none), and the index just past it;
    `held` is then empty. When `data` ends mid-line, returns (None, b"", len(data)) and keeps the tail in `held` for
    the next chunk. Raises LineTooLong when the line without its `\\n` is longer than `limit` bytes, whichever way it
    was cut; `held` is then left as it was (a refused tail is not kept), for a caller that passes it on unchanged.
    """
    end = data.find(b"\n", start)
    if end < 0:
        if len(held) + len(data) - start > limit:
            raise LineTooLong(f"a line longer than {limit} bytes")
        held += memoryview(data)[start:]
        return None, b"", len(data)
    if len(held) + end - start > limit:  # the same verdict as for a tail, however the line was cut
        raise LineTooLong(f"a line longer than {limit} bytes")
    if not held:
        return data[start : end + 1], b"", end + 1
    head = bytes(held)
    held.clear()
    return head + data[start : end + 1], head, end + 1
