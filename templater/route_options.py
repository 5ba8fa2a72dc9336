"""Per-route options from service meta, validated where they are read. Pure.

Each option is read from the first instance (in the same order as `http_host`) whose meta has
its key. A bad value gives one warning naming the service, the key and the value, and leaves
that option out; the route is still served. Every value that reaches a proxy file is a number,
a boolean or a normalized network address here, so no meta text is ever written as it is.

| meta key               | value                                      | Traefik, nginx-proxy              |
|------------------------|--------------------------------------------|-----------------------------------|
| `http_redirect_https`  | true: plain HTTP gets 301 to https://      | redirectscheme; HTTPS_METHOD      |
| `http_hsts`            | max-age in seconds (1 to 2 years)          | headers.stsSeconds; HSTS          |
| `http_max_body`        | request body limit: 512k, 10m, 1g or bytes | buffering.maxRequestBodyBytes     |
| `http_connect_timeout` | Go duration, 1ms to 1h                     | serversTransport dialTimeout      |
| `http_read_timeout`    | Go duration, 1ms to 24h (idle tunnels too) | responseHeaderTimeout             |
| `http_allow`           | CIDRs (comma list): only these             | ipallowlist.sourceRange           |
| `http_deny`            | CIDRs (comma list): never these            | -                                 |
| `http_strip_path`      | true: the route's path is taken off        | stripprefix                       |
| `http_rate_limit`      | requests a second per client address       | ratelimit.average                 |
| `http_header_<name>`   | a response header from the safe set below  | headers.customResponseHeaders     |
| `http_proto`           | h2c or grpc: instances speak HTTP/2 in clear | loadBalancer.server.scheme=h2c    |

Response headers (`http_header_x_frame_options=DENY`, label SERVICE_HTTP_HEADER_X_FRAME_OPTIONS):
the name's underscores are dashes, and only the names in HEADERS are taken (security and
caching headers; never Set-Cookie, Location, Content-Length or hop-by-hop ones). A value is
printable ASCII, at most 1024 characters, without `"`, a backslash, `$` or `%` (each means something
in a proxy's quoted string), so it is written quoted as it is.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from sidecar.durations import parse_duration

KEYS = (
    "http_redirect_https", "http_hsts", "http_max_body", "http_connect_timeout", "http_read_timeout",
    "http_allow", "http_deny", "http_strip_path", "http_rate_limit", "http_proto",
)  # fmt: skip
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}
_SIZE = re.compile(r"^(\d{1,12})([kKmMgG]?)$")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
HSTS_MAX = 2 * 365 * 24 * 3600
BODY_MAX = 64 * 1024**3
HEADER_PREFIX = "http_header_"
HEADERS = {
    name.lower(): name
    for name in (
        "X-Frame-Options", "X-Content-Type-Options", "Referrer-Policy", "Content-Security-Policy",
        "Content-Security-Policy-Report-Only", "Permissions-Policy", "Cache-Control", "X-XSS-Protection",
        "Cross-Origin-Opener-Policy", "Cross-Origin-Resource-Policy", "Cross-Origin-Embedder-Policy",
        "Access-Control-Allow-Origin", "Access-Control-Allow-Methods", "Access-Control-Allow-Headers",
        "Access-Control-Max-Age", "X-Robots-Tag",
    )
}  # fmt: skip
_HEADER_VALUE = re.compile(r"^[\x20-\x7e]{1,1024}\Z")
_HEADER_UNSAFE = set('"\\$%')


@dataclass(frozen=True)
class Options:
    redirect_https: bool = False
    hsts: int = 0  # Strict-Transport-Security max-age, seconds; 0: not sent
    max_body: int = 0  # bytes; 0: the proxy's default (NGINX 1m, HAProxy none)
    connect_timeout_ms: int = 0  # 0: the template's default
    read_timeout_ms: int = 0
    allow: tuple[str, ...] = ()  # normalized networks; (): any address
    deny: tuple[str, ...] = ()
    strip_path: bool = False
    rate_limit: int = 0  # requests a second per client address; 0: none
    headers: tuple[tuple[str, str], ...] = ()  # response headers (name, value), by name
    h2c: bool = False  # the instances speak HTTP/2 in clear (gRPC)
    errors: tuple[str, ...] = field(default=(), compare=False)  # the warnings, said by the route

    @property
    def any(self) -> bool:
        return self != NONE


NONE = Options()


def read(name: str, metas: Iterable[Mapping[str, str]]) -> Options:
    """The options of service name from its instances' meta, in order (the first has its say)."""
    found: dict[str, str] = {}
    for meta in metas:
        for key in KEYS:
            if key in meta and key not in found:
                found[key] = meta[key]
        for key in meta:
            if key.startswith(HEADER_PREFIX) and key not in found:
                found[key] = meta[key]
    if not found:
        return NONE
    errors: list[str] = []

    def bad(key: str, why: str) -> None:
        errors.append(f"service {name}: {key}={found[key]!r} {why}: option left out")

    values: dict[str, object] = {}
    for key, (attr, (parse, why)) in _PARSERS.items():
        if key in found:
            value = parse(found[key])
            if value is None:
                bad(key, why)
            else:
                values[attr] = value
    headers = _headers(found, bad)
    if headers:
        values["headers"] = headers
    return Options(**values, errors=tuple(errors))  # type: ignore[arg-type]


Parser = tuple[Callable[[str], object], str]  # the value or None when bad; what a good value is


def _flag(text: str) -> bool | None:
    word = text.strip().lower()
    return word in _TRUE if word in _TRUE | _FALSE else None


def _whole(high: int) -> Parser:
    def parse(text: str) -> int | None:
        digits = text.strip()
        return int(digits) if digits.isdigit() and 1 <= int(digits) <= high else None

    return parse, f"is not a whole number from 1 to {high}"


def _size(text: str) -> int | None:
    size = _SIZE.match(text.strip())
    number = int(size.group(1)) * _UNITS[size.group(2).lower()] if size else 0
    return number if 1 <= number <= BODY_MAX else None


def _milliseconds(high: int) -> Parser:  # high: seconds, whole hours
    def parse(text: str) -> int | None:
        try:
            seconds = parse_duration(text)
        except ValueError:
            return None
        return round(seconds * 1000) if 0.001 <= seconds <= high else None

    return parse, f"is not a duration from 1ms to {high // 3600}h"


def _network_list(text: str) -> tuple[str, ...] | None:
    return _networks(text) or None


def _proto(text: str) -> bool | None:
    proto = text.strip().lower()
    return proto in ("h2c", "grpc") if proto in ("h2c", "grpc", "http1", "http") else None


_FLAG: Parser = (_flag, "is not true or false")
_NETWORKS: Parser = (_network_list, "is not a comma list of addresses or CIDRs")
# meta key -> (Options field, its parser)
_PARSERS: dict[str, tuple[str, Parser]] = {
    "http_redirect_https": ("redirect_https", _FLAG),
    "http_strip_path": ("strip_path", _FLAG),
    "http_hsts": ("hsts", _whole(HSTS_MAX)),
    "http_rate_limit": ("rate_limit", _whole(100_000)),
    "http_max_body": ("max_body", (_size, "is not a size such as 512k, 10m or 1g")),
    "http_connect_timeout": ("connect_timeout_ms", _milliseconds(3600)),
    "http_read_timeout": ("read_timeout_ms", _milliseconds(86400)),
    "http_allow": ("allow", _NETWORKS),
    "http_deny": ("deny", _NETWORKS),
    "http_proto": ("h2c", (_proto, "is not h2c, grpc or http1")),
}


def _headers(found: Mapping[str, str], bad: Callable[[str, str], None]) -> tuple[tuple[str, str], ...]:
    """The response headers of the safe set in found (http_header_<name>), by name, each once."""
    headers = []
    for key in sorted(k for k in found if k.startswith(HEADER_PREFIX)):
        header = HEADERS.get(key.removeprefix(HEADER_PREFIX).replace("_", "-").lower())
        value = found[key].strip()
        if header is None:
            bad(key, "is not a header of the safe set (route_options.HEADERS)")
        elif not _HEADER_VALUE.match(value) or _HEADER_UNSAFE & set(value):
            bad(key, 'is not printable ASCII of at most 1024 characters without " \\ $ %')
        else:
            headers.append((header, value))
    return tuple(sorted(dict(headers).items()))


def _networks(text: str) -> tuple[str, ...]:
    """Normalized networks, or () when any part is not one."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return tuple(str(ipaddress.ip_network(p, strict=False)) for p in parts)
    except ValueError:
        return ()
