#!/usr/bin/env python3
"""atheris target: the payload contract, ``sensor_gateway.payload.parse``.

Usage (``make fuzz`` runs it through ``tests/fuzz/run.py``):
    .venv/bin/python tests/fuzz/fuzz_payload.py [libFuzzer flags] WORK_DIR tests/fuzz/corpus/payload
An input is ``<topic>\\n<payload>`` (see ``targets.payload_input``); a failed
contract check or any exception is a crash.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.fuzz.atheris_main import fuzz

    fuzz(["sensor_gateway.payload"], "payload_input")
