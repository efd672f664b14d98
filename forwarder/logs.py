"""Structured log lines on stderr: logfmt-style text by default, one JSON object per line with --log-format json."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

from forwarder import journal

LogFormat = Literal["text", "json"]

# Attributes every LogRecord has; anything else came from `extra=` and is a structured field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname.lower(), record.getMessage()]
        for key, value in fields(record).items():
            text = str(value)
            parts.append(f"{key}={json.dumps(text) if (' ' in text or not text) else text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        entry.update(
            {k: v if isinstance(v, (int, float, bool)) or v is None else str(v) for k, v in fields(record).items()}
        )
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup(log_format: LogFormat = "text", level: int = logging.INFO) -> None:
    """Send the `natfwd` logger to stderr in the chosen format (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(journal.wrap(JSONFormatter() if log_format == "json" else TextFormatter()))
    logger = logging.getLogger("natfwd")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
