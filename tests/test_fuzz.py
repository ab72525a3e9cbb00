"""Fuzzing the reading contract and the batch path (issue 8).

- every seed (``tests/fuzz/corpus``) and every crash the fuzzer found
  (``tests/fuzz/crashes``) replayed through the contract checks, no fuzzing;
- a short, bounded fuzz of each atheris target (``make fuzz`` runs them long);
- each crash found, as a named regression test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from sensor_gateway.ingest.receive import Incoming
from sensor_gateway.ingest.validate import validate_batch
from sensor_gateway.payload import DEFAULT_LIMITS, Reject, parse
from tests.fuzz import contract, targets

FUZZ = Path(__file__).resolve().parent / "fuzz"
NOW = contract.NOW
# Per target, in the default suite; `make fuzz` gives them minutes.
SHORT_FUZZ_SECONDS = 12


def _inputs(target: str) -> list[Path]:
    return sorted(
        p for d in ("corpus", "crashes") for p in (FUZZ / d / target).glob("*") if p.is_file()
    )


def _id(p: Path) -> str:
    return f"{p.parent.parent.name}/{p.name}"


@pytest.mark.parametrize("path", _inputs("payload"), ids=_id)
def test_payload_inputs_keep_the_contract(path: Path) -> None:
    targets.payload_input(path.read_bytes())


@pytest.mark.parametrize("path", _inputs("mqtt"), ids=_id)
def test_mqtt_inputs_decode_as_paho_decodes_them(path: Path) -> None:
    targets.mqtt_input(path.read_bytes())


@pytest.mark.parametrize("path", _inputs("batch"), ids=_id)
def test_batch_inputs_keep_the_contract(path: Path) -> None:
    pytest.importorskip("atheris")  # a batch input drives atheris' FuzzedDataProvider
    targets.batch_input(path.read_bytes())


def test_payload_seeds_as_one_batch_twice() -> None:
    """Every payload seed through validate_batch, then all of them redelivered."""
    batch = []
    for i, data in enumerate(targets.SEEDS * 2):
        topic, payload = targets.split(data)
        mid = i % len(targets.SEEDS) + 1
        batch.append(Incoming(mid, 1, topic, payload, NOW + timedelta(seconds=i), 0.0, 0))
    targets.check_batch(batch, DEFAULT_LIMITS, 1024)
    out = validate_batch(batch, DEFAULT_LIMITS, 1024)
    keyed = sum("_id" in d for d in out.readings)
    assert keyed and out.duplicates == keyed  # each keyed reading's redelivery, once
    assert len(out.rejects) % 2 == 0


@pytest.mark.parametrize("target", ["payload", "batch", "mqtt"])
def test_short_bounded_fuzz_finds_no_crash(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    proc = subprocess.run(
        [sys.executable, str(FUZZ / "run.py"), "--targets", target, "--work", str(tmp_path)]
        + ["--seconds", str(SHORT_FUZZ_SECONDS)],
        capture_output=True,
        text=True,
        timeout=SHORT_FUZZ_SECONDS + 120,
    )
    # On a crash, stderr has the traceback, the input (base64) and where it was kept.
    assert proc.returncode == 0, proc.stderr[-8000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["crashes"] == 0, summary
    assert summary["executions"] > 1000, summary


# -- crashes the fuzzer found (each input is kept in tests/fuzz/crashes/) ------------


def _crash(name: str) -> tuple[str, bytes]:
    return targets.split((FUZZ / "crashes" / name).read_bytes())


def _reason(topic: str, payload: bytes) -> str:
    result = parse(topic, payload, NOW)
    assert isinstance(result, Reject), result
    contract.check_reject(result)
    return result.reason


def test_fuzz_crash_bytes_not_utf8_inside_a_json_string() -> None:
    """fuzz_payload, crashes/payload/invalid-utf8-in-string-0111e15e: msgspec raises
    UnicodeDecodeError (not its DecodeError) for bytes that are not UTF-8 inside a
    string, and parse let it out. A device sending a Latin-1 degree sign did that."""
    assert "not UTF-8" in _reason(*_crash("payload/invalid-utf8-in-string-0111e15e"))
    for payload in (
        b'{"value": 1, "unit": "\xb0C"}',  # Latin-1 "°C"
        b'{"value": 1, "\xe5": 2}',  # in a key
        b'{"value": 1, "unit": "\xed\xa0\x80"}',  # an encoded surrogate
        b'{"value": 1, "unit": "\xc0\x80"}',  # an overlong NUL
        b'{"value": 1, "unit": "\xe2\x82"}',  # cut in the middle of a character
    ):
        assert "not UTF-8" in _reason("sensors/t/x", payload)
    # UTF-8 is still read as such.
    doc = parse("sensors/t/x", '{"value": 1, "unit": "°C"}'.encode(), NOW)
    assert not isinstance(doc, Reject) and doc["unit"] == "°C"


def test_fuzz_crash_identifier_with_a_trailing_newline() -> None:
    """fuzz_payload, crashes/payload/sensor-id-trailing-newline-48136def: the
    identifier pattern ends in ``$``, which also matches before a final newline,
    so ``"sensor_id": "d\\n"`` (and such a kind) was stored."""
    assert "sensor_id" in _reason(*_crash("payload/sensor-id-trailing-newline-48136def"))
    assert "sensor_id" in _reason("sensors/t/x", b'{"value": 1, "sensor_id": "t1\\n"}')
    assert "kind" in _reason("sensors/t/x", b'{"value": 1, "kind": "temperature\\n"}')
    strict = parse("sensors/t/x", b'{"value": 1, "sensor_id": "x\\n"}', NOW, targets.STRICT)
    assert isinstance(strict, Reject)
