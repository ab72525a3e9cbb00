"""The gateway's MQTT client reads ahead (sensor_gateway.mqtt.ReadAheadSocket):
whatever sizes paho asks for, it gets the stream's bytes in order, exactly once,
and ``pending()`` says what is held. (Over a broker, plain and TLS: the suite.)"""

from __future__ import annotations

import contextlib
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensor_gateway.mqtt import ReadAheadSocket


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
