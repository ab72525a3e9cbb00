"""What one fuzz input means, for each target; the contract checks are in ``contract``.

``payload_input(data)``: the first line of ``data`` is the topic (UTF-8; bytes
that do not decode become lone surrogates, so topics that are not valid text
are tried too), the rest is the payload. Without a newline, ``data`` is the
payload on ``sensors/temperature/t1``. The payload is parsed twice, with the
default limits (packet id 0) and with ``topic_identity`` (packet id 65535).

``batch_input(data)``: ``data`` drives an ``atheris.FuzzedDataProvider`` that
builds a batch of 1-16 messages (realistic or arbitrary topics; arbitrary
bytes, readings built from fuzzed fields, or byte-mutated readings; some
redelivered with the same packet id) and the limits, then runs
``ingest.validate.validate_batch``. Replaying it needs atheris (the provider is native),
and what a batch input means depends on the code below: change it and the
seeds in ``corpus/batch`` still run, as other batches.

``mqtt_input(data)``: the first byte picks MQTT 5 or 3.1.1 (its low bit) and
the size of the pieces the rest arrives in; the rest is what the broker
sends. The gateway's MQTT client (``sensor_gateway.mqtt.Client``, which
decodes PUBLISH packets itself) must hand on_message the same messages as
paho's own client, and fail where it fails (:func:`received`).

The atheris scripts ``fuzz_payload.py``, ``fuzz_batch.py`` and
``fuzz_mqtt.py`` import this module only after instrumenting
``sensor_gateway``; ``tests/test_fuzz.py`` replays the corpus through it, the
payload and mqtt inputs without atheris.
"""

from __future__ import annotations

import json
import select
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from paho.mqtt import client as mqtt

from sensor_gateway.ingest import receive, validate
from sensor_gateway.mqtt import Client, ReadAheadSocket
from sensor_gateway.payload import DEFAULT_LIMITS, Limits, dedupe_key, parse
from tests.fuzz import contract

NOW = contract.NOW
DEFAULT_TOPIC = "sensors/temperature/t1"
STRICT = Limits(topic_identity=True)
PAYLOAD_RUNS = ((DEFAULT_LIMITS, 0), (STRICT, 65535))
CORPUS = Path(__file__).resolve().parent / "corpus"


def split(data: bytes) -> tuple[str, bytes]:
    topic, newline, payload = data.partition(b"\n")
    if not newline:
        return DEFAULT_TOPIC, data
    return topic.decode("utf-8", "surrogateescape"), payload


def payload_input(data: bytes) -> None:
    topic, payload = split(data)
    results = []
    for limits, packet_id in PAYLOAD_RUNS:
        result = parse(topic, payload, NOW, limits, packet_id)
        contract.check_parsed(result, topic, NOW, limits.max_future_skew_s)
        results.append(result)
    default, strict = results
    levels = topic.split("/")
    if isinstance(strict, dict) and len(levels) > 2:
        assert strict["sensor_id"] == levels[2], "topic_identity: the topic names the sensor"
    if isinstance(default, dict) and isinstance(strict, dict):
        # The dedupe key (payload.py): topic + payload bytes when the payload has a
        # timestamp; with the packet id too when it has only a msg_id; else none.
        if not default.get("ts_from_receipt"):
            assert default["_id"] == strict["_id"] == dedupe_key(topic, payload)
        elif "_id" in default:
            assert default["_id"] != strict["_id"], "the packet id is part of the key"


# -- the batch path ----------------------------------------------------------------

# Topics from paho are strict UTF-8, so seeds whose topic line is not are left out.
SEEDS = sorted(
    data
    for f in (CORPUS / "payload").iterdir()
    if "\ufffd" not in (data := f.read_bytes()).partition(b"\n")[0].decode("utf-8", "replace")
)
KINDS = ["temperature", "humidity", "status", "pressure", "t", "x.y:z-1"]
IDS = ["t1", "h7", "dev-a", "dev-b", "status", "a" * 64]
TIMESTAMPS = [
    "2026-11-24T11:59:00.5+01:00",
    "2026-11-24T12:00:00Z",
    "2026-11-24T12:00:00",
    "2026-11-24T12:00:00.123456789Z",
    "0001-01-01T00:00:00+01:00",
    "0001-01-01T00:00:00-01:00",
    "9999-12-31T23:59:59-01:00",
    "9999-12-31T23:59:59.999999+00:00",
    "2026-11-24",
    "20261124T120000Z",
    "yesterday",
    "",
]
VALUES: list[Any] = [
    0,
    -1,
    6,
    7,
    21.5,
    " 12.5 ",
    "1e400",
    "NaN",
    "-Infinity",
    True,
    None,
    [1],
    {"$ne": 1},
    10**400,
    -(10**309),
    1.7976931348623157e308,
    5e-324,
]


def _text(fdp: Any, n: int) -> str:
    # Topics and strings reach us as decoded UTF-8 (paho decodes topics strictly),
    # so no lone surrogates here; payload bytes are arbitrary elsewhere.
    return fdp.ConsumeUnicodeNoSurrogates(n)


def _topic(fdp: Any) -> str:
    shape = fdp.ConsumeIntInRange(0, 4)
    kind = fdp.PickValueInList(KINDS)
    if shape == 0:
        return f"sensors/{kind}"
    if shape == 1:
        return f"sensors/{kind}/{fdp.PickValueInList(IDS)}"
    if shape == 2:
        return f"sensors/{kind}/{_text(fdp, 8)}"
    if shape == 3:
        return f"sensors/{_text(fdp, 8)}"
    return _text(fdp, 24)


def _value(fdp: Any) -> Any:
    how = fdp.ConsumeIntInRange(0, 7)
    if how == 0:
        return fdp.PickValueInList(VALUES)
    if how == 1:
        return fdp.ConsumeFloat()  # NaN and infinities too: json.dumps writes them
    if how == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 160))
    if how <= 4:
        return fdp.ConsumeIntInRange(0, 6)
    if how == 5:
        return fdp.ConsumeRegularFloat()
    if how == 6:
        return repr(fdp.ConsumeRegularFloat())
    return _text(fdp, 12)


def _timestamp(fdp: Any) -> Any:
    how = fdp.ConsumeIntInRange(0, 3)
    if how == 0:
        return fdp.PickValueInList(TIMESTAMPS)
    if how == 1:
        # Around the time of receipt (the future-skew rule), any offset.
        dt = NOW + timedelta(microseconds=fdp.ConsumeIntInRange(-(10**13), 10**13))
        offset = timedelta(minutes=fdp.ConsumeIntInRange(-1439, 1439))
        return dt.astimezone(timezone(offset)).isoformat()
    if how == 2:
        return fdp.ConsumeIntInRange(-(10**12), 10**12)
    return _text(fdp, 40)


def _reading(fdp: Any) -> bytes:
    body: dict[str, Any] = {}
    if fdp.ConsumeBool():
        body["sensor_id"] = fdp.PickValueInList(IDS) if fdp.ConsumeBool() else _text(fdp, 6)
    body["status" if fdp.ConsumeIntInRange(0, 3) == 0 else "value"] = _value(fdp)
    if fdp.ConsumeBool():
        body["timestamp"] = _timestamp(fdp)
    if fdp.ConsumeBool():
        # A few msg_ids only: two devices, or a restarted counter, reuse them.
        body["msg_id"] = str(fdp.ConsumeIntInRange(0, 3)) if fdp.ConsumeBool() else _text(fdp, 8)
    if fdp.ConsumeIntInRange(0, 3) == 0:
        body["kind"] = fdp.PickValueInList(KINDS) if fdp.ConsumeBool() else _text(fdp, 8)
    if fdp.ConsumeIntInRange(0, 3) == 0:
        body["unit"] = "°C" if fdp.ConsumeBool() else _text(fdp, 8)
    return json.dumps(body, ensure_ascii=fdp.ConsumeBool()).encode("utf-8", "surrogatepass")


def _mutated(data: bytearray, fdp: Any) -> bytes:
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        if not data:
            break
        at = fdp.ConsumeIntInRange(0, len(data) - 1)
        how = fdp.ConsumeIntInRange(0, 2)
        if how == 0:
            data[at] = fdp.ConsumeIntInRange(0, 255)
        elif how == 1:
            del data[at:]
        else:
            data[at:at] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
    return bytes(data)


def _message(fdp: Any, earlier: list[receive.Incoming], received: datetime) -> receive.Incoming:
    how = fdp.ConsumeIntInRange(0, 5)
    if how == 0 and earlier:
        # A broker redelivery: same topic, payload and packet id, received later.
        m = fdp.PickValueInList(earlier)
        return receive.Incoming(m.mid, m.qos, m.topic, m.payload, received, 0.0, m.connection)
    topic = _topic(fdp)
    if how <= 1:
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 96))
    elif how <= 3:
        payload = _reading(fdp)
    elif how == 4:
        payload = _mutated(bytearray(_reading(fdp)), fdp)
    else:
        # One of the payload target's seeds (every shape and hostile class), maybe mutated.
        topic, payload = split(fdp.PickValueInList(SEEDS))
        if fdp.ConsumeBool():
            payload = _mutated(bytearray(payload), fdp)
    if fdp.ConsumeIntInRange(0, 15) == 0:
        payload += b" " * fdp.ConsumeIntInRange(0, 17000)  # around the size limit
    mid = fdp.ConsumeIntInRange(1, 65535)
    return receive.Incoming(mid, 1, topic, payload, received, 0.0, fdp.ConsumeIntInRange(0, 1))


def make_batch(data: bytes) -> tuple[list[receive.Incoming], Limits, int]:
    import atheris  # the provider is native; replaying a batch input needs atheris

    fdp = atheris.FuzzedDataProvider(data)
    limits = Limits(
        max_payload_bytes=fdp.PickValueInList([16384, 16384, 64]),
        max_future_skew_s=fdp.PickValueInList([300.0, 300.0, 0.0]),
        topic_identity=fdp.ConsumeBool(),
    )
    keep = fdp.PickValueInList([1024, 0, 7])
    batch: list[receive.Incoming] = []
    received = NOW
    for _ in range(fdp.ConsumeIntInRange(1, 16)):
        received += timedelta(milliseconds=fdp.ConsumeIntInRange(0, 90_000))
        batch.append(_message(fdp, batch, received))
    return batch, limits, keep


def check_batch(batch: list[receive.Incoming], limits: Limits, keep: int) -> None:
    out = validate.validate_batch(batch, limits, keep)
    n = len(out.readings) + len(out.rejects) + out.duplicates
    assert n == len(batch), f"{len(batch)} messages became {n} (lost or made up)"
    topics = {m.topic for m in batch}
    ids = [d["_id"] for d in out.readings if "_id" in d]
    assert len(ids) == len(set(ids)), "a within-batch duplicate was kept twice"
    for doc in out.readings:
        assert doc["topic"] in topics
        contract.check_reading(doc, doc["topic"], doc["received_at"], limits.max_future_skew_s)
    for doc in out.rejects:
        contract.check_reject_doc(doc)
        # The last guard in validate_batch turns an exception into a reject; for
        # the fuzzer that is a crash (parse is meant to be total).
        assert not doc["reason"].startswith("internal error"), doc["reason"]
        assert doc["topic"] in topics
        assert len(doc["payload"]) <= keep, "a reject keeps more of the payload than asked"
    contract.check_batch_readings(out.readings)


def batch_input(data: bytes) -> None:
    check_batch(*make_batch(data))


# -- the MQTT client -----------------------------------------------------------------

# The sizes of the pieces a stream arrives in (the first byte of an input picks one).
PIECES = (1, 2, 7, 100, 1500, 4096, 65536, 1 << 20)


def received(client_class: type[mqtt.Client], v5: bool, stream: bytes, piece: int) -> list[tuple]:
    """What ``client_class`` hands on_message for ``stream``, the broker's bytes
    (sent in ``piece``-byte pieces), ending with the return code it stops on."""
    a, b = socket.socketpair()
    got: list[tuple] = []
    try:
        b.setblocking(False)
        c = client_class(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id="t",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            manual_ack=True,
        )

        def on_message(_c: object, _u: object, m: mqtt.MQTTMessage) -> None:
            props = m.properties.json() if m.properties is not None else None
            fields = (m._topic, m.mid, m.qos, m.dup, m.retain, bytes(m.payload), props)
            got.append((*fields, m.state, m.info.mid, m.timestamp > 0))

        c.on_message = on_message
        c._sock = ReadAheadSocket(b) if issubclass(client_class, Client) else b
        c._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
        rc = mqtt.MQTT_ERR_SUCCESS
        for i in range(0, len(stream), piece):
            a.sendall(stream[i : i + piece])
            # Read while bytes are at hand, read ahead or in the socket.
            while c._sock is not None and not rc:
                held = c._sock.pending() if isinstance(c._sock, ReadAheadSocket) else 0
                if not held and not select.select([b], [], [], 0)[0]:
                    break
                rc = c.loop_read()
            if rc or c._sock is None:
                break
        got.append(("rc", int(rc)))
    finally:
        a.close()
        b.close()
    return got


def mqtt_input(data: bytes) -> None:
    if not data:
        return
    v5, piece = bool(data[0] & 1), PIECES[(data[0] >> 1) % len(PIECES)]
    stream = data[1:]
    ours, paho = received(Client, v5, stream, piece), received(mqtt.Client, v5, stream, piece)
    assert ours == paho, f"the gateway's client handed on {ours[:3]}..., paho {paho[:3]}..."
