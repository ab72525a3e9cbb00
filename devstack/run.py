"""``make run``: the whole pipeline in the foreground, on loopback, data under ./var.

Starts Mosquitto, Redis and a MongoDB-wire server (see devstack.stack), writes
``var/gateway.toml`` pointing at them, then runs the ingester, the API and the
simulator as child processes, their output prefixed by name.

Ports are fixed, so that the URLs stay the same from one run to the next: 1883,
6379, 27017 and 8000 unless MQTT_PORT, REDIS_PORT, MONGODB_PORT or API_PORT say
otherwise. Each is checked before anything starts: a taken one ends the run
with its service, its number and the process holding it named, rather than
the gateway talking to a stranger (an old Redis with another password).

Everything started here ends with the run, however it ends: Ctrl-C, SIGTERM or
SIGHUP, stdout closed (``make run | head``), a daemon exiting, or this process
killed (each child gets SIGTERM from the kernel then, see devstack.lifetime).
Under make, make's death ends the run too.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import tomli_w

from devstack import REPO, lifetime
from devstack.ports import describe_taken, is_free
from devstack.stack import PortTaken, Stack

# Started in this order; stopped together.
DAEMONS = ("ingest", "api", "simulate")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# (service, environment variable, default port)
PORTS = (
    ("mqtt", "MQTT_PORT", 1883),
    ("redis", "REDIS_PORT", 6379),
    ("mongodb", "MONGODB_PORT", 27017),
    ("api", "API_PORT", 8000),
)
EXIT_PORT_TAKEN = 3


class Stop(BaseException):
    """Raised in the main thread by a stop signal: unwinds to the clean-up."""


class Output:
    """Our stdout and stderr, shared by the main thread and the daemons' pumps.

    A write to a closed stdout (or one found closed by :meth:`stdout_closed`)
    points the descriptor at /dev/null, so that nothing later fails on it, and
    sets ``closed``: the run then stops."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = threading.Event()

    def out(self, text: str) -> None:
        self._write(sys.stdout, text)

    def err(self, text: str) -> None:
        self._write(sys.stderr, text)

    def _write(self, stream, text: str) -> None:
        with self.lock:
            try:
                stream.write(text)
                stream.flush()
            except (BrokenPipeError, ValueError):
                self._silence(stream)
            except OSError:
                pass  # a full disk, say: the line is lost, the run goes on

    def _silence(self, stream) -> None:
        try:
            fd = stream.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
        except (OSError, ValueError):
            pass
        if stream is sys.stdout:
            self.closed.set()

    def stdout_closed(self) -> bool:
        """A pipe whose reader is gone polls as POLLERR; noticed even while
        nobody writes."""
        try:
            poller = select.poll()
            poller.register(sys.stdout.fileno(), 0)
            events = poller.poll(0)
        except (OSError, ValueError):
            return False
        if any(ev & (select.POLLERR | select.POLLHUP) for _, ev in events):
            with self.lock:
                self._silence(sys.stdout)
            return True
        return False


def _pump(name: str, proc: subprocess.Popen, output: Output) -> None:
    """A daemon's output, prefixed by its name; read to the end, even once our
    stdout is gone (a daemon must never block on a full pipe)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        output.out(f"{name:>9} | {line.decode(errors='replace')}")


def _ports() -> dict[str, int]:
    return {svc: int(os.environ.get(var) or default) for svc, var, default in PORTS}


def taken_ports(ports: dict[str, int]) -> list[str]:
    """A line per taken port, naming its service, its variable and its holder."""
    var = {svc: v for svc, v, _ in PORTS}
    return [
        f"{describe_taken(svc, port)}\n  stop that process, or run on another port: "
        f"{var[svc]}={port + 1} make run"
        for svc, port in ports.items()
        if not is_free(port)
    ]


class Run:
    def __init__(self, data: Path, rate: float | None, output: Output) -> None:
        self.output = output
        self.rate = rate
        self.ports = _ports()
        self.stack = Stack(
            root=data.resolve(), ports={k: v for k, v in self.ports.items() if k != "api"}
        )
        self.daemons: dict[str, subprocess.Popen] = {}
        self.stop_reason = ""
        self.stopping = False
        self.hurry = threading.Event()

    def on_signal(self, signum: int, frame) -> None:
        if self.stopping:
            self.hurry.set()  # a second Ctrl-C: no more waiting for graceful exits
            return
        self.stopping = True
        self.stop_reason = signal.Signals(signum).name
        raise Stop

    def start(self) -> int:
        taken = taken_ports(self.ports)
        if taken:
            self.output.err("make run: " + "\nmake run: ".join(taken) + "\n")
            return EXIT_PORT_TAKEN
        try:
            self.stack.start()
        except (RuntimeError, TimeoutError) as exc:
            self.output.err(
                f"make run: could not start the local services: {exc}\n"
                f"(logs in {self.stack.root}/*/service.log)\n"
            )
            return EXIT_PORT_TAKEN if isinstance(exc, PortTaken) else 1
        data = self.stack.config_dict()
        api_port = self.ports["api"]
        data["api"]["bind"] = f"127.0.0.1:{api_port}"
        cfg_path = self.stack.root / "gateway.toml"
        cfg_path.write_text(tomli_w.dumps(data))
        self.output.out(f"services up ({self.stack.mongo.engine}); configuration in {cfg_path}\n")

        for name in DAEMONS:
            if name == "api" and not is_free(api_port):
                self.output.err(f"make run: {describe_taken('api', api_port)}\n")
                return EXIT_PORT_TAKEN
            extra = ["--rate", str(self.rate)] if name == "simulate" and self.rate else []
            self.daemons[name] = proc = lifetime.spawn(
                [sys.executable, "-m", "sensor_gateway", "-c", str(cfg_path), name, *extra],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.stack.root,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            threading.Thread(target=_pump, args=(name, proc, self.output), daemon=True).start()
            if name == "ingest":
                time.sleep(1.0)  # let it subscribe before readings flow
        self.output.out(
            f"API on http://127.0.0.1:{api_port}/  "
            f"(try: curl http://127.0.0.1:{api_port}/readings/latest)\nCtrl-C stops everything.\n"
        )
        return 0

    def wait(self) -> int:
        """Until a daemon exits (1) or stdout is closed (0); a signal raises Stop."""
        while True:
            for name, proc in self.daemons.items():
                status = lifetime.exit_status(proc)  # not reaped: stop() ends its group
                if status is not None:
                    self.stop_reason = f"{name} exited with {status}"
                    return 1
            if self.output.closed.wait(0.5) or self.output.stdout_closed():
                self.stop_reason = "stdout closed"
                return 0

    def stop(self) -> None:
        self.stopping = True  # from now on a signal only hurries the stop
        if self.stop_reason:
            self.output.err(f"make run: {self.stop_reason}; stopping\n")
        # The daemons first (the ingester writes what it holds), then what they use.
        lifetime.end_all(self.daemons.values(), timeout=15.0, hurry=self.hurry)
        self.stack.stop(hurry=self.hurry)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / "var", help="data folder (default ./var)")
    ap.add_argument("--rate", type=float, default=None, help="simulator messages per second")
    args = ap.parse_args(argv)

    if os.environ.get("MAKELEVEL"):
        # Started by make: make's end is ours, even a SIGKILL (make itself
        # forwards SIGTERM, and waits for us on SIGINT and SIGHUP).
        lifetime.die_with_parent(signal.SIGTERM, os.getppid())
    output = Output()
    run = Run(args.data, args.rate, output)
    for sig in STOP_SIGNALS:
        signal.signal(sig, run.on_signal)
    status = 0
    try:
        status = run.start()
        if status == 0:
            status = run.wait()
    except Stop:
        status = 0
    finally:
        run.stop()
    return status


if __name__ == "__main__":
    sys.exit(main())
