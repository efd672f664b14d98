"""journald priority prefixes (`<3>` ...) on log lines, when stderr is the journal (systemd sets JOURNAL_STREAM)."""

from __future__ import annotations

import logging
import os
import sys

ENV = "JOURNAL_STREAM"

# syslog priorities, as sd-daemon(3) spells them in the `<N>` prefix journald reads at the start of each line.
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG = 7


def priority(levelno: int) -> int:
    """The syslog priority of a logging level."""
    for level, value in _PRIORITY:
        if levelno >= level:
            return value
    return _DEBUG


def stderr_is_journal() -> bool:
    """True when stderr is the very stream systemd connected to journald (JOURNAL_STREAM=device:inode)."""
    device, _, inode = os.environ.get(ENV, "").partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


class PriorityFormatter(logging.Formatter):
    """Wraps another formatter: every line of a record (a traceback too) gets the record's `<N>` prefix."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def wrap(formatter: logging.Formatter) -> logging.Formatter:
    """`formatter`, with priority prefixes when stderr is the journal."""
    return PriorityFormatter(formatter) if stderr_is_journal() else formatter
