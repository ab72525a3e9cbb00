#!/usr/bin/env bash
# The systemd tests (`make test-systemd`): the units inside a real systemd in a
# systemd-nspawn container, plus the static unit checks. Needs root.
#   - installs what is missing (systemd-container, debootstrap, FerretDB, .venv);
#   - builds the Debian bookworm rootfs once (about 90 s; cached in
#     $SG_ROOTFS_CACHE, default /var/cache/sensor-gateway);
#   - boots a throwaway copy with a private network, installs the gateway and
#     runs pytest -m systemd. Extra arguments go to pytest (e.g. -k watchdog).
set -euo pipefail
cd "$(dirname "$0")/../.."
.ci/install-deps.sh base systemd
PY=.venv/bin/python
start=$(date +%s)
"$PY" -m tests.systemd.nspawn >/dev/null
rc=0
"$PY" -m pytest -p no:cacheprovider -m "not e2e" tests/test_units_static.py tests/systemd "$@" || rc=$?
echo "systemd tests: $(( $(date +%s) - start )) s (exit $rc)"
exit $rc
