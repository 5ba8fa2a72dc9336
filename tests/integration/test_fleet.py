"""A fleet on loopback addresses (issue 11): 3 Consul servers, a dc2 server, hosts A (HAProxy)
and B (NGINX) with their own agents, engines, registrars and templaters (devtools/fleet.py, the
code behind scripts/fleet.sh). Load: a new connection per request, a quarter POST."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.fleet import Fleet, Host, Layout
from tests.dns_support import BindServer, dig
from tests.fleet_support import (
    catalog,
    leader_loss,
    load,
    marker,
    metric,
    no_failures,
    only_served,
    running_fleet,
    serves_all,
)
from tests.support import ROOT, Process, wait_until

pytestmark = pytest.mark.integration

NET = os.environ.get("FLEET_TEST_NET", "127.0.1")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, docker_engine: Any) -> Iterator[Fleet]:
    with running_fleet(Layout(state=tmp_path_factory.mktemp("fleet"), net=NET)) as fleet:
        yield fleet


def host(fleet: Fleet, name: str) -> Host:
    return fleet.layout.host(name)


def test_cross_host_routing(fleet: Fleet) -> None:
    """A service with instances on A and B is served through both hosts' proxies (HAProxy on A,
    NGINX on B), from both hosts' instances."""
    backends = [(fleet.run_web(on, service="xhost", http_host="xhost.fleet.test"), on) for on in ("a", "b", "b")]
    for proxy_host in fleet.layout.hosts:
        wait_until(lambda ph=proxy_host: serves_all(fleet, ph, "xhost.fleet.test", backends), timeout=30,
                   what=f"every instance served through host {proxy_host.name}")  # fmt: skip
    nodes = {e["Node"]["Node"] for e in catalog(fleet, "/v1/health/service/xhost?passing")}
    assert nodes == {"host-a", "host-b"}
    # host A's routes page: the route with both hosts' instances, and the fleet's proxies (issue 26)
    a, b = host(fleet, "a"), host(fleet, "b")
    with urllib.request.urlopen(f"http://{a.ip}:9200/api/routes", timeout=10) as response:
        page = json.loads(response.read())
    (route,) = [r for r in page["routes"] if r["service"] == "xhost"]
    assert {i["node"] for i in route["instances"] if i["routed"]} == {"host-a", "host-b"}
    assert {f["node"]: f["page"] for f in page["fleet"]} == {
        "host-a": f"http://{a.ip}:9200/routes",
        "host-b": f"http://{b.ip}:9200/routes",
    }
    for c, _ in backends:
        c.remove(force=True)
    # each host's engine asks its drain plugin first (issue 25): host A's backend was drained
    drained = (fleet.logs / "drain-a.log").read_text()
    assert "drained call='remove" in drained and backends[0][0].name in drained, drained[-2000:]


def test_leader_loss(fleet: Fleet) -> None:
    """The leader is killed under load: no failed request through either proxy, no configuration
    emptied or reloaded by the election, and a container started during an election is
    routable within 2 s of the new leader."""
    leader_loss(fleet)


def test_quorum_loss(fleet: Fleet) -> None:
    """2 of 3 servers stopped for 30 s: both proxies keep serving live backends with no failed
    request; a registrar keeps registering in its agent; a templater restarted meanwhile renders
    from stale reads (--max-stale) and says so; the catalog converges when the servers return."""
    a, b = fleet.layout.hosts
    backends = [(fleet.run_web(on, service="ql", http_host="ql.fleet.test"), on) for on in ("a", "b")]
    for ph in (a, b):
        wait_until(lambda ph=ph: serves_all(fleet, ph, "ql.fleet.test", backends), timeout=30, what="ql served")
    leader = fleet.leader()
    stopped = [leader, next(n for n, _ in fleet.layout.servers if n != leader)]
    with load(a, "ql.fleet.test") as load_a, load(b, "ql.fleet.test") as load_b:
        time.sleep(1)
        for name in stopped:
            fleet.kill(name, signal.SIGTERM)
        down_at = time.monotonic()
        wait_until(lambda: fleet.leader() == "", timeout=30, what="no leader")

        # the registrar goes on registering in its own agent
        during = fleet.run_web("a", service="ql", http_host="ql.fleet.test")
        agent_ids = wait_until(
            lambda: [s["ID"] for s in agent_services(a).values() if during.name in s["ID"]], timeout=15,
            what="the new container in host A's agent",
        )  # fmt: skip

        # a templater restarted without quorum renders from stale reads
        fleet.procs.stop("templater-b")
        log_mark = log_size(fleet, "templater-b")
        renders_before = 0.0
        fleet.start_templater(b, "--max-stale", "1h")
        wait_until(lambda: metric(b, "templater_renders_total") > renders_before, timeout=30,
                   what="the restarted templater rendered")  # fmt: skip
        wait_until(lambda: metric(b, "templater_consul_known_leader") == 0, timeout=5, what="known_leader 0")
        assert metric(b, "templater_consul_last_contact_seconds") > 1
        text = fleet.proxy_config(b).read_text()
        for c, on in backends:
            assert marker(b, c, host(fleet, on)).split(":")[0] in text
        wait_until(lambda: "rendering from stale reads" in log_tail(fleet, "templater-b", log_mark), timeout=10,
                   what="the stale-read notice in the log")  # fmt: skip
        dry = subprocess.run(
            [sys.executable, "-m", "templater", "--consul", a.consul_url, "--once", "--dry", "--max-stale", "1h",
             "--template", f"{ROOT / 'templates' / 'haproxy.cfg.j2'}:/dev/null"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert dry.returncode == 0, dry.stderr[-2000:]
        assert all(c.name in dry.stdout for c, _ in backends), dry.stdout[-3000:]
        assert "rendering from stale reads" in dry.stderr

        time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        for name in stopped:
            fleet.start_server(name)
        fleet.wait_leader()
        wait_until(lambda: agent_ids[0] in passing_ids(fleet, "ql"), timeout=60,
                   what="the container registered during the outage in the catalog")  # fmt: skip
        for ph in (a, b):
            wait_until(lambda ph=ph: serves_all(fleet, ph, "ql.fleet.test", [*backends, (during, "a")]), timeout=30,
                       what="the new container routable")  # fmt: skip
        wait_until(lambda: metric(b, "templater_consul_known_leader") == 1, timeout=30, what="fresh reads again")
        time.sleep(0.5)
    print(f"quorum loss: requests A {load_a.ok} B {load_b.ok} over {time.monotonic() - down_at:.0f} s")
    no_failures(load_a, load_b)
    fleet.procs.stop("templater-b")
    fleet.start_templater(b)
    fleet.wait_host(b)
    for c, _ in [*backends, (during, "a")]:
        c.remove(force=True)


def passing_ids(fleet: Fleet, service: str) -> set[str]:
    return {e["Service"]["ID"] for e in catalog(fleet, f"/v1/health/service/{service}?passing")}


def agent_services(h: Host) -> dict[str, Any]:
    with urllib.request.urlopen(f"{h.consul_url}/v1/agent/services", timeout=5) as response:
        return dict(json.loads(response.read()))


def log_size(fleet: Fleet, name: str) -> int:
    path = fleet.logs / f"{name}.log"
    return path.stat().st_size if path.exists() else 0


def log_tail(fleet: Fleet, name: str, offset: int) -> str:
    with open(fleet.logs / f"{name}.log", "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def test_second_datacenter_reads_and_failover(fleet: Fleet) -> None:
    """service(name, dc="dc2") reads the WAN-joined datacenter; with failover_dc=dc2 the bundled
    template routes to dc2's instances while none passes here, and back when one does."""
    a, _ = fleet.layout.hosts
    dc2_ip = fleet.layout.dc2_server[1]
    remote = fleet.run_web("a", service="fo", http_host="fo.fleet.test", SERVICE_IGNORE="1")
    remote.reload()
    port = int(remote.attrs["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostPort"])
    registration = {
        "ID": "fo-dc2", "Name": "fo", "Address": a.ip, "Port": port, "Meta": {"http_host": "fo.fleet.test"},
        "Check": {"HTTP": f"http://{a.ip}:{port}/index.html", "Interval": "1s"},
    }  # fmt: skip
    request = urllib.request.Request(f"http://{dc2_ip}:8500/v1/agent/service/register",
                                     data=json.dumps(registration).encode(), method="PUT")  # fmt: skip
    urllib.request.urlopen(request, timeout=5).close()
    template = fleet.layout.state / "dc2.j2"
    template.write_text('{% for i in service("fo", dc="dc2") %}{{ i.id }} {{ i.address }}:{{ i.port }}\n{% endfor %}')
    wait_until(
        lambda: f"fo-dc2 {a.ip}:{port}" in subprocess.run(
            [sys.executable, "-m", "templater", "--consul", a.consul_url, "--once", "--dry",
             "--template", f"{template}:/dev/null"], capture_output=True, text=True, timeout=60, cwd=ROOT).stdout,
        timeout=30, what="service('fo', dc='dc2') read through host A's agent",
    )  # fmt: skip

    hosts = fleet.layout.hosts  # A: HAProxy, B: NGINX
    for h in hosts:
        fleet.procs.stop(f"templater-{h.name}")
        fleet.start_templater(h, "--var", "failover_dc=dc2")
    for h in hosts:
        fleet.wait_host(h)
    local = fleet.run_web("a", service="fo", http_host="fo.fleet.test")
    remote_marker = {"haproxy": "fo-dc2", "nginx": f"{a.ip}:{port}"}
    for h in hosts:
        wait_until(lambda h=h: only_served(h, "fo.fleet.test", {marker(h, local, a)}), timeout=30,
                   what=f"only the local instance served through {h.name}")  # fmt: skip
    with load(a, "fo.fleet.test") as lo_a, load(hosts[1], "fo.fleet.test") as lo_b:
        time.sleep(1)
        local.stop(timeout=5)
        for h in hosts:
            wait_until(lambda h=h: only_served(h, "fo.fleet.test", {remote_marker[h.proxy]}, 4), timeout=15,
                       what=f"failover to dc2 through {h.name}")  # fmt: skip
        back = fleet.run_web("a", service="fo", http_host="fo.fleet.test")
        for h in hosts:
            wait_until(lambda h=h: only_served(h, "fo.fleet.test", {marker(h, back, a)}, 4), timeout=30,
                       what=f"back to the local instance through {h.name}")  # fmt: skip
        time.sleep(0.5)
    no_failures(lo_a, lo_b)
    for h in hosts:
        fleet.procs.stop(f"templater-{h.name}")
        fleet.start_templater(h)
    for h in hosts:
        fleet.wait_host(h)
    urllib.request.urlopen(
        urllib.request.Request(f"http://{dc2_ip}:8500/v1/agent/service/deregister/fo-dc2", method="PUT"), timeout=5
    ).close()
    for c in (remote, local, back):
        c.remove(force=True)


def test_host_loss_and_return(fleet: Fleet, tmp_path: Path) -> None:
    """Host B dies at once (SIGKILL to its agent, registrar, templater, proxy, containers and
    engine). Through A: no failed GET, and B's instances leave A's configuration within Consul's
    failure detection. B comes back: its containers are registered again with no manual step,
    and the entry of a container that did not come back is cleaned. External DNS (a templater
    with --dns-zone on A's agent, a real BIND) follows: B's proxy address leaves the service's
    record with B and comes back with it."""
    a, b = fleet.layout.hosts
    bind = BindServer(tmp_path / "bind", "fleet.test")
    bind.start()
    dns = Process("templater", ["--consul", a.consul_url, "--dns-zone", "fleet.test", "--dns-server",
                                f"127.0.0.1:{bind.port}", "--dns-key-file", str(bind.key_file),
                                "--dns-sync-interval", "2s"], tmp_path)  # fmt: skip
    try:
        host_loss_and_return(fleet, a, b, bind)
    finally:
        dns.stop()
        bind.stop()


def host_loss_and_return(fleet: Fleet, a: Host, b: Host, bind: BindServer) -> None:
    on_a = [fleet.run_web("a", service="hl", http_host="hl.fleet.test") for _ in range(2)]
    kept = [fleet.run_web("b", service="hl", http_host="hl.fleet.test", restart=True) for _ in range(2)]
    gone = fleet.run_web("b", service="hl", http_host="hl.fleet.test")
    backends = [*((c, "a") for c in on_a), *((c, "b") for c in [*kept, gone])]
    wait_until(lambda: serves_all(fleet, a, "hl.fleet.test", backends), timeout=30, what="hl served through A")
    both = sorted([a.ip, b.ip])
    wait_until(lambda: dig(bind.port, "hl.fleet.test") == both, timeout=15, what="both proxies in DNS")
    config = fleet.proxy_config(a)
    with load(a, "hl.fleet.test") as lo:
        time.sleep(1)
        killed_at = time.monotonic()
        fleet.kill_host("b")
        wait_until(lambda: f"{b.ip}:" not in config.read_text(), timeout=60, interval=0.05,
                   what="B's instances out of A's configuration")  # fmt: skip
        detected = time.monotonic() - killed_at
        wait_until(lambda: dig(bind.port, "hl.fleet.test") == [a.ip], timeout=10, what="B's proxy out of DNS")
        dns_detected = time.monotonic() - killed_at
        time.sleep(1)
    print(f"host loss: B's proxy out of DNS {dns_detected:.2f} s after the kill")
    print(f"host loss: B's instances out of A's configuration {detected:.2f} s after the kill; "
          f"{lo.ok} requests, {len(lo.failures)} failed ({lo.get_failures} GET)")  # fmt: skip
    assert lo.ok > 50
    assert lo.get_failures == 0, lo.failures[:10]
    # Consul's LAN failure detection: probe every 1 s, suspicion 4 x log10(nodes) x 1 s, which
    # confirmations from the other members shorten; 10 s is well beyond it
    assert detected < 10 and dns_detected < 12

    fleet.start_host("b")
    names = {c.name for c in kept}

    def b_services() -> set[str]:
        entries = catalog(fleet, "/v1/health/service/hl?passing")
        return {e["Service"]["ID"].split(":")[1] for e in entries if e["Node"]["Node"] == "host-b"}

    wait_until(lambda: b_services() == names, timeout=60, what="B's restarted containers registered, the gone one not")
    node = catalog(fleet, "/v1/catalog/node/host-b")
    assert not any(gone.name in sid for sid in node["Services"]), "the gone container's entry was not cleaned"
    client = fleet.docker(b)
    restarted = [client.containers.get(c.id) for c in kept]
    now = [*((c, "a") for c in on_a), *((c, "b") for c in restarted)]
    wait_until(lambda: serves_all(fleet, a, "hl.fleet.test", now), timeout=30, what="B's instances through A again")
    wait_until(lambda: dig(bind.port, "hl.fleet.test") == both, timeout=30, what="B's proxy back in DNS")
    for c in [*restarted, client.containers.get(gone.id)]:
        c.remove(force=True)
    client.close()
    for c in on_a:
        c.remove(force=True)
