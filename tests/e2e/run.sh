#!/usr/bin/env bash
# make e2e: deploy/ansible/site.yml into a fresh Debian bookworm systemd
# container and check the result end to end (tests/e2e/test_deploy.py).
# Needs root, systemd-container, debootstrap and iptables (installed here when
# missing), the venv's ansible (pip install -e '.[deploy,test]') and FerretDB
# in .cache/bin (built by .ci/build-ferretdb.sh when missing or not the
# version the mongodb role sets).
# Extra arguments go to pytest (e.g. -x, -k reboot).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
if [ "$(id -u)" != 0 ]; then
  echo "e2e: needs root (systemd-nspawn, veth, NAT)" >&2
  exit 1
fi
missing=()
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v iptables >/dev/null || missing+=(iptables)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -q "${missing[@]}" >/dev/null
fi
if ! "$PY" -c 'import ansible_collections.community.docker' 2>/dev/null; then
  "$PY" -m pip install -q 'ansible>=9' 'ansible-lint>=24'
fi
.ci/build-ferretdb.sh
start=$(date +%s)
rc=0
"$PY" -m pytest -m e2e tests/e2e -v -p no:cacheprovider "$@" || rc=$?
echo "e2e: $(( $(date +%s) - start )) s in all (exit $rc)"
exit $rc
