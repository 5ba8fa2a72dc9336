"""Looking at a running fleet (devtools/fleet.py) from outside, for its tests and bench/."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import psutil

from devtools.fleet import Fleet, Host, Layout
from tests.support import wait_until
from tests.traffic import Load


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


def answered_by(h: Host, http_host: str, tries: int) -> set[str] | None:
    """Who answered `tries` requests through h, or None when any of them was not a 200, or when
    a worker of the configuration before a reload is still there to answer the next one."""
    if not old_workers_gone(h):
        return None
    seen = set()
    for _ in range(tries):
        status, served = ask(h, http_host)
        if status != 200:
            return None
        seen.add(served)
    return seen


def old_workers_gone(h: Host) -> bool:
    """NGINX after a reload: until the worker of the configuration before has exited, it may
    still take a connection and answer from that configuration (a 404 for a route just added),
    however many requests the new one answered. HAProxy's old worker stops accepting at once."""
    if h.proxy != "nginx":
        return True
    config = f"/host-{h.name}/nginx.cfg"
    for proc in psutil.process_iter(["cmdline"]):
        if config in " ".join(proc.info["cmdline"] or []) and "master" in " ".join(proc.info["cmdline"] or []):
            try:
                return len(proc.children()) == 1  # worker_processes 1: the new one alone
            except psutil.NoSuchProcess:
                return False
    return False


def only_served(h: Host, http_host: str, wanted: set[str], tries: int = 8) -> bool:
    """Every request answered 200, by exactly the instances wanted, and no worker of an older
    configuration is left to answer the next one."""
    return answered_by(h, http_host, tries) == wanted


def serves_all(fleet: Fleet, proxy_host: Host, http_host: str, backends: list[tuple[Any, str]]) -> bool:
    """Every (container, host name) of backends answers through proxy_host, and no request fails."""
    wanted = {marker(proxy_host, c, fleet.layout.host(on)) for c, on in backends}
    seen = answered_by(proxy_host, http_host, 4 * len(wanted))
    return seen is not None and wanted <= seen


@contextlib.contextmanager
def running_fleet(layout: Layout) -> Iterator[Fleet]:
    """A fleet up for a test module, down afterwards (also when it failed to come up)."""
    fleet = Fleet(layout)
    try:
        fleet.up(demo=False)
        yield fleet
    finally:
        fleet.down()


def metric(h: Host, name: str) -> float:
    """One value from the host's templater /metrics."""
    with urllib.request.urlopen(f"http://{h.ip}:9200/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics of host {h.name}"
    return float(match.group(1))


def catalog(fleet: Fleet, path: str) -> Any:
    """GET path from the first server that answers (with the management token of a secure fleet)."""
    token = fleet.management_token
    for _, ip in fleet.layout.servers:
        request = urllib.request.Request(f"http://{ip}:8500{path}", headers={"X-Consul-Token": token} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=3) as response:
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


def load(h: Host, http_host: str) -> Load:
    """Load through the host's proxy: a new connection per request, a quarter POST."""
    return Load(h.proxy_port, http_host, address=h.ip)


def no_failures(*loads: Load) -> None:
    for lo in loads:
        assert lo.ok > 50, lo
        assert lo.failures == [], (lo.address, lo.failures[:10])


def leader_loss(fleet: Fleet) -> None:
    """Kill the leader under load through both proxies: no failed request, no configuration
    changed or proxy reloaded by the election; then kill the next leader and start a container
    during that election: routable within 2 s of the new leader."""
    a, b = fleet.layout.hosts
    backends = [(fleet.run_web(on, service="ll", http_host="ll.fleet.test"), on) for on in ("a", "a", "b")]
    for ph in (a, b):
        wait_until(lambda ph=ph: serves_all(fleet, ph, "ll.fleet.test", backends), timeout=30, what="ll served")

    def snapshot() -> list[tuple[str, float]]:
        return [(fleet.proxy_config(h).read_text(), metric(h, "templater_reloads_total")) for h in (a, b)]

    with load(a, "ll.fleet.test") as load_a, load(b, "ll.fleet.test") as load_b:
        time.sleep(1)
        before = snapshot()
        old = fleet.leader()
        killed_at = time.monotonic()
        fleet.kill(old)
        new = wait_until(lambda: fleet.leader() not in ("", old) and fleet.leader(), timeout=30, interval=0.05,
                         what="a new leader")  # fmt: skip
        election = time.monotonic() - killed_at
        time.sleep(3)  # anything the election would make the templaters do, they have done by now
        assert snapshot() == before, "a configuration changed or a proxy reloaded because of the election"
        fleet.start_server(old)
        wait_until(lambda: healthy_voters(fleet) == 3, timeout=60, what="3 healthy voters again")

        # a container started while the servers elect a leader
        old = fleet.leader()
        fleet.kill(old)
        started = fleet.run_web("a", service="ll", http_host="ll.fleet.test")
        wait_until(lambda: fleet.leader() not in ("", old), timeout=30, interval=0.02, what="a new leader")
        leader_at = time.monotonic()
        wait_until(lambda: marker(a, started, a) in seen_through(a, "ll.fleet.test", 4), timeout=30,
                   interval=0.02, what="the new container routable")  # fmt: skip
        routable = time.monotonic() - leader_at
        fleet.start_server(old)
        wait_until(lambda: healthy_voters(fleet) == 3, timeout=60, what="3 healthy voters again")
        time.sleep(1)
    print(f"leader loss: election {election:.2f} s (new leader {new}); container started during an election "
          f"routable {routable:.2f} s after the new leader; requests A {load_a.ok} B {load_b.ok}")  # fmt: skip
    no_failures(load_a, load_b)
    assert routable <= 2.0
    for c, _ in [*backends, (started, "a")]:
        c.remove(force=True)
