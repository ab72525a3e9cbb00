"""``make run``, through make: it names a taken port instead of talking to a
stranger, and leaves no process behind however it ends.

Each run gets a data folder of its own (``RUN_DATA=``) and free ports
(``MQTT_PORT=`` and the like), so it never meets a user's ``./var`` or an
earlier run. The run's processes are found in /proc by that folder: the services
and daemons work in it, and make's and the runner's command lines name it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import REPO
from devstack.ports import free_port
from devstack.stack import PortTaken, Stack
from tests.helpers import wait_for

PORT_VARS = ("MQTT_PORT", "REDIS_PORT", "MONGODB_PORT", "API_PORT")
READY = "Ctrl-C stops everything."
# What runs once the stack is up: make, the runner, Mosquitto, Redis, the
# MongoDB-wire server, the ingester, the simulator, and gunicorn's master with
# its workers (two by default).
AT_LEAST = 9


def processes_of(data: Path) -> dict[int, str]:
    """Live processes (zombies aside) working in ``data`` or naming it."""
    mark = str(data)
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                cwd = ""
        except (OSError, IndexError):
            continue  # gone meanwhile
        if mark in cmd or cwd == mark or cwd.startswith(mark + "/"):
            found[int(entry.name)] = cmd.strip()
    return found


def runner_pid(make: subprocess.Popen) -> int:
    """The ``python -m devstack.run`` make started."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == make.pid and b"devstack.run" in cmd:
                return int(entry.name)
    raise AssertionError("no devstack.run under make")


def distinct_free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


class MakeRun:
    """``make run`` in a session of its own (a process group to signal, as a
    terminal would), output to a file or a pipe; ``deps`` taken as made."""

    def __init__(self, tmp_path: Path, env: dict[str, str] | None = None, pipe: bool = False):
        self.data = tmp_path / "run"
        self.log = tmp_path / "make-run.log"
        self.ports = dict(zip(PORT_VARS, distinct_free_ports(len(PORT_VARS)), strict=True))
        self.ports.update(env or {})
        self.out = None if pipe else open(self.log, "wb")  # noqa: SIM115 - closed in close()
        self.make = subprocess.Popen(
            # -o deps: the installer is not under test (and would reinstall the
            # venv mid-suite whenever setup.cfg changed); the run recipe is.
            ["make", "--no-print-directory", "-o", "deps", "run", f"RUN_DATA={self.data}"],
            cwd=REPO,
            env={**os.environ, **{k: str(v) for k, v in self.ports.items()}},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else self.out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.text = ""

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['API_PORT']}"

    def output(self) -> str:
        return self.text if self.out is None else self.log.read_text(errors="replace")

    def read_until(self, marker: str, timeout: float = 45.0) -> None:
        """From the pipe (pipe=True), until ``marker`` or make's end."""
        assert self.make.stdout is not None
        fd = self.make.stdout.fileno()
        deadline = time.monotonic() + timeout
        while marker not in self.text:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} after {timeout}s:\n{self.text}"
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                assert chunk, f"make's output ended before {marker!r}:\n{self.text}"
                self.text += chunk.decode(errors="replace")

    def wait_serving(self, timeout: float = 45.0) -> None:
        """Until the runner says it is up and the API answers."""
        if self.out is None:
            self.read_until(READY, timeout)
        else:
            wait_for(
                lambda: READY in self.output() or self.make.poll() is not None,
                timeout,
                what="make run to start",
            )
            assert self.make.poll() is None, self.output()

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"{self.api}/readings/latest", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(answers, timeout, what="the API to answer")

    def close(self) -> None:
        """Whatever happened: nothing of this run left running."""
        if self.make.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.make.pid, signal.SIGKILL)
            self.make.wait()
        for pid in processes_of(self.data):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.out is not None:
            self.out.close()
        if self.make.stdout is not None:
            self.make.stdout.close()


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[list[MakeRun]]:
    runs: list[MakeRun] = []
    yield runs
    for r in runs:
        r.close()


def assert_all_gone(run: MakeRun, timeout: float) -> None:
    """make has ended, and within ``timeout`` seconds so has every process of the run."""
    try:
        run.make.wait(45)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"make run still running:\n{processes_of(run.data)}\n{run.output()}"
        ) from None
    deadline = time.monotonic() + timeout
    while (left := processes_of(run.data)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"left running after make run ended: {left}\n{run.output()}"


def _signal_group(run: MakeRun, sig: int) -> None:
    os.killpg(run.make.pid, sig)


def _signal_make(run: MakeRun, sig: int) -> None:
    os.kill(run.make.pid, sig)


def _signal_runner(run: MakeRun, sig: int) -> None:
    os.kill(runner_pid(run.make), sig)


# (how it ends, send, signal, seconds the run's processes may outlive make):
# the graceful ends stop everything before the runner exits (0 s); a SIGKILLed
# runner or make cannot, and the kernel's parent-death signals do it then.
ENDINGS = [
    ("Ctrl-C at the terminal", _signal_group, signal.SIGINT, 0),
    ("terminal closed (SIGHUP)", _signal_group, signal.SIGHUP, 0),
    ("SIGTERM to make", _signal_make, signal.SIGTERM, 0),
    ("SIGTERM to the runner", _signal_runner, signal.SIGTERM, 0),
    ("SIGKILL to the runner", _signal_runner, signal.SIGKILL, 20),
    ("SIGKILL to make", _signal_make, signal.SIGKILL, 30),
]


@pytest.mark.parametrize(
    ("send", "sig", "grace"), [e[1:] for e in ENDINGS], ids=[e[0] for e in ENDINGS]
)
def test_make_run_leaves_nothing_running(
    tmp_path: Path, make_run: list[MakeRun], send, sig: int, grace: float
) -> None:
    run = MakeRun(tmp_path)
    make_run.append(run)
    run.wait_serving()
    running = processes_of(run.data)
    assert len(running) >= AT_LEAST, running
    send(run, sig)
    assert_all_gone(run, grace)


def test_make_run_stops_when_its_output_pipe_closes(
    tmp_path: Path, make_run: list[MakeRun]
) -> None:
    """``make run | grep -m1 API``: the reader goes away while the run is up."""
    run = MakeRun(tmp_path, pipe=True)
    make_run.append(run)
    run.wait_serving()
    assert len(processes_of(run.data)) >= AT_LEAST
    assert run.make.stdout is not None
    run.make.stdout.close()  # nobody reads any more
    assert_all_gone(run, 0)


def test_make_run_names_a_taken_port_and_starts_nothing(
    tmp_path: Path, make_run: list[MakeRun]
) -> None:
    # A stranger on the port Redis would have (an earlier run's Redis, say).
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        run = MakeRun(tmp_path, env={"REDIS_PORT": str(port)})
        make_run.append(run)
        assert run.make.wait(45) != 0
    out = run.output()
    assert f"port {port} for redis on 127.0.0.1 is taken" in out, out
    assert f"pid {os.getpid()}" in out, out  # the holder: this process
    assert f"REDIS_PORT={port + 1} make run" in out, out
    assert "services up" not in out, out
    assert not processes_of(run.data)
    assert not (run.data / "redis").exists()


def test_stack_refuses_a_taken_fixed_port(tmp_path: Path) -> None:
    """The same check in devstack.stack, for anything else using fixed ports."""
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        stack = Stack(root=tmp_path / "stack", ports={"mqtt": port})
        with pytest.raises(PortTaken, match=rf"port {port} for mosquitto .* pid {os.getpid()}"):
            stack.start()
        stack.stop()
    assert stack.mosquitto.proc is None
