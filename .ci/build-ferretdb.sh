#!/usr/bin/env bash
# Builds FerretDB 1.24.2 (a MongoDB-wire server; SQLite backend) into $1 (default .cache/bin).
# `go install …@v1.24.2` alone panics at start-up: the module lacks the
# build/version/version.txt its release builds generate, so we build from a
# copy of the module source with that file written.
set -euo pipefail
VERSION=v1.24.2
DEST=${1:-$(cd "$(dirname "$0")/.." && pwd)/.cache/bin}
if [ -x "$DEST/ferretdb" ] && "$DEST/ferretdb" --version 2>/dev/null | grep -q "${VERSION}"; then
  exit 0
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
"$DEST/ferretdb" --version | head -1
