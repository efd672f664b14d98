"""The open-file limit: what a worker needs at max_connections, raising RLIMIT_NOFILE to it, and raw mode's share."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("natfwd.server")

RAW_FD_SHARE = 8  # raw mode may always use 1/8 of RLIMIT_NOFILE; more when max_connections leaves more
UNLIMITED = 1 << 20  # what RLIM_INFINITY counts as


def fds_needed(max_connections: int) -> int:
    """Descriptors a worker needs at its connection limit: a client and a node socket each, plus listeners and logs.

    Raw mode's socket duplicates and pipes come only out of what the open-file limit leaves beyond this.
    """
    return 2 * max_connections + 64


def soft_limit() -> int:
    """RLIMIT_NOFILE's soft limit now, with no limit counted as UNLIMITED."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return UNLIMITED if soft == resource.RLIM_INFINITY else soft


def raw_budget(reserved: int) -> int:
    """Descriptors raw mode may hold: what the soft limit leaves beyond `reserved` (the connections' needs), and
    never less than an eighth of the limit.

    Raw mode is an optimisation: under a limit too tight for both (raise_fd_limit warns at start), busy connections
    stay fast at the cost of at most that eighth of the capacity.
    """
    limit = soft_limit()
    return max(limit - reserved, limit // RAW_FD_SHARE)


def raise_fd_limit(max_connections: int) -> None:
    """Raise RLIMIT_NOFILE to hold max_connections and as much again for raw mode; warn when it cannot.

    The soft limit goes up to the hard one; the hard one too when it is lower than that and we may raise it
    (root, CAP_SYS_RESOURCE). Raw mode uses what the limit leaves beyond fds_needed(), but at least an eighth.
    Run it once, in the process that starts the workers: forked workers inherit the limit.
    """
    needed = fds_needed(max_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = UNLIMITED
    if hard < 2 * needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (2 * needed, 2 * needed))
            soft = hard = 2 * needed
        except (ValueError, OSError):
            pass  # not privileged: keep what we were given
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit", extra={"soft": soft, "hard": hard, "error": str(exc)})
    if soft < needed + soft // RAW_FD_SHARE:
        # Below `needed` not every connection can open; below that plus raw mode's share, busy connections in raw
        # mode (splice) can hold descriptors a new connection would need.
        log.warning(
            "open-file limit is below what max_connections needs; raise LimitNOFILE or ulimit -n",
            extra={"limit": soft, "needed": needed, "recommended": 2 * needed, "max_connections": max_connections},
        )
