"""Loopback ports: a free one, waiting for one to open, and who holds a taken one."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

LISTEN = "0A"  # the state column of /proc/net/tcp{,6}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:``port`` now (as ours do, with
    SO_REUSEADDR: a connection in TIME_WAIT does not count as taken)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Holder:
    """A process with a socket listening on the port."""

    pid: int
    cmdline: str
    cwd: str

    def __str__(self) -> str:
        where = f", cwd {self.cwd}" if self.cwd else ""
        return f"pid {self.pid} ({self.cmdline}{where})"


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def holders(port: int) -> list[Holder]:
    """The processes listening on ``port`` (any address) that this user may look
    into: /proc/net/tcp{,6} gives the socket's inode, /proc/PID/fd who has it."""
    inodes = {f"socket:[{i}]" for i in _listening_inodes(port)}
    found = []
    if not inodes:
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(entry / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(entry / "fd" / fd)
            except OSError:
                continue
            if target in inodes:
                found.append(_holder(int(entry.name)))
                break
    return found


def _holder(pid: int) -> Holder:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        cmdline = " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    except OSError:
        cmdline = "?"
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = ""
    return Holder(pid=pid, cmdline=cmdline, cwd=cwd)


def describe_taken(service: str, port: int) -> str:
    """One line for a taken port: the service that wanted it and who has it."""
    found = holders(port)
    if found:
        who = "held by " + "; ".join(str(h) for h in found)
    else:
        who = "held by a process this user cannot see (try: sudo ss -ltnp)"
    return f"port {port} for {service} on 127.0.0.1 is taken, {who}"
