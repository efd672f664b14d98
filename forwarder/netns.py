"""Network namespaces by name: enter one on the current thread (setns), and list the processes inside one."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

from forwarder.errors import NatfwdError

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def path(name: str) -> str:
    """The bind-mount `ip netns add NAME` creates."""
    return os.path.join(NETNS_DIR, name)


def _setns(fd: int) -> None:
    # Python 3.11 has no os.setns; the libc call is the same syscall.
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block with the current thread inside namespace `name`, then switch back.

    Only the calling thread moves. Sockets created in the block stay in `name` after it ends, so a client
    connected inside keeps working outside. Raises NatfwdError if the namespace does not exist or setns
    is not permitted (it needs CAP_SYS_ADMIN).
    """
    try:
        target = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NatfwdError(f"network namespace {name!r} does not exist (is the lab up?)") from None
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                _setns(target)
            except OSError as exc:
                raise NatfwdError(f"cannot enter network namespace {name!r}: {exc.strerror}; it needs root") from None
            try:
                yield
            finally:
                _setns(original)
        finally:
            os.close(original)
    finally:
        os.close(target)


def pids(name: str) -> list[int]:
    """Pids of the live processes whose network namespace is `name` (what `ip netns pids` prints).

    Zombies have already left their namespaces, so they are not listed. Returns [] if `name` does not exist.
    """
    try:
        wanted = os.stat(path(name))
    except FileNotFoundError:
        return []
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # exited meanwhile, a zombie, or a kernel thread
            continue
        if (st.st_dev, st.st_ino) == (wanted.st_dev, wanted.st_ino):
            found.append(int(entry))
    return sorted(found)


def listening_ports(name: str) -> set[int]:
    """TCP ports with a listening socket (IPv4 or IPv6) in namespace `name`, read from its /proc tables.

    Reading the tables makes no connection, so a natfwd being waited on sees no probe (no rejected-client
    metric, no log line). Raises NatfwdError as `entered` does.
    """
    ports: set[int] = set()
    with entered(name):
        # /proc/thread-self/net follows this thread's namespace; /proc/self/net would follow the main thread's.
        for table in ("tcp", "tcp6"):
            try:
                with open(f"/proc/thread-self/net/{table}") as handle:
                    rows = handle.read().splitlines()[1:]
            except FileNotFoundError:  # no IPv6 in this kernel
                continue
            for row in rows:
                fields = row.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
