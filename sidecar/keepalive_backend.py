"""A backend that speaks HTTP/1.1 keep-alive and shuts down the common graceful way.

On SIGTERM it stops accepting, lets in-flight requests finish, then exits, which closes its idle
keep-alive connections at once (as Go's http.Server.Shutdown, gunicorn and uvicorn do). The
tests and bench/proxy_bench.py run it in a container to show what such backends do to a proxy's
upstream connection pool. GET and POST /cgi-bin/slow answer "ok <hostname>" after 30 ms, like
the busybox backend; /index.html answers "ok".
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

IN_FLIGHT = threading.Condition()
BUSY = [0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the client says close

    def _answer(self) -> None:
        with IN_FLIGHT:
            BUSY[0] += 1
        try:
            self._respond()
        finally:
            with IN_FLIGHT:
                BUSY[0] -= 1
                IN_FLIGHT.notify_all()

    def _respond(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.startswith("/cgi-bin/slow"):
            time.sleep(0.03)
            body = f"ok {socket.gethostname()}\n".encode()
        else:
            body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        return


def main() -> int:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True  # idle keep-alive connections die with the process

    def on_term(_signum: int, _frame: object) -> None:
        # stop accepting now; in-flight requests finish (non-daemon work below), then exit
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, on_term)
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    with IN_FLIGHT:  # in-flight requests finish; idle keep-alive connections are not waited for
        IN_FLIGHT.wait_for(lambda: BUSY[0] == 0, timeout=30)
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
