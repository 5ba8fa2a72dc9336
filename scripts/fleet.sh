#!/usr/bin/env bash
# A fleet on this machine: 3 Consul servers, a dc2 server, hosts A and B (each with a Consul
# client agent, its own Docker engine, a registrar and a templater with its proxy), all on
# loopback addresses. up | down | status | kill-host a|b | start-host a|b | kill-leader
# FLEET_NET (default 127.0.0) picks the loopback /24, FLEET_STATE the state directory.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "${1:-}" == "up" ]]; then
    "$ROOT/scripts/install-deps.sh"
fi
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m devtools.fleet "$@"
