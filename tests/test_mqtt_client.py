"""The gateway's MQTT client (sensor_gateway.mqtt) reads ahead: whatever sizes
paho asks for, it gets the stream's bytes in order, exactly once, and
``pending()`` says what is held; and it decodes PUBLISH packets itself: it
hands on what paho would, and fails where paho fails. (Over a broker, plain
and TLS: the suite.)"""

from __future__ import annotations

import contextlib
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import client as mqtt

from sensor_gateway.mqtt import Client, ReadAheadSocket
from tests.fuzz.targets import received


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=200_000),
    asks=st.lists(st.integers(1, 70_000), min_size=1, max_size=50),
)
def test_reads_return_the_stream_in_order(data: bytes, asks: list[int]) -> None:
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        r = ReadAheadSocket(b)
        got = bytearray()
        sent = 0
        i = 0
        while len(got) < len(data):
            if sent < len(data):
                a.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sent += a.send(data[sent : sent + 65536])
            n = asks[i % len(asks)]
            i += 1
            try:
                chunk = r.recv(n)
            except BlockingIOError:
                assert r.pending() == 0
                continue
            assert 0 < len(chunk) <= n
            got += chunk
            assert r.pending() >= 0
        assert bytes(got) == data
        assert r.pending() == 0
        with pytest.raises(BlockingIOError):
            r.recv(1)
        assert r.fileno() == b.fileno()  # what select() waits on
    finally:
        a.close()
        b.close()


# -- the gateway's own PUBLISH decoding against paho's ---------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def _publish(draw: st.DrawFn, v5: bool) -> bytes:
    qos = draw(st.integers(0, 2))
    flags = qos << 1 | draw(st.integers(0, 1)) << 3 | draw(st.integers(0, 1))
    topic = draw(st.one_of(st.text(max_size=40).map(str.encode), st.binary(max_size=40)))
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
    if v5:
        # No properties, a User Property, or bytes claiming to be properties.
        props = draw(
            st.sampled_from([b"", b"\x26\x00\x01k\x00\x01v", b"\x01\x01", b"\x02\x00\x00\x00\x05"])
            | st.binary(max_size=6)
        )
        body += _varint(len(props)) + props
    body += draw(st.binary(max_size=3000))
    if draw(st.integers(0, 9)) == 0:  # a length that lies
        body = body[: draw(st.integers(0, len(body)))]
        return bytes([0x30 | flags]) + _varint(len(body) + draw(st.integers(-3, 3)) % 5) + body
    return bytes([0x30 | flags]) + _varint(len(body)) + body


def _stream(v5: bool) -> st.SearchStrategy[bytes]:
    packet = st.one_of(
        _publish(v5),
        st.just(b"\xd0\x00"),  # PINGRESP
        st.binary(max_size=8),  # garbage
    )
    # Mostly PUBLISHes, as a broker sends.
    return st.lists(st.one_of(_publish(v5), _publish(v5), packet), max_size=30).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), v5=st.booleans(), chunk=st.sampled_from([1, 7, 100, 4096, 1 << 20]))
def test_publishes_are_decoded_as_paho_decodes_them(
    data: st.DataObject, v5: bool, chunk: int
) -> None:
    """Whatever the broker's bytes (well-formed or not, properties or none, whole
    or split), the gateway's client hands on the same messages as paho's own and
    fails where paho fails."""
    stream = data.draw(_stream(v5))
    assert received(Client, v5, stream, chunk) == received(mqtt.Client, v5, stream, chunk)
