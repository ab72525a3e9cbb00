#!/usr/bin/env python3
"""atheris target: the batch path, ``sensor_gateway.ingest.validate.validate_batch``.

Usage (``make fuzz`` runs it through ``tests/fuzz/run.py``):
    .venv/bin/python tests/fuzz/fuzz_batch.py [libFuzzer flags] WORK_DIR tests/fuzz/corpus/batch
An input drives a FuzzedDataProvider that builds a batch (see
``targets.batch_input``); a failed check or any exception is a crash.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.fuzz.atheris_main import fuzz

    fuzz(["sensor_gateway.ingest", "sensor_gateway.payload"], "batch_input")
