#!/usr/bin/env bash
# The main job: install what is missing, then run the sidecar on embedded defaults
# (Consul dev agent and Docker engine started when none answers). Ctrl-C stops it all.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/install-deps.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m devtools.main_job "$@"
