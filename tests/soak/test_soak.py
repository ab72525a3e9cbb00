"""A one-minute run of the chaos soak (``make soak`` runs it for ten).

Not in the default suite (marker ``soak``): ``.venv/bin/python -m pytest -m soak``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import REPO

pytestmark = pytest.mark.soak

DURATION = 60


def test_soak_one_minute_loses_nothing(tmp_path: Path) -> None:
    err = tmp_path / "soak.err"
    with err.open("wb") as stderr:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.soak.chaos",
                "--duration",
                str(DURATION),
                # Seed 51 draws each kind of fault in its first six.
                "--seed",
                "51",
                "--min-gap",
                "1",
                "--max-gap",
                "5",
                "--workdir",
                str(tmp_path / "soak"),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            timeout=DURATION + 900,
        )
    log = err.read_text(errors="replace")[-6000:]
    lines = proc.stdout.decode().strip().splitlines()
    assert lines, f"no JSON line (exit {proc.returncode}); stderr ends:\n{log}"
    out = json.loads(lines[-1])
    print(lines[-1])
    assert out["published"] >= 0.8 * 500 * DURATION, (out, log)
    assert out["lost"] == 0, (out, log)
    assert out["duplicates"] == 0, (out, log)
    assert out["hostile_stored"] == 0, (out, log)
    assert out["ingester_alive"], (out, log)
    assert out["ingester_unexpected_exits"] == 0, (out, log)
    assert out["faults_injected"] >= 6, (out, log)
    assert out["ok"], (out, log)
