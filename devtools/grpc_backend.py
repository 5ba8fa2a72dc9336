"""A gRPC backend for the tests, run in a container on the local Debian base.

Generic handlers over raw bytes (no generated code): echo.Echo/Say answers `<hostname>:<request>`
and echo.Echo/Count streams `<hostname>:0` to `<hostname>:2`. It speaks HTTP/2 in clear (h2c)
on the port given (8080), and stops on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    name = os.environ.get("HOSTNAME", "grpc").encode()

    def say(request: bytes, _context: Any) -> bytes:
        return name + b":" + request

    def count(_request: bytes, _context: Any) -> Iterator[bytes]:
        for n in range(3):
            yield name + b":" + str(n).encode()

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {"Say": grpc.unary_unary_rpc_method_handler(say), "Count": grpc.unary_stream_rpc_method_handler(count)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(8), handlers=(handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(1))
    server.wait_for_termination()


if __name__ == "__main__":
    main()
