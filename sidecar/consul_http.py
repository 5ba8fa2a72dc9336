"""The one HTTP layer both programs use to talk to Consul.

GET and PUT through py-consul's HTTP client (one keep-alive connection per calling thread),
the ACL token in the X-Consul-Token header (never in the URL), blocking-query and stale
parameters as given, and one mapping of every failure to our error tree, each text scrubbed of
secrets:

- no answer (connection refused, reset, timeout)          -> ConsulUnavailable
- 5xx that says the cluster cannot answer yet (no leader,
  an RPC or connection error between agent and servers),
  and 502 / 503 / 504 from anything in between             -> ConsulUnavailable
- 403                                                      -> ConsulForbidden, naming the permission
- 404 on a GET                                             -> an Answer with found=False
- any other 4xx / 5xx                                      -> ConsulRejected
- a body that is not JSON                                  -> ConsulUnavailable

The X-Consul-* headers are read here, into the Answer.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import consul
import requests

from sidecar.consul_conn import ConsulSettings
from sidecar.errors import ConsulForbidden, ConsulRejected, ConsulUnavailable

Params = Sequence[tuple[str, str]]

# what a 500 says when the agent or the servers cannot answer for now (retry), not "no"
_NOT_READY = ("No cluster leader", "connection refused", "rpc error", "i/o timeout", "Not ready", "EOF")


def make_client(settings: ConsulSettings, timeout: float = 10.0) -> consul.Consul:
    """A py-consul client for the agent in settings.

    The token is passed per request rather than through py-consul's constructor, which lets
    CONSUL_HTTP_TOKEN override an explicit --token.
    """
    parsed = urllib.parse.urlparse(settings.url)
    scheme = parsed.scheme or "http"
    port = parsed.port or (443 if scheme == "https" else 8500)
    verify: bool | str = settings.ca_file or True
    cert = (settings.cert_file, settings.key_file) if settings.cert_file and settings.key_file else None
    client = consul.Consul(
        host=parsed.hostname or "127.0.0.1",
        port=port,
        scheme=scheme,
        verify=verify,
        cert=cert,
    )
    client.token = settings.current_token()
    client.http.connections_timeout = timeout
    return client


class ClientPerThread:
    """One py-consul client (one keep-alive connection) per calling thread.

    A requests session is not safe to share between threads, and both daemons call Consul
    from several threads (sync loop and probes; watch loops and the node pool).
    """

    def __init__(self, settings: ConsulSettings, timeout: float) -> None:
        self.settings = settings
        self._timeout = timeout
        self._local = threading.local()

    def get(self) -> consul.Consul:
        client: consul.Consul | None = getattr(self._local, "client", None)
        if client is None:
            client = make_client(self.settings, self._timeout)
            self._local.client = client
        else:
            client.token = self.settings.current_token()  # a token file may have changed
        return client


@dataclass(frozen=True)
class Answer:
    data: Any  # the decoded JSON body; None for an empty body or a 404
    index: int = 0  # X-Consul-Index: where a blocking query goes on from
    last_contact_ms: int = 0  # X-Consul-LastContact: how long since the answering server heard a leader
    known_leader: bool = True  # X-Consul-KnownLeader
    found: bool = True  # False: 404

    def mapping(self) -> dict[str, Any]:
        """The body when it is a JSON object, else an empty one."""
        return self.data if isinstance(self.data, dict) else {}


class ConsulHTTP:
    """Requests to one Consul agent, counted (for /metrics and the bench)."""

    def __init__(self, settings: ConsulSettings, timeout: float = 10.0) -> None:
        """timeout: for a request that does not block; a blocking query's read timeout follows
        its `wait` (py-consul sizes it)."""
        self.settings = settings
        self._clients = ClientPerThread(settings, timeout)
        self.requests = 0
        self.bytes = 0  # the answers' bodies, as sent

    def get(self, path: str, params: Params = (), *, doing: str = "", needs: str = "") -> Answer:
        """doing: what the request is for, as the error texts say it ("during register web-1",
        "reading /v1/kv/app"); needs: the ACL permission it needs, named when it is denied."""
        return self._send("get", path, params, None, doing or f"reading {path}", needs)

    def put(self, path: str, body: Any = None, params: Params = (), *, doing: str = "", needs: str = "") -> Answer:
        data = json.dumps(body) if body is not None else ""
        return self._send("put", path, params, data, doing or f"writing {path}", needs)

    def _send(self, method: str, path: str, params: Params, data: str | None, doing: str, needs: str) -> Answer:
        client = self._clients.get()
        scrub = self.settings.scrub
        headers = client.prepare_headers()
        self.requests += 1
        try:
            if method == "get":
                raw = client.http.get(lambda r: r, path, params=list(params), headers=headers)
            else:
                raw = client.http.put(lambda r: r, path, params=list(params), data=data, headers=headers)
        except (requests.RequestException, consul.Timeout, OSError) as err:
            raise ConsulUnavailable(scrub(f"consul {self.settings.url} unreachable {doing}: {err}")) from None
        body = raw.body or ""
        self.bytes += len(body)
        code = int(raw.code)
        if code >= 400:
            self._refuse(code, body, method, doing, needs)
            return Answer(None, _int(raw.headers, "X-Consul-Index", 1), found=False)
        try:
            decoded = json.loads(body) if body else None
        except ValueError as err:
            raise ConsulUnavailable(f"consul {path}: bad JSON: {err}") from None
        return Answer(
            decoded,
            index=_int(raw.headers, "X-Consul-Index", 0),
            last_contact_ms=_int(raw.headers, "X-Consul-LastContact", 0),
            known_leader=str(raw.headers.get("X-Consul-KnownLeader", "true")).lower() == "true",
        )

    def _refuse(self, code: int, body: str, method: str, doing: str, needs: str) -> None:
        """Raise for an answer of code; returns only for a 404 on a GET."""
        scrub = self.settings.scrub
        text = scrub(f"{code} {body[:200].strip()}")
        if code == 403:
            raise ConsulForbidden(scrub(f"permission denied {doing}{f' (needs {needs})' if needs else ''}: {text}"))
        if code == 404 and method == "get":
            return
        if code in (502, 503, 504) or (code >= 500 and any(m in body for m in _NOT_READY)):
            raise ConsulUnavailable(f"consul not ready {doing}: {text}")
        raise ConsulRejected(f"consul refused {doing}: {text}")


def _int(headers: Any, name: str, default: int) -> int:
    try:
        return int(headers.get(name) or default)
    except (TypeError, ValueError):
        return default
