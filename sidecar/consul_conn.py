"""Consul connection flags shared by both programs, and the client built from them."""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import consul
import requests

from sidecar.errors import ConsulRejected, ConsulUnavailable

T = TypeVar("T")


@dataclass(frozen=True)
class ConsulSettings:
    url: str = "http://127.0.0.1:8500"
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def describe(self) -> str:
        return self.url

    def scrub(self, text: str) -> str:
        """text without the ACL token, for error messages, logs and /health."""
        return scrub(text, self.token)


_TOKEN_PARAM = re.compile(r"(?i)([?&](?:token|X-Consul-Token)=)[^&\s'\")]*")
REDACTED = "<redacted>"


def scrub(text: str, token: str | None = None) -> str:
    """text with every `token=` query value and every occurrence of the token redacted.

    Third-party errors (requests, urllib3) quote the URL they failed on; none of that may carry
    a secret into a log line or a status page."""
    text = _TOKEN_PARAM.sub(r"\1" + REDACTED, text)
    if token:
        text = text.replace(token, REDACTED)
    return text


def add_consul_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    group = parser.add_argument_group("consul")
    group.add_argument(
        "--consul",
        default=env("CONSUL_HTTP_ADDR", "http://127.0.0.1:8500"),
        help="Consul agent address (CONSUL_HTTP_ADDR)",
    )
    group.add_argument("--token", default=env("CONSUL_HTTP_TOKEN"), help="ACL token (CONSUL_HTTP_TOKEN)")
    group.add_argument("--ca-file", default=env("CONSUL_CACERT"), help="CA bundle for https")
    group.add_argument("--cert-file", default=env("CONSUL_CLIENT_CERT"), help="client certificate")
    group.add_argument("--key-file", default=env("CONSUL_CLIENT_KEY"), help="client key")


def consul_settings_from(args: argparse.Namespace) -> ConsulSettings:
    url = args.consul if "//" in args.consul else f"http://{args.consul}"
    return ConsulSettings(
        url=url, token=args.token, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file
    )


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
    client.token = settings.token
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
        return client


class AgentAPI:
    """Agent API calls with every failure mapped to ConsulUnavailable or ConsulRejected, the
    token scrubbed from the message. Shared by the registrar and the templater's own
    registration."""

    def __init__(self, settings: ConsulSettings, timeout: float = 5.0) -> None:
        self._settings = settings
        self._clients = ClientPerThread(settings, timeout)

    def call(self, what: str, fn: Callable[[consul.Consul], T]) -> T:
        scrub = self._settings.scrub
        try:
            return fn(self._clients.get())
        except (requests.RequestException, consul.Timeout, OSError) as err:
            raise ConsulUnavailable(scrub(f"consul {self._settings.url} unreachable during {what}: {err}")) from None
        except consul.ConsulException as err:
            text = scrub(str(err))
            if text.startswith("500") and ("connection refused" in text or "No cluster leader" in text):
                raise ConsulUnavailable(f"consul not ready during {what}: {text}") from None
            raise ConsulRejected(f"consul refused {what}: {text}") from None

    def put(self, what: str, path: str, body: Any = None, params: list[Any] | None = None) -> None:
        def run(client: consul.Consul) -> None:
            data = json.dumps(body) if body is not None else ""
            client.http.put(
                consul.callback.CB.boolean(), path, params=params or [], data=data, headers=client.prepare_headers()
            )

        self.call(what, run)
