"""Plain `docker stop` drains first (issue 25): sidecar-drain, the engine's authorization plugin,
with the real engine, registrar, templater and both proxies, and the backends that close their
listener the moment they get SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import ROOT, TcpForwarder, wait_until
from tests.support.drain import DrainPlugin, engine_config
from tests.traffic import Load, closing_web, compose_web, get

pytestmark = pytest.mark.integration

DRAIN = "1s"


@pytest.fixture
def drain_plugin(consul, workdir):
    """A factory: drain_plugin(consul_url, *extra) runs sidecar-drain against the engine the
    suite started; each is stopped at the end and must have taken itself out of the engine."""
    if engine_config() is None:
        pytest.skip("the engine was not started by scripts/engine.sh (no SIDECAR_ENGINE_CONFIG): "
                    "the drain plugin has no engine configuration to add itself to")  # fmt: skip
    started: list[DrainPlugin] = []

    def start(consul_url: str = consul.url, *extra: str) -> DrainPlugin:
        plugin = DrainPlugin(consul_url, workdir, f"consul-sidecar-drain-t{os.getpid()}-{len(started)}", DRAIN, *extra)
        started.append(plugin)
        return plugin

    yield start
    for plugin in started:
        plugin.stop()
        assert not plugin.enabled(), plugin.output()[-2000:]


def docker_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def marker(kind: str, container, containers) -> str:
    """What X-Served-By shows for a backend: HAProxy's server name holds the container's name,
    NGINX's upstream its published port."""
    return container.name if kind == "haproxy" else f"127.0.0.1:{containers.host_port(container)}"


def serving(port: int, kind: str, container, containers) -> bool:
    try:
        mark = marker(kind, container, containers)
    except (KeyError, TypeError, IndexError):  # no port yet (restarting)
        return False
    return any(mark in get(port, "app.test", "/index.html")[1] for _ in range(8))


def settled(port: int) -> bool:
    """Every request answered: after a reload NGINX's old worker, whose config may predate the
    backends, takes new connections beside the new one for a moment."""
    return all(get(port, "app.test", "/index.html")[0] == 200 for _ in range(20))


def compose_up(tool: list[str], directory: Path, project: str, image: str | None, session: str) -> None:
    path = compose_web(directory, image, session)
    up = subprocess.run([*tool, "-p", project, "-f", str(path), "up", "-d"], capture_output=True, text=True,
                        timeout=120)  # fmt: skip
    assert up.returncode == 0, up.stderr


CLIENTS = ["docker stop", "docker restart", "docker rm -f", "docker-compose down", "docker compose down"]


@pytest.mark.parametrize("kind", ["haproxy", "nginx"])
@pytest.mark.parametrize("client", CLIENTS)
def test_any_client_stops_a_backend_under_load_without_a_failed_request(
    consul, containers, docker_engine, proxy_stack, drain_plugin, keepalive_image, tmp_path, kind, client
):
    """Backends that close their listener at once, stopped by each client under load: zero
    failures, GET or POST. Each client meets the busybox backend through one proxy and the
    keep-alive one through the other."""
    image = keepalive_image if (CLIENTS.index(client) + (kind == "nginx")) % 2 else None
    extra = ("--drain-timeout", "10s") if kind == "haproxy" else ("--wait", "50ms:500ms")
    port, proc = proxy_stack(kind, *extra)
    plugin = drain_plugin()
    others = [closing_web(containers, image) for _ in range(2)]
    project = f"drain{containers.session}{CLIENTS.index(client)}{kind[0]}"
    tool = ["docker-compose"] if client.startswith("docker-compose") else ["docker", "compose"]
    down = [*tool, "-p", project, "-f", str(tmp_path / "compose.yaml"), "down"]
    if client.endswith("down"):
        compose_up(tool, tmp_path, project, image, containers.session)
        target = docker_engine.containers.list(filters={"label": f"com.docker.compose.project={project}"})[0]
    else:
        target = closing_web(containers, image)
    try:
        drain_one(port, kind, proc, plugin, consul, containers, [*others, target], client, down)
    finally:
        if client.endswith("down"):  # its network too, when the test failed before its own down
            subprocess.run(down, capture_output=True, timeout=120)


def drain_one(port, kind, proc, plugin, consul, containers, backends, client, down) -> None:
    target = backends[-1]
    wait_until(lambda: all(serving(port, kind, c, containers) for c in backends), timeout=30,
               what="3 backends serving")  # fmt: skip
    wait_until(lambda: settled(port), timeout=10, what="every request answered")
    command = {
        "docker stop": ["docker", "stop", "-t", "5", target.name],
        "docker restart": ["docker", "restart", "-t", "5", target.name],
        "docker rm -f": ["docker", "rm", "-f", target.name],
    }.get(client, down)
    with Load(port, "app.test") as load:
        time.sleep(1)
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        if client == "docker restart":  # routable again once it serves
            wait_until(lambda: serving(port, kind, target, containers), timeout=20, what="restarted backend serving")
        time.sleep(1)
    assert load.ok > 50
    assert load.failures == [], (load.failures[:10], plugin.output()[-3000:], proc.output()[-3000:])
    short = target.id[:12]
    drained = [line for line in plugin.output().splitlines() if "drained call=" in line]
    assert any(target.name in line or short in line for line in drained), plugin.output()[-3000:]
    if client == "docker restart":
        assert "undrained call='restart" in plugin.output()
        lifted = lambda: not [c for c in consul.checks() if c.startswith("_service_maintenance:")]  # noqa: E731
        wait_until(lifted, timeout=10, what="maintenance lifted")


def test_a_killed_or_hung_worker_never_holds_docker_and_the_guard_restarts_it(containers, drain_plugin):
    plugin = drain_plugin()
    os.kill(plugin.worker_pid(), signal.SIGKILL)
    started = time.monotonic()
    listed = docker_cli("ps", "-q", timeout=20)
    assert listed.returncode == 0, listed.stderr
    killed_wait = time.monotonic() - started
    wait_until(lambda: "worker exited: restarting it" in plugin.output(), timeout=5, what="restart logged")
    hung = plugin.worker_pid()
    os.kill(hung, signal.SIGSTOP)
    try:
        started = time.monotonic()
        listed = docker_cli("ps", "-q", timeout=20)
        hung_wait = time.monotonic() - started
        assert listed.returncode == 0, listed.stderr
        c = containers.run(command="trap 'exit 0' TERM; sleep 300 & wait")  # docker run, then docker stop
        stopped = docker_cli("stop", c.name, timeout=20)
        assert stopped.returncode == 0, stopped.stderr
    finally:
        with_stopped = Path(f"/proc/{hung}")
        if with_stopped.exists():
            os.kill(hung, signal.SIGCONT)
    assert "worker hung: restarting it" in plugin.output()
    assert plugin.enabled()  # still in the engine, and serving again
    # not a speed target: the bound that makes Docker usable (the engine alone would wait 30 s)
    assert killed_wait < 10 and hung_wait < 10, (killed_wait, hung_wait)


def test_a_killed_guard_takes_the_plugin_out_of_the_engine(drain_plugin):
    plugin = drain_plugin()
    worker = plugin.worker_pid()
    os.kill(plugin.proc.proc.pid, signal.SIGKILL)
    plugin.proc.proc.wait()
    wait_until(lambda: not plugin.enabled(), timeout=10, what="plugin taken out")
    wait_until(lambda: not Path(f"/proc/{worker}").exists(), timeout=10, what="worker gone")
    assert "its guard process is gone" in plugin.output()
    listed = docker_cli("ps", "-q", timeout=20)
    assert listed.returncode == 0, listed.stderr


class HungConsul(TcpForwarder):
    """The real agent behind a forwarder that holds every answer back until stop(): to a
    client, an agent that takes the connection and never answers."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.released = threading.Event()

    def pump(self, src, dst, upstream: bool) -> None:
        if not upstream:
            self.released.wait()
        super().pump(src, dst, upstream)

    def stop(self) -> None:
        self.released.set()
        super().stop()


def test_a_hung_consul_lets_the_stop_go_ahead_and_says_why(consul, containers, registrar, drain_plugin):
    """A stop that needs a drain, the agent hung: the stop waits --consul-wait, not more."""
    registrar()
    c = closing_web(containers, None)
    wait_until(lambda: any(s["Meta"].get("container_name") == c.name for s in consul.services().values()),
               timeout=15, what="registered")  # fmt: skip
    hung = HungConsul(consul.http_port)
    hung.start()
    try:
        plugin = drain_plugin(hung.url, "--consul-wait", "1s")
        done = docker_cli("stop", c.name, timeout=30)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: "draining skipped" in plugin.output(), timeout=5, what="skip logged")
        line = next(x for x in plugin.output().splitlines() if "draining skipped" in x)
        assert f"call='stop {c.name}'" in line and "no answer from Consul within 1 s" in line, line
    finally:
        hung.stop()


def test_a_container_without_services_is_not_drained(consul, containers, registrar, drain_plugin):
    registrar()
    plugin = drain_plugin(consul.url, "--drain", "5s")
    plain = containers.run(command="trap 'exit 0' TERM; sleep 300 & wait", ports=())  # no port: no service
    started = time.monotonic()
    done = docker_cli("stop", plain.name)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert took < 5.0, took  # never the drain's wait (it exits at SIGTERM: a fraction of a second)
    time.sleep(0.5)
    assert plain.name not in plugin.output() and plain.id[:12] not in plugin.output()
    assert plugin.output().count("drained call=") == 0


def test_sidecar_stop_says_it_is_not_needed_and_is_not_drained_twice(consul, containers, registrar, drain_plugin):
    registrar()
    plugin = drain_plugin()
    c = closing_web(containers, None)
    wait_until(lambda: any(s["Meta"].get("container_name") == c.name for s in consul.services().values()),
               timeout=15, what="registered")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "registrar.drain", "--consul", consul.url, "--drain", "1s", c.name],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"this engine runs the drain plugin ({plugin.name})" in done.stderr
    assert "sidecar-stop is not needed here" in done.stderr
    assert "drained for 1 s" in done.stdout
    time.sleep(0.5)
    assert "drained call=" not in plugin.output()  # the services were in maintenance already


def test_other_calls_are_not_held_while_a_stop_drains(consul, containers, registrar, drain_plugin):
    registrar()
    plugin = drain_plugin(consul.url, "--drain", "3s")
    c = closing_web(containers, None)
    wait_until(lambda: any(s["Meta"].get("container_name") == c.name for s in consul.services().values()),
               timeout=15, what="registered")  # fmt: skip
    stopping = threading.Thread(target=docker_cli, args=("stop", c.name))
    stopping.start()
    try:
        wait_until(
            lambda: any(k.startswith("_service_maintenance:") for k in consul.checks()),
            timeout=5,
            what="maintenance set",
        )
        started = time.monotonic()
        listed = docker_cli("ps", "-q")
        logs = docker_cli("logs", c.name)
        took = time.monotonic() - started
        assert listed.returncode == 0 and logs.returncode == 0
        assert stopping.is_alive()  # the stop still waits for its drain
    finally:
        stopping.join()
    assert "drained call='stop" in plugin.output()
    # the drain is 3 s; docker ps and docker logs answered while it ran (bench/drain_bench.py
    # measures their cost: a few milliseconds)
    assert took < 2.0, took
