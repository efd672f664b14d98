"""Request lines that may arrive cut across chunks, joined whole, with a cap on their length."""

from __future__ import annotations


class LineTooLong(ValueError):
    """A request line is longer than the cap: the rewriter can no longer follow the requests."""


def take_line(held: bytearray, data: bytes, start: int, limit: int) -> tuple[bytes | None, int]:
    """The next complete line (with its `\\n`) at `data[start:]`, after the start of it that `held` kept.

    Returns the line and the index just past it; `held` is then empty. When `data` ends mid-line, returns
    (None, len(data)) and keeps the tail in `held` for the next chunk. Raises LineTooLong when the line
    without its `\\n` is longer than `limit` bytes, whichever way it was cut (a refused tail is not kept).
    """
    end = data.find(b"\n", start)
    if end < 0:
        if len(held) + len(data) - start > limit:
            raise LineTooLong(f"request line longer than {limit} bytes")
        held += data[start:]
        return None, len(data)
    if held:
        held += data[start : end + 1]
        line = bytes(held)
        held.clear()
    else:
        line = data[start : end + 1]
    if len(line) - 1 > limit:  # the same verdict as for a tail, however the line was cut
        raise LineTooLong(f"request line longer than {limit} bytes")
    return line, end + 1
