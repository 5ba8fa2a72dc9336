"""The fleet as production runs it (issue 12): every Consul agent with ACLs in default-deny mode
and TLS (verify incoming and outgoing, server host names), the registrars and templaters on
HTTPS with client certificates and the least-privilege tokens of deploy/consul-policies, read
from files (devtools/fleet.py with secure=True)."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from devtools.fleet import Fleet, Layout
from tests.fleet_support import catalog, leader_loss, marker, running_fleet, seen_through
from tests.support import wait_until

pytestmark = pytest.mark.integration

NET = os.environ.get("FLEET_SECURE_TEST_NET", "127.0.5")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, docker_engine: Any) -> Iterator[Fleet]:
    with running_fleet(Layout(state=tmp_path_factory.mktemp("secure-fleet"), net=NET, secure=True)) as fleet:
        yield fleet


def anonymous(fleet: Fleet, path: str) -> Any:
    with urllib.request.urlopen(f"http://{fleet.layout.servers[0][1]}:8500{path}", timeout=5) as response:
        return json.loads(response.read())


def test_secure_fleet_routes_across_hosts_with_least_privilege(fleet: Fleet) -> None:
    a, b = fleet.layout.hosts
    backends = [(fleet.run_web(on, service="sx", http_host="sx.fleet.test"), on) for on in ("a", "b")]
    for ph in (a, b):
        wanted = {marker(ph, c, fleet.layout.host(on)) for c, on in backends}
        wait_until(lambda ph=ph, wanted=wanted: wanted <= seen_through(ph, "sx.fleet.test", 8), timeout=40,
                   what=f"both instances through host {ph.name}")  # fmt: skip
    # the catalog holds them, and an anonymous client sees none of it
    assert {e["Node"]["Node"] for e in catalog(fleet, "/v1/health/service/sx?passing")} == {"host-a", "host-b"}
    assert "sx" not in anonymous(fleet, "/v1/catalog/services")
    tokens = [(fleet.layout.host_dir(h) / f"{part}.token").read_text().strip()
              for h in (a, b) for part in ("registrar", "templater")]  # fmt: skip
    for h in (a, b):
        for part in ("registrar", "templater"):
            proc = fleet.procs.process(f"{part}-{h.name}")
            assert proc is not None
            cmdline = " ".join(proc.cmdline())
            assert f"https://{h.ip}:8501" in cmdline and "--token-file" in cmdline and "--cert-file" in cmdline
            assert not any(t in cmdline for t in tokens)
            assert (fleet.layout.host_dir(h) / f"{part}.token").stat().st_mode & 0o777 == 0o600
    printed = "".join(p.read_text(errors="replace") for p in fleet.logs.glob("*.log"))
    assert not any(t in printed for t in [*tokens, fleet.management_token])
    cmdlines = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    assert not any(fleet.management_token in c for c in cmdlines)
    for c, _ in backends:
        c.remove(force=True)


def test_secure_fleet_leader_loss(fleet: Fleet) -> None:
    """The same leader loss as the open fleet, through TLS and ACLs: no failed request, nothing
    reloaded by the election, a container started during an election routable within 2 s."""
    leader_loss(fleet)
