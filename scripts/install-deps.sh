#!/usr/bin/env bash
# Install everything the sidecar and its tests need on a Debian bookworm machine, as root.
# Idempotent: each step is skipped when what it provides is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"

log() { printf '[install] %s\n' "$*" >&2; }

need_apt=()
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
command -v haproxy >/dev/null 2>&1 || need_apt+=(haproxy)
command -v nginx >/dev/null 2>&1 || need_apt+=(nginx-light)
[[ -f /usr/lib/nginx/modules/ngx_stream_module.so ]] || need_apt+=(libnginx-mod-stream)  # TCP routes
command -v consul >/dev/null 2>&1 || need_apt+=(consul)
command -v busybox >/dev/null 2>&1 || need_apt+=(busybox-static)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v ss >/dev/null 2>&1 || need_apt+=(iproute2)
command -v mmdebstrap >/dev/null 2>&1 || need_apt+=(mmdebstrap)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
command -v named >/dev/null 2>&1 || need_apt+=(bind9)  # tests' authoritative server (external DNS)
command -v dig >/dev/null 2>&1 || need_apt+=(bind9-dnsutils)  # dig, nsupdate

if ((${#need_apt[@]})); then
    # Consul is packaged only in bullseye: add that suite with a low pin so that
    # nothing else is taken from it.
    if [[ " ${need_apt[*]} " == *" consul "* ]] && [[ ! -f /etc/apt/sources.list.d/bullseye.sources ]]; then
        log "adding the bullseye suite for consul"
        cat >/etc/apt/sources.list.d/bullseye.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        cat >/etc/apt/preferences.d/bullseye-pin <<'EOF'
Package: *
Pin: release n=bullseye
Pin-Priority: 100
EOF
    fi
    log "apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # No packaged service may start (BIND as a resolver would query the root servers): the
    # tests start what they need on their own ports. policy-rc.d is Debian's switch for that.
    made_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    if [[ -n "$made_policy" ]]; then rm -f /usr/sbin/policy-rc.d; fi
    if [[ " ${need_apt[*]} " == *" bind9 "* ]] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now named >/dev/null 2>&1 || true
    fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import registrar, templater, consul, docker, jinja2, watchdog, psutil, pytest' 2>/dev/null \
    || [[ "$ROOT/pyproject.toml" -nt "$VENV/.installed" ]]; then
    log "pip install -e .[dev]"
    "$VENV/bin/pip" install -q -e "$ROOT[dev]"
    touch "$VENV/.installed"
fi

# `docker compose` (Compose v2, a CLI plugin): bookworm has only docker-compose 1.29. Take the
# plugin binary alone from trixie's docker-compose package (it needs only libc6); the 1.29
# command stays as it is.
if ! docker compose version >/dev/null 2>&1; then
    log "docker compose: the CLI plugin from trixie's docker-compose 2.26.1-4"
    apt_dir="$(mktemp -d)"
    chmod 755 "$apt_dir"  # apt's _apt user fetches into it
    echo "deb http://deb.debian.org/debian trixie main" >"$apt_dir/sources.list"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=-
              -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -qq)
    apt-get "${apt_opts[@]}" update
    (cd "$apt_dir" && apt-get "${apt_opts[@]}" download docker-compose=2.26.1-4 2>/dev/null)
    dpkg-deb --fsys-tarfile "$apt_dir"/docker-compose_2.26.1-4_amd64.deb \
        | tar -x -C "$apt_dir" ./usr/libexec/docker/cli-plugins/docker-compose
    install -D -m 755 "$apt_dir/usr/libexec/docker/cli-plugins/docker-compose" \
        /usr/local/lib/docker/cli-plugins/docker-compose
    rm -rf "$apt_dir"
fi
