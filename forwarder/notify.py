"""systemd's readiness protocol (sd_notify): one datagram per state change to $NOTIFY_SOCKET, when it is set."""

from __future__ import annotations

import os
import socket
import time

ENV = "NOTIFY_SOCKET"


def send(state: str) -> bool:
    """Send `state` ("READY=1", ...) to the service manager; False when not run under Type=notify.

    Errors are swallowed: a service manager that went away must not stop the forwarder.
    """
    address = os.environ.get(ENV)
    if not address or address[0] not in "@/":
        return False
    # A leading "@" names a socket in the abstract namespace, spelled with a NUL byte.
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError:
        return False
    return True


def ready() -> None:
    """Every listener is bound: systemd may start what comes after natfwd."""
    send("READY=1\nSTATUS=serving")


def reloading() -> None:
    """A reload started; READY=1 again says it is over (MONOTONIC_USEC as systemd's reload protocol asks)."""
    send(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\nSTATUS=reloading")


def stopping() -> None:
    """Draining before exit."""
    send("STOPPING=1\nSTATUS=draining")


def detach() -> None:
    """Forget the socket in this process (a forked worker): only the supervisor speaks for the service."""
    os.environ.pop(ENV, None)


class Barrier:
    """READY=1 from a supervisor once `count` workers each said they are bound, over a pipe they inherit."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._seen = 0
        self.done = False

    def worker_ready(self) -> None:
        """In a worker: this worker's listeners are bound."""
        try:
            os.write(self._write, b"1")
        except OSError:
            pass

    def poll(self) -> bool:
        """In the supervisor: count what arrived; send READY=1 once all workers are bound. True once sent."""
        if self.done:
            return True
        try:
            self._seen += len(os.read(self._read, 4096))
        except BlockingIOError:
            pass
        if self._seen >= self.count:
            self.done = True
            ready()
        return self.done

    def close(self) -> None:
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
