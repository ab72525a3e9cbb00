"""MQTT clients (paho-mqtt 2): credentials, TLS, MQTT 5 sessions and backoff."""

from __future__ import annotations

import ssl
import struct

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sensor_gateway.config import Config


def make_client(
    cfg: Config,
    client_id: str,
    username: str,
    password_file: str,
    *,
    manual_ack: bool = False,
    persistent: bool = False,
) -> mqtt.Client:
    v5 = cfg.mqtt.protocol == "5"
    client = mqtt.Client(
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
