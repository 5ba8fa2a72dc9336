#!/usr/bin/env bash
# Run the whole test suite on a Debian bookworm machine, as root.
# Installs what is missing, starts dockerd when no engine answers (and stops it
# afterwards, by PID, only if it started it), then runs pytest.
# pytest's exit code 5 ("no tests collected") is reported as a failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/install-deps.sh"
# shellcheck source=scripts/engine.sh
source "$ROOT/scripts/engine.sh"
ensure_dockerd
trap stop_started_dockerd EXIT

cd "$ROOT"
rc=0
"$ROOT/.venv/bin/python" -m pytest "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "[test] pytest collected no tests: failing" >&2
    rc=1
fi
exit $rc
