"""Children that do not outlive us.

Each child runs in a process group of its own (``start_new_session``), so that
whatever it forks (gunicorn's workers) can be signalled with it, and asks the
kernel for a signal when the thread that started it dies (``PR_SET_PDEATHSIG``,
kept across ``exec``): even a SIGKILLed parent takes its children along.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable

PR_SET_PDEATHSIG = 1

# Looked up once, here: the preexec function runs in the forked child, where
# the less Python does the better.
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Have the kernel send ``sig`` to this process when its parent (the thread
    that forked it) dies. With ``parent``, a parent already gone before the
    request was made counts too."""
    if _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def die_with_this_thread(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when
    the calling thread ends. Only from the main thread (None elsewhere): a helper
    thread that starts a service and returns must not take the service along."""
    if threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()
    return lambda: die_with_parent(sig, parent)


def spawn(cmd: list[str], *, death_signal: int = signal.SIGTERM, **kwargs) -> subprocess.Popen:
    """Popen in a new session (its own process group) that dies with this thread."""
    return subprocess.Popen(
        cmd, start_new_session=True, preexec_fn=die_with_this_thread(death_signal), **kwargs
    )


def has_exited(proc: subprocess.Popen) -> bool:
    """Whether the child has exited, without reaping it: while it stays a zombie
    its process-group id cannot be given to anyone else, so the group can still
    be killed safely."""
    return exit_status(proc) is not None


def exit_status(proc: subprocess.Popen) -> int | None:
    """The exit status (negative: the signal) once the child has exited, else
    None; without reaping it (see :func:`has_exited`)."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return proc.poll()
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def end_all(
    procs: Iterable[subprocess.Popen],
    timeout: float = 20.0,
    sig: int = signal.SIGTERM,
    hurry: threading.Event | None = None,
) -> None:
    """Stop group leaders started by :func:`spawn`: ``sig`` to each, up to
    ``timeout`` seconds (less once ``hurry`` is set) for them to exit, then
    SIGKILL; finally SIGKILL to what is left of each group (a worker its leader
    left behind), and reap."""
    procs = [p for p in procs if p is not None]
    reaped_before = {p.pid for p in procs if p.returncode is not None}
    for p in procs:
        if not has_exited(p):
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
    deadline = time.monotonic() + timeout
    while not all(has_exited(p) for p in procs):
        if time.monotonic() > deadline or (hurry is not None and hurry.is_set()):
            for p in procs:
                if not has_exited(p):
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            deadline = float("inf")
        time.sleep(0.05)
    for p in procs:
        if p.pid not in reaped_before:
            kill_group(p.pid)
        p.wait()


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
