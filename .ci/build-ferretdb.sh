#!/usr/bin/env bash
# Builds FerretDB (a MongoDB-wire server; SQLite backend) into $1 (default .cache/bin).
# The version is the deployment's: mongodb_ferretdb_version in
# deploy/ansible/roles/mongodb/defaults/main.yml, its one place
# (`.ci/build-ferretdb.sh --print-version` prints it; tests/test_versions.py).
# `go install …@vX.Y.Z` alone panics at start-up: the module lacks the
# build/version/version.txt its release builds generate, so we build from a
# copy of the module source with that file written.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEFAULTS="$ROOT/deploy/ansible/roles/mongodb/defaults/main.yml"
VERSION=v$(sed -nE 's/^mongodb_ferretdb_version:[[:space:]]*"?([0-9]+\.[0-9]+\.[0-9]+)"?[[:space:]]*$/\1/p' "$DEFAULTS")
if [ "$VERSION" = v ]; then
  echo "build-ferretdb: no mongodb_ferretdb_version: \"X.Y.Z\" line in $DEFAULTS" >&2
  exit 1
fi
if [ "${1:-}" = --print-version ]; then
  echo "$VERSION"
  exit 0
fi
DEST=${1:-$ROOT/.cache/bin}
# A binary for another architecture (GOARCH=arm64 ...) cannot run here to say its version.
native=yes
if command -v go >/dev/null && [ "$(go env GOARCH)" != "$(go env GOHOSTARCH)" ]; then
  native=no
fi
# Output captured and matched without a pipe: a `grep -q` that stops reading
# early kills the writer with SIGPIPE, which pipefail reports as a failure.
if [ "$native" = yes ] && [ -x "$DEST/ferretdb" ]; then
  have=$'\n'$("$DEST/ferretdb" --version 2>/dev/null || true)$'\n'
  if [[ $have == *$'\n'"version: ${VERSION}"$'\n'* ]]; then
    exit 0
  fi
fi
command -v go >/dev/null || { echo "go is needed to build FerretDB (apt-get install golang-go)" >&2; exit 1; }
work=$(mktemp -d)
trap 'chmod -R u+w "$work"; rm -rf "$work"' EXIT
cd "$work"
GOFLAGS=-mod=mod go mod download -json "github.com/FerretDB/FerretDB@${VERSION}" > dl.json
src=$(python3 -c 'import json,sys; print(json.load(open("dl.json"))["Dir"])')
cp -r "$src" ferretdb-src
chmod -R u+w ferretdb-src
cd ferretdb-src
echo "${VERSION}" > build/version/version.txt
mkdir -p "$DEST"
CGO_ENABLED=0 go build -trimpath -o "$DEST/ferretdb" ./cmd/ferretdb
if [ "$native" = yes ]; then
  have=$("$DEST/ferretdb" --version)
  echo "${have%%$'\n'*}"
else
  echo "FerretDB ${VERSION} for $(go env GOOS)/$(go env GOARCH) in $DEST/ferretdb"
fi
