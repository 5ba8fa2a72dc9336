#!/usr/bin/env bash
# Build the sidecar image: wheels built on this host (the build itself needs no network),
# then `docker build`. Usage: scripts/build-image.sh [TAG] (default consul-sidecar:latest).
#
# BASE_IMAGE: the image to build on. Default: the local Debian base that scripts/base-image.sh
# makes (no registry needed). Where a registry is reachable, BASE_IMAGE=debian:bookworm-slim
# works too: the Dockerfile installs what that base lacks from Debian's archive.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAG="${1:-consul-sidecar:latest}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
BASE_IMAGE="${BASE_IMAGE:-$("$ROOT/scripts/base-image.sh")}"

log() { printf '[build-image] %s\n' "$*" >&2; }

CONTEXT="$(mktemp -d)"
trap 'rm -rf "$CONTEXT"' EXIT
log "wheels for the project and its dependencies"
"$PYTHON" -m pip wheel --quiet --wheel-dir "$CONTEXT/wheels" "$ROOT"
# pip itself, run from its wheel inside the build: the image needs no python3-venv or ensurepip
"$PYTHON" -m pip download --quiet --no-deps --only-binary :all: --dest "$CONTEXT/wheels" pip
cp -r "$ROOT/Dockerfile" "$ROOT/templates" "$CONTEXT/"
log "docker build -t $TAG (base $BASE_IMAGE)"
docker build --quiet --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$TAG" "$CONTEXT" >/dev/null
log "built $TAG: $(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.1f MB", $1/1e6}')"
echo "$TAG"
