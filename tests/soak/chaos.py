"""Chaos soak (``make soak``): steady publishing through faults, then a count.

    .venv/bin/python -m tests.soak.chaos --duration 600 --seed 7

A private stack (Mosquitto, Redis, a MongoDB-wire server) on loopback, the real
ingester (``sensor-gateway ingest``) and API (``sensor-gateway api``, gunicorn)
as subprocesses, and a publisher of our own at ``--rate`` messages per second:

- valid readings: sensor ``soak-<seq % 8>``, ``value`` = a global sequence
  number (the identity counted at the end), an ISO 8601 ``timestamp`` ending in
  ``Z`` and a ``msg_id``. One counts as *published* only once the broker
  acknowledged it (PUBACK, matched to the message by its packet id, without a
  failure reason code). paho re-sends what was not acknowledged when the broker
  went away, byte for byte; such a re-send must still be stored once.
- ``--hostile`` of the messages (1 %) are hostile payloads (see ``HOSTILE``),
  sent on a connection of their own so that nothing the broker does about them
  can disturb the valid stream. They count as ``rejected`` on our side and
  are compared with the ``rejected`` collection; none may become a reading.

Meanwhile a seeded random schedule injects faults, one at a time, each counted
in ``faults_injected``: kill -9 and restart of the ingester; MongoDB stopped
and started (once in a while with an ingester kill -9 during the outage);
Redis stopped and started; Mosquitto restarted gracefully (persistence on);
the API restarted (``/healthz`` must answer again). After each fault the
ingester must be subscribed and storing again. An ingester that exits on its
own (not killed by us) is restarted, and the exit (with the traceback from its
log) is reported under ``ingester_unexpected_exits`` / ``ingester_exits``.

The ingester's progress is read from its sd_notify STATUS line (a notify
socket of ours stands in for systemd's): every time its counters stand still
for over 5 s while we publish is reported (``ingester_stalls_over_5s``).

At the end: publishing stops, outstanding PUBACKs are awaited, the ingester is
left to drain (its counters still with nothing queued, confirmed by a probe
reading published last, see ``Soak.drain``; bounded), and the readings
collection is read once (``sensor_id``, ``value``). ``stored`` = distinct
published identities found, ``duplicates`` = documents for them beyond one
each, ``lost`` = acknowledged valid readings not found.

Progress goes to stderr; stdout gets one JSON line. Exit status 0 when the
targets hold (lost 0, duplicates 0, no hostile payload stored, ingester alive
and never exited on its own, every fault recovered from, at least
``--min-faults`` faults), else 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import requests

from devstack.ports import free_port
from devstack.stack import Stack
from sensor_gateway import storage
from sensor_gateway.mqtt import connect_async, make_client
from tests.helpers import Gateway

T0 = time.monotonic()
SENSORS = [f"soak-{k}" for k in range(8)]
SENSOR_SET = frozenset(SENSORS)
# Published at the end, after everything else: see Soak.drain.
PROBE_SENSOR = "soak-probe"


def say(msg: str) -> None:
    print(f"[soak {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def pause(seconds: float) -> None:
    time.sleep(max(0.0, seconds))


# -- hostile payloads ------------------------------------------------------------------
# Each builder gets the rng and a serial number and returns (topic, payload). None
# of them is a valid reading (docs/ARCHITECTURE.md, "The payload contract").

Builder = Callable[[random.Random, int], tuple[str, bytes]]


def _obj(n: int, **fields: Any) -> bytes:
    body = {"sensor_id": f"hostile-{n % 4}", "value": 1.5, "timestamp": iso_now()}
    body.update(fields)
    body["msg_id"] = f"hostile-{n}"
    return json.dumps(body).encode()


def _raw(n: int, value: bytes = b"1.5", ts: bytes | None = None, extra: bytes = b"") -> bytes:
    ts = ts if ts is not None else iso_now().encode()
    return b'{"sensor_id":"hostile-%d","value":%s,"timestamp":"%s","msg_id":"hostile-%d"%s}' % (
        n % 4,
        value,
        ts,
        n,
        extra,
    )


HOSTILE_TOPIC = "sensors/temperature"

HOSTILE: dict[str, Builder] = {
    "invalid_json": lambda r, n: (HOSTILE_TOPIC, _raw(n)[: r.randint(1, 40)]),
    "random_bytes": lambda r, n: (HOSTILE_TOPIC, r.randbytes(r.randint(1, 3000))),
    "huge_int": lambda r, n: (HOSTILE_TOPIC, _raw(n, b"1" + b"0" * 400)),
    "huge_negative_int": lambda r, n: (HOSTILE_TOPIC, _raw(n, b"-1" + b"0" * 400)),
    "float_overflow": lambda r, n: (HOSTILE_TOPIC, _raw(n, r.choice([b"1e999", b"-1e999"]))),
    "huge_int_status": lambda r, n: (
        "sensors/status",
        b'{"sensor_id":"hostile-s","status":9%s,"timestamp":"%s"}'
        % (b"0" * 400, iso_now().encode()),
    ),
    "ts_year_1": lambda r, n: (HOSTILE_TOPIC, _raw(n, ts=b"0001-01-01T00:00:00+01:00")),
    "ts_year_9999": lambda r, n: (HOSTILE_TOPIC, _raw(n, ts=b"9999-12-31T23:59:59-01:00")),
    "ts_garbage": lambda r, n: (
        HOSTILE_TOPIC,
        _raw(n, ts=r.choice([b"yesterday", b"2024-13-45T99:99:99Z", b"", b"\\u0000"])),
    ),
    "ts_far_future": lambda r, n: (HOSTILE_TOPIC, _raw(n, ts=b"2999-01-01T00:00:00Z")),
    "lone_surrogate_unit": lambda r, n: (HOSTILE_TOPIC, _raw(n, extra=b',"unit":"\\ud800"')),
    "lone_surrogate_sensor_id": lambda r, n: (
        HOSTILE_TOPIC,
        b'{"sensor_id":"\\udc00x","value":1,"timestamp":"%s"}' % iso_now().encode(),
    ),
    "lone_surrogate_msg_id": lambda r, n: (
        HOSTILE_TOPIC,
        b'{"sensor_id":"hostile-m","value":1,"msg_id":"\\ud800%d"}' % n,
    ),
    "nan": lambda r, n: (HOSTILE_TOPIC, _raw(n, r.choice([b"NaN", b"Infinity", b"-Infinity"]))),
    "nan_string": lambda r, n: (
        HOSTILE_TOPIC,
        _obj(n, value=r.choice(["NaN", "inf", "-Infinity", "1e999", "nan"])),
    ),
    "wrong_type_value": lambda r, n: (
        HOSTILE_TOPIC,
        _obj(n, value=r.choice([True, [1], {"v": 1}, None, "twelve", ""])),
    ),
    "wrong_type_field": lambda r, n: (
        HOSTILE_TOPIC,
        _obj(
            n,
            **r.choice(
                [
                    {"sensor_id": 5},
                    {"sensor_id": ""},
                    {"sensor_id": "x" * 65},
                    {"timestamp": 12345},
                    {"timestamp": ["2024-01-01T00:00:00Z"]},
                    {"kind": 7},
                    {"kind": "bad kind!"},
                    {"unit": {"u": 1}},
                    {"unit": "u" * 200},
                ]
            ),
        ),
    ),
    "wrong_type_msg_id": lambda r, n: (
        HOSTILE_TOPIC,
        _raw(n, extra=r.choice([b',"msg_id":123', b',"msg_id":"%s"' % (b"m" * 65)])),
    ),
    "not_an_object": lambda r, n: (
        f"sensors/temperature/hostile-{n % 4}",
        r.choice([b"[]", b'"text"', b"42", b"null", b"true", b"", b"[1,2,3]"]),
    ),
    "bad_sensor_in_topic": lambda r, n: (
        "sensors/temperature/bad!id",
        b'{"value":1,"timestamp":"%s"}' % iso_now().encode(),
    ),
    # Over the ingester's 16 KiB but within the broker's limit (16 KiB + 4 KiB)...
    "oversize": lambda r, n: (
        HOSTILE_TOPIC,
        _raw(n, extra=b',"pad":"%s"' % (b"x" * (16 * 1024 + r.randint(1, 3500)))),
    ),
    # ...and over both.
    "oversize_for_broker": lambda r, n: (
        HOSTILE_TOPIC,
        _raw(n, extra=b',"pad":"%s"' % (b"x" * (64 * 1024))),
    ),
    "deep_nesting_value": lambda r, n: (
        HOSTILE_TOPIC,
        _raw(n, b"[" * 5000 + b"1" + b"]" * 5000),
    ),
    "deep_nesting_raw": lambda r, n: (HOSTILE_TOPIC, b"[" * r.randint(1000, 16000)),
    "deep_nesting_objects": lambda r, n: (
        HOSTILE_TOPIC,
        b'{"a":' * 2500 + b"1" + b"}" * 2500,
    ),
}
# Payloads the broker may refuse itself (message_size_limit). Mosquitto 2.0.11 closes
# the publisher's connection over one rather than answering PUBACK 0x95, and paho
# would re-send it after every reconnect, forever. So each goes out on a one-shot
# connection of its own, driven by hand (no automatic reconnect, no re-send).
BROKER_REFUSES = {"oversize", "oversize_for_broker"}


# -- the ingester's sd_notify messages -------------------------------------------------


@dataclass
class NotifyState:
    ready: bool = False
    status: str = ""
    counters: dict[str, int] = field(default_factory=dict)
    changed: float = 0.0  # last time stored/rejected/duplicates moved


STALL_S = 5.0
COUNTER_RE = re.compile(r"\b(stored|rejected|duplicates|queued) (\d+)")


class NotifyListener:
    """A stand-in for systemd's notify socket: READY and STATUS by sender pid.

    The ingester's STATUS line carries its counters (stored, rejected,
    duplicates, queued): a cheap, immediate sign of progress, where counting
    documents on FerretDB takes seconds once the collection is large.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.lock = threading.Lock()
        self.by_pid: dict[int, NotifyState] = {}
        # (seconds into the run, seconds) of each time an ingester's counters stood
        # still for over STALL_S and then moved again.
        self.stalls: list[tuple[float, float]] = []
        # Set while we publish: an ingester idle after that is not stalled.
        self.publishing = threading.Event()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        cred = struct.calcsize("3i")
        while not self.closed.is_set():
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(cred))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", cdata[:cred])[0]
            self._record(pid, data.decode("utf-8", "replace"))

    def _record(self, pid: int, text: str) -> None:
        now = time.monotonic()
        with self.lock:
            st = self.by_pid.setdefault(pid, NotifyState(changed=now))
            for line in text.splitlines():
                if line == "READY=1":
                    st.ready = True
                elif line.startswith("STATUS="):
                    st.status = line.removeprefix("STATUS=")
                    found = {k: int(v) for k, v in COUNTER_RE.findall(st.status)}
                    if not found:
                        continue
                    moved = {k: v for k, v in found.items() if k != "queued"}
                    if moved != {k: v for k, v in st.counters.items() if k != "queued"}:
                        stalled = now - st.changed > STALL_S and self.publishing.is_set()
                        if stalled and st.counters:
                            self.stalls.append((st.changed - T0, now - st.changed))
                            say(
                                f"ingester pid {pid} stored nothing for {now - st.changed:.1f}s "
                                f"(from {st.changed - T0:.1f}s): {st.status}"
                            )
                        st.changed = now
                    st.counters = found

    def get(self, pid: int) -> NotifyState | None:
        with self.lock:
            st = self.by_pid.get(pid)
            return (
                None
                if st is None
                else NotifyState(st.ready, st.status, dict(st.counters), st.changed)
            )

    def close(self) -> None:
        self.closed.set()
        self.sock.close()
        self.thread.join(2)


# -- daemons ---------------------------------------------------------------------------


def last_traceback(path: Path, max_lines: int = 60) -> tuple[str, str]:
    """(summary, traceback or log tail) from a dead daemon's log."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"log unreadable: {exc}", ""
    i = text.rfind("Traceback (most recent call last)")
    tail = text[i:] if i >= 0 else "\n".join(text.splitlines()[-15:])
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    summary = lines[-1].strip()[:240] if lines else "(empty log)"
    return summary, "\n".join(lines[:max_lines])


class IngesterSupervisor:
    """The ingester subprocess: our kill -9s, and restarts after exits we did not cause."""

    def __init__(self, gw: Gateway, notify: NotifyListener, spawn_lock: threading.Lock) -> None:
        self.gw = gw
        self.notify = notify
        self.spawn_lock = spawn_lock
        self.lock = threading.RLock()
        self.proc: Any = None
        self.started = 0.0
        self.spawns = 0
        self.unexpected = 0
        self.exit_reasons: Counter[str] = Counter()
        self.tracebacks: dict[str, str] = {}
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="ingester-monitor", daemon=True)

    def _spawn(self) -> None:
        with self.spawn_lock:  # Gateway.spawn writes the config and its process list
            self.proc = self.gw.spawn("ingest", env={"NOTIFY_SOCKET": str(self.notify.path)})
        self.started = time.monotonic()
        self.spawns += 1

    def start(self) -> None:
        with self.lock:
            self._spawn()
        self._monitor.start()

    @property
    def pid(self) -> int:
        p = self.proc
        return p.pid if p is not None else 0

    def alive(self) -> bool:
        p = self.proc
        return p is not None and p.poll() is None

    def ready(self) -> bool:
        """The current process is up and has subscribed (READY=1, or its log says so)."""
        p = self.proc
        if p is None or p.poll() is not None:
            return False
        st = self.notify.get(p.pid)
        if st is not None and st.ready:
            return True
        try:
            return "subscribed to" in p.log_path.read_text(errors="replace")
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return True
            pause(0.1)
        return False

    def counters(self) -> dict[str, int] | None:
        st = self.notify.get(self.pid)
        return st.counters if st is not None and st.counters else None

    def kill9(self) -> None:
        """kill -9 the ingester and start a new one (not waiting for it)."""
        with self.lock:
            p = self.proc
            if p is not None:
                self._note_exit()  # it may have died on its own just before
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait()
            self._spawn()

    def _note_exit(self) -> bool:
        """Record an exit we did not cause; True if there was a new one."""
        p = self.proc
        if p is None or p.poll() is None or getattr(p, "soak_noted", False):
            return False
        p.soak_noted = True
        self.unexpected += 1
        summary, tb = last_traceback(p.log_path)
        self.exit_reasons[f"exit {p.returncode}: {summary}"] += 1
        up = time.monotonic() - self.started
        say(
            f"INGESTER EXITED ON ITS OWN: pid {p.pid}, status {p.returncode}, after {up:.1f}s "
            f"up; {summary} (log {p.log_path})"
        )
        if summary not in self.tracebacks:
            self.tracebacks[summary] = tb
            say("its log ends with:\n" + tb)
        return True

    def _watch(self) -> None:
        backoff = 0.5
        while not self._stop.wait(0.25):
            with self.lock:
                dead = self.proc
                if not self._note_exit():
                    continue
                quick = time.monotonic() - self.started < 10
            # A crash loop (dying within 10 s of each start) backs off, up to 5 s.
            backoff = min(backoff * 2, 5.0) if quick else 0.5
            if self._stop.wait(backoff):
                return
            with self.lock:
                if self.proc is dead:
                    say(f"restarting the ingester after its exit (backoff {backoff:.1f}s)")
                    self._spawn()

    def stop_monitor(self) -> None:
        self._stop.set()
        if self._monitor.is_alive():
            self._monitor.join(10)
        with self.lock:
            self._note_exit()


class ApiRunner:
    """``sensor-gateway api`` (gunicorn) on a port of its own."""

    def __init__(self, gw: Gateway, spawn_lock: threading.Lock, port: int) -> None:
        self.gw = gw
        self.spawn_lock = spawn_lock
        self.base = f"http://127.0.0.1:{port}"
        self.proc: Any = None
        self.unexpected = 0

    def start(self) -> None:
        with self.spawn_lock:
            self.proc = self.gw.spawn("api")

    def healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                if requests.get(self.base + "/healthz", timeout=2).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            pause(0.2)
        return False

    def restart(self) -> None:
        p = self.proc
        if p.poll() is not None:
            self.unexpected += 1
            summary, _ = last_traceback(p.log_path)
            say(f"API had exited on its own ({p.returncode}): {summary} (log {p.log_path})")
        else:
            t = time.monotonic()
            p.terminate()
            try:
                p.wait(30)
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired; kill instead
                say("  the API did not stop within 30s of SIGTERM; killing it")
                p.kill()
                p.wait()
            say(f"  API stopped in {time.monotonic() - t:.1f}s")
        self.start()


# -- publishing ------------------------------------------------------------------------


class AckBook:
    """Which messages the broker acknowledged: PUBACK → packet id → our message.

    ``on_publish`` runs in paho's network thread, with paho's own lock held; our
    lock is never held while calling paho, so the two cannot deadlock. A PUBACK
    can arrive before ``publish()`` has returned the packet id to us: it waits in
    ``early`` until ``sent`` registers the message.
    """

    def __init__(self, on_done: Callable[[Any, bool, int], None]) -> None:
        self.lock = threading.Lock()
        self.pending: dict[int, Any] = {}
        self.early: dict[int, tuple[bool, int]] = {}
        self.on_done = on_done

    def on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        ok = not reason_code.is_failure
        with self.lock:
            item = self.pending.pop(mid, None)
            if item is None:
                self.early[mid] = (ok, reason_code.value)
            else:
                self.on_done(item, ok, reason_code.value)

    def sent(self, mid: int, item: Any) -> None:
        with self.lock:
            early = self.early.pop(mid, None)
            if early is None:
                self.pending[mid] = item
            else:
                self.on_done(item, *early)

    def outstanding(self) -> int:
        with self.lock:
            return len(self.pending)


class Connection:
    def __init__(self, gw: Gateway, name: str, book: AckBook) -> None:
        self.name = name
        self.connects = 0
        self.disconnects = 0
        self.closed = False
        self.connected = threading.Event()
        self.client = make_client(
            gw.cfg,
            f"soak-{name}-{os.getpid()}",
            gw.cfg.simulator.mqtt_username,
            gw.cfg.simulator.mqtt_password_file,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.on_publish = book.on_publish
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        connect_async(self.client, gw.cfg)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            say(f"publisher {self.name}: connect refused: {reason_code}")
            return
        self.connects += 1
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.disconnects += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.disconnect()
            self.client.loop_stop()


class OneShots:
    """Hostile payloads the broker refuses, each on a connection of its own."""

    def __init__(self, gw: Gateway, on_done: Callable[[str, str], None]) -> None:
        self.gw = gw
        self.on_done = on_done
        self.queue: queue.Queue[tuple[str, str, bytes] | None] = queue.Queue(maxsize=2)
        self.n = 0
        self.thread = threading.Thread(target=self._run, name="one-shots", daemon=True)
        self.thread.start()

    def offer(self, name: str, topic: str, payload: bytes) -> bool:
        try:
            self.queue.put_nowait((name, topic, payload))
            return True
        except queue.Full:
            return False

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            name, topic, payload = item
            try:
                outcome = self._send(topic, payload)
            except Exception as exc:  # noqa: BLE001 - an outcome like any other
                outcome = f"error {type(exc).__name__}"
            self.on_done(name, outcome)

    def _send(self, topic: str, payload: bytes, timeout: float = 5.0) -> str:
        cfg = self.gw.cfg
        self.n += 1
        result: dict[str, Any] = {}
        c = make_client(
            cfg,
            f"soak-oneshot-{os.getpid()}-{self.n}",
            cfg.simulator.mqtt_username,
            cfg.simulator.mqtt_password_file,
        )
        c.on_publish = lambda cl, u, mid, rc, props: result.setdefault("puback", rc)
        c.on_disconnect = lambda cl, u, flags, rc, props: result.setdefault("disconnect", rc)
        deadline = time.monotonic() + timeout
        try:
            c.connect(cfg.mqtt.host, cfg.mqtt.port)
            while not c.is_connected() and "disconnect" not in result:
                if time.monotonic() > deadline:
                    return "no connection"
                c.loop(0.1)
            if not c.is_connected():
                return "no connection"
            c.publish(topic, payload, qos=1)
            while "puback" not in result and "disconnect" not in result:
                if time.monotonic() > deadline:
                    return "no answer"
                c.loop(0.1)
        except OSError:
            return "no connection"
        finally:
            if c.is_connected():
                c.disconnect()
                c.loop(0.1)
            sock = c.socket()
            if sock is not None:
                sock.close()
        if "puback" in result:
            rc = result["puback"]
            return f"puback {rc.value:#x}" if rc.is_failure else "acked"
        return f"disconnected ({result['disconnect']})"

    def close(self, timeout: float) -> None:
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self.thread.join(timeout)


class Publisher:
    """Valid readings and hostile payloads at a steady rate, QoS 1."""

    def __init__(self, gw: Gateway, rng: random.Random, rate: float, hostile: float) -> None:
        self.rng = rng
        self.rate = rate
        self.hostile_fraction = hostile
        self.run_id = f"{rng.getrandbits(48):012x}"
        self.lock = threading.Lock()
        self.seq = 0
        self.probes = 0
        # When each valid reading was published (seconds into the run), by seq - 1.
        self.sent_at = array("f")
        self.valid_acked: set[int] = set()
        self.valid_refused = 0
        self.hostile_sent: Counter[str] = Counter()
        self.hostile_acked: Counter[str] = Counter()
        self.hostile_refused: Counter[str] = Counter()
        self.publish_errors: Counter[str] = Counter()
        self.behind_resets = 0
        self.started = 0.0
        self.ended = 0.0
        self.valid_book = AckBook(self._valid_done)
        self.hostile_book = AckBook(self._hostile_done)
        self.valid = Connection(gw, "valid", self.valid_book)
        self.hostile = Connection(gw, "hostile", self.hostile_book)
        self.count_lock = threading.Lock()
        self.one_shots = OneShots(gw, self._one_shot_done)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self.deadline = 0.0

    def _valid_done(self, seq: int, ok: bool, rc: int) -> None:
        if seq < 0:
            return  # a drain probe: its publisher waits on it directly
        if ok:
            self.valid_acked.add(seq)
        else:
            self.valid_refused += 1
            if self.valid_refused <= 5:
                say(f"broker refused valid reading {seq}: reason code {rc:#x}")

    def _hostile_done(self, name: str, ok: bool, rc: int) -> None:
        with self.count_lock:
            if ok:
                self.hostile_acked[name] += 1
            else:
                self.hostile_refused[f"{name}: puback {rc:#x}"] += 1

    def _one_shot_done(self, name: str, outcome: str) -> None:
        with self.count_lock:
            if outcome == "acked":
                self.hostile_acked[name] += 1
            else:
                self.hostile_refused[f"{name}: {outcome}"] += 1

    def wait_connected(self, timeout: float) -> bool:
        return self.valid.connected.wait(timeout) and self.hostile.connected.wait(timeout)

    def start(self, duration: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + duration
        self.thread.start()

    def _publish(self, conn: Connection, book: AckBook, topic: str, payload: bytes, item) -> bool:
        info = conn.client.publish(topic, payload, qos=1)
        # NO_CONN: queued by paho, sent when the broker is back.
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self.publish_errors[mqtt.error_string(info.rc)] += 1
            return False
        book.sent(info.mid, item)
        return True

    def _one(self) -> None:
        if self.rng.random() < self.hostile_fraction:
            name = self.rng.choice(list(HOSTILE))
            n = sum(self.hostile_sent.values())
            topic, payload = HOSTILE[name](self.rng, n)
            if name in BROKER_REFUSES:
                if self.one_shots.offer(name, topic, payload):
                    self.hostile_sent[name] += 1
                return
            if self._publish(self.hostile, self.hostile_book, topic, payload, name):
                self.hostile_sent[name] += 1
            return
        seq = self.seq + 1
        sensor = SENSORS[seq % len(SENSORS)]
        body = {
            "sensor_id": sensor,
            "value": seq,
            "timestamp": iso_now(),
            "msg_id": f"{self.run_id}-{seq}",
            "unit": "C",
        }
        payload = json.dumps(body, separators=(",", ":")).encode()
        topic = f"sensors/temperature/{sensor}"
        if self._publish(self.valid, self.valid_book, topic, payload, seq):
            self.seq = seq
            self.sent_at.append(time.monotonic() - T0)

    def _run(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= self.deadline:
                break
            if next_at > now:
                pause(min(next_at - now, 0.05))
                continue
            if now - next_at > 2.0:
                # Far behind (the machine stalled): skip ahead rather than burst.
                self.behind_resets += 1
                next_at = now
            next_at += interval
            self._one()
        self.ended = time.monotonic()

    def probe(self, timeout: float) -> bool:
        """Publish one more reading (value -n), last; True once the broker acknowledged it."""
        self.probes += 1
        body = {
            "sensor_id": PROBE_SENSOR,
            "value": -self.probes,
            "timestamp": iso_now(),
            "msg_id": f"{self.run_id}-probe-{self.probes}",
        }
        payload = json.dumps(body, separators=(",", ":")).encode()
        info = self.valid.client.publish(f"sensors/temperature/{PROBE_SENSOR}", payload, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            return False
        self.valid_book.sent(info.mid, -self.probes)
        try:
            info.wait_for_publish(timeout)
        except RuntimeError:
            return False
        return info.is_published()

    @property
    def sent_total(self) -> int:
        return self.seq + sum(self.hostile_sent.values())

    def outstanding(self) -> int:
        return self.valid_book.outstanding() + self.hostile_book.outstanding()

    def finish(self, timeout: float) -> bool:
        """Stop publishing; wait (bounded) for the PUBACKs still outstanding."""
        self._stop.set()
        self.thread.join(timeout)
        deadline = time.monotonic() + timeout
        while self.outstanding() and time.monotonic() < deadline:
            pause(0.2)
        self.one_shots.close(max(1.0, deadline - time.monotonic()))
        done = self.outstanding() == 0
        self.hostile.close()
        return done

    def close(self) -> None:
        self.valid.close()
        self.hostile.close()


# -- faults ----------------------------------------------------------------------------

# name → weight; "mongodb_stop+ingester_kill9" injects both (an ingester killed while
# it holds a batch unacknowledged during a MongoDB outage, restarted into the outage).
FAULT_WEIGHTS = {
    "ingester_kill9": 3,
    "mongodb_stop": 2,
    "redis_stop": 2,
    "broker_restart": 2,
    "api_restart": 2,
    "mongodb_stop+ingester_kill9": 1,
}


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rng_faults = random.Random(f"faults-{args.seed}")
        self.rng_publish = random.Random(f"publish-{args.seed}")
        self.stack = Stack(root=workdir / "stack")
        self.gw: Gateway | None = None
        self.faults: Counter[str] = Counter()
        self.recovery_failures: Counter[str] = Counter()
        self.recovery_s: list[float] = []
        self.spawn_lock = threading.Lock()
        self._chaos_stop = threading.Event()

    # -- the parts ---------------------------------------------------------------------

    def setup(self) -> None:
        say(f"starting the stack in {self.workdir}")
        self.stack.start()
        say(f"MongoDB-wire server: {self.stack.mongo.engine}")
        gw = Gateway(self.stack, self.workdir, "soak")
        gw.set(api={"bind": f"127.0.0.1:{free_port()}", "workers": 2, "threads": 4})
        self.gw = gw
        # Our own reads: a full scan of the readings on FerretDB takes longer than the
        # daemons' socket timeout.
        self.reader = storage.connect(gw.cfg, socketTimeoutMS=600_000, appname="soak")
        self.notify = NotifyListener(self.workdir / "notify.sock")
        self.ingester = IngesterSupervisor(gw, self.notify, self.spawn_lock)
        self.ingester.start()
        if not self.ingester.wait_ready(60):
            raise RuntimeError(f"the ingester did not subscribe; see {self.ingester.proc.log_path}")
        self.api = ApiRunner(gw, self.spawn_lock, int(gw.cfg.api.bind.rpartition(":")[2]))
        self.api.start()
        if not self.api.healthy(60):
            raise RuntimeError(f"the API did not answer /healthz; see {self.api.proc.log_path}")
        self.publisher = Publisher(gw, self.rng_publish, self.args.rate, self.args.hostile)
        if not self.publisher.wait_connected(30):
            raise RuntimeError("the publisher did not connect")

    def progress_mark(self) -> tuple[int, int]:
        c = self.ingester.counters()
        return self.ingester.pid, (c or {}).get("stored", -1)

    def progressed_since(self, mark: tuple[int, int]) -> bool:
        pid, stored = self.progress_mark()
        if stored < 0:
            return False
        return stored > mark[1] if pid == mark[0] else stored > 0

    def recover(self, name: str, t_restored: float) -> None:
        """After a fault: the ingester subscribed and storing again, the API answering."""
        steps = []
        ok = self.ingester.wait_ready(90)
        steps.append(f"ingester subscribed {time.monotonic() - t_restored:.1f}s")
        if ok:
            mark = self.progress_mark()
            deadline = time.monotonic() + 90
            while not (ok := self.progressed_since(mark)) and time.monotonic() < deadline:
                pause(0.1)
            steps.append(f"storing {time.monotonic() - t_restored:.1f}s")
        if ok and name == "api_restart":
            ok = self.api.healthy(60)
            steps.append(f"/healthz {time.monotonic() - t_restored:.1f}s")
        took = time.monotonic() - t_restored
        self.recovery_s.append(took)
        if ok:
            say(f"  recovered in {took:.1f}s ({', '.join(steps)})")
        else:
            self.recovery_failures[name] += 1
            say(f"  NOT RECOVERED after {took:.0f}s from {name} ({', '.join(steps)})")

    def inject(self, name: str) -> None:
        r = self.rng_faults
        s = self.stack
        say(f"fault {sum(self.faults.values()) + 1}: {name}")
        if name == "ingester_kill9":
            self.ingester.kill9()
            self.faults[name] += 1
        elif name in ("mongodb_stop", "redis_stop"):
            svc = s.mongo if name == "mongodb_stop" else s.redis
            down = r.uniform(1, 8)
            svc.stop()
            self.faults[name] += 1
            pause(down)
            svc.start()
            say(f"  {svc.name} was down {down:.1f}s")
        elif name == "broker_restart":
            s.mosquitto.restart()
            self.faults[name] += 1
        elif name == "api_restart":
            self.api.restart()
            self.faults[name] += 1
        elif name == "mongodb_stop+ingester_kill9":
            s.mongo.stop()
            self.faults["mongodb_stop"] += 1
            pause(r.uniform(0.5, 3))
            self.ingester.kill9()
            self.faults["ingester_kill9"] += 1
            pause(r.uniform(1, 4))
            s.mongo.start()
        else:  # pragma: no cover - FAULT_WEIGHTS names them all
            raise ValueError(name)
        self.recover(name, time.monotonic())

    def chaos(self, deadline: float) -> None:
        names = list(FAULT_WEIGHTS)
        weights = list(FAULT_WEIGHTS.values())
        r = self.rng_faults
        while not self._chaos_stop.is_set():
            gap = r.uniform(self.args.min_gap, self.args.max_gap)
            # Leave the last fault time to recover before publishing ends.
            if time.monotonic() + gap + 10 > deadline:
                return
            if self._chaos_stop.wait(gap):
                return
            name = r.choices(names, weights)[0]
            try:
                self.inject(name)
            except Exception as exc:  # noqa: BLE001 - report it, bring everything back
                self.recovery_failures[f"{name}: {exc}"[:120]] += 1
                say(f"  INJECTING {name} FAILED: {exc!r}")
                self.restore_services()

    def restore_services(self) -> None:
        for svc in (self.stack.mosquitto, self.stack.redis, self.stack.mongo):
            if svc.proc is None or svc.proc.poll() is not None:
                try:
                    svc.start()
                except Exception as exc:  # noqa: BLE001
                    say(f"  could not start {svc.name} again: {exc!r}")

    def report_progress(self, stop: threading.Event) -> None:
        while not stop.wait(self.args.progress_every):
            p = self.publisher
            c = self.ingester.counters() or {}
            say(
                f"published {p.seq} valid ({len(p.valid_acked)} acked) + "
                f"{sum(p.hostile_sent.values())} hostile, {p.outstanding()} awaiting PUBACK | "
                f"ingester pid {self.ingester.pid}: {c or 'no status'} | "
                f"faults {sum(self.faults.values())}, ingester exits on its own "
                f"{self.ingester.unexpected}"
            )

    # -- the end -----------------------------------------------------------------------

    def wait_idle(self, deadline: float, idle: float) -> bool:
        """Until the ingester's counters (stored, rejected, duplicates) have not moved
        for ``idle`` seconds with nothing queued in it; False at the deadline, or if it
        keeps exiting. Without STATUS from it: until the collections' counts stand still.
        """
        last_counts: tuple[int, int] | None = None
        last_change = time.monotonic()
        exits_before = self.ingester.unexpected
        while time.monotonic() < deadline:
            now = time.monotonic()
            if self.ingester.unexpected - exits_before >= 3:
                say("the ingester keeps exiting; giving up on draining")
                return False
            st = self.notify.get(self.ingester.pid)
            if st is not None and st.counters:
                if (
                    self.ingester.alive()
                    and st.counters.get("queued", 0) == 0
                    and now - st.changed >= idle
                    and now - self.ingester.started >= idle
                ):
                    return True
                pause(0.5)
                continue
            counts = (
                storage.count_readings(self.reader),
                self.reader[storage.REJECTED].estimated_document_count(),
            )
            if counts != last_counts or not self.ingester.alive():
                last_counts, last_change = counts, time.monotonic()
            elif time.monotonic() - last_change >= idle:
                return True
            pause(2)
        return False

    def drain(self, timeout: float, idle: float) -> bool:
        """Wait until the ingester has written everything the broker held for it.

        Its counters standing still could also be a loop blocked somewhere (its
        STATUS is sent from the loop), so idleness is confirmed with a probe: one
        more reading, published last. The broker delivers a session's messages in
        order and the ingester writes batches in order, so once the probe is
        stored everything before it was taken. Done when the probe moved the
        stored counter by exactly one and all stands still again; otherwise a
        backlog turned up, and round again. The final count checks the probe too.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.wait_idle(deadline, idle):
                return False
            pid = self.ingester.pid
            st = self.notify.get(pid)
            if st is None or not st.counters:
                return True  # no STATUS: the counts stood still, nothing better to go on
            before = st.counters.get("stored", 0)
            if not self.publisher.probe(30):
                say("the broker did not acknowledge the drain probe; trying again")
                continue
            while time.monotonic() < deadline and self.ingester.pid == pid:
                st = self.notify.get(pid)
                if st is not None and st.counters.get("stored", 0) > before:
                    break
                pause(0.2)
            if not self.wait_idle(min(deadline, time.monotonic() + 60), 3.0):
                continue
            st = self.notify.get(pid)
            if self.ingester.pid == pid and st is not None and st.counters["stored"] == before + 1:
                return True
            say("more than the probe arrived: a backlog was still coming; waiting again")
        return False

    def count(self) -> dict[str, Any]:
        """Read the readings once: how often each published identity is stored."""
        assert self.gw is not None
        p = self.publisher
        per_seq: Counter[int] = Counter()
        foreign = 0
        mismatched = 0
        probes: set[float] = set()
        for d in storage.scan_readings(self.reader):
            sid, v = d.get("sensor_id"), d.get("value")
            if sid == PROBE_SENSOR:
                probes.add(v)
                continue
            if sid not in SENSOR_SET or not isinstance(v, int | float) or not math.isfinite(v):
                foreign += 1
                continue
            seq = int(v)
            if seq != v or not 1 <= seq <= p.seq or SENSORS[seq % len(SENSORS)] != sid:
                mismatched += 1
                continue
            per_seq[seq] += 1
        lost = sorted(s for s in p.valid_acked if s not in per_seq)
        return {
            "stored": len(per_seq),
            "duplicates": sum(n - 1 for n in per_seq.values()),
            "lost": lost,
            "stored_unacknowledged": sum(1 for s in per_seq if s not in p.valid_acked),
            "hostile_stored": foreign,
            "mismatched": mismatched,
            "rejected_collection": self.reader[storage.REJECTED].count_documents({}),
            "probe_stored": p.probes > 0 and float(-p.probes) in probes,
        }

    def run(self) -> dict[str, Any]:
        args = self.args
        self.setup()
        stop_progress = threading.Event()
        threading.Thread(
            target=self.report_progress, args=(stop_progress,), name="progress", daemon=True
        ).start()
        say(
            f"publishing at {args.rate:g} msg/s ({args.hostile:.1%} hostile) for "
            f"{args.duration:g}s, seed {args.seed}"
        )
        self.notify.publishing.set()
        self.publisher.start(args.duration)
        chaos = threading.Thread(
            target=self.chaos, args=(self.publisher.deadline,), name="chaos", daemon=True
        )
        chaos.start()
        self.publisher.thread.join(args.duration + 60)
        self.notify.publishing.clear()
        self._chaos_stop.set()
        chaos.join(300)
        p = self.publisher
        say(f"publishing ended; waiting for {p.outstanding()} outstanding PUBACKs")
        all_acked = p.finish(60)
        say(f"draining the ingester (at most {args.drain_timeout:g}s)")
        drained = self.drain(args.drain_timeout, args.idle)
        say("counting stored readings" if drained else "NOT DRAINED in time; counting anyway")
        result = self.count()
        if result["lost"] or not result["probe_stored"]:
            say(
                f"{len(result['lost'])} missing, drain probe stored: {result['probe_stored']}; "
                "waiting once more for stragglers"
            )
            drained = self.drain(120, args.idle)
            result = self.count()
        p.close()
        stop_progress.set()
        self.ingester.stop_monitor()
        ingester_alive = self.ingester.alive() and self.ingester.ready()
        api_alive = self.api.healthy(30)
        hostile_acked = sum(p.hostile_acked.values())
        lost = result.pop("lost")
        published_s = max(p.ended - p.started, 1e-9)
        out: dict[str, Any] = {
            "published": len(p.valid_acked),
            "stored": result.pop("stored"),
            "lost": len(lost),
            "duplicates": result.pop("duplicates"),
            "rejected": hostile_acked,
            "faults_injected": sum(self.faults.values()),
            "ingester_alive": ingester_alive,
            "ingester_unexpected_exits": self.ingester.unexpected,
            "rejected_collection": result.pop("rejected_collection"),
            **result,
            "lost_sample": lost[:10],
            # When the lost ones were published (seconds into the run, as in the stderr log).
            "lost_published_at_s": (
                [round(p.sent_at[lost[0] - 1], 1), round(p.sent_at[lost[-1] - 1], 1)]
                if lost
                else []
            ),
            "valid_sent": p.seq,
            "valid_unacknowledged": p.seq - len(p.valid_acked) - p.valid_refused,
            "valid_refused_by_broker": p.valid_refused,
            "hostile_sent": sum(p.hostile_sent.values()),
            "hostile_refused_by_broker": dict(sorted(p.hostile_refused.items())),
            "hostile_by_kind": dict(sorted(p.hostile_acked.items())),
            "publish_errors": dict(p.publish_errors),
            "publisher_reconnects": {
                "valid": p.valid.connects - 1,
                "hostile": p.hostile.connects - 1,
            },
            "all_acked": all_acked,
            "drained": drained,
            "probe_stored": result.pop("probe_stored"),
            "faults": dict(sorted(self.faults.items())),
            "recovery_failures": dict(self.recovery_failures),
            "recovery_s_max": round(max(self.recovery_s, default=0.0), 1),
            "ingester_stalls_over_5s": len(self.notify.stalls),
            "ingester_longest_stall_s": round(
                max((g for _, g in self.notify.stalls), default=0), 1
            ),
            "ingester_exits": dict(self.ingester.exit_reasons),
            "ingester_starts": self.ingester.spawns,
            "api_alive": api_alive,
            "api_unexpected_exits": self.api.unexpected,
            "rate": round(p.sent_total / published_s, 1),
            "duration_s": round(published_s, 1),
            "seed": args.seed,
            "engine": self.stack.mongo.engine,
        }
        out["ok"] = (
            out["lost"] == 0
            and out["duplicates"] == 0
            and out["hostile_stored"] == 0
            and out["mismatched"] == 0
            and out["published"] > 0
            and ingester_alive
            and out["ingester_unexpected_exits"] == 0
            and not out["recovery_failures"]
            and out["faults_injected"] >= args.min_faults
        )
        return out

    def close(self) -> None:
        for part in ("notify",):
            if hasattr(self, part):
                getattr(self, part).close()
        if hasattr(self, "publisher"):
            self.publisher.close()
        # Not Gateway.close(): its database drop and session cleanup are pointless for
        # a stack that goes away, and slow with a large collection on FerretDB.
        for proc in self.gw.procs if self.gw is not None else ():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for svc in (self.stack.mosquitto, self.stack.redis, self.stack.mongo):
            svc.kill()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m tests.soak.chaos", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of publishing")
    ap.add_argument("--seed", type=int, default=None, help="fault and payload schedule")
    ap.add_argument("--rate", type=float, default=500.0, help="messages per second")
    ap.add_argument("--hostile", type=float, default=0.01, help="fraction of hostile payloads")
    ap.add_argument("--min-gap", type=float, default=2.0, help="seconds between faults, min")
    ap.add_argument("--max-gap", type=float, default=8.0, help="seconds between faults, max")
    ap.add_argument(
        "--min-faults",
        type=int,
        default=None,
        help="faults needed to pass (default 40 per 600 s of duration)",
    )
    ap.add_argument("--drain-timeout", type=float, default=300.0)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds idle that mean drained")
    ap.add_argument("--progress-every", type=float, default=15.0)
    ap.add_argument("--workdir", type=Path, default=None, help="kept; default a temporary one")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    if args.min_faults is None:
        args.min_faults = math.floor(40 * args.duration / 600)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="sensor-gateway-soak-")) if temporary else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    # SIGTERM (a CI timeout) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    soak = Soak(args, workdir)
    out: dict[str, Any] | None = None
    try:
        out = soak.run()
    finally:
        soak.close()
        keep = args.keep or out is None or not out["ok"]
        if temporary and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif temporary:
            say(f"kept {workdir} (daemon logs: {workdir}/ingest-*.log, api-*.log)")
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
