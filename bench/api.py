"""API benchmark: latest-ten and a 1,000-reading time range over ≥ 1,000,000 readings.

    .venv/bin/python bench/api.py [--readings 1000000] [--duration 10] [--connections 16]

Starts the local services (sensor_gateway.localstack.Stack), bulk-inserts the
readings straight into MongoDB (a benchmark fixture, not the ingest path),
fills Redis' latest sets as the ingester would, then runs `sensor-gateway api`
(gunicorn, the configured workers and threads) and, under the same gunicorn
settings, a bare Flask route returning a constant: the ceiling of the stack
on this machine. Load comes from another process: wrk when installed
(`apt-get install wrk`), else a threaded Python client.

Prints ONE JSON line. Range queries are sent without cache hits (every request
a different window); ``range_db_*`` is the same query straight through pymongo,
so the difference is the API's own share; ``range_cached_*`` the same route
answered from the short-lived Redis cache (its TTL raised for the measurement).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import tomli_w
from pymongo.write_concern import WriteConcern

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sensor_gateway import cache, config, storage  # noqa: E402
from sensor_gateway.localstack import Stack, free_port, wait_port  # noqa: E402
from sensor_gateway.model import iso  # noqa: E402

SENSORS = 10
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def fill(cfg: config.Config, n: int, batch: int = 50_000) -> int:
    db = storage.connect(cfg)
    storage.ensure_indexes(db)
    coll = db[storage.READINGS]
    have = coll.estimated_document_count()
    t = time.monotonic()
    for start in range(have, n, batch):
        docs = []
        for i in range(start, min(n, start + batch)):
            ts = T0 + timedelta(seconds=i // SENSORS)
            docs.append(
                {
                    "_id": f"b{i}",
                    "sensor_id": f"s{i % SENSORS}",
                    "kind": "temperature",
                    "value": float(i % 1000) / 10,
                    "unit": "°C",
                    "ts": ts,
                    "received_at": ts,
                    "topic": "sensors/temperature",
                }
            )
        coll.with_options(write_concern=WriteConcern(w=1)).insert_many(docs, ordered=False)
        log(f"inserted {min(n, start + batch)}/{n} ({time.monotonic() - t:.0f}s)")
    # Redis' latest sets, as the ingester leaves them.
    r = cache.connect(cfg)
    keys = cache.Keys(cfg.redis.key_prefix)
    last = [
        {
            "_id": f"b{i}",
            "sensor_id": f"s{i % SENSORS}",
            "kind": "temperature",
            "value": float(i % 1000) / 10,
            "unit": "°C",
            "ts": T0 + timedelta(seconds=i // SENSORS),
        }
        for i in range(n - 10 * SENSORS, n)
    ]
    cache.store_latest(r, keys, last, cfg.ingest.latest_n, live=False)
    return coll.count_documents({}) if n <= 200_000 else coll.estimated_document_count()


def wrk(url: str, duration: int, connections: int, script: Path | None = None) -> dict:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "120s"]
    if script:
        cmd += ["-s", str(script)]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "p50": ms("50"),
        "p99": ms("99"),
        "rps": rps,
        "errors": int(non2xx.group(1)) if non2xx else 0,
    }


def python_load(url: str, duration: int, connections: int) -> dict:
    """Fallback load generator: keep-alive connections, one thread each."""
    host, _, rest = url.removeprefix("http://").partition("/")
    h, _, p = host.partition(":")
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.monotonic() + duration

    def run() -> None:
        nonlocal errors
        c = http.client.HTTPConnection(h, int(p), timeout=120)
        mine: list[float] = []
        while time.monotonic() < deadline:
            t = time.perf_counter()
            c.request("GET", "/" + rest)
            resp = c.getresponse()
            resp.read()
            mine.append((time.perf_counter() - t) * 1000)
            if resp.status != 200:
                with lock:
                    errors += 1
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(connections)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat.sort()
    return {
        "p50": lat[len(lat) // 2],
        "p99": lat[int(len(lat) * 0.99)],
        "rps": len(lat) / (time.monotonic() - t0),
        "errors": errors,
    }


def load(url: str, duration: int, connections: int) -> dict:
    if shutil.which("wrk"):
        return wrk(url, duration, connections)
    return python_load(url, duration, connections)


def median_run(runs: list[dict]) -> dict:
    """The run with the median requests/s (its latencies go with it)."""
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


def range_url(base: str, rng: random.Random, n_readings: int) -> tuple[str, dict]:
    """A window holding exactly 1,000 readings of one sensor (one a second)."""
    span_s = n_readings // SENSORS
    start = T0 + timedelta(seconds=rng.randrange(0, span_s - 1000))
    params = {
        "sensor_id": f"s{rng.randrange(SENSORS)}",
        "start": iso(start),
        "end": iso(start + timedelta(seconds=1000)),
        "limit": "1000",
    }
    return f"{base}/readings?{urlencode(params)}", params


def range_uncached(base: str, n_readings: int, max_requests: int, budget_s: float) -> dict:
    """Sequential range queries, each a different window (no cache hits)."""
    import requests

    rng = random.Random(7)
    lat: list[float] = []
    deadline = time.monotonic() + budget_s
    while len(lat) < max_requests and time.monotonic() < deadline:
        url, _ = range_url(base, rng, n_readings)
        t = time.perf_counter()
        r = requests.get(url, timeout=600)
        lat.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, r.text[:300]
        assert len(r.json()["items"]) == 1000, len(r.json()["items"])
        assert r.headers["X-Cache"] == "miss"
    lat.sort()
    return {
        "p50": statistics.median(lat),
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "rps": 1000 / statistics.mean(lat),
        "n": len(lat),
    }


def range_db(cfg: config.Config, n_readings: int, requests_n: int) -> dict:
    """The same query straight through pymongo, and the server's own plan."""
    from sensor_gateway import queries

    db = storage.connect(cfg)
    rng = random.Random(7)
    lat = []
    for _ in range(requests_n):
        _, p = range_url("", rng, n_readings)
        q = queries.ReadingQuery(
            sensor_id=p["sensor_id"],
            start=datetime.fromisoformat(p["start"]),
            end=datetime.fromisoformat(p["end"]),
            limit=1000,
        )
        t = time.perf_counter()
        items, _ = queries.find_readings(db, q)
        lat.append((time.perf_counter() - t) * 1000)
    plan = db[storage.READINGS].find(q.filter()).sort([("ts", 1), ("_id", 1)]).limit(1001).explain()
    pushdown = {k: v for k, v in plan.items() if "ushdown" in k}
    return {"p50": statistics.median(lat), "plan": plan.get("queryPlanner"), **pushdown}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--readings", type=int, default=1_000_000)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument(
        "--connections",
        type=int,
        default=8,
        help="concurrent keep-alive connections (default: workers x threads of the API)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="bare/latest rounds (median)")
    ap.add_argument("--range-requests", type=int, default=20)
    ap.add_argument("--range-budget-s", type=float, default=240)
    ap.add_argument("--keep", default="", help="reuse/keep the stack in this folder")
    args = ap.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sg-bench-"))
    stack = Stack(root=root / "stack")
    stack.start()
    procs: list[subprocess.Popen] = []
    try:
        port, bare_port = free_port(), free_port()
        data = stack.config_dict(database="bench")
        data["mongodb"]["timeout_ms"] = 600_000  # FerretDB scans take long at 1M
        data["api"].update({"bind": f"127.0.0.1:{port}", "cache_ttl_s": 120.0})
        data["log"] = {"level": "warning"}
        cfg_path = root / "gateway.toml"
        cfg_path.write_text(tomli_w.dumps(data))
        cfg = config.build(data)
        log(f"engine {stack.mongo.engine}; filling {args.readings} readings")
        n = fill(cfg, args.readings)
        log(f"{n} readings in the collection")

        env = {**os.environ, "PYTHONPATH": str(REPO), "SENSOR_GATEWAY_CONFIG": str(cfg_path)}
        out = open(root / "api.log", "wb")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "sensor_gateway", "-c", str(cfg_path), "api"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
        bare_env = {**env, "SENSOR_GATEWAY_API__BIND": f'"127.0.0.1:{bare_port}"'}
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "-c",
                    "python:sensor_gateway.gunicorn_conf",
                    "bench.bare_app:app",
                ],
                env=bare_env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
        for p, proc in ((port, procs[0]), (bare_port, procs[1])):
            wait_port(p, 60, proc)
        base, bare = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{bare_port}"
        for url in (base + "/healthz", base + "/latestten", bare + "/"):
            deadline = time.monotonic() + 30
            while True:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", int(url.split(":")[2][:5]))
                    c.request("GET", "/" + url.split("/", 3)[3])
                    if c.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(url)
                time.sleep(0.2)

        # Alternate bare / latest rounds and keep the median of each: background
        # work of the services (SQLite checkpoints after the bulk insert) hits both.
        bare_rounds, latest_rounds = [], []
        for i in range(args.rounds):
            bare_rounds.append(load(bare + "/", args.duration, args.connections))
            latest_rounds.append(load(base + "/readings/latest", args.duration, args.connections))
            log(f"round {i + 1}: bare {bare_rounds[-1]}, latest {latest_rounds[-1]}")
        bare_r, latest_r = median_run(bare_rounds), median_run(latest_rounds)
        log("range (cached)")
        rng = random.Random(1)
        cached_url, _ = range_url(base, rng, n)
        urllib.request.urlopen(cached_url, timeout=600).read()  # fill the cache (a miss)
        cached_r = load(cached_url, args.duration, args.connections)
        log(f"range cached: {cached_r}")
        log("range (uncached, sequential)")
        range_r = range_uncached(base, n, args.range_requests, args.range_budget_s)
        log(f"range: {range_r}")
        db_r = range_db(cfg, n, 1)
        log(f"range in the database alone: {db_r}")

        result = {
            "latest_p50_ms": round(latest_r["p50"], 2),
            "latest_p99_ms": round(latest_r["p99"], 2),
            "latest_rps": round(latest_r["rps"], 1),
            "range_p50_ms": round(range_r["p50"], 1),
            "range_p99_ms": round(range_r["p99"], 1),
            "range_rps": round(range_r["rps"], 2),
            "bare_rps": round(bare_r["rps"], 1),
            "readings_in_collection": n,
            "latest_vs_bare": round(latest_r["rps"] / bare_r["rps"], 3),
            "range_requests": range_r["n"],
            "range_db_p50_ms": round(db_r["p50"], 1),
            "range_db_filter_pushdown": db_r.get("filterPushdown"),
            "range_db_sort_pushdown": db_r.get("sortPushdown"),
            "range_cached_p50_ms": round(cached_r["p50"], 2),
            "range_cached_p99_ms": round(cached_r["p99"], 2),
            "range_cached_rps": round(cached_r["rps"], 1),
            "bare_p99_ms": round(bare_r["p99"], 2),
            "engine": stack.mongo.engine,
            "load_generator": "wrk" if shutil.which("wrk") else "python",
            "connections": args.connections,
            "rounds": args.rounds,
            "workers": cfg.api.workers,
            "threads": cfg.api.threads,
            "cpus": os.cpu_count(),
        }
        print(json.dumps(result), flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        stack.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
