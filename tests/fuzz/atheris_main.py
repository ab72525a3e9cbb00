"""What every atheris script does: instrument the gateway's modules, then fuzz
one function of ``targets`` (the scripts differ only in which)."""

from __future__ import annotations

import importlib
import sys


def fuzz(modules: list[str], target: str) -> None:
    import atheris

    # Instrumented before ``targets`` imports them, so coverage guides the fuzzer.
    with atheris.instrument_imports(include=["sensor_gateway"]):
        for name in modules:
            importlib.import_module(name)
    from tests.fuzz import targets

    atheris.Setup(sys.argv, getattr(targets, target))
    atheris.Fuzz()
