"""Run inside the test container with the gateway's venv: reads MongoDB for the tests.

``probe.py ids``    prints every stored reading's ``msg_id``, one a line
``probe.py count``  prints ``readings rejected`` counts
``probe.py drop``   drops the database (a fresh start for a test)
``probe.py lanes``  prints the ingest worker lanes holding readings, one a line
"""

from __future__ import annotations

import sys

from sensor_gateway import config, layout, storage


def main(cmd: str) -> None:
    db = storage.connect(config.load(), appname="systemd-test-probe")
    if cmd == "ids":
        for r in storage.scan_readings(db):
            print(r.get("msg_id"))
    elif cmd == "count":
        print(storage.count_readings(db), db[storage.REJECTED].count_documents({}))
    elif cmd == "lanes":
        ids = (d["_id"].partition("/")[0] for d in db[layout.SAMPLES].find({}, {"_id": 1}))
        for lane in sorted({layout.lane_of(i)[1] for i in ids}):
            print(lane)
    elif cmd == "drop":
        db.client.drop_database(db.name)
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1])
