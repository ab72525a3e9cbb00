"""Fixtures: real Mosquitto, Redis and a MongoDB-wire server on loopback.

``stack`` is shared by the session (each test gets its own database, Redis key
prefix and MQTT client ids through ``gateway``); ``private_stack`` is a fresh
set for tests that stop, kill or restart services.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import Stack
from tests.helpers import Gateway


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(root=tmp_path_factory.mktemp("stack"))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def private_stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(root=tmp_path / "stack")
    s.start()
    yield s
    for svc in (s.mosquitto, s.redis, s.mongo):
        svc.kill()


def _gateway(stack: Stack, tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(stack, tmp_path, uuid.uuid4().hex[:8])
    yield gw
    gw.close()


@pytest.fixture
def gateway(stack: Stack, tmp_path: Path) -> Iterator[Gateway]:
    yield from _gateway(stack, tmp_path)


@pytest.fixture
def private_gateway(private_stack: Stack, tmp_path: Path) -> Iterator[Gateway]:
    yield from _gateway(private_stack, tmp_path)
