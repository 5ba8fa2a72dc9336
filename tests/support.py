"""Real services for the tests: a Consul dev agent, the Docker engine, a test image, processes.

Everything started here is stopped by PID; every container is labelled TEST_LABEL and only
containers with that label are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import docker
from prometheus_client.parser import text_string_to_metric_families

from devtools.demo_image import IMAGE, ensure_image  # noqa: F401 - re-exported for tests and bench
from sidecar.signals import terminate

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
TEST_LABEL = "consul-sidecar.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(fn: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll fn until it returns something truthy; fail with what it last returned."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = fn()
        except Exception as err:  # the thing polled is allowed to be not there yet
            last = err
        else:
            if value:
                return value
            last = value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}: last={last!r}")


def health(port: int) -> tuple[int, dict[str, Any]]:
    """A program's /health on 127.0.0.1:port: the status code and the JSON body (503 included)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def scrape(port: int) -> dict[str, float]:
    """A program's /metrics on 127.0.0.1:port through prometheus_client's own parser: sample -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


class ConsulAgent:
    """`consul agent -dev` on free loopback ports; restart() loses all state, as a dev agent does."""

    def __init__(self, workdir: Path, extra: dict[str, Any] | None = None, https: bool = False) -> None:
        """extra: merged into the configuration (ACLs, TLS files); https: serve HTTPS too."""
        self.workdir = workdir
        self.https_port = free_port() if https else None
        self.extra = extra or {}  # merged into the agent's configuration (ACLs, TLS)
        self.token: str | None = None  # sent by get() and put() when set
        self.http_port = free_port()
        self.dns_port = free_port()  # Consul's DNS interface (TCP and UDP)
        self._ports = {
            "serf_lan": free_port(),
            "serf_wan": free_port(),
            "server": free_port(),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "consul.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        config = {
            "ports": {
                "http": self.http_port,
                "dns": self.dns_port,
                "grpc": -1,
                "serf_lan": self._ports["serf_lan"],
                "serf_wan": self._ports["serf_wan"],
                "server": self._ports["server"],
                **({"https": self.https_port} if self.https_port else {}),
            },
            "enable_local_script_checks": True,
            "disable_update_check": True,  # no traffic off this machine
            **self.extra,
        }
        cfg = self.workdir / "consul.json"
        cfg.write_text(json.dumps(config))
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed on stop
        self.proc = subprocess.Popen(
            [
                "consul",
                "agent",
                "-dev",
                "-node",
                str(self.extra.get("node_name", "test-node")),
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
                "-config-file",
                str(cfg),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(self._leader, timeout=30, interval=0.1, what="consul leader")

    def _leader(self) -> bool:
        return bool(self.get("/v1/status/leader"))

    def stop(self) -> None:
        if self.proc:
            terminate(self.proc, signal.SIGTERM, 10, "consul")
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self.token} if self.token else {}

    def get(self, path: str) -> Any:
        request = urllib.request.Request(self.url + path, headers=self._headers())
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"null")

    def put(self, path: str, body: Any = None, method: str = "PUT") -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self._headers())
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"null")

    def services(self) -> dict[str, Any]:
        return dict(self.get("/v1/agent/services"))

    def checks(self) -> dict[str, Any]:
        return dict(self.get("/v1/agent/checks"))

    def health(self, name: str, passing: bool = False) -> list[Any]:
        return list(self.get(f"/v1/health/service/{name}" + ("?passing" if passing else "")))


def docker_client() -> docker.DockerClient:
    return docker.from_env(timeout=60)


def remove_test_containers(client: docker.DockerClient, session: str | None = None) -> None:
    selector = f"{TEST_LABEL}={session}" if session else TEST_LABEL
    for container in client.containers.list(all=True, filters={"label": selector}):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            container.remove(force=True)


HTTPD = "httpd -f -p 8080 -h /www"


class Containers:
    """Starts labelled test containers; each publishes its ports on 127.0.0.1 only."""

    def __init__(self, client: docker.DockerClient, session: str) -> None:
        self.client = client
        self.session = session
        self.count = 0

    def run(
        self,
        labels: dict[str, str] | None = None,
        command: str | None = HTTPD,
        ports: tuple[str, ...] = ("8080/tcp",),
        name: str | None = None,
        image: str = IMAGE,
        **kwargs: Any,
    ) -> Any:
        """command runs under sh -c; None runs the image's own entrypoint."""
        self.count += 1
        all_labels = {TEST_LABEL: self.session, **(labels or {})}
        kwargs.setdefault("stop_signal", "SIGTERM")
        return self.client.containers.run(
            image,
            ["sh", "-c", command] if command is not None else None,
            name=name or f"t{self.session}-{self.count}",
            labels=all_labels,
            ports={p: ("127.0.0.1", None) for p in ports},
            detach=True,
            **kwargs,
        )

    def host_port(self, container: Any, port: str = "8080/tcp") -> int:
        container.reload()
        return int(container.attrs["NetworkSettings"]["Ports"][port][0]["HostPort"])


class Process:
    """A Python entry point run as a child, its output in a log file, stopped by PID."""

    def __init__(
        self, module: str, args: list[str], workdir: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> None:
        self.log_path = workdir / f"{module}-{int(time.time() * 1000)}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


@contextlib.contextmanager
def tempdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sidecar-test-") as d:
        yield Path(d)


class _Forwarder:
    """Forwards every accepted connection to a target; stop() cuts them all and refuses new
    ones, start() opens the path again. Subclasses say how to listen and how to connect."""

    name = "fwd"

    def __init__(self) -> None:
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def _listen(self) -> socket.socket:
        raise NotImplementedError

    def _connect(self) -> socket.socket:
        raise NotImplementedError

    def _cleanup(self) -> None:
        """After stop(): what the listener leaves behind."""

    def start(self) -> None:
        server = self._listen()
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), name=f"{self.name}-accept", daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        server.settimeout(0.1)  # closing a socket does not wake a blocked accept(): poll instead
        while True:
            try:
                client, _ = server.accept()
            except TimeoutError:
                if server.fileno() == -1:
                    return
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = self._connect()
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # a blocking query holds its answer for up to its wait
            with self._lock:
                self._conns += [client, upstream]
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self.pump, args=(a, b, up), name=f"{self.name}-pump", daemon=True).start()

    def pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        """Copy one direction until it closes; upstream: client -> target."""
        try:
            while data := src.recv(65536):
                self.seen(data, upstream)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def seen(self, data: bytes, upstream: bool) -> None:
        """Every chunk forwarded (for counting forwarders)."""

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None
        self.cut()
        self._cleanup()

    def cut(self) -> None:
        """Close every forwarded connection (the listener stays as it is)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


class UnixSocketForwarder(_Forwarder):
    """A unix socket that forwards every connection to the real Docker socket.

    Stopping it closes every forwarded connection, which is what a Docker engine restart looks
    like to a client: the event stream breaks and new connections are refused.
    """

    name = "fwd"

    def __init__(self, path: Path, target: str = "/var/run/docker.sock") -> None:
        super().__init__()
        self.path = path
        self.target = target

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def _listen(self) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.path))
        return server

    def _connect(self) -> socket.socket:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(self.target)
        return upstream

    def _cleanup(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class TcpForwarder(_Forwarder):
    """127.0.0.1:<port> forwarding to a target port; stop() refuses new connections and cuts the
    open ones, as an unreachable agent looks to a client; start() again restores the path."""

    name = "tcp-fwd"

    def __init__(self, target_port: int, port: int | None = None) -> None:
        super().__init__()
        self.target_port = target_port
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> socket.socket:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        return server

    def _connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
