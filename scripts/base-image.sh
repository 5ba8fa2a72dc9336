#!/usr/bin/env bash
# Make the sidecar's Debian bookworm base image locally, with no container registry:
# mmdebstrap from Debian's archive, then `docker import`. Prints the image tag.
#
# The tag carries a hash of this script (the package list and the hooks live here), so an
# existing image is reused and a changed list makes a new one. Needs root, mmdebstrap and a
# Docker engine. MIRROR overrides the archive (default: http://deb.debian.org/debian).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
# no python3-venv: the image's venv is made --without-pip and filled by pip run from its wheel
PACKAGES=python3,haproxy,nginx-light,libnginx-mod-stream,tini,ca-certificates,libcap2-bin
HASH="$(sha256sum "$HERE/base-image.sh" | cut -c1-12)"
TAG="consul-sidecar-base:bookworm-$HASH"

log() { printf '[base-image] %s\n' "$*" >&2; }

if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "$TAG"
    exit 0
fi
if ! command -v mmdebstrap >/dev/null 2>&1; then
    log "mmdebstrap is missing: apt-get install mmdebstrap (scripts/install-deps.sh does)"
    exit 1
fi
log "building $TAG from $MIRROR (bookworm, minbase + $PACKAGES)"
started=$(date +%s)
# documentation, man pages and translations are left out; apt lists and caches are removed;
# the unprivileged user `sidecar` (uid 10001) is created for the image to run as
# merged /usr by mmdebstrap's own hook, not the usrmerge package (which pulls in 47 MB of perl)
mmdebstrap --variant=minbase --include="$PACKAGES" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='chroot "$1" useradd --uid 10001 --user-group --create-home --home-dir /var/lib/sidecar --shell /usr/sbin/nologin sidecar' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log' \
    --quiet bookworm - "$MIRROR" \
    | docker import --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
log "built $TAG in $(( $(date +%s) - started )) s"
echo "$TAG"
