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


def main() -> None:
    import atheris

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    with atheris.instrument_imports(include=["sensor_gateway"]):
        import sensor_gateway.payload  # noqa: F401
    from tests.fuzz.targets import payload_input

    atheris.Setup(sys.argv, payload_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
