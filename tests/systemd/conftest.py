"""One booted container for the systemd tests, with the gateway installed.

Built once per session: the cached Debian rootfs (tests/systemd/nspawn.py) is
copied and booted with a private network, the package, configuration, secrets,
Mosquitto, Redis, FerretDB and the units are installed (provision.py), and the
three back-end services started. Each test then starts the units it needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.systemd import nspawn, provision
from tests.systemd.nspawn import Container


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture(scope="session")
def container() -> Iterator[Container]:
    try:
        nspawn.require_tools()
    except nspawn.NspawnError as exc:
        pytest.fail(f"systemd tests cannot run here: {exc}", pytrace=False)
    rootfs = nspawn.build_rootfs()
    with Container(f"sgt{os.getpid() % 100000}", rootfs) as c:
        provision.install_venv(c)
        provision.install_gateway(c)
        provision.start_backends(c)
        yield c
