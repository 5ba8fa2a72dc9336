"""Traffic through a proxy and the web backends it goes to, for the proxy tests and bench/."""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tests.support import IMAGE, TEST_LABEL, wait_until

# a backend that finishes in-flight requests on SIGTERM (docker stop), as the issue asks
SERVE = "trap 'sleep 1; kill $pid; exit 0' TERM; httpd -f -p 8080 -h /www & pid=$!; wait"


@dataclass
class Load:
    """Steady load through the proxy: a new connection per request, a quarter of them POST."""

    port: int
    host: str
    workers: int = 4
    address: str = "127.0.0.1"
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    get_failures: int = 0
    latencies: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _one(self) -> None:
        post = random.random() < 0.25
        started = time.monotonic()
        conn = http.client.HTTPConnection(self.address, self.port, timeout=10)
        try:
            body = b"x" * 200 if post else None
            conn.request("POST" if post else "GET", "/cgi-bin/slow", body=body, headers={"Host": self.host})
            response = conn.getresponse()
            data = response.read()
            if response.status != 200 or not data.startswith(b"ok"):
                raise RuntimeError(f"{response.status} {data[:80]!r}")
        except Exception as err:  # every kind of failure counts
            conn.close()
            with self.lock:
                self.failures.append(f"{'POST' if post else 'GET'}: {err} (at {time.time():.2f})")
                self.get_failures += 0 if post else 1
            return
        conn.close()
        with self.lock:
            self.ok += 1
            self.latencies.append(time.monotonic() - started)

    def _run(self) -> None:
        while not self.stop.is_set():
            self._one()

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self._run) for _ in range(self.workers)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def get(port: int, host: str, path: str = "/cgi-bin/slow") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path, headers={"Host": host})
    response = conn.getresponse()
    body = response.read().decode()
    served = response.getheader("X-Served-By") or ""
    conn.close()
    return response.status, body + served


WEB_LABELS = {
    "SERVICE_NAME": "web",
    "SERVICE_HTTP_HOST": "app.test",
    "SERVICE_CHECK_HTTP": "/index.html",
    "SERVICE_CHECK_INTERVAL": "5s",
}


def web(containers: Any, name: str | None = None, **labels: str) -> Any:
    return containers.run(labels={**WEB_LABELS, **labels}, command=SERVE, name=name, stop_signal="SIGTERM")


def web_keepalive(containers: Any, image: str, **labels: str) -> Any:
    """A web backend that keeps connections alive and, on SIGTERM, finishes in-flight requests
    and exits, closing its idle keep-alive connections (devtools/keepalive_backend.py)."""
    return containers.run(labels={**WEB_LABELS, **labels}, command=None, image=image, stop_signal="SIGTERM")


def serving_web(
    containers: Any, count: int, serving: Callable[[Any], bool], timeout: float = 30.0, image: str | None = None
) -> list[Any]:
    """`count` web backends (busybox, or the keep-alive backend in `image`), returned once every
    one answers through the proxy (`serving`)."""
    backends = [web(containers) if image is None else web_keepalive(containers, image) for _ in range(count)]
    wait_until(lambda: all(serving(c) for c in backends), timeout=timeout, what=f"{count} backends serving")
    return backends


def served_by(port: int, marker: str) -> bool:
    """Whether the instance marked so answers within 8 requests. X-Served-By carries HAProxy's
    server name (the registrator ID host:container:port: the container name is a marker) or
    NGINX's upstream address (127.0.0.1:<published port>)."""
    return any(marker in get(port, "app.test", "/index.html")[1] for _ in range(8))


def started_at(container: Any) -> float:
    """The container's State.StartedAt as a Unix time (Docker gives nanoseconds; keep micro)."""
    container.reload()
    stamp = container.attrs["State"]["StartedAt"]  # 2026-11-22T20:35:01.812345678Z
    whole, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp() + float("0." + (frac or "0"))


# busybox httpd that closes its listener the moment it gets SIGTERM, as Go's Shutdown, gunicorn
# and uvicorn do (in-flight requests still finish): for the drain plugin's tests and bench
SERVE_CLOSING = "trap 'kill $pid; exit 0' TERM; httpd -f -p 8080 -h /www & pid=$!; wait"

COMPOSE_WEB = """version: "2.4"
services:
  web:
    image: {image}
    {command}
    labels: {labels}
    ports: ["127.0.0.1::8080"]
    stop_signal: SIGTERM
    stop_grace_period: 5s
"""


def closing_web(containers: Any, image: str | None) -> Any:
    """A web backend that stops accepting at once on SIGTERM: busybox, or the keep-alive one in image."""
    if image is None:
        return containers.run(labels=WEB_LABELS, command=SERVE_CLOSING, stop_signal="SIGTERM")
    return containers.run(labels=WEB_LABELS, command=None, image=image, stop_signal="SIGTERM")


def compose_web(directory: Any, image: str | None, session: str) -> Any:
    """directory/compose.yaml with one such backend as service `web` (labelled as the session's)."""
    labels = {TEST_LABEL: session, **WEB_LABELS}
    command = (
        "" if image else f"command: {json.dumps(['sh', '-c', SERVE_CLOSING.replace('$', '$$')])}"
    )  # compose interpolates $
    path = directory / "compose.yaml"
    path.write_text(COMPOSE_WEB.format(image=image or IMAGE, command=command, labels=json.dumps(labels)))
    return path
