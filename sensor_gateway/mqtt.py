"""MQTT clients (paho-mqtt 2): credentials, TLS, MQTT 5 sessions and backoff."""

from __future__ import annotations

import ssl
import struct
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sensor_gateway.config import Config

# What one recv() from the kernel asks for; paho asks for a byte at a time.
READ_AHEAD_BYTES = 65536
# Packets read per wake of paho's network loop before it sends and pings again.
PACKETS_PER_WAKE = 200


class ReadAheadSocket:
    """A connected socket (plain or TLS) whose reads go to the kernel 64 KiB at once.

    paho reads each packet with three recv() calls (type, length, rest), each
    a system call, and waits in select() before every packet: most of what
    receiving cost us. Here a recv() is served from what was read ahead, and
    ``pending()`` (which paho asks of TLS sockets) tells its loop that more is
    at hand without select() (see :class:`Client`).
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        if self._pos >= len(self._buf):
            data = self._sock.recv(max(n, READ_AHEAD_BYTES))
            if len(data) <= n:
                return data
            self._buf, self._pos = data, 0
        chunk = self._buf[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._buf) - self._pos + inner

    def take_publish(self, v5: bool) -> tuple[int, bytes, int, bytes] | None:
        """The next packet, if it is a whole QoS 0 or 1 PUBLISH already read
        ahead, with a topic and no MQTT 5 properties: (first byte, topic, packet
        id, payload), consumed. Anything else is left for paho (None), which
        also tells a malformed packet."""
        buf, pos, end = self._buf, self._pos, len(self._buf)
        if end - pos < 2 or buf[pos] >> 4 != 3 or buf[pos] & 0x06 > 0x02:
            return None
        first = buf[pos]
        # Remaining length: up to four 7-bit groups, least significant first.
        length = shift = 0
        i = pos + 1
        while True:
            if i >= end or shift > 21:
                return None
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            shift += 7
            i += 1
            if not byte & 0x80:
                break
        stop = i + length
        if stop > end or length < 2:
            return None
        topic_end = body = i + 2 + ((buf[i] << 8) | buf[i + 1])
        mid = 0
        if first & 0x02:
            if body + 2 > stop:
                return None
            mid = (buf[body] << 8) | buf[body + 1]
            body += 2
        if topic_end == i + 2 or body > stop:
            return None
        if v5:
            if body >= stop or buf[body] != 0:
                return None
            body += 1  # the properties' length: none
        self._pos = stop
        return first, buf[i + 2 : topic_end], mid, buf[body:stop]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Message(mqtt.MQTTMessage):
    """paho's received message, made without what a received message does not
    need up front: its MQTT 5 properties (empty, see :meth:`Client._read_ahead`)
    and its ``info`` (a lock and a condition, for messages we publish) are made
    only if asked for. Together they cost more than the rest of a message."""

    __slots__ = ("_props", "_v5", "_info")

    def __init__(
        self, mid: int, topic: bytes, v5: bool, first: int, payload: bytes, timestamp: float
    ) -> None:
        # What paho's __init__ sets, from the packet rather than defaults.
        self.mid = mid
        self._topic = topic
        self.dup = bool(first & 0x08)
        self.qos = (first & 0x06) >> 1
        self.retain = bool(first & 0x01)
        self.payload = payload
        self.timestamp = timestamp
        self.state = mqtt.mqtt_ms_invalid
        self._v5 = v5
        self._props: Properties | None = None
        self._info: mqtt.MQTTMessageInfo | None = None

    @property  # type: ignore[override]
    def properties(self) -> Properties | None:
        if self._props is None and self._v5:
            self._props = Properties(PacketTypes.PUBLISH)
        return self._props

    @properties.setter
    def properties(self, value: Properties | None) -> None:
        self._props = value

    @property  # type: ignore[override]
    def info(self) -> mqtt.MQTTMessageInfo:
        if self._info is None:
            self._info = mqtt.MQTTMessageInfo(self.mid)
        return self._info

    @info.setter
    def info(self, value: mqtt.MQTTMessageInfo) -> None:
        self._info = value


class Client(mqtt.Client):
    """paho's client, reading ahead (:class:`ReadAheadSocket`) and handling
    every packet at hand per wake of its loop rather than one. A PUBLISH found
    whole in what was read ahead is decoded here, in a few slices, rather than
    by paho's general packet reader; everything else goes through paho.
    Measured draining a backlog with a bare subscriber: bench/ingest.py,
    ``ceiling_read_ahead_msgs_per_s`` against paho's own ``ceiling_msgs_per_s``.
    Uses paho-mqtt 2 internals (``_create_socket``, ``_sock``, ``_in_packet``,
    ``_handle_on_message``, ``_send_puback``), as its own websocket wrapper does;
    the whole suite runs over it, and a property test holds it to paho's own
    decoding (tests/test_mqtt_client.py)."""

    _filtered = False  # a per-topic callback was added (message_callback_add)

    def _create_socket(self) -> Any:
        return ReadAheadSocket(super()._create_socket())

    def message_callback_add(self, sub: str, callback: Any) -> None:
        self._filtered = True
        super().message_callback_add(sub, callback)

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        handled = 0
        while handled < PACKETS_PER_WAKE:
            sock = self._sock
            if sock is None:
                return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
            n = self._read_ahead(sock, PACKETS_PER_WAKE - handled)
            if n:
                handled += n
                continue
            rc = super().loop_read(max_packets)
            handled += 1
            if rc or self._sock is None or not self._sock.pending():
                return rc
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _read_ahead(self, sock: Any, most: int) -> int:
        """Handle up to ``most`` PUBLISH packets whole in ``sock``'s read-ahead;
        returns how many (0: the next packet is paho's to read)."""
        if self._in_packet["command"] or not isinstance(sock, ReadAheadSocket):
            return 0
        v5 = self._protocol == mqtt.MQTTv5
        handled = 0
        while handled < most and (packet := sock.take_publish(v5)) is not None:
            first, topic, mid, payload = packet
            msg = Message(mid, topic, v5, first, payload, mqtt.time_func())
            self._handle_on_message(msg)
            if msg.qos and not self._manual_ack:
                self._send_puback(mid)
            handled += 1
        if handled:
            with self._msgtime_mutex:
                self._last_bytes_received = mqtt.time_func()
        return handled

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        # paho matches every topic against its per-topic callbacks, even when
        # there are none: a tenth of receiving.
        if self._filtered or self.on_message is None:
            super()._handle_on_message(message)
            return
        with self._in_callback_mutex:
            try:
                self.on_message(self, self._userdata, message)
            except Exception as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise


def make_client(
    cfg: Config,
    client_id: str,
    username: str,
    password_file: str,
    *,
    manual_ack: bool = False,
    persistent: bool = False,
    client_class: type[mqtt.Client] = Client,
) -> mqtt.Client:
    """``client_class``: paho's own ``mqtt.Client`` for a benchmark's baseline."""
    v5 = cfg.mqtt.protocol == "5"
    client = client_class(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        # MQTT 3.1.1 asks for a persistent session here; MQTT 5 does at connect.
        clean_session=None if v5 else not persistent,
        manual_ack=manual_ack,
    )
    if username:
        client.username_pw_set(username, cfg.secret(password_file) or None)
    if cfg.mqtt.tls:
        ctx = ssl.create_default_context(cafile=cfg.mqtt.ca_file or None)
        client.tls_set_context(ctx)
    client.reconnect_delay_set(
        max(1, int(cfg.mqtt.reconnect_min_s)), max(1, int(cfg.mqtt.reconnect_max_s))
    )
    return client


def connect_async(client: mqtt.Client, cfg: Config, properties: Properties | None = None) -> None:
    """Connect in the background (paho retries with backoff); persistent with MQTT 5."""
    if client.protocol == mqtt.MQTTv5:
        client.connect_async(
            cfg.mqtt.host,
            cfg.mqtt.port,
            keepalive=cfg.mqtt.keepalive,
            clean_start=properties is None,
            properties=properties,
        )
    else:
        client.connect_async(cfg.mqtt.host, cfg.mqtt.port, keepalive=cfg.mqtt.keepalive)


def session_properties(
    session_expiry_s: int, receive_maximum: int, maximum_packet_size: int | None = None
) -> Properties:
    """CONNECT properties of a persistent session with our own in-flight window.

    Receive Maximum bounds how many messages the broker has in flight to us;
    Maximum Packet Size bounds each one's bytes, so what we hold is bounded in
    bytes too. (The broker does not send us a larger packet: it drops it and
    logs it; its own message_size_limit refuses such payloads at publish time.)
    """
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    props.ReceiveMaximum = receive_maximum
    if maximum_packet_size:
        props.MaximumPacketSize = maximum_packet_size
    return props


_PUBACK = struct.Struct("!BBH")


def acknowledge_all(client: mqtt.Client, mids: list[int]) -> None:
    """Send a PUBACK for each QoS 1 message of ``mids``, all in one write.

    paho's ``ack()`` queues a packet per message, wakes its network thread for
    each (a byte on its socket pair) and sends each with a send() of its own: a
    third of the ingester's acknowledge stage at thousands of messages a second.
    Here one packet holding every PUBACK goes through paho's own output queue
    (``_packet_queue``, paho-mqtt 2 internals, which ``ack()`` itself uses; a
    test checks that every PUBACK reaches the broker). The PUBACK is the same in
    MQTT 3.1.1 and 5 (a reason code of success may be left out).
    """
    if mids:
        packet = b"".join(_PUBACK.pack(mqtt.PUBACK, 2, mid) for mid in mids)
        client._packet_queue(mqtt.PUBACK, packet, 0, 0)
