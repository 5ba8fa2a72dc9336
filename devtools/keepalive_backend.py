"""A backend that speaks HTTP/1.1 keep-alive and shuts down the common graceful way.

On SIGTERM it stops accepting, closes its idle keep-alive connections at once, lets in-flight
requests finish (closing their connections after the response), then exits: what Go's
http.Server.Shutdown, gunicorn and uvicorn do. The tests and bench/proxy_bench.py run it in a
container to show what such backends do to a proxy's upstream connection pool. GET and POST
/cgi-bin/slow answer "ok <hostname>" after 30 ms, like the busybox backend; /index.html "ok".
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = threading.Condition()
# keep-alive connections waiting for their next request; a new connection is not idle until it
# has served one (Go gives new connections time to send theirs, too)
IDLE: set[socket.socket] = set()
BUSY = [0]
CLOSING = threading.Event()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the client says close

    def finish(self) -> None:
        with STATE:
            IDLE.discard(self.connection)
        super().finish()

    def _answer(self) -> None:
        with STATE:
            IDLE.discard(self.connection)
            BUSY[0] += 1
        try:
            self._respond()
        finally:
            with STATE:
                BUSY[0] -= 1
                if not self.close_connection:
                    IDLE.add(self.connection)
                STATE.notify_all()

    def _respond(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.startswith("/cgi-bin/slow"):
            time.sleep(0.03)
            body = f"ok {socket.gethostname()}\n".encode()
        else:
            body = b"ok\n"
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        if CLOSING.is_set():
            head += "Connection: close\r\n"
            self.close_connection = True
        # head and body in one write, as servers send a small answer: a SIGKILL then lands
        # before the answer or after it, never between the head and the body (a cut answer
        # that no proxy may resend, whatever it does)
        self.wfile.write(head.encode() + b"\r\n" + body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        return


def main() -> int:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True

    def on_term(_signum: int, _frame: object) -> None:
        CLOSING.set()
        # stop accepting at once, as Go's Shutdown closes its listeners first: new connections
        # are refused (a proxy resends any request to another instance then)
        with contextlib.suppress(OSError):
            server.socket.shutdown(socket.SHUT_RDWR)
        threading.Thread(target=server.shutdown).start()
        with STATE:
            idle = list(IDLE)
        for conn in idle:  # idle keep-alive connections are closed at once
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    signal.signal(signal.SIGTERM, on_term)
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    with STATE:  # in-flight requests finish
        STATE.wait_for(lambda: BUSY[0] == 0, timeout=30)
    time.sleep(0.05)
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
