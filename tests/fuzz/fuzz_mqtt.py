#!/usr/bin/env python3
"""atheris target: the gateway's MQTT client against paho's own, byte stream in.

Usage (``make fuzz`` runs it through ``tests/fuzz/run.py``):
    .venv/bin/python tests/fuzz/fuzz_mqtt.py [libFuzzer flags] WORK_DIR tests/fuzz/corpus/mqtt
An input is what a broker sends (see ``targets.mqtt_input``); a difference
from paho, or any exception, is a crash.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.fuzz.atheris_main import fuzz

    fuzz(["sensor_gateway.mqtt"], "mqtt_input")
