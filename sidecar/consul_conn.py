"""Consul connection flags shared by both programs, and the client built from them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import consul
import requests

from sidecar.errors import ConsulForbidden, ConsulRejected, ConsulUnavailable

T = TypeVar("T")


class TokenFile:
    """An ACL token kept in a file, read again whenever the file changes: a token rotated or
    replaced on disk is used from the next request on, with no restart. A file that cannot be
    read keeps the last token read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._token: str | None = None
        self.error = ""

    def token(self) -> str | None:
        with self._lock:
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                if stamp != self._stamp:
                    with open(self.path, encoding="utf-8") as f:
                        self._token = f.read().strip() or None
                    self._stamp = stamp
                    if self._token:
                        _SEEN_TOKENS.add(self._token)
                self.error = ""
            except OSError as err:
                self.error = f"token file {self.path}: {err.strerror or err}"
            return self._token


_TOKEN_FILES: dict[str, TokenFile] = {}
_TOKEN_FILES_LOCK = threading.Lock()
# every token this process has read from a file: an old one may still sit in an error text
_SEEN_TOKENS: set[str] = set()


def token_file(path: str) -> TokenFile:
    with _TOKEN_FILES_LOCK:
        return _TOKEN_FILES.setdefault(path, TokenFile(path))


@dataclass(frozen=True)
class ConsulSettings:
    url: str = "http://127.0.0.1:8500"
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token_file: str | None = None  # wins over token; read again when it changes

    def describe(self) -> str:
        return self.url

    def current_token(self) -> str | None:
        if self.token_file:
            return token_file(self.token_file).token()
        return self.token

    def scrub(self, text: str) -> str:
        """text without any ACL token, for error messages, logs and /health."""
        for secret in [self.token, *sorted(_SEEN_TOKENS, key=len, reverse=True)]:
            text = scrub(text, secret)
        return scrub(text)


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
    group.add_argument(
        "--token",
        default=env("CONSUL_HTTP_TOKEN"),
        help="ACL token (CONSUL_HTTP_TOKEN); visible in the process list: prefer --token-file",
    )
    group.add_argument(
        "--token-file",
        default=env("CONSUL_HTTP_TOKEN_FILE"),
        help="file holding the ACL token, read again when it changes (CONSUL_HTTP_TOKEN_FILE); wins over --token",
    )
    group.add_argument("--ca-file", default=env("CONSUL_CACERT"), help="CA bundle for https")
    group.add_argument("--cert-file", default=env("CONSUL_CLIENT_CERT"), help="client certificate")
    group.add_argument("--key-file", default=env("CONSUL_CLIENT_KEY"), help="client key")


def consul_settings_from(args: argparse.Namespace) -> ConsulSettings:
    url = args.consul if "//" in args.consul else f"http://{args.consul}"
    return ConsulSettings(
        url=url,
        token=args.token,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        token_file=args.token_file,
    )


def warn_if_token_on_command_line(argv: list[str] | None, logger: logging.Logger) -> None:
    """--token given as an argument: anyone on the host can read it in the process list."""
    args = sys.argv[1:] if argv is None else argv
    if any(a == "--token" or a.startswith("--token=") for a in args):
        logger.warning("--token on the command line is visible to every user of this host (ps): "
                       "use --token-file or CONSUL_HTTP_TOKEN_FILE")  # fmt: skip


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


class AgentAPI:
    """Agent API calls with every failure mapped to ConsulUnavailable or ConsulRejected, the
    token scrubbed from the message. Shared by the registrar and the templater's own
    registration."""

    def __init__(self, settings: ConsulSettings, timeout: float = 5.0) -> None:
        self._settings = settings
        self._clients = ClientPerThread(settings, timeout)

    def call(self, what: str, fn: Callable[[consul.Consul], T], needs: str = "") -> T:
        """fn(client) with Consul's failures mapped; needs: the ACL permission the call needs,
        named in a permission-denied error."""
        scrub = self._settings.scrub
        try:
            return fn(self._clients.get())
        except (requests.RequestException, consul.Timeout, OSError) as err:
            raise ConsulUnavailable(scrub(f"consul {self._settings.url} unreachable during {what}: {err}")) from None
        except consul.ACLPermissionDenied as err:
            raise ConsulForbidden(
                scrub(f"permission denied during {what}{' (needs ' + needs + ')' if needs else ''}: {err}")
            ) from None
        except consul.ConsulException as err:
            text = scrub(str(err))
            if text.startswith("500") and ("connection refused" in text or "No cluster leader" in text):
                raise ConsulUnavailable(f"consul not ready during {what}: {text}") from None
            raise ConsulRejected(f"consul refused {what}: {text}") from None

    def put(self, what: str, path: str, body: Any = None, params: list[Any] | None = None, needs: str = "") -> None:
        def run(client: consul.Consul) -> None:
            data = json.dumps(body) if body is not None else ""
            client.http.put(
                consul.callback.CB.boolean(), path, params=params or [], data=data, headers=client.prepare_headers()
            )

        self.call(what, run, needs)


def agent_self(client: consul.Consul) -> dict[str, Any]:
    """/v1/agent/self with the token: py-consul's agent.self() sends none, which an agent with
    ACLs in default-deny mode refuses."""
    result: dict[str, Any] = client.http.get(
        consul.callback.CB.json(), "/v1/agent/self", headers=client.prepare_headers()
    )
    return result
