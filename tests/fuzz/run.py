#!/usr/bin/env python3
"""Run the atheris fuzz targets for a bounded time; print one JSON line.

    .venv/bin/python tests/fuzz/run.py [--seconds 600] [--targets payload,batch,mqtt] [--work DIR]

``make fuzz`` runs it (``FUZZ_SECONDS``, default 600, shared equally between
the targets, one after the other). Each target starts from its seed corpus
(``tests/fuzz/corpus/<target>``) and the crashes kept so far
(``tests/fuzz/crashes/<target>``), both read-only; what libFuzzer learns goes
to a working corpus under ``--work`` (default ``.cache/fuzz``), kept between
runs. A crash (a broken contract check, an exception, a hang over
``-timeout``, memory over ``-rss_limit_mb``) stops that target and leaves the
input in ``<work>/artifacts/<target>/``; the run then exits 1. The last line
of output is JSON: executions and crashes per target and in total.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TARGETS = ("payload", "batch", "mqtt")
# Payloads up to the 16 KiB limit and a little over it matter.
MAX_LEN = 17000
# A message whose validation takes this long stalls ingestion: a crash too.
TIMEOUT_S = 10
RSS_LIMIT_MB = 2048


def libfuzzer_args(target: str, seconds: int, work: Path) -> tuple[list[str], Path, Path]:
    corpus = work / "corpus" / target
    artifacts = work / "artifacts" / target
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    seeds = [HERE / "corpus" / target, HERE / "crashes" / target]
    args = [
        sys.executable,
        str(HERE / f"fuzz_{target}.py"),
        f"-max_total_time={seconds}",
        f"-max_len={MAX_LEN}",
        f"-timeout={TIMEOUT_S}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-dict={HERE / 'payload.dict'}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        str(corpus),  # the first directory is the one libFuzzer writes to
        *(str(d) for d in seeds if d.is_dir()),
    ]
    return args, corpus, artifacts


def _stat(log: str, name: str) -> int | None:
    m = re.search(rf"^stat::{name}:\s*(\d+)", log, re.M)
    return int(m.group(1)) if m else None


def summarize(log: str, returncode: int, seconds: float) -> dict[str, object]:
    executions = _stat(log, "number_of_executed_units")
    if executions is None:  # killed before the final stats: the last status line
        runs = re.findall(r"^#(\d+)\s", log, re.M)
        executions = int(runs[-1]) if runs else 0
    status = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)/", log)
    crash_inputs = re.findall(r"Test unit written to (\S+)", log)
    crashes = len(crash_inputs) or (1 if returncode != 0 else 0)
    out: dict[str, object] = {
        "executions": executions,
        "crashes": crashes,
        "seconds": round(seconds, 1),
        "exec_per_sec": _stat(log, "average_exec_per_sec"),
        "new_units": _stat(log, "new_units_added"),
    }
    if status:
        cov, ft, corp = status[-1]
        out.update(coverage=int(cov), features=int(ft), corpus=int(corp))
    if crashes:
        out["crash_inputs"] = crash_inputs
        out["returncode"] = returncode
    return out


def fuzz(target: str, seconds: int, work: Path) -> dict[str, object]:
    args, corpus, _ = libfuzzer_args(target, seconds, work)
    log_path = work / f"{target}.log"
    print(f"fuzz {target}: {seconds} s, working corpus {corpus}, log {log_path}", flush=True)
    start = time.monotonic()
    with log_path.open("w") as log_file:
        proc = subprocess.run(args, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    log = log_path.read_text(errors="replace")
    result = summarize(log, proc.returncode, time.monotonic() - start)
    if result["crashes"]:
        # The Python traceback and libFuzzer's report of the input.
        at = log.find("=== Uncaught Python exception")
        tail = log[at:] if at >= 0 else log[-4000:]
        print(tail[:8000], file=sys.stderr)
        print(
            f"fuzz {target}: CRASH; input kept in {result['crash_inputs']}. Keep it as a "
            f"regression: copy it to tests/fuzz/crashes/{target}/<name> and add a named test.",
            file=sys.stderr,
        )
    else:
        print(f"fuzz {target}: {result['executions']} executions, no crash", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "600")))
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "fuzz")
    a = p.parse_args(argv)
    targets = [t for t in a.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown or not targets:
        p.error(f"targets are {', '.join(TARGETS)}")
    try:
        import atheris  # noqa: F401
    except ImportError:
        print(
            "atheris is not installed: `make deps` installs it (PyPI has wheels for x86_64 only)",
            file=sys.stderr,
        )
        return 2
    each = max(1, a.seconds // len(targets))
    results = {t: fuzz(t, each, a.work.resolve()) for t in targets}
    summary = {
        "fuzz_seconds": a.seconds,
        "executions": sum(int(r["executions"]) for r in results.values()),
        "crashes": sum(int(r["crashes"]) for r in results.values()),
        "targets": results,
    }
    print(json.dumps(summary), flush=True)
    return 1 if summary["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
