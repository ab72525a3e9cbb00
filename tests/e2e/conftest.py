"""The Ansible end-to-end deployment: one booted container for the module.

See test_deploy.py. Timings of each phase are collected in ``TIMINGS`` and
printed at the end of the run (also without ``-s``).
"""

from __future__ import annotations

import pytest

TIMINGS: dict[str, float] = {}
# Lines worth showing after the run (e.g. the daemon's journal lines).
NOTES: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if NOTES:
        terminalreporter.section("e2e notes")
        for line in NOTES:
            terminalreporter.write_line(line)
    if not TIMINGS:
        return
    terminalreporter.section("e2e timings")
    for phase, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{phase:<48} {seconds:7.1f} s")
