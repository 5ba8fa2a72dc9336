"""Consul connection flags shared by both programs (address, token, TLS files), the token file
read again when it changes, and scrubbing of secrets; the HTTP layer itself is consul_http."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import TypeVar

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
