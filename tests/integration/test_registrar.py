"""The registrar against the real Docker engine and a real Consul agent."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.support import IMAGE, ConsulAgent, UnixSocketForwarder, wait_until

pytestmark = pytest.mark.integration


def ids_for(consul: ConsulAgent, container: Any) -> list[str]:
    return sorted(sid for sid in consul.services() if f":{container.name}:" in sid)


def test_registers_published_port_with_registrator_id_and_meta(consul, containers, registrar, hostname):
    registrar()
    c = containers.run(
        labels={
            "SERVICE_NAME": "web",
            "SERVICE_TAGS": "blue, v1",
            "SERVICE_HTTP_HOST": "app.example.com",
            "SERVICE_HTTP_PATH": "/api",
        },
        environment={"SERVICE_WEIGHT": "5"},
    )
    sid = f"{hostname}:{c.name}:8080"
    svc = wait_until(lambda: consul.services().get(sid), what=sid)
    assert svc["Service"] == "web"
    assert svc["Port"] == containers.host_port(c)
    assert svc["Address"] == "127.0.0.1"
    assert svc["Tags"] == ["blue", "v1"]
    origin = {"container_name": c.name, "container_id": c.id[:12], "image": IMAGE, "registrar_host": hostname}
    assert svc["Meta"] == {"http_host": "app.example.com", "http_path": "/api", "weight": "5", **origin}
    # visible in the catalog, which is what templates and the UI read
    wait_until(lambda: consul.get("/v1/catalog/service/web"), what="catalog entry")

    c.stop(timeout=1)
    wait_until(lambda: sid not in consul.services(), what="deregistration after stop")


def test_several_ports_udp_and_per_port_overrides(consul, containers, registrar, hostname):
    registrar()
    c = containers.run(
        ports=("8080/tcp", "9090/tcp", "5353/udp"),
        labels={"SERVICE_9090_NAME": "metrics", "SERVICE_9090_TAGS": "prom", "SERVICE_TAGS": "x"},
    )
    expected = {
        f"{hostname}:{c.name}:8080",
        f"{hostname}:{c.name}:9090",
        f"{hostname}:{c.name}:5353:udp",
    }
    wait_until(lambda: expected <= set(consul.services()), what=expected)
    services = consul.services()
    assert services[f"{hostname}:{c.name}:8080"]["Service"] == "consul-sidecar-test-8080"
    assert services[f"{hostname}:{c.name}:9090"]["Service"] == "metrics"
    assert services[f"{hostname}:{c.name}:9090"]["Tags"] == ["prom"]
    assert services[f"{hostname}:{c.name}:5353:udp"]["Tags"] == ["x", "udp"]


@pytest.mark.parametrize(
    ("label", "value", "reason"),
    [
        ("SERVICE_9999_NAME", "x", "port 9999 is not exposed"),
        ("SERVICE_CHECK_INTERVAL", "banana", "duration"),
        ("SERVICE_CHECK_HTTP", "/health check", "without spaces"),
        ("SERVICE_NAME", "not_a.dns label", "may hold only letters"),
        ("SERVICE_TAGS", "a,b\nbackend evil", "control character"),
        ("SERVICE_HTTP_HOST", "a.com\n  server evil 1.2.3.4:80", "control character"),
        # a typo used to be dropped silently: the instance passed at once, with no check at all
        ("SERVICE_CHECK_HTPP", "/health", "unknown check setting"),
        ("SERVICE_CHECK_CMD", "/bin/healthcheck", "needs --allow-script-checks"),
    ],
)
def test_bad_label_skips_that_container_only(consul, containers, registrar, hostname, label, value, reason):
    proc = registrar()
    bad = containers.run(
        labels={label: value}
        if label in ("SERVICE_CHECK_HTTP", "SERVICE_CHECK_CMD")
        else {label: value, "SERVICE_CHECK_HTTP": "/"}
    )
    good = containers.run(labels={"SERVICE_NAME": "good"})
    wait_until(lambda: f"{hostname}:{good.name}:8080" in consul.services(), what="good container")
    line = wait_until(
        lambda: next((ln for ln in proc.output().splitlines() if "bad label" in ln and bad.name in ln), None),
        what="error log line",
    )
    assert label in line and reason in line
    assert repr(value) in line or value in line
    assert ids_for(consul, bad) == []
    assert proc.alive()


def test_twenty_containers_at_once(consul, containers, registrar, hostname):
    registrar()
    with ThreadPoolExecutor(10) as pool:
        started = list(pool.map(lambda i: containers.run(labels={"SERVICE_NAME": "many"}), range(20)))
    expected = {f"{hostname}:{c.name}:8080" for c in started}
    wait_until(lambda: expected <= set(consul.services()), timeout=20, what="20 registrations")
    assert len(consul.health("many")) == 20


def test_existing_containers_registered_at_start_and_cleanup(consul, containers, registrar, hostname):
    c = containers.run(labels={"SERVICE_NAME": "early"})
    # a dangling entry of this host, and one of another host that must survive
    consul.put("/v1/agent/service/register", {"ID": f"{hostname}:gone:80", "Name": "gone", "Port": 80})
    consul.put("/v1/agent/service/register", {"ID": "otherhost:gone:80", "Name": "gone", "Port": 80})
    registrar("--cleanup")
    wait_until(lambda: f"{hostname}:{c.name}:8080" in consul.services(), what="listing at start")
    wait_until(lambda: f"{hostname}:gone:80" not in consul.services(), what="cleanup")
    assert "otherhost:gone:80" in consul.services()


def test_http_check_fast_readiness(consul, containers, registrar, hostname):
    """Passing in Consul within a fraction of a second of the server answering, not within
    Consul's own 30 s check interval."""
    registrar()
    # the server starts listening 1.5 s after the container starts
    c = containers.run(
        labels={"SERVICE_NAME": "slowstart", "SERVICE_CHECK_HTTP": "/index.html", "SERVICE_CHECK_INTERVAL": "30s"},
        command="sleep 1.5; httpd -f -p 8080 -h /www",
    )
    sid = f"{hostname}:{c.name}:8080"
    wait_until(lambda: sid in consul.services(), what="registration")
    assert consul.health("slowstart", passing=True) == []  # not before it answers
    port = containers.host_port(c)
    answered: list[float] = []

    def watch_port() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=0.5) as r:
                    if r.status == 200:
                        answered.append(time.monotonic())
                        return
            except OSError:
                time.sleep(0.01)

    watcher = threading.Thread(target=watch_port)
    watcher.start()
    wait_until(lambda: consul.health("slowstart", passing=True), timeout=10, interval=0.01, what="passing")
    t_pass = time.monotonic()
    watcher.join()
    assert answered, "the server never answered"
    assert t_pass - answered[0] < 1.0, f"passing {t_pass - answered[0]:.2f} s after the server first answered"


def test_stop_puts_in_maintenance_during_stop_timeout(consul, containers, registrar, hostname):
    registrar()
    # busybox sh as PID 1 has no SIGTERM handler, so it ignores the signal until SIGKILL
    c = containers.run(labels={"SERVICE_NAME": "stubborn"}, command="httpd -p 8080 -h /www; sleep 3600")
    sid = f"{hostname}:{c.name}:8080"
    wait_until(lambda: consul.health("stubborn", passing=True), what="passing")
    with ThreadPoolExecutor(1) as pool:
        stopping = pool.submit(c.stop, timeout=4)
        wait_until(lambda: f"_service_maintenance:{sid}" in consul.checks(), timeout=2, what="maintenance")
        assert consul.health("stubborn", passing=True) == []
        c.reload()
        assert c.status == "running"  # still in its stop timeout, yet unroutable
        stopping.result()
    wait_until(lambda: sid not in consul.services(), what="deregistered after die")


def test_pause_and_unpause(consul, containers, registrar, hostname):
    registrar()
    c = containers.run(labels={"SERVICE_NAME": "pausable"})
    sid = f"{hostname}:{c.name}:8080"
    wait_until(lambda: consul.health("pausable", passing=True), what="passing")
    c.pause()
    wait_until(lambda: f"_service_maintenance:{sid}" in consul.checks(), what="maintenance on pause")
    c.unpause()
    wait_until(lambda: f"_service_maintenance:{sid}" not in consul.checks(), what="maintenance lifted")
    assert consul.health("pausable", passing=True)


def test_docker_healthcheck_followed(consul, containers, registrar, hostname):
    registrar()
    c = containers.run(
        labels={"SERVICE_NAME": "dockerhealth"},
        command="httpd -f -p 8080 -h /www",
        healthcheck={"test": ["CMD", "sh", "-c", "test -f /tmp/ok"], "interval": 200_000_000, "retries": 1},
    )
    sid = f"{hostname}:{c.name}:8080"
    wait_until(lambda: sid in consul.services(), what="registration")
    assert consul.health("dockerhealth", passing=True) == []
    c.exec_run(["sh", "-c", "echo > /tmp/ok"])
    wait_until(lambda: consul.health("dockerhealth", passing=True), timeout=5, what="healthy")
    c.exec_run(["sh", "-c", "rm /tmp/ok"])
    wait_until(lambda: not consul.health("dockerhealth", passing=True), timeout=5, what="unhealthy")


def test_consul_restart_restores_registrations(consul, containers, registrar, hostname):
    proc = registrar()
    started = [containers.run(labels={"SERVICE_NAME": "survivor", "SERVICE_CHECK_TCP": "true"}) for _ in range(3)]
    expected = {f"{hostname}:{c.name}:8080" for c in started}
    wait_until(lambda: len(consul.health("survivor", passing=True)) == 3, what="3 passing")
    before = len(proc.output())
    old_pid = consul.proc.pid
    consul.restart()
    t0 = time.monotonic()
    # a new dev agent, which knew none of them: the registrar had to register all 3 again (the
    # agent's own list can already be complete again by the time restart() returns), by its
    # reconcile or, for one whose write the catalog did not show yet, by its confirmation
    assert consul.proc.pid != old_pid

    def reregistered() -> bool:
        lines = [line for line in proc.output()[before:].splitlines() if " registered " in line]
        return all(any(re.search(rf"id={re.escape(sid)}( |$)", line) for line in lines) for sid in expected)

    wait_until(reregistered, timeout=5, what="3 re-registered")
    wait_until(lambda: expected <= set(consul.services()), timeout=5, what="restored within 5 s")
    wait_until(lambda: len(consul.health("survivor", passing=True)) == 3, timeout=5, what="passing again")
    assert time.monotonic() - t0 < 5


def test_consul_down_at_start_then_up(consul, containers, registrar, hostname):
    c = containers.run(labels={"SERVICE_NAME": "patient"})
    consul.stop()
    proc = registrar(ready=False)
    time.sleep(2)
    assert proc.alive()
    consul.start()
    wait_until(lambda: f"{hostname}:{c.name}:8080" in consul.services(), timeout=10, what="registered")
    assert proc.output().count("consul unavailable") == 1


def test_retry_attempts_exhausted_exits(consul, registrar):
    consul.stop()
    proc = registrar("--retry-attempts", "2", "--retry-interval", "100", ready=False)
    wait_until(lambda: not proc.alive(), timeout=10, what="exit")
    assert proc.proc.returncode == 1
    assert "giving up on consul" in proc.output()
    consul.start()


def test_docker_unreachable_then_back_and_stream_break(consul, containers, registrar, hostname, workdir):
    forwarder = UnixSocketForwarder(workdir / f"docker-{hostname}.sock")
    first = containers.run(labels={"SERVICE_NAME": "early"})
    proc = registrar("--docker", forwarder.url, ready=False)
    time.sleep(1.5)
    assert proc.alive()  # no engine at that address yet: retrying, not exiting
    forwarder.start()
    try:
        wait_until(lambda: f"{hostname}:{first.name}:8080" in consul.services(), timeout=10, what="first")
        forwarder.stop()  # the event stream breaks
        second = containers.run(labels={"SERVICE_NAME": "late"})  # started while the registrar is blind
        first.stop(timeout=1)
        time.sleep(1)
        assert proc.alive()
        forwarder.start()
        # reconnect reconciles: the new container appears, the stopped one goes
        wait_until(lambda: f"{hostname}:{second.name}:8080" in consul.services(), timeout=10, what="second")
        wait_until(lambda: f"{hostname}:{first.name}:8080" not in consul.services(), timeout=10, what="first gone")
    finally:
        forwarder.stop()
    output = proc.output()
    assert output.count("docker unavailable") >= 1
    assert "docker events connected" in output


def test_host_network_uses_exposed_port(consul, containers, registrar, hostname):
    from tests.support import IMAGE, TEST_LABEL, free_port

    port = free_port()
    registrar("--ip", "127.0.0.1")
    # host networking publishes nothing: the service port is the exposed one (a Dockerfile EXPOSE)
    api = containers.client.api
    name = f"t{containers.session}-hostnet"
    created = api.create_container(
        IMAGE,
        ["sh", "-c", f"httpd -f -p 127.0.0.1:{port} -h /www"],
        name=name,
        labels={TEST_LABEL: containers.session, "SERVICE_NAME": "hostnet", "SERVICE_CHECK_HTTP": "/index.html"},
        ports=[port],
        host_config=api.create_host_config(network_mode="host"),
    )
    api.start(created["Id"])
    sid = f"{hostname}:{name}:{port}"
    svc = wait_until(lambda: consul.services().get(sid), what=sid)
    assert svc["Port"] == port
    assert svc["Address"] == "127.0.0.1"
    wait_until(lambda: consul.health("hostnet", passing=True), timeout=5, what="passing via fast probe")


def test_internal_registers_container_ip_and_exposed_port(consul, containers, registrar, hostname):
    registrar("--internal")
    c = containers.run(labels={"SERVICE_NAME": "inner"})
    sid = f"{hostname}:{c.name}:8080"
    svc = wait_until(lambda: consul.services().get(sid), what=sid)
    c.reload()
    assert svc["Port"] == 8080
    assert svc["Address"] == c.attrs["NetworkSettings"]["IPAddress"]


def test_each_thread_has_its_own_docker_client(docker_engine):
    """The event and resync threads used to share one docker-py client (a requests session is
    not thread-safe): each thread now gets its own, against the real engine (issue 9, point 6)."""
    from registrar.docker_events import DockerSource

    source = DockerSource("unix:///var/run/docker.sock")
    clients: list[object] = []

    def use() -> None:
        source.ping()
        clients.append(source._api())
        assert source._api() is clients[-1]  # kept for the thread's next call

    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    use()
    assert len(clients) == 3 and len({id(c) for c in clients}) == 3


def test_sidecar_stop_drains_then_stops_and_says_what_it_did(consul, containers, registrar, hostname):
    import subprocess
    import sys

    from tests.support import ROOT

    registrar()
    c = containers.run(labels={"SERVICE_NAME": "drained"})
    sid = f"{hostname}:{c.name}:8080"
    wait_until(lambda: consul.health("drained", passing=True), what="passing")
    args = [sys.executable, "-m", "registrar.drain", "--consul", consul.url, "--drain", "1s", "-t", "2"]
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(subprocess.run, [*args, c.name, "no-such-container"], capture_output=True, text=True,
                           timeout=30, cwd=ROOT)  # fmt: skip
        check = wait_until(lambda: consul.checks().get(f"_service_maintenance:{sid}"), timeout=3, what="drain")
        assert check["Notes"].startswith("Draining: sidecar-stop at ")
        assert consul.health("drained", passing=True) == []
        c.reload()
        assert c.status == "running"  # drained first, signalled only after --drain
        result = done.result()
    assert result.returncode == 1  # the second name does not exist
    assert f"{c.name}: 1 service(s) drained for 1 s, stopped" in result.stdout
    assert "no-such-container: no such container" in result.stderr
    c.reload()
    assert c.status == "exited"
    wait_until(lambda: sid not in consul.services(), what="deregistered once gone")
