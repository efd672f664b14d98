"""natfwd's optional C extensions: multiplexing's scanners (protocols/_cframing.c) and raw mode's relay thread
(_crelay.c).

Each is built at install when a compiler is there (pyproject.toml, `optional = true`). Without one, or with
NATFWD_NO_EXTENSIONS set, natfwd runs the pure-Python code the extension mirrors, and says so once where it costs.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

OFF = bool(os.environ.get("NATFWD_NO_EXTENSIONS"))  # turned off on purpose: no warning then
_warned: set[str] = set()


def load(name: str) -> ModuleType | None:
    """The extension module `name` (dotted, under forwarder), or None when OFF is set or it was not built."""
    if OFF:
        return None
    try:
        return importlib.import_module(f"forwarder.{name}")
    except ImportError:
        return None


def warn_missing(log: logging.Logger, what: str, cost: str) -> None:
    """Warn once per process that `what` runs in Python because its extension was not built (not when OFF)."""
    if OFF or what in _warned:
        return
    _warned.add(what)
    log.warning(
        f"{what} in Python, which costs {cost}: the C extension was not built; install gcc and the Python headers "
        "(apt-get install gcc python3-dev) and reinstall natfwd"
    )
