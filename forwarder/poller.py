"""One epoll set for the sockets of connections without transports, watched by the event loop as a single reader."""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable
from typing import Protocol

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_READ_EVENTS = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
FAILED = select.EPOLLERR | select.EPOLLHUP  # in `events` for a connect that failed
EVENTS_PER_WAKEUP = 256  # the rest wait for the next loop iteration (level-triggered), so timers and others run


class Watcher(Protocol):
    """The four calls raw mode makes to be told when a socket can be read or written: the loop's, or a Poller's."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> object: ...
    def remove_reader(self, fd: int) -> object: ...
    def add_writer(self, fd: int, callback: Callable[[], None]) -> object: ...
    def remove_writer(self, fd: int) -> object: ...


class Poller:
    """add_reader and friends, as the loop has them, for many sockets behind one descriptor the loop watches.

    The loop's own calls do more per call than one epoll_ctl (uvloop makes a poll handle and looks the descriptor
    up among its transports, raising and catching a KeyError), and a plain connection makes about six of them.
    Callbacks run from the loop's reader callback, level-triggered as the loop's would be.
    """

    __slots__ = ("epoll", "masks", "readers", "writers", "loop", "events")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.epoll = select.epoll()
        self.masks: dict[int, int] = {}
        self.readers: dict[int, Callable[[], None]] = {}
        self.writers: dict[int, Callable[[], None]] = {}
        self.loop = loop
        # The events of the writer callback being run: a connect watched with add_writer needs no SO_ERROR system
        # call to learn that it succeeded unless they include FAILED.
        self.events = 0
        loop.add_reader(self.epoll.fileno(), self.dispatch)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback
        self._watch(fd, self.masks.get(fd, 0) | _IN)

    def remove_reader(self, fd: int) -> None:
        if self.readers.pop(fd, None) is not None:
            self._watch(fd, self.masks.get(fd, 0) & ~_IN)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self.writers[fd] = callback
        self._watch(fd, self.masks.get(fd, 0) | _OUT)

    def remove_writer(self, fd: int) -> None:
        if self.writers.pop(fd, None) is not None:
            self._watch(fd, self.masks.get(fd, 0) & ~_OUT)

    def writer_to_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Replace the writer of `fd`, its only callback (a connect), by a reader: one epoll_ctl instead of two."""
        del self.writers[fd]
        self.readers[fd] = callback
        self.masks[fd] = _IN
        self.epoll.modify(fd, _IN)

    def replace_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """A new reader for `fd`, which has one: no epoll_ctl."""
        self.readers[fd] = callback

    def closing(self, fd: int) -> None:
        """`fd` is about to be closed, which takes it out of the epoll set (no other descriptor refers to its
        socket): drop its callbacks without an epoll_ctl."""
        if self.masks.pop(fd, 0):
            self.readers.pop(fd, None)
            self.writers.pop(fd, None)

    def _watch(self, fd: int, mask: int) -> None:
        masks = self.masks
        old = masks.get(fd, 0)
        if mask == old:
            return
        if not old:
            self.epoll.register(fd, mask)
            masks[fd] = mask
        elif mask:
            self.epoll.modify(fd, mask)
            masks[fd] = mask
        else:
            self.epoll.unregister(fd)
            del masks[fd]

    def dispatch(self) -> None:
        readers = self.readers
        writers = self.writers
        for fd, events in self.epoll.poll(0, EVENTS_PER_WAKEUP):
            # A callback earlier in this batch may have closed fd (and a new socket taken its number): the callbacks
            # are looked up now, and every one of them copes with a spurious wakeup (EAGAIN).
            if events & _READ_EVENTS:
                reader = readers.get(fd)
                if reader is not None:
                    reader()
            if events & _WRITE_EVENTS:
                writer = writers.get(fd)
                if writer is not None:
                    self.events = events
                    writer()

    def close(self) -> None:
        """Stop watching (the connections were closed before)."""
        if not self.epoll.closed:
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()
