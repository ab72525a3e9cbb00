"""The Ansible end-to-end deployment: one booted container for the module.

See test_deploy.py. Timings of each phase are collected in ``TIMINGS`` and
printed at the end of the run (also without ``-s``).
"""

from __future__ import annotations

import pytest

TIMINGS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("e2e timings")
    for phase, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{phase:<48} {seconds:7.1f} s")
