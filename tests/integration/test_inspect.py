"""Registrations that explain themselves where users look: the HTTP API the Consul UI reads."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import ROOT, UnixSocketForwarder, free_port, scrape, wait_until
from tests.traffic import get

TEMPLATES = ROOT / "templates"

pytestmark = pytest.mark.integration


def ui_service(consul, name: str) -> dict:
    """The row the UI's services list shows for one service."""
    return next(s for s in consul.get("/v1/internal/ui/services") if s["Name"] == name)


def instance(consul, name: str, sid: str) -> dict:
    """One instance as the UI's service page reads it: /v1/health/service/<name>."""
    return next(e for e in consul.health(name) if e["Service"]["ID"] == sid)


def test_instance_meta_and_check_names_say_where_it_comes_from(consul, containers, registrar, hostname):
    registrar()
    c = containers.run(labels={"SERVICE_NAME": "explained", "SERVICE_CHECK_HTTP": "/index.html",
                               "SERVICE_CHECK_INTERVAL": "7s"})  # fmt: skip
    sid = f"{hostname}:{c.name}:8080"
    wait_until(lambda: consul.health("explained", passing=True), what="passing")
    entry = instance(consul, "explained", sid)
    meta = entry["Service"]["Meta"]
    assert meta["container_name"] == c.name
    assert meta["container_id"] == c.id[:12]
    assert meta["image"] == c.attrs["Config"]["Image"]
    assert meta["registrar_host"] == hostname
    [check] = [ch for ch in entry["Checks"] if ch["ServiceID"] == sid]
    assert check["Name"] == "HTTP GET /index.html every 7s"
    assert check["Notes"] == f"Registered by the registrar on {hostname} for container {c.name}"
    assert ui_service(consul, "explained")["InstanceCount"] == 1


def test_docker_healthcheck_check_is_named_for_what_it_follows(consul, containers, registrar, hostname):
    registrar()
    c = containers.run(
        labels={"SERVICE_NAME": "dockerhc"}, healthcheck={"test": ["CMD", "true"], "interval": 500_000_000}
    )
    sid = f"{hostname}:{c.name}:8080"
    wait_until(lambda: consul.health("dockerhc", passing=True), timeout=15, what="healthy")
    names = [ch["Name"] for ch in instance(consul, "dockerhc", sid)["Checks"] if ch["ServiceID"] == sid]
    assert names == ["Docker HEALTHCHECK (follows health_status)"]


def test_draining_instance_shows_the_maintenance_reason(consul, containers, registrar, hostname):
    registrar()
    c = containers.run(labels={"SERVICE_NAME": "draining"}, command="httpd -p 8080 -h /www; sleep 3600")
    sid = f"{hostname}:{c.name}:8080"
    wait_until(lambda: sid in consul.services(), what="registered")
    with ThreadPoolExecutor(1) as pool:
        stopping = pool.submit(c.stop, timeout=3)
        check = wait_until(lambda: consul.checks().get(f"_service_maintenance:{sid}"), timeout=3, what="maintenance")
        entry = instance(consul, "draining", sid)
        shown = [ch for ch in entry["Checks"] if ch["CheckID"] == f"_service_maintenance:{sid}"]
        stopping.result()
    assert check["Notes"].startswith("Draining: docker stop received at ")
    assert "(signal SIGTERM)" in check["Notes"]
    assert shown and shown[0]["Status"] == "critical" and shown[0]["Notes"] == check["Notes"]


def test_registrar_registers_itself_and_follows_the_docker_engine(consul, containers, registrar, hostname, workdir):
    forwarder = UnixSocketForwarder(workdir / f"docker-own-{hostname}.sock")
    forwarder.start()
    try:
        proc = registrar("--docker", forwarder.url)
        own = f"registrar:{hostname}"
        wait_until(lambda: consul.health("registrar", passing=True), timeout=10, what="own registration passing")
        entry = instance(consul, "registrar", own)
        [check] = [ch for ch in entry["Checks"] if ch["ServiceID"] == own]
        assert check["Name"] == "Follows the Docker engine (event stream connected)"
        assert "Docker engine events followed" in check["Output"]
        assert entry["Service"]["Meta"]["registrar_host"] == hostname
        forwarder.stop()  # the engine goes away
        wait_until(lambda: not consul.health("registrar", passing=True), timeout=10, what="critical")
        critical = next(ch for ch in instance(consul, "registrar", own)["Checks"] if ch["ServiceID"] == own)
        assert critical["Status"] == "critical" and "Docker engine unreachable" in critical["Output"]
        forwarder.start()
        wait_until(lambda: consul.health("registrar", passing=True), timeout=15, what="passing again")
        proc.stop()
        time.sleep(0.2)
        assert own not in consul.services()  # a clean stop takes it away
    finally:
        forwarder.stop()


class CheckWatcher(threading.Thread):
    """Every status one service's checks go through, seen with blocking queries."""

    def __init__(self, consul, service: str) -> None:
        super().__init__(name=f"watch-{service}")
        self.consul, self.service = consul, service
        self.seen: list[tuple[str, str]] = []  # (status, output)
        self.stopped = threading.Event()

    def run(self) -> None:
        index = 1
        while not self.stopped.is_set():
            url = f"{self.consul.url}/v1/health/checks/{self.service}?index={index}&wait=1s"
            with urllib.request.urlopen(url, timeout=10) as response:
                index = max(1, int(response.headers.get("X-Consul-Index", "1")))
                for check in json.loads(response.read()):
                    state = (check["Status"], check["Output"])
                    if not self.seen or self.seen[-1] != state:
                        self.seen.append(state)


def test_proxy_registers_itself_and_its_check_follows_the_proxy(consul, containers, registrar, templater, tmp_path):
    registrar()
    port = free_port()
    proc = templater(
        "--template", f"{TEMPLATES / 'haproxy.cfg.j2'}:{tmp_path / 'haproxy.cfg'}", "--proxy", "haproxy",
        "--stop-proxy", "--var", f"runtime_dir={tmp_path}", "--var", f"http_port={port}",
        "--var", "bind_address=127.0.0.1",
    )  # fmt: skip
    wait_until(lambda: consul.health("ingress", passing=True), timeout=15, what="ingress passing")
    [entry] = consul.health("ingress")
    service = entry["Service"]
    assert service["Tags"] == ["sidecar", "haproxy"]
    assert service["Meta"]["proxy"] == "haproxy" and service["Meta"]["proxy_version"].startswith("2.6")
    assert str(port) in service["Meta"]["ports"].split(",") and service["Port"] > 0
    [check] = [c for c in entry["Checks"] if c["ServiceID"] == service["ID"]]
    assert check["Name"] == "Proxy haproxy serves the rendered configuration"
    watcher = CheckWatcher(consul, "ingress")
    watcher.start()
    try:
        master = int((tmp_path / "haproxy.cfg.pid").read_text().split()[0])
        os.killpg(master, signal.SIGKILL)  # the proxy dies with every worker
        wait_until(lambda: any(s == "critical" for s, _ in watcher.seen), timeout=10, what="critical seen")
        critical = next(o for s, o in watcher.seen if s == "critical")
        assert "haproxy is not running" in critical
        wait_until(lambda: watcher.seen[-1][0] == "passing" and any(s == "critical" for s, _ in watcher.seen),
                   timeout=15, what="passing again after the restart")  # fmt: skip
        assert get(port, "nothing.test")[0] == 404  # serving again
    finally:
        watcher.stopped.set()
        watcher.join(5)
    proc.stop()
    wait_until(lambda: not consul.health("ingress"), timeout=5, what="own registration gone after a clean stop")


def test_metrics_parse_and_histograms_count_the_events_caused(consul, containers, registrar, templater, tmp_path):
    reg_status, tpl_status, port = free_port(), free_port(), free_port()
    registrar("--status-addr", f"127.0.0.1:{reg_status}")
    proc = templater(
        "--template", f"{TEMPLATES / 'haproxy.cfg.j2'}:{tmp_path / 'haproxy.cfg'}", "--proxy", "haproxy",
        "--stop-proxy", "--var", f"runtime_dir={tmp_path}", "--var", f"http_port={port}",
        "--var", "bind_address=127.0.0.1", "--status-addr", f"127.0.0.1:{tpl_status}", "--drain-timeout", "1s",
    )  # fmt: skip
    wait_until(lambda: get(port, "nothing.test")[0] == 404, timeout=15, what="haproxy serving")
    before = scrape(reg_status)
    assert before["registrar_event_to_registered_seconds_count"] == 0
    assert before["process_resident_memory_bytes"] > 0 and before["process_open_fds"] > 0
    labels = {"SERVICE_NAME": "metered", "SERVICE_HTTP_HOST": "metered.test"}
    first = containers.run(labels=labels)
    wait_until(lambda: served(port, "metered.test"), timeout=15, what="first routed (a reload: new backend)")
    second = containers.run(labels=labels)
    wait_until(lambda: len(consul.health("metered", passing=True)) == 2, what="second registered")
    wait_until(lambda: "haproxy runtime added" in proc.output(), timeout=10, what="second added at runtime")
    second.stop(timeout=1)
    wait_until(lambda: "haproxy removed" in proc.output(), timeout=15, what="drained and removed")
    reg = scrape(reg_status)
    assert reg["registrar_event_to_registered_seconds_count"] == 2  # two containers started
    assert reg["registrar_registrations_total"] >= 2 and reg["registrar_deregistrations_total"] >= 1
    tpl = scrape(tpl_status)
    assert tpl["templater_reload_seconds_count"] == tpl["templater_reloads_total"] >= 1
    assert tpl["templater_runtime_api_seconds_count"] >= 2  # the add, and the drain of the stopped one
    assert tpl["templater_drain_seconds_count"] == 1
    assert tpl["templater_change_to_write_seconds_count"] == tpl["templater_writes_total"]
    assert tpl["process_resident_memory_bytes"] > 0
    first.stop(timeout=1)


def served(port: int, host: str) -> bool:
    return get(port, host, "/index.html")[0] == 200
