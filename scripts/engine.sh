# Sourced by test.sh and run.sh: start dockerd when no Docker engine answers.
# STARTED_DOCKERD_PID is set only when this shell started it. A dockerd started here reads its
# settings from ENGINE_CONFIG (--config-file), where the drain plugin (sidecar-drain
# --engine-config) adds itself to `authorization-plugins` while it runs; SIDECAR_ENGINE_CONFIG
# and SIDECAR_ENGINE_PID tell the plugin (and the tests) where that is.
STARTED_DOCKERD_PID=""
ENGINE_CONFIG="${ENGINE_CONFIG:-/tmp/consul-sidecar-daemon.json}"

docker_answers() {
    docker info >/dev/null 2>&1
}

ensure_dockerd() {
    if [[ -n "${DOCKER_HOST:-}" ]] || docker_answers; then
        return 0
    fi
    echo "[engine] no Docker engine answers: starting dockerd (log /tmp/consul-sidecar-dockerd.log)" >&2
    echo '{}' >"$ENGINE_CONFIG"  # no plugin until one listens (a killed one may have left itself in)
    dockerd --config-file "$ENGINE_CONFIG" >/tmp/consul-sidecar-dockerd.log 2>&1 &
    STARTED_DOCKERD_PID=$!
    export SIDECAR_ENGINE_CONFIG="$ENGINE_CONFIG" SIDECAR_ENGINE_PID="$STARTED_DOCKERD_PID"
    for _ in $(seq 1 60); do
        docker_answers && return 0
        sleep 0.5
    done
    echo "[engine] dockerd did not answer within 30 s; see /tmp/consul-sidecar-dockerd.log" >&2
    return 1
}

stop_started_dockerd() {
    if [[ -n "$STARTED_DOCKERD_PID" ]] && kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null; then
        kill -TERM "$STARTED_DOCKERD_PID"
        wait "$STARTED_DOCKERD_PID" 2>/dev/null || true
    fi
}
