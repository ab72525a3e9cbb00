"""Logging to stdout/stderr, with sd-daemon priority prefixes under journald.

When systemd connects our stderr to the journal it sets ``$JOURNAL_STREAM``;
journald then reads a leading ``<N>`` as the line's priority, so
``journalctl -p warning`` filters correctly. Elsewhere lines stay plain.
"""

from __future__ import annotations

import logging
import os
import sys
import time

# syslog priorities (sd-daemon.h): err 3, warning 4, info 6, debug 7.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def under_journald() -> bool:
    """True when stderr is the journal stream systemd announced."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    dev, ino = stream.split(":", 1)
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


class JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        # Multi-line messages (tracebacks) keep the priority on every line.
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def setup(level: str = "info", force_journal: bool | None = None) -> None:
    journal = under_journald() if force_journal is None else force_journal
    handler = logging.StreamHandler(sys.stderr)
    if journal:
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (pymongo heartbeats, paho internals) stays out of info.
    for noisy in ("pymongo", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class RateLimitedLogger:
    """Logs at most ``per_minute`` messages a minute and says how many it skipped."""

    def __init__(self, logger: logging.Logger, per_minute: int) -> None:
        self.logger = logger
        self.per_minute = per_minute
        self._window = 0
        self._count = 0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        window = int(time.monotonic() // 60)
        if window != self._window:
            if self._suppressed:
                self.logger.warning(
                    "%d similar warnings suppressed in the last minute", self._suppressed
                )
            self._window, self._count, self._suppressed = window, 0, 0
        if self._count < self.per_minute:
            self._count += 1
            self.logger.warning(msg, *args)
        else:
            self._suppressed += 1


class TracebackOnce:
    """Logs an unexpected exception with its traceback the first time each kind
    (type and place raised) is seen, and in one line after that."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._seen: set[tuple[str, str, int]] = set()

    def __call__(self, exc: BaseException, msg: str, *args: object) -> None:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb else ("?", 0)
        kind = (type(exc).__name__, *where)
        if kind in self._seen:
            self.logger.error(msg + " (%s: %s)", *args, type(exc).__name__, exc)
            return
        self._seen.add(kind)
        self.logger.error(msg, *args, exc_info=exc)
