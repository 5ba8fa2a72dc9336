"""Fast readiness: probe a new instance's HTTP/TCP check target at short intervals.

Consul runs a check first somewhere within its interval; a container that answers after 80 ms
should not wait 10 s for traffic. The probe answers "ready" once, then Consul takes over.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator

from registrar.model import Check


def probe_once(check: Check, timeout: float = 0.5) -> bool:
    """Whether the check target answers as Consul's check would count passing."""
    try:
        if check.kind == "tcp":
            host, _, port = check.target.rpartition(":")
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return True
        url = urllib.parse.urlsplit(check.target)
        conn: http.client.HTTPConnection
        if url.scheme == "https":
            context = ssl.create_default_context()
            if check.tls_skip_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            conn = http.client.HTTPSConnection(url.netloc, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection(url.netloc, timeout=timeout)
        try:
            path = url.path or "/"
            if url.query:
                path += "?" + url.query
            conn.request(check.method, path, headers={"User-Agent": "registrar-readiness"})
            return 200 <= conn.getresponse().status < 300
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ValueError):
        return False


def schedule(window: float) -> Iterator[float]:
    """Delays between probes: 20 ms for the first second, then 100 ms, then 500 ms."""
    elapsed = 0.0
    while elapsed < window:
        delay = 0.02 if elapsed < 1 else 0.1 if elapsed < 10 else 0.5
        elapsed += delay
        yield delay


class Prober:
    """Runs one probing thread per (service, check) until it passes, the window closes, or
    it is cancelled because the container went away."""

    def __init__(self, on_ready: Callable[[str, int, int], None], window: float = 60.0) -> None:
        self._on_ready = on_ready
        self._window = window
        self._cancelled: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, service_id: str, index: int, check: Check, generation: int) -> None:
        with self._lock:
            old = self._cancelled.get(service_id)
            if old:
                old.set()
            cancel = threading.Event()
            self._cancelled[service_id] = cancel
        thread = threading.Thread(
            target=self._run,
            args=(service_id, index, check, generation, cancel),
            name=f"probe-{service_id}",
            daemon=True,
        )
        thread.start()

    def cancel(self, service_id: str) -> None:
        with self._lock:
            cancel = self._cancelled.pop(service_id, None)
        if cancel:
            cancel.set()

    def cancel_all(self) -> None:
        with self._lock:
            events, self._cancelled = list(self._cancelled.values()), {}
        for event in events:
            event.set()

    def _run(self, service_id: str, index: int, check: Check, generation: int, cancel: threading.Event) -> None:
        for delay in schedule(self._window):
            if cancel.is_set():
                return
            if probe_once(check, timeout=min(0.5, max(0.05, delay * 10))):
                with self._lock:
                    if self._cancelled.get(service_id) is cancel:
                        del self._cancelled[service_id]
                if not cancel.is_set():
                    self._on_ready(service_id, index, generation)
                return
            if cancel.wait(delay):
                return
