"""Log a problem at WARNING the first time it happens in this process, at DEBUG after that: a model
with graph breaks opens the cost cache and the compiled store once per graph, and one broken
directory must not fill the log."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

__all__ = ["warn_once"]

_seen: set[tuple[str, str]] = set()  # (path, reason) already logged at WARNING
_lock = threading.Lock()


def warn_once(logger: logging.Logger, path: Path, reason: str, message: str, *args: object) -> None:
    """``message`` at WARNING the first time ``reason`` happens to ``path`` in this process, then DEBUG."""
    with _lock:
        first = (str(path), reason) not in _seen
        _seen.add((str(path), reason))
    logger.log(logging.WARNING if first else logging.DEBUG, message, *args)
