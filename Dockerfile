# The sidecar image: registrar and templater (one image, two commands), HAProxy and NGINX inside.
#
# Build with scripts/build-image.sh: it builds the wheels on the host and uses a local Debian
# base (scripts/base-image.sh, no registry needed). With a registry, any Debian bookworm image
# works as the base: BASE_IMAGE=debian:bookworm-slim scripts/build-image.sh.
#
#   docker run -d --name registrar --net host --group-add "$(stat -c %g /var/run/docker.sock)" \
#       -v /var/run/docker.sock:/var/run/docker.sock consul-sidecar registrar --ip 10.0.0.5
#   docker run -d --name templater --net host consul-sidecar \
#       templater --proxy haproxy --template /templates/haproxy.cfg.j2:/run/consul-sidecar/haproxy.cfg
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
# the local base has python3 already; a stock Debian image gets it from Debian's archive
RUN python3 -c 'import venv' 2>/dev/null \
 || (apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*)
COPY wheels /wheels
# a venv without pip, filled by pip run from its own wheel (no python3-venv, no pip left inside)
RUN python3 -m venv --without-pip /opt/sidecar \
 && set -- /wheels/pip-*.whl \
 && /opt/sidecar/bin/python "$1/pip" install --no-cache-dir --no-index --find-links /wheels consul-sidecar \
 && find /opt/sidecar -name '__pycache__' -prune -exec rm -rf {} + \
 && /opt/sidecar/bin/python -m compileall -q /opt/sidecar/lib

FROM ${BASE_IMAGE}
# what a stock base lacks comes from Debian's archive; the proxies get the capability to bind
# ports below 1024 without root
RUN set -e; \
    missing=""; \
    for p in python3:python3 haproxy:haproxy nginx:nginx-light tini:tini setcap:libcap2-bin; do \
        command -v "${p%%:*}" >/dev/null || missing="$missing ${p#*:}"; \
    done; \
    if [ -n "$missing" ]; then \
        apt-get update && apt-get install -y --no-install-recommends $missing && rm -rf /var/lib/apt/lists/*; \
    fi; \
    id sidecar >/dev/null 2>&1 || useradd --uid 10001 --user-group --create-home \
        --home-dir /var/lib/sidecar --shell /usr/sbin/nologin sidecar; \
    setcap cap_net_bind_service=+ep "$(readlink -f "$(command -v haproxy)")"; \
    setcap cap_net_bind_service=+ep "$(readlink -f "$(command -v nginx)")"; \
    install -d -o sidecar -g sidecar /run/consul-sidecar /var/lib/nginx /var/log/nginx
COPY --from=build /opt/sidecar /opt/sidecar
COPY templates /templates
# In a container the templater is PID 1's child: stopping the container stops the proxy too,
# gracefully, and the proxy's output goes to the container's log. Both serve /health here.
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TEMPLATER_STOP_PROXY=1 \
    TEMPLATER_STATUS_ADDR=127.0.0.1:9200 \
    REGISTRAR_STATUS_ADDR=127.0.0.1:9201
USER sidecar
WORKDIR /var/lib/sidecar
ENTRYPOINT ["/usr/bin/tini", "--"]
HEALTHCHECK --interval=5s --timeout=3s --start-period=15s --retries=3 CMD ["sidecar-healthcheck"]
CMD ["registrar"]
