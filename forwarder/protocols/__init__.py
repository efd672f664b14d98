"""Pure, sans-IO protocol rewriters that give cluster-aware clients public node addresses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Mapper = Callable[[str, int], "tuple[str, int] | None"]
"""(node host name or IP, node port) -> (public address, public port), or None for a node with no forward."""

Warn = Callable[[str], None]
"""Receives one human-readable warning (the caller logs it); must not raise."""


class Rewriter(Protocol):
    """One connection's rewriter: observes requests, rewrites replies; never raises on any input bytes."""

    def from_client(self, data: bytes) -> None:
        """Observe client->node bytes (requests); they are forwarded unchanged by the caller."""

    def from_node(self, data: bytes) -> bytes:
        """Return node->client bytes ready to send; an incomplete tail may be held back until more arrives."""

    def pending(self) -> int:
        """Number of node bytes currently held back."""

    def flush(self) -> bytes:
        """On node EOF: release whatever is held, unchanged; the rewriter passes everything through afterwards."""
