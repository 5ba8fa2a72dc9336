"""Socket forwarders that a test can cut or slow (a faulty network between two real programs)."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

from tests.support.polling import free_port


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
                stopped = self._server is not server  # stop() ran since accept(): cut this one too
                if not stopped:
                    self._conns += [client, upstream]
            if stopped:
                client.close()
                upstream.close()
                return
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
        with self._lock:  # under the lock: an accept in flight sees the stop and closes its pair
            server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
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
