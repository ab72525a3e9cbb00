"""systemd notification: READY, STATUS, STOPPING and a progress-based watchdog.

``WATCHDOG=1`` is sent only by :meth:`Notifier.progress`, which the daemon's
work loop calls when it has made progress (or is idle with nothing to do);
a hung loop therefore stops the pings and systemd restarts the daemon.
Outside systemd (no ``$NOTIFY_SOCKET``) every call is a cheap no-op.
"""

from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        # Ping at half the timeout, as sd_watchdog_enabled(3) recommends.
        self.watchdog_interval = usec / 2e6 if usec else 0.0
        self._last_ping = 0.0
        self._last_status = ""

    def _send(self, text: str) -> None:
        if self._n is not None:
            self._n.notify(text)

    def ready(self, status: str = "") -> None:
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def progress(self) -> None:
        """Called by the work loop each time it advances; rate-limits the pings."""
        if not self.watchdog_interval:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval / 2:
            self._last_ping = now
            self._send("WATCHDOG=1")
