"""The status address both programs serve: /health (JSON, 200 or 503) and Prometheus /metrics.

Bound to loopback unless told otherwise: it tells anyone who can reach it how the host is doing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HealthFn = Callable[[], tuple[int, dict[str, Any]]]
MetricsFn = Callable[[], str]
# more paths, from the path and the request's If-None-Match: (status, body, content type, ETag or
# ""), or None for a path it does not serve
PagesFn = Callable[[str, str], tuple[int, bytes, str, str] | None]
# whether a request for one of those paths may be answered, from its Authorization header
GateFn = Callable[[str | None], bool]


def parse_addr(text: str) -> tuple[str, int]:
    """HOST:PORT (HOST defaults to 127.0.0.1). Raises ValueError."""
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"status address {text!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)


class StatusServer:
    def __init__(
        self, addr: tuple[str, int], health: HealthFn, metrics: MetricsFn, pages: PagesFn | None = None,
        gate: GateFn | None = None,
    ) -> None:  # fmt: skip
        """pages: more read-only paths (the templater's routes page); gate: asked first for them."""

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                headers: dict[str, str] = {}
                if self.path.startswith("/health"):
                    code, body = health()
                    payload, ctype = json.dumps(body).encode(), "application/json"
                elif self.path.startswith("/metrics"):
                    code, payload, ctype = 200, metrics().encode(), "text/plain; version=0.0.4"
                elif pages is not None and gate is not None and not gate(self.headers.get("Authorization")):
                    code, payload, ctype = 401, b"a token is needed (--status-token-file)\n", "text/plain"
                    headers["WWW-Authenticate"] = 'Basic realm="consul-sidecar routes", charset="UTF-8"'
                else:
                    answer = pages(self.path, self.headers.get("If-None-Match") or "") if pages is not None else None
                    if answer is None:
                        code, payload, ctype = 404, b"not found\n", "text/plain"
                    else:
                        code, payload, ctype, etag = answer
                        headers["Cache-Control"] = "no-cache"  # kept, and asked again every time
                        if etag:
                            headers["ETag"] = etag
                        headers["Content-Security-Policy"] = (
                            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                            "connect-src 'self'; img-src 'self'"
                        )
                        headers["X-Content-Type-Options"] = "nosniff"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(addr, Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="status", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
