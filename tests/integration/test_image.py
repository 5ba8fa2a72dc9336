"""The sidecar image as users deploy it: built here with no registry, run by the real engine."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.support import ROOT, TEST_LABEL, ConsulAgent, free_port, wait_until
from tests.support.drain import engine_config, engine_plugins
from tests.traffic import Load, get, served_by, serving_web, web

pytestmark = pytest.mark.integration

TAG = "consul-sidecar:test"


@pytest.fixture(scope="session")
def sidecar_image(docker_engine: docker.DockerClient) -> str:
    """Build the image from this checkout (the base image is cached by the hash of its script)."""
    started = time.monotonic()
    proc = subprocess.run([str(ROOT / "scripts" / "build-image.sh"), TAG], capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"the sidecar image could not be built:\n{proc.stderr[-3000:]}")
    print(f"image {TAG} built in {time.monotonic() - started:.1f} s")
    return TAG


def socket_group() -> int:
    return os.stat("/var/run/docker.sock").st_gid


def run_sidecar(client: docker.DockerClient, session: str, *command: str, **kwargs: Any) -> Any:
    return client.containers.run(
        TAG,
        list(command),
        detach=True,
        network_mode="host",
        labels={TEST_LABEL: session},
        **kwargs,
    )


def exit_code(container: Any) -> int:
    container.reload()
    return int(container.attrs["State"]["ExitCode"])


def health_status(container: Any) -> str:
    container.reload()
    return str(((container.attrs["State"].get("Health") or {}).get("Status")) or "")


def test_image_runs_as_an_unprivileged_user_with_both_commands(sidecar_image, docker_engine):
    out = docker_engine.containers.run(
        sidecar_image, ["sh", "-c", "id -u; registrar --help; templater --help; sidecar-stop --help"], remove=True
    ).decode()
    assert out.splitlines()[0] == "10001"
    assert "usage: registrar" in out and "usage: templater" in out and "usage: sidecar-stop" in out
    assert "--dns-zone" in out  # external DNS, with dnspython inside
    caps = docker_engine.containers.run(sidecar_image, ["sh", "-c", "getcap $(readlink -f $(command -v haproxy))"],
                                        remove=True).decode()  # fmt: skip
    assert "cap_net_bind_service" in caps


def test_registrar_container_registers_and_stops_fast(sidecar_image, docker_engine, consul, containers, hostname):
    registrar = run_sidecar(
        docker_engine, containers.session, "registrar", "--consul", consul.url, "--hostname", hostname,
        group_add=[str(socket_group())], volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock"}},
    )  # fmt: skip
    try:
        wait_until(lambda: "docker events connected" in registrar.logs().decode(), timeout=30, what="registrar up")
        c = containers.run(labels={"SERVICE_NAME": "imaged"})
        sid = f"{hostname}:{c.name}:8080"
        wait_until(lambda: sid in consul.services(), timeout=10, what="registered by the container")
        c.stop(timeout=2)
        wait_until(lambda: sid not in consul.services(), timeout=10, what="deregistered")
        # a drained stop from inside the registrar's container, as the README shows
        d = containers.run(labels={"SERVICE_NAME": "imaged"})
        wait_until(lambda: f"{hostname}:{d.name}:8080" in consul.services(), timeout=10, what="second registered")
        code, out = registrar.exec_run(["sidecar-stop", "--consul", consul.url, "--drain", "0.5s", "-t", "2", d.name])
        assert code == 0 and f"{d.name}: 1 service(s) drained for 0.5 s" in out.decode(), out.decode()
        wait_until(lambda: f"{hostname}:{d.name}:8080" not in consul.services(), timeout=10, what="drained and gone")
        wait_until(lambda: health_status(registrar) == "healthy", timeout=30, what="healthy")
        t0 = time.monotonic()
        registrar.stop(timeout=10)
        assert time.monotonic() - t0 < 2.0
        assert exit_code(registrar) == 0, registrar.logs().decode()[-2000:]
    finally:
        registrar.remove(force=True)


@pytest.fixture
def templater_container(sidecar_image, docker_engine, consul, containers, registrar) -> Iterator[tuple[Any, int]]:
    registrar()  # on the host: registers the backend containers
    port = free_port()
    container = run_sidecar(
        docker_engine, containers.session, "templater", "--consul", consul.url, "--proxy", "haproxy",
        "--template", "/templates/haproxy.cfg.j2:/run/consul-sidecar/haproxy.cfg",
        "--var", "runtime_dir=/run/consul-sidecar", "--var", f"http_port={port}", "--var", "bind_address=127.0.0.1",
        "--drain-timeout", "10s",
    )  # fmt: skip
    try:
        wait_until(lambda: get(port, "nothing.test")[0] == 404, timeout=30, what="haproxy in the container serving")
        yield container, port
    finally:
        container.remove(force=True)


def test_templater_container_routes_and_replaces_backends_without_failures(consul, containers, templater_container):
    container, port = templater_container
    old = serving_web(containers, 2, lambda c: served_by(port, c.name), timeout=30)
    with Load(port, "app.test", workers=3) as load:
        time.sleep(1)
        for c in old:
            new = web(containers)
            wait_until(lambda new=new: served_by(port, new.name), timeout=15, what="replacement serving")
            c.stop(timeout=5)
        time.sleep(1)
    assert load.ok > 50
    assert load.failures == [], load.failures[:10]
    # an orphan inside the container is reparented to PID 1 (tini), which reaps it
    container.exec_run(["sh", "-c", "(sleep 0.2 &); exit 0"])
    time.sleep(1.0)
    states = [row[1] for row in container.top(ps_args="-eo pid,stat,comm")["Processes"]]
    assert not any(state.startswith("Z") for state in states), container.top(ps_args="-eo pid,stat,comm")


def test_docker_stop_drains_haproxy_gracefully_and_leaves_no_zombie(consul, containers, templater_container):
    container, port = templater_container
    serving_web(containers, 1, lambda c: served_by(port, c.name), timeout=30)
    result: dict[str, Any] = {}

    def in_flight() -> None:
        try:
            result["answer"] = get(port, "app.test", "/cgi-bin/sleep?3")
        except Exception as err:  # what a client sees when its request is cut
            result["error"] = err

    client = threading.Thread(target=in_flight)
    client.start()
    time.sleep(0.5)  # the request is in the backend now
    top = container.top(ps_args="-eo pid,stat,comm")["Processes"]
    assert any("haproxy" in row[-1] for row in top), top
    t0 = time.monotonic()
    container.stop(timeout=20)
    client.join(10)
    assert "error" not in result, result
    assert result["answer"][0] == 200 and "slept 3" in result["answer"][1]
    assert time.monotonic() - t0 < 10
    assert exit_code(container) == 0, container.logs().decode()[-2000:]
    logs = container.logs().decode()
    assert "proxy stopped haproxy" in logs
    # nothing of the container is left on the host: no orphan haproxy, no zombie
    leftovers = subprocess.run(["pgrep", "-af", "/run/consul-sidecar/haproxy.cfg"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", leftovers.stdout


def test_healthcheck_healthy_then_unhealthy_without_consul(sidecar_image, docker_engine, workdir, containers):
    agent = ConsulAgent(workdir / "hc")
    (workdir / "hc").mkdir(exist_ok=True)
    agent.start()
    container = run_sidecar(
        docker_engine, containers.session, "templater", "--consul", agent.url,
        "--template", "/templates/haproxy.cfg.j2:/tmp/out.cfg", "--var", "runtime_dir=/tmp",
    )  # fmt: skip
    try:
        wait_until(lambda: health_status(container) == "healthy", timeout=40, interval=0.5, what="healthy")
        agent.stop()
        t0 = time.monotonic()
        wait_until(lambda: health_status(container) == "unhealthy", timeout=60, interval=0.5, what="unhealthy")
        assert time.monotonic() - t0 > 5  # after its retries, not at the first failed probe
        body = container.attrs["State"]["Health"]["Log"][-1]["Output"]
        assert "consul" in body
    finally:
        container.remove(force=True)
        agent.stop()


def test_compose_file_validates_and_runs(sidecar_image, consul, tmp_path):
    env = {"SIDECAR_IMAGE": sidecar_image, "CONSUL_HTTP_ADDR": consul.url, "HTTP_PORT": str(free_port()),
           "DOCKER_GID": str(socket_group()), "COMPOSE_PROJECT_NAME": f"sidecartest{free_port()}"}  # fmt: skip
    engine = engine_config()
    services = ["registrar", "templater"]  # the drain plugin only where the engine is the suite's own
    if engine is not None:
        plugin = f"consul-sidecar-drain-c{env['HTTP_PORT']}"
        env.update(ENGINE_CONFIG_DIR=str(Path(engine[0]).parent), ENGINE_CONFIG_FILE=Path(engine[0]).name,
                   ENGINE_PID=engine[1], DRAIN_PLUGIN=plugin, DRAIN="1s")  # fmt: skip
        services.append("drain")
    full = {**os.environ, **env}
    compose = ["docker-compose", "-f", str(ROOT / "compose.yaml")]
    config = subprocess.run([*compose, "config"], capture_output=True, text=True, env=full)
    assert config.returncode == 0, config.stderr
    up = subprocess.run([*compose, "up", "-d", *services], capture_output=True, text=True, env=full, timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        wait_until(lambda: get(int(env["HTTP_PORT"]), "nothing.test")[0] == 404, timeout=40, what="compose haproxy")
        # both containers reached the host's agent: each registered itself
        wait_until(lambda: {"registrar", "ingress"} <= set(consul.get("/v1/catalog/services")), timeout=30,
                   what="registrar and ingress registered by the compose containers")  # fmt: skip
        if engine is not None:  # the image's drain plugin is in the engine while its container runs
            wait_until(lambda: plugin in engine_plugins(engine[0]), timeout=30, what="drain plugin in the engine")
            drain = subprocess.run([*compose, "ps", "-q", "drain"], capture_output=True, text=True, env=full)
            wait_until(lambda: "own container id=" in docker_logs(drain.stdout.strip()), timeout=15,
                       what="the plugin knows its own container")  # fmt: skip
            # docker rm -f kills it without a signal it could handle: it leaves the engine first
            removed = subprocess.run(["docker", "rm", "-f", drain.stdout.strip()], capture_output=True, text=True,
                                     timeout=30)  # fmt: skip
            assert removed.returncode == 0, removed.stderr
            assert plugin not in engine_plugins(engine[0])
            assert subprocess.run(["docker", "ps", "-q"], capture_output=True, timeout=10).returncode == 0
    finally:
        down = subprocess.run(
            [*compose, "down", "--timeout", "10"], capture_output=True, text=True, env=full, timeout=120
        )
    assert down.returncode == 0, down.stderr
    ps = subprocess.run([*compose, "ps", "-q"], capture_output=True, text=True, env=full)
    assert ps.stdout.strip() == ""
    if engine is not None:  # the socket file the removed plugin left in the engine's plugin directory
        Path(f"/run/docker/plugins/{plugin}.sock").unlink(missing_ok=True)


def docker_logs(container: str) -> str:
    return subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=10).stderr
