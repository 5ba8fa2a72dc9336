"""Faults from outside the programs (issue 21): a disk that fills up or turns read-only."""

from __future__ import annotations

import contextlib
import errno
import http.server
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import psutil
import pytest

from devtools.demo_image import ensure_image
from tests.integration.test_hardening import RAW_WEIGHT, admin, register
from tests.support import ROOT, Process, TcpForwarder, free_port, health, wait_until
from tests.traffic import Load, get

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs of our own, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def backends() -> Iterator[list[int]]:
    """Three HTTP backends on free ports that answer 200: the instances behind the proxy."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Ok) for _ in range(3)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [server.server_address[1] for server in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


def fill(directory: Path) -> Path:
    """Write a file until the filesystem has no room left; the file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out, contextlib.suppress(OSError):  # unbuffered: nothing left to flush
        while True:
            out.write(b"x" * 4096)
    with pytest.raises(OSError) as err:
        (directory / "probe").write_bytes(b"x" * 8192)
    assert err.value.errno == errno.ENOSPC
    return filler


def test_a_full_then_read_only_disk_keeps_the_last_good_file_and_recovers_by_itself(
    consul, templater, tmp_path, small_disk, backends
):
    """Full: the change reaches HAProxy at runtime, the file on disk stays the last good one
    (never a partial one), /health names the path, the error is said once, and once there is
    room the file is written without any new change. Read-only: the same."""
    port, status = free_port(), free_port()
    src = tmp_path / "raw.j2"
    src.write_text(RAW_WEIGHT)
    dest = small_disk / "raw.cfg"
    register(consul, "f1", "raw", backends[0])
    proc = templater(
        "--template", f"{src}:{dest}", "--proxy", "haproxy", "--stop-proxy", "--status-addr", f"127.0.0.1:{status}",
        "--var", f"dir={tmp_path}", "--var", f"port={port}",
    )  # fmt: skip
    wait_until(lambda: get(port, "x", "/")[0] == 200, timeout=15, what="haproxy serving")
    wait_until(lambda: "server f1 " in dest.read_text(), what="first file")
    assert health(status)[0] == 200

    filler = fill(small_disk)
    good = dest.read_text()
    register(consul, "f2", "raw", backends[1])
    wait_until(lambda: health(status)[0] == 503, timeout=10, what="the write failure in /health")
    problems = health(status)[1]["problems"]
    writes = [v for k, v in problems.items() if k.startswith("write:")]
    assert writes and all(str(dest) in v and "No space left" in v for v in writes), problems
    wait_until(lambda: " f2 " in admin(tmp_path / "admin.sock", "show servers state be"), what="f2 at runtime")
    wait_until(lambda: proc.output().count("trying again") >= 1, what="the error in the log")
    assert dest.read_text() == good and get(port, "x", "/")[0] == 200
    assert [p.name for p in small_disk.iterdir() if p.name.endswith(".tmp")] == []  # no staged file left
    time.sleep(3.5)  # two retries later (1 s, then 2 s): said once, and never applied at runtime again
    assert proc.output().count("No space left") == 1 and "refused" not in proc.output()
    assert dest.read_text() == good

    filler.unlink()
    wait_until(lambda: "server f2 " in dest.read_text(), timeout=40, what="the file written once there is room")
    wait_until(lambda: health(status)[0] == 200, timeout=10, what="healthy again")
    assert "wrote " in proc.output() and " again" in proc.output()

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        register(consul, "f3", "raw", backends[2])
        wait_until(lambda: health(status)[0] == 503, timeout=10, what="read-only in /health")
        assert "Read-only file system" in " ".join(health(status)[1]["problems"].values())
        assert "server f3 " not in dest.read_text() and get(port, "x", "/")[0] == 200
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    wait_until(lambda: "server f3 " in dest.read_text(), timeout=40, what="written once it is writable")
    wait_until(lambda: health(status)[0] == 200, timeout=10, what="healthy again")
    assert proc.alive()


class FaultyConsul(TcpForwarder):
    """The agent through a forwarder that adds `delay` to every chunk of every answer and, while
    cutting, closes every open connection (blocking queries included) every `every` seconds."""

    name = "faulty-consul"

    def __init__(self, target_port: int, delay: float) -> None:
        super().__init__(target_port)
        self.delay = delay
        self.cuts = 0
        self._cutting = threading.Event()

    def seen(self, data: bytes, upstream: bool) -> None:
        if not upstream and self.delay:
            time.sleep(self.delay)

    def cut_every(self, every: float, until: threading.Event) -> threading.Thread:
        def run() -> None:
            while not until.wait(every):
                self.cut()
                self.cuts += 1

        thread = threading.Thread(target=run, name="cutter", daemon=True)
        thread.start()
        return thread


LISTING = "# begin\n{% for i in service('slow') %}{{ i.id }} {{ i.port }}\n{% endfor %}# end\n"


def test_a_slow_consul_that_cuts_its_connections_never_empties_the_output(consul, templater, tmp_path):
    """300 ms added to every answer, every connection cut every 0.7 s, blocking queries
    half-way included: no crash, never an emptied or partial file, a bounded number of
    connections, every change in the end; and once it heals, a change within a retry interval."""
    for n in range(3):
        register(consul, f"slow{n}", "slow", 9600 + n)
    faulty = FaultyConsul(consul.http_port, delay=0.3)
    faulty.start()
    src, dest, status = tmp_path / "slow.j2", tmp_path / "slow.txt", free_port()
    src.write_text(LISTING)
    proc = templater("--consul", faulty.url, "--template", f"{src}:{dest}", "--status-addr", f"127.0.0.1:{status}")
    stop = threading.Event()
    bad: list[str] = []
    try:
        wait_until(lambda: dest.exists() and dest.read_text().count("\n") == 5, timeout=20, what="first file")

        def read_all_along() -> None:
            while not stop.is_set():
                text = dest.read_text()
                if not (text.startswith("# begin\n") and text.endswith("# end\n")) or text.count("\n") < 4:
                    bad.append(text)
                time.sleep(0.005)

        reader = threading.Thread(target=read_all_along, daemon=True)
        reader.start()
        faulty.cut_every(0.7, stop)
        register(consul, "slow3", "slow", 9603)
        register(consul, "slow4", "slow", 9604)
        consul.put("/v1/agent/service/deregister/slow0", None)
        want = {f"slow{n} {9600 + n}" for n in range(1, 5)}
        wait_until(lambda: set(dest.read_text().splitlines()[1:-1]) == want, timeout=30, what="every change")
        time.sleep(3.0)  # more cuts with nothing changing
        pid = proc.proc.pid
        conns = [c for c in psutil.Process(pid).net_connections("tcp") if c.raddr and c.raddr.port == faulty.port]
        assert faulty.cuts >= 4 and proc.alive()
        assert len(conns) <= 12, conns  # the node, its list, two check states, the read pool: not one per cut
    finally:
        stop.set()
    assert bad == [], bad[:3]
    faulty.delay = 0.0  # healed
    time.sleep(2.5)  # one retry interval (--retry-max-backoff 2s) for a watch cut last
    started = time.monotonic()
    register(consul, "slow5", "slow", 9605)
    wait_until(lambda: "slow5 9605" in dest.read_text(), timeout=10, what="a change after it healed")
    assert time.monotonic() - started < 2.5
    faulty.stop()


def test_a_registrar_killed_while_containers_come_and_go_restores_the_catalog_at_start(
    consul, containers, registrar, hostname
):
    """SIGKILL while containers start, stop and are removed about once a second; started again
    10 s later: the agent lists exactly the running containers (ours) within 2 s of its start."""
    proc = registrar("--cleanup")
    running = [containers.run(labels={"SERVICE_NAME": "churn"}) for _ in range(3)]

    def ours() -> set[str]:
        return {sid for sid, s in consul.services().items() if s["Service"] == "churn" and sid.startswith(hostname)}

    def want() -> set[str]:
        return {f"{hostname}:{c.name}:8080" for c in running}

    def churn(seconds: float) -> None:
        """A container started, and one stopped (or removed) about every second."""
        end = time.monotonic() + seconds
        step = 0
        while time.monotonic() < end:
            step += 1
            running.append(containers.run(labels={"SERVICE_NAME": "churn"}))
            gone = running.pop(0)
            if step % 2:
                gone.stop(timeout=1)
            else:
                gone.remove(force=True)
            time.sleep(0.5)

    wait_until(lambda: ours() == want(), timeout=10, what="registered")
    churn(3.0)
    proc.stop(signal.SIGKILL)
    churn(10.0)
    started = time.monotonic()
    registrar("--cleanup", ready=False)
    wait_until(lambda: ours() == want(), timeout=10, what="the catalog equal to the running containers")
    took = time.monotonic() - started
    assert took < 2.0, f"{took:.2f} s after its start"


BRIDGE = "csfault0"  # the private engine's own bridge: with `--bridge none` dockerd deletes docker0


class PrivateEngine:
    """A Docker engine of the test's own (its socket, data, exec root, containerd namespace and
    bridge; no iptables), so it can be stopped and started again without touching the engine
    the rest of the suite uses. Stopped by its PID."""

    def __init__(self, root: Path, live_restore: bool) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.url = f"unix://{self.socket}"
        self.live_restore = live_restore
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exec_root = Path("/run") / f"consul-sidecar-{self.root.name}"  # short: unix socket paths are short
        argv = ["dockerd", "-H", self.url, "--data-root", str(DATA_ROOT), "--exec-root", str(exec_root),
                "--pidfile", str(self.root / "dockerd.pid"), "--bridge", BRIDGE, "--iptables=false",
                "--ip6tables=false", "--containerd-namespace", "consul-sidecar-faults",
                "--containerd-plugins-namespace", "consul-sidecar-faults-plugins",
                *(["--live-restore"] if self.live_restore else [])]  # fmt: skip
        with open(self.root / "dockerd.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._answers, timeout=60, what="the private dockerd")

    def _answers(self) -> bool:
        """GET /_ping on its socket (a plain socket: nothing left open when it is not there yet)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            try:
                sock.connect(str(self.socket))
                sock.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                return b" 200 " in sock.recv(64)
            except OSError:
                return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=30)


DATA_ROOT = Path("/var/lib/consul-sidecar-faults-docker")
DOCKER0_BEFORE = Path("/sys/class/net/docker0").exists()  # kept between runs: the image import is cached


@pytest.fixture(params=[True, False], ids=["live-restore", "no-live-restore"])
def private_engine(request, tmp_path: Path) -> Iterator[PrivateEngine]:
    root = Path(tempfile.mkdtemp(prefix="eng", dir="/tmp"))
    engine = PrivateEngine(root, request.param)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)  # one a killed run left
    subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", "10.231.0.1/24", "dev", BRIDGE], check=True)
    subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
    engine.start()
    try:
        yield engine
    finally:
        if engine.proc is None or engine.proc.poll() is not None:
            engine.start()
        client = engine.client()
        try:
            for container in client.containers.list(all=True):  # every container of this engine is ours
                container.remove(force=True)
        finally:
            client.close()
            engine.stop()
            shutil.rmtree(root, ignore_errors=True)
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    assert Path("/sys/class/net/docker0").exists() or not DOCKER0_BEFORE, "the suite's engine lost docker0"


def test_an_engine_restart_is_followed_by_a_resync(consul, templater, workdir, hostname, private_engine):
    """The Docker engine stops and starts again. With live-restore its containers keep running:
    nothing is deregistered and no request through the proxy fails. Without it they stop: the
    registrar deregisters them when the engine is back, and registers again the one whose restart
    policy brought it back."""
    engine = private_engine
    client = engine.client()
    image = ensure_image(client)
    ports = [free_port() for _ in range(3)]

    def run(port: int, **host: Any) -> Any:
        """A container on the host's network, its port exposed (docker-py's run() refuses ports there)."""
        config = client.api.create_host_config(network_mode="host", **host)
        labels = {"SERVICE_NAME": "engine", "SERVICE_HTTP_HOST": "engine.test"}
        created = client.api.create_container(
            image, ["sh", "-c", f"httpd -f -p 127.0.0.1:{port} -h /www"], ports=[port], labels=labels,
            host_config=config,
        )  # fmt: skip
        client.api.start(created["Id"])
        return client.containers.get(created["Id"])

    running = [run(ports[0]), run(ports[1]), run(ports[2], restart_policy={"Name": "always", "MaximumRetryCount": 0})]
    want = {f"{hostname}:{c.name}:{p}" for c, p in zip(running, ports, strict=True)}
    registrar = Process("registrar", ["--consul", consul.url, "--hostname", hostname, "--docker", engine.url,
                                      "--retry-interval", "500", "--cleanup"], workdir)  # fmt: skip
    http = free_port()
    templater(
        "--template", f"{ROOT / 'templates' / 'haproxy.cfg.j2'}:{workdir / 'engine.cfg'}", "--proxy", "haproxy",
        "--var", f"runtime_dir={workdir}", "--var", f"http_port={http}", "--var", "bind_address=127.0.0.1",
        "--stop-proxy",
    )  # fmt: skip

    def ours() -> set[str]:
        return {sid for sid, s in consul.services().items() if s["Service"] == "engine"}

    try:
        wait_until(lambda: ours() == want, timeout=20, what="registered")
        wait_until(lambda: get(http, "engine.test")[0] == 200, timeout=20, what="routed")
        with Load(http, "engine.test") as load:
            time.sleep(1.0)
            engine.stop()
            time.sleep(2.0)  # the engine is gone; the registrar's event stream broke
            assert registrar.alive()
            engine.start()
            wait_until(lambda: registrar.output().count("docker events connected") >= 2, timeout=20,
                       what="the registrar reconnected")  # fmt: skip
            if engine.live_restore:
                time.sleep(2.0)  # its resync after reconnecting: nothing to change
                assert ours() == want
            else:
                back = {f"{hostname}:{running[2].name}:{ports[2]}"}  # restart policy always
                wait_until(lambda: ours() == back, timeout=30, what="the stopped ones deregistered, one back")
            time.sleep(1.0)
        assert registrar.alive()
        if engine.live_restore:
            assert load.ok > 50 and load.failures == [], load.failures[:5]
    finally:
        registrar.stop()
        client.close()
