"""A notify socket of our own, standing in for systemd's (``$NOTIFY_SOCKET``):
every datagram a daemon sends (READY=1, WATCHDOG=1, STATUS=...) lands in
``messages``, and when it came in ``times``. Used by tests and benchmarks."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.messages: list[str] = []
        # time.perf_counter() at each message's arrival.
        self.times: list[float] = []
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.2)
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.times.append(time.perf_counter())
            self.messages.append(data.decode())

    def first(self, text: str, timeout: float) -> float | None:
        """When the first message containing ``text`` arrived (waits up to timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            for at, m in zip(self.times, self.messages, strict=False):
                if text in m:
                    return at
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
