"""RESP2/RESP3 values as spans of the original bytes, and byte-exact edits of them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# Type bytes, as ints (indexing bytes yields ints).
SIMPLE = frozenset(b"+-:_,#(")  # one line: string, error, integer, null, double, boolean, big number
BULK = frozenset(b"$!=")  # length-prefixed: string, blob error, verbatim string
AGGREGATE = frozenset(b"*~>%|")  # array, set, push, map, attribute
PAIRED = frozenset(b"%|")  # aggregates whose count is of key/value pairs
STRING_TYPES = frozenset(b"+$=")
MAX_DEPTH = 64  # replies we rewrite are at most 4 deep; deeper captures are not parsed


class RespError(ValueError):
    """The bytes are not one complete, well-formed RESP value."""


@dataclass(slots=True)
class Value:
    """One parsed value. `start`..`end` span the whole value in the buffer; `body_start`..`body_end` its
    payload (the line's text for simple types, the data for bulk types; -1 for a streamed string).
    Map and attribute children are flattened as key, value, key, value."""

    type: int
    start: int
    end: int
    body_start: int
    body_end: int
    children: list[Value] = field(default_factory=list)


def parse(buf: bytes, pos: int = 0, depth: int = 0) -> Value:
    """Parse one value starting at `pos`; a leading attribute is parsed and skipped.

    Raises RespError when the bytes are malformed, truncated or nested deeper than MAX_DEPTH.
    """
    if depth > MAX_DEPTH:
        raise RespError("nested too deep")
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0 or eol == pos:
            raise RespError(f"incomplete or empty header at offset {pos}")
        kind = buf[pos]
        if kind != 0x7C:  # "|": an attribute annotates the value that follows it; skip it
            break
        count = _count(buf[pos + 1 : eol])
        pos = eol + 2
        for _ in range(2 * count):
            pos = parse(buf, pos, depth + 1).end
    text = buf[pos + 1 : eol]
    if kind in SIMPLE:
        return Value(kind, pos, eol + 2, pos + 1, eol)
    if kind in BULK:
        if text == b"?" and kind == 0x24:
            return _streamed_string(buf, pos, eol + 2)
        size = _count(text, allow_null=True)
        if size < 0:
            return Value(kind, pos, eol + 2, eol + 2, eol + 2)
        end = eol + 2 + size
        if buf[end : end + 2] != b"\r\n":
            raise RespError(f"bulk value at offset {pos} is not followed by CRLF")
        return Value(kind, pos, end + 2, eol + 2, end)
    if kind in AGGREGATE:
        value = Value(kind, pos, 0, eol + 2, eol + 2)
        child = eol + 2
        if text == b"?":
            while buf[child : child + 3] != b".\r\n":
                item = parse(buf, child, depth + 1)
                value.children.append(item)
                child = item.end
            child += 3
        else:
            count = _count(text, allow_null=True)
            for _ in range(count * 2 if kind in PAIRED else count):
                item = parse(buf, child, depth + 1)
                value.children.append(item)
                child = item.end
        value.end = value.body_end = child
        return value
    raise RespError(f"unknown RESP type byte {bytes([kind])!r} at offset {pos}")


def _streamed_string(buf: bytes, start: int, pos: int) -> Value:
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0 or buf[pos] != 0x3B:  # ";"
            raise RespError(f"bad streamed string chunk at offset {pos}")
        size = _count(buf[pos + 1 : eol])
        if size == 0:
            return Value(0x24, start, eol + 2, -1, -1)
        pos = eol + 2 + size + 2
        if buf[pos - 2 : pos] != b"\r\n":
            raise RespError(f"streamed string chunk at offset {eol} is not followed by CRLF")


def _count(text: bytes, *, allow_null: bool = False) -> int:
    if text.isdigit():
        return int(text)
    if allow_null and text == b"-1":
        return -1
    raise RespError(f"bad length {text[:20]!r}")


def string(buf: bytes, value: Value) -> bytes | None:
    """The text of a simple, bulk or verbatim string (verbatim without its `txt:` format); None otherwise."""
    if value.type not in STRING_TYPES or value.body_start < 0 or value.body_start == value.end:
        return None
    text = buf[value.body_start : value.body_end]
    return text[4:] if value.type == 0x3D else text


def integer(buf: bytes, value: Value) -> int | None:
    """The value of an integer, or of a string holding only digits; None otherwise."""
    text = buf[value.body_start : value.body_end] if value.type == 0x3A else string(buf, value)
    return int(text) if text is not None and text.isdigit() else None


def pairs(buf: bytes, value: Value) -> dict[bytes, Value]:
    """The fields of a map, or of a RESP2 flat array of key/value pairs, keyed by lower-cased key text."""
    if value.type not in (0x25, 0x2A) or len(value.children) % 2:
        return {}
    items = value.children
    fields: dict[bytes, Value] = {}
    for key, item in zip(items[::2], items[1::2], strict=True):
        name = string(buf, key)
        if name is not None:
            fields[name.lower()] = item
    return fields


Edit = tuple[int, int, bytes]
"""Replace buf[start:end] with the bytes."""


def replace_string(buf: bytes, value: Value, text: bytes) -> Edit:
    """An edit giving a string value new text, keeping its type (and a verbatim string's format)."""
    if value.type == 0x2B and b"\r" not in text and b"\n" not in text:
        return value.start, value.end, b"+" + text + b"\r\n"
    if value.type == 0x3D:
        text = buf[value.body_start : value.body_start + 4] + text
        return value.start, value.end, b"=%d\r\n%s\r\n" % (len(text), text)
    return value.start, value.end, b"$%d\r\n%s\r\n" % (len(text), text)


def replace_integer(buf: bytes, value: Value, number: int) -> Edit:
    """An edit giving an integer (or a string of digits) a new value, keeping its type."""
    if value.type == 0x3A:
        return value.start, value.end, b":%d\r\n" % number
    return replace_string(buf, value, b"%d" % number)


def apply(buf: bytes, edits: Iterable[Edit]) -> bytes:
    """Apply non-overlapping edits; bytes outside them are kept exactly."""
    out: list[bytes] = []
    pos = 0
    for start, end, text in sorted(edits):
        if start < pos:
            raise ValueError("overlapping RESP edits")
        out.append(buf[pos:start])
        out.append(text)
        pos = end
    out.append(buf[pos:])
    return b"".join(out)
