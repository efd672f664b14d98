"""The two error families the CLI maps to exit codes (runtime 1, usage 2), and the wording of a bind failure."""

import errno


class NatfwdError(Exception):
    """A runtime failure: the message says what failed and, where known, how to fix it (exit 1)."""


class UsageError(Exception):
    """A usage or config mistake: the message names the bad input and what is valid (exit 2)."""


def bind_error(address: str, port: int, exc: OSError, key: str | None = None) -> NatfwdError:
    """The one wording of a port that cannot be bound (a listener, or the metrics exporter's `key`): what, why, and
    the fix for the usual causes."""
    prefix = f"{key}: " if key is not None else ""
    if exc.errno == errno.EADDRINUSE:
        return NatfwdError(
            f"{prefix}port {port} is already in use on {address}; is another natfwd or memcached running?"
        )
    if exc.errno == errno.EACCES:
        return NatfwdError(
            f"{prefix}cannot bind {address}:{port}: permission denied; ports below 1024 need root or "
            "CAP_NET_BIND_SERVICE"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return NatfwdError(
            f"{prefix}cannot bind {address}:{port}: {address} is not an address of this host; check listen_address"
        )
    return NatfwdError(f"{prefix}cannot bind {address}:{port}: {exc.strerror or exc}")
