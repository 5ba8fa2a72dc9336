"""Waiting and ports: free loopback ports, polling until a condition holds, temporary directories."""

from __future__ import annotations

import contextlib
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """count distinct free ports: each socket stays bound until all are picked (one at a time,
    the kernel may hand the same port out twice: a Consul agent once got its RPC port equal to
    its HTTP port and would not start)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


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


@contextlib.contextmanager
def tempdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sidecar-test-") as d:
        yield Path(d)
