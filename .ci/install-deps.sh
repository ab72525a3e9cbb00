#!/usr/bin/env bash
# Installs what the gateway's local pipeline and tests need on a Debian machine:
#   base:    mosquitto, redis-server, rabbitmq-server, python3-venv, Go (for FerretDB),
#            chromium (the dashboard's browser tests drive it through Playwright),
#            FerretDB 1.24 built into .cache/bin, and .venv with the package + test extras
#   systemd: + systemd-container, debootstrap (the nspawn tests)
#   deploy:  + ansible, ansible-lint, iptables, curl (the end-to-end deployment)
# Idempotent: only what is missing is installed. Usage: .ci/install-deps.sh [base|systemd|deploy]...
set -euo pipefail
cd "$(dirname "$0")/.."
groups=("${@:-base}")
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

want=()
need() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed" || want+=("$1"); }
need mosquitto; need mosquitto-clients; need redis-server; need rabbitmq-server
need python3-venv; need ca-certificates
# Debian's browser for the Playwright tests (executable /usr/bin/chromium; no browser download).
need chromium
for g in "${groups[@]}"; do
  case "$g" in
    base) ;;
    systemd) need systemd-container; need debootstrap ;;
    deploy) need systemd-container; need debootstrap; need iptables; need curl ;;
    *) echo "unknown group $g" >&2; exit 2 ;;
  esac
done
command -v go >/dev/null || want+=(golang-go)
if [ ${#want[@]} -gt 0 ]; then
  echo "installing: ${want[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${want[@]}" >/dev/null
  # Debian starts what it just installed where it can; the gateway runs its own
  # instances on free ports, and `make run` wants 1883/6379 for itself.
  for svc in mosquitto redis-server rabbitmq-server; do
    if [[ " ${want[*]} " == *" $svc "* ]]; then
      $SUDO service "$svc" stop >/dev/null 2>&1 || true
    fi
  done
fi

.ci/build-ferretdb.sh

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# The default suite lints the playbook, so the deploy tools come with the test extras.
extras=test,deploy
stamp=".venv/.installed-$extras-$(cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[$extras]"
  touch "$stamp"
fi
