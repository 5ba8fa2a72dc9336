"""Looking at a running fleet (sidecar/fleet.py) from outside, for its tests and bench/."""

from __future__ import annotations

import http.client
import json
import re
import urllib.request
from typing import Any

from sidecar.fleet import Fleet, Host


def ask(h: Host, http_host: str, path: str = "/index.html", method: str = "GET") -> tuple[int, str]:
    """Status and X-Served-By of one request through the host's proxy."""
    conn = http.client.HTTPConnection(h.ip, h.proxy_port, timeout=5)
    try:
        conn.request(method, path, headers={"Host": http_host})
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("X-Served-By") or ""
    finally:
        conn.close()


def marker(proxy_host: Host, container: Any, on: Host) -> str:
    """What X-Served-By shows through proxy_host for a backend on host `on`: HAProxy the service
    ID (which holds the container name), NGINX the upstream address."""
    if proxy_host.proxy == "haproxy":
        return f"{on.node}:{container.name}:8080"
    container.reload()
    port = container.attrs["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostPort"]
    return f"{on.ip}:{port}"


def seen_through(h: Host, http_host: str, tries: int = 12) -> set[str]:
    seen = set()
    for _ in range(tries):
        status, served = ask(h, http_host)
        if status == 200:
            seen.add(served)
    return seen


def serves_all(fleet: Fleet, proxy_host: Host, http_host: str, backends: list[tuple[Any, str]]) -> bool:
    """Every (container, host name) of backends answers through proxy_host."""
    wanted = {marker(proxy_host, c, fleet.layout.host(on)) for c, on in backends}
    return wanted <= seen_through(proxy_host, http_host, tries=4 * len(wanted))


def metric(h: Host, name: str) -> float:
    """One value from the host's templater /metrics."""
    with urllib.request.urlopen(f"http://{h.ip}:9200/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics of host {h.name}"
    return float(match.group(1))


def catalog(fleet: Fleet, path: str) -> Any:
    """GET path from the first server that answers."""
    for _, ip in fleet.layout.servers:
        try:
            with urllib.request.urlopen(f"http://{ip}:8500{path}", timeout=3) as response:
                return json.loads(response.read())
        except OSError:
            continue
    raise AssertionError("no server answers")


def healthy_voters(fleet: Fleet) -> int:
    try:
        health = catalog(fleet, "/v1/operator/autopilot/health")
    except (AssertionError, ValueError):
        return 0
    return sum(1 for s in health.get("Servers") or [] if s.get("Healthy") and s.get("Voter"))
