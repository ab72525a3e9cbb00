"""Export benchmark: the API worker's memory while it streams every reading as CSV.

    .venv/bin/python bench/export.py [--readings 1000000] [--format csv] [--keep DIR]

Starts the local services (devstack.stack.Stack), loads the readings
through the storage layer's writer (bench/api.py's fixture, not MQTT),
runs `sensor-gateway api` (gunicorn, one gthread worker), warms the worker up
with a small export, then streams ``GET /readings/export?format=csv`` of the
whole collection while sampling the worker's RSS (psutil, every 50 ms).
Prints ONE JSON line: rows, bytes, seconds, rows/s, the worker's RSS before
and at its peak, and the growth (the bound: < 20 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests
import tomli_w

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from api import fill, log  # noqa: E402

from devstack.ports import free_port, wait_port  # noqa: E402
from devstack.stack import Stack  # noqa: E402
from sensor_gateway import config  # noqa: E402

MB = 1024 * 1024


def worker_of(master: psutil.Process, timeout: float = 30.0) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = master.children()
        if kids:
            return kids[0]
        time.sleep(0.1)
    raise RuntimeError("no gunicorn worker")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--readings", type=int, default=1_000_000)
    ap.add_argument("--format", choices=["csv", "ndjson"], default="csv")
    ap.add_argument("--keep", default="", help="reuse/keep the stack (and its data) here")
    args = ap.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sg-bench-export-"))
    root.mkdir(parents=True, exist_ok=True)
    stack = Stack(root=root / "stack")
    stack.start()
    proc = None
    try:
        port = free_port()
        data = stack.config_dict(database="bench")
        data["mongodb"]["timeout_ms"] = 3_600_000  # FerretDB sorts a whole collection
        data["api"].update({"bind": f"127.0.0.1:{port}", "workers": 1, "threads": 4})
        data["log"] = {"level": "warning"}
        cfg_path = root / "gateway.toml"
        cfg_path.write_text(tomli_w.dumps(data))
        cfg = config.build(data)
        log(f"engine {stack.mongo.engine}; filling {args.readings} readings")
        t = time.monotonic()
        n = fill(cfg, args.readings)
        fill_s = time.monotonic() - t
        log(f"{n} readings in the collection ({fill_s:.0f} s)")

        env = {**os.environ, "PYTHONPATH": str(REPO)}
        out = open(root / "api.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "sensor_gateway", "-c", str(cfg_path), "api"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        wait_port(port, 60, proc)
        base = f"http://127.0.0.1:{port}"
        worker = worker_of(psutil.Process(proc.pid))
        # Warm-up: the export's code paths loaded, a few batches encoded.
        r = requests.get(
            base + "/readings/export",
            params={"format": args.format, "end": "2024-01-01T00:10:00Z"},
            timeout=3600,
        )
        assert r.status_code == 200, r.text[:300]
        time.sleep(1)
        before = worker.memory_info().rss
        peak = before
        samples = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak, samples
            while not stop.is_set():
                peak = max(peak, worker.memory_info().rss)
                samples += 1
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t = time.monotonic()
        first_byte = None
        rows = size = 0
        with requests.get(
            base + "/readings/export", params={"format": args.format}, stream=True, timeout=3600
        ) as resp:
            assert resp.status_code == 200, resp.text[:300]
            disposition = resp.headers.get("Content-Disposition")
            for chunk in resp.iter_content(chunk_size=256 * 1024):
                if first_byte is None:
                    first_byte = time.monotonic() - t
                size += len(chunk)
                rows += chunk.count(b"\n")
        seconds = time.monotonic() - t
        stop.set()
        sampler.join()
        after = worker.memory_info().rss
        rows -= 1 if args.format == "csv" else 0  # the header
        print(
            json.dumps(
                {
                    "bench": "export",
                    "engine": stack.mongo.engine,
                    "format": args.format,
                    "readings": n,
                    "rows": rows,
                    "bytes": size,
                    "seconds": round(seconds, 1),
                    "first_byte_s": round(first_byte or 0.0, 1),
                    "rows_per_s": round(rows / seconds),
                    "worker_rss_before_mb": round(before / MB, 1),
                    "worker_rss_peak_mb": round(peak / MB, 1),
                    "worker_rss_after_mb": round(after / MB, 1),
                    "worker_rss_growth_mb": round((peak - before) / MB, 1),
                    "rss_samples": samples,
                    "content_disposition": disposition,
                    "fill_s": round(fill_s),
                }
            )
        )
        assert rows == n, f"exported {rows} of {n}"
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        stack.stop()


if __name__ == "__main__":
    main()
