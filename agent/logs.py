"""Structured log lines on stderr: ``ts=… level=… logger=… event key=value …``.

Messages are written as an event name followed by key=value pairs, so a line is
greppable by eye and parseable by a log shipper without a JSON dependency.
"""

from __future__ import annotations

import logging
import sys
import time


class KeyValueFormatter(logging.Formatter):
    """One line per record; a traceback, if any, follows on its own indented lines."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"ts={stamp} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += "\n  " + self.formatException(record.exc_info).replace("\n", "\n  ")
        return line


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # paho logs nothing unless asked; onnxruntime's own logging goes to its C++ sink.
