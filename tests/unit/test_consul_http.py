"""The one Consul HTTP layer's mapping of answers to our errors, against a loopback HTTP server
that answers as a Consul agent does when its cluster cannot answer, refuses, or breaks."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from sidecar.consul_conn import ConsulSettings
from sidecar.consul_http import ConsulHTTP
from sidecar.errors import ConsulForbidden, ConsulRejected, ConsulUnavailable
from tests.support import free_port

TOKEN = "5ecret-70ken-0042"
ANSWERS: dict[str, tuple[int, str, dict[str, str]]] = {
    "/v1/no-leader": (500, "No cluster leader", {}),
    "/v1/rpc": (500, "rpc error making call: EOF", {}),
    "/v1/bad-gateway": (502, "", {}),
    "/v1/invalid": (500, "Invalid check: TTL must be > 0", {}),
    "/v1/bad-request": (400, "Missing service name", {}),
    "/v1/denied": (403, f"ACL not found (token {TOKEN})", {}),
    "/v1/missing": (404, "", {"X-Consul-Index": "42"}),
    "/v1/not-json": (200, "{not json", {}),
    "/v1/stale": (200, '{"a": 1}', {"X-Consul-Index": "7", "X-Consul-KnownLeader": "false",
                                   "X-Consul-LastContact": "1500"}),
}  # fmt: skip


class _Agent(http.server.BaseHTTPRequestHandler):
    seen_headers: list[dict[str, str]] = []  # noqa: RUF012 - one list for the test module

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        _Agent.seen_headers.append({k.lower(): v for k, v in self.headers.items()} | {"path": self.path})
        code, body, headers = ANSWERS.get(self.path.split("?")[0], (200, "null", {}))
        data = body.encode()
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = _answer


@pytest.fixture(scope="module")
def agent() -> Iterator[ConsulHTTP]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Agent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield ConsulHTTP(ConsulSettings(url=f"http://127.0.0.1:{server.server_address[1]}", token=TOKEN), timeout=5)
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("path", "error"),
    [("/v1/no-leader", ConsulUnavailable), ("/v1/rpc", ConsulUnavailable), ("/v1/bad-gateway", ConsulUnavailable),
     ("/v1/invalid", ConsulRejected), ("/v1/bad-request", ConsulRejected), ("/v1/denied", ConsulForbidden),
     ("/v1/not-json", ConsulUnavailable)],
)  # fmt: skip
def test_each_answer_maps_to_one_error_with_the_token_scrubbed(agent: ConsulHTTP, path: str, error: type) -> None:
    with pytest.raises(error) as raised:
        agent.get(path, doing="during a test", needs="key:read")
    assert type(raised.value) is error
    assert TOKEN not in str(raised.value)
    if error is ConsulForbidden:
        assert str(raised.value).startswith("permission denied during a test (needs key:read): 403")


def test_a_put_refused_is_rejected_and_names_what_it_was_for(agent: ConsulHTTP) -> None:
    with pytest.raises(ConsulRejected, match=r"consul refused during register web-1: 404"):
        agent.put("/v1/missing", {"Name": "web"}, doing="during register web-1")


def test_headers_are_read_in_one_place_and_the_token_goes_in_a_header(agent: ConsulHTTP) -> None:
    missing = agent.get("/v1/missing")
    assert (missing.found, missing.data, missing.index) == (False, None, 42)
    stale = agent.get("/v1/stale", [("stale", "")])
    assert (stale.data, stale.index, stale.known_leader, stale.last_contact_ms) == ({"a": 1}, 7, False, 1500)
    sent = _Agent.seen_headers[-1]
    assert sent["x-consul-token"] == TOKEN and TOKEN not in sent["path"] and "stale" in sent["path"]


def test_no_answer_is_unavailable_and_scrubbed() -> None:
    dead = ConsulHTTP(ConsulSettings(url=f"http://127.0.0.1:{free_port()}", token=TOKEN), timeout=2)
    with pytest.raises(ConsulUnavailable, match="unreachable reading /v1/kv/x") as raised:
        dead.get("/v1/kv/x", [("token", TOKEN)])  # a token a caller put in the URL is scrubbed too
    assert TOKEN not in str(raised.value)
