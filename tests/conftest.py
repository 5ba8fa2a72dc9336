from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

from devtools.demo_image import ensure_grpc_image, ensure_keepalive_image
from tests.support import (
    ROOT,
    ConsulAgent,
    Containers,
    Process,
    docker_client,
    ensure_image,
    free_port,
    remove_test_containers,
    tempdir,
    wait_until,
)
from tests.traffic import get

SESSION = uuid.uuid4().hex[:6]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="session")
def consul_agent(workdir: Path) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(workdir)
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def consul(consul_agent: ConsulAgent) -> Iterator[ConsulAgent]:
    """The session's agent, with no services left over from an earlier test."""
    if consul_agent.proc is None or consul_agent.proc.poll() is not None:
        consul_agent.start()
    for service_id in consul_agent.services():
        consul_agent.put(f"/v1/agent/service/deregister/{service_id}")
    yield consul_agent


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    try:
        client = docker_client()
        client.ping()
    except docker.errors.DockerException as err:
        pytest.fail(f"no Docker engine answers ({err}); run scripts/test.sh, which starts dockerd")
    ensure_image(client)
    remove_test_containers(client)
    yield client
    remove_test_containers(client)
    client.close()


@pytest.fixture
def containers(docker_engine: docker.DockerClient) -> Iterator[Containers]:
    tag = f"{SESSION}{uuid.uuid4().hex[:4]}"
    runner = Containers(docker_engine, tag)
    yield runner
    remove_test_containers(docker_engine, tag)


@pytest.fixture
def readable_dir() -> Iterator[Path]:
    """A directory other users can read (NGINX's workers run as nobody; tmp_path's parents are
    0700). A test lists it before the fixtures whose processes write into it, so that pytest
    removes it after those processes stopped, never while one still writes there."""
    with tempdir() as path:
        path.chmod(0o755)
        yield path


@pytest.fixture
def hostname() -> str:
    return f"h{uuid.uuid4().hex[:6]}"


@pytest.fixture
def registrar(
    consul: ConsulAgent, docker_engine: docker.DockerClient, workdir: Path, hostname: str
) -> Iterator[object]:
    """A factory: registrar(*extra_args) starts the real registrar against the test agent."""
    started: list[Process] = []

    def start(*extra: str, ready: bool = True) -> Process:
        """ready: wait until its event stream is open, so containers started next arrive as events."""
        args = ["--consul", consul.url, "--hostname", hostname, "--retry-interval", "500", *extra]
        proc = Process("registrar", args, workdir, env={"PYTHONUNBUFFERED": "1"})
        started.append(proc)
        if ready:
            wait_until(lambda: "docker events connected" in proc.output() or not proc.alive(), what="registrar up")
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """Every thread a test starts, daemon or not, has ended shortly after it (stop() was called)."""
    before = set(threading.enumerate())

    def leaked() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before and t.is_alive()]

    yield
    deadline = time.monotonic() + 3.0  # a stopped loop notices at its next wake-up
    while leaked() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leaked(), f"threads leaked: {leaked()}"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


@pytest.fixture
def templater(consul: ConsulAgent, workdir: Path) -> Iterator[object]:
    """A factory: templater(*args) runs the real templater against the test agent."""
    started: list[Process] = []

    def start(*extra: str) -> Process:
        proc = Process("templater", ["--consul", consul.url, *extra], workdir, env={"PYTHONUNBUFFERED": "1"})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def proxy_stack(consul, registrar, templater, tmp_path):
    """A factory: registrar + templater --proxy KIND on the bundled template; (port, templater)."""

    def start(kind: str, *extra: str, registrar_args: tuple[str, ...] = (), dest_dir: Path | None = None):
        """dest_dir: where the proxy's file goes (default tmp_path)."""
        port = free_port()
        template = {"haproxy": "haproxy.cfg.j2", "nginx": "nginx.conf.j2"}[kind]
        registrar(*registrar_args)
        proc = templater(
            "--template", f"{ROOT / 'templates' / template}:{(dest_dir or tmp_path) / (kind + '.cfg')}",
            "--proxy", kind,
            "--var", f"runtime_dir={tmp_path}", "--var", f"http_port={port}", "--var", "bind_address=127.0.0.1",
            "--stop-proxy",
            *extra,
        )  # fmt: skip
        wait_until(lambda: get(port, "nothing.test")[0] == 404, timeout=15, what=f"{kind} serving")
        return port, proc

    return start


@pytest.fixture(scope="session")
def debian_base(docker_engine: docker.DockerClient) -> str:
    """The cached Debian base image (scripts/base-image.sh) the test backends' images build on."""
    base = subprocess.run([str(ROOT / "scripts" / "base-image.sh")], capture_output=True, text=True, timeout=900)
    if base.returncode != 0:
        pytest.fail(f"the Debian base image for the test backends could not be made:\n{base.stderr[-2000:]}")
    return base.stdout.strip()


@pytest.fixture(scope="session")
def keepalive_image(docker_engine: docker.DockerClient, debian_base: str) -> str:
    """The keep-alive backend's image (devtools/keepalive_backend.py) on the cached Debian base."""
    return ensure_keepalive_image(docker_engine, debian_base)


@pytest.fixture(scope="session")
def grpc_image(docker_engine: docker.DockerClient, debian_base: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The gRPC backend's image (devtools/grpc_backend.py): grpcio, the version the tests' own
    client runs, from wheels downloaded here, on the cached Debian base."""
    import grpc

    wheels = tmp_path_factory.mktemp("wheels")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "-d", str(wheels),
                          f"grpcio=={grpc.__version__}"], capture_output=True, text=True, timeout=300)  # fmt: skip
    if got.returncode != 0:
        pytest.fail(f"pip could not download grpcio's wheels for the gRPC backend:\n{got.stderr[-2000:]}")
    return ensure_grpc_image(docker_engine, debian_base, sorted(wheels.glob("*.whl")))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:  # a failure, never a skip: scripts/install-deps.sh installs both
        pytest.fail(f"the browser test needs Debian's chromium and chromium-driver (found {chromium}, {driver})")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(arg)
    session = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield session
    finally:
        session.quit()
