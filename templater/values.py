"""Pure helpers for values that end up in proxy files: identifiers, server names, paths,
host lists, clamped numbers. Used by the template filters (render) and the routing table."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from templater.catalog import valid_hostname


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def clamp_int(value: Any, low: int, high: int, default: int, what: str) -> tuple[int, str | None]:
    """An integer for a proxy setting and what was wrong with the text: bad text gives the
    default, a number outside low..high is clamped."""
    try:
        number = int(str(value).strip())
    except ValueError:
        return default, f"{what}={value!r} is not a whole number: using {default}"
    if not low <= number <= high:
        clamped = min(max(number, low), high)
        return clamped, f"{what}={value!r} is outside {low}-{high}: using {clamped}"
    return number, None


def ident(value: Any) -> str:
    """A name safe as a proxy identifier (backend, server, upstream).

    Safe text is kept as it is; text with other characters gets them replaced by `_` and a
    short hash of the original appended, so `x/1` and `x_1` stay two names."""
    text = str(value)
    safe = _UNSAFE_IDENT.sub("_", text)
    if safe == text and text:
        return text
    return f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


_UNSAFE_IDENT = re.compile(r"[^A-Za-z0-9_.:-]")


def server_names(instances: Iterable[Any]) -> list[tuple[str, Any]]:
    """(name, instance) pairs with names unique within the list, for one backend's servers.

    Names are ident(id); the same id on two nodes (IDs are unique per node only) becomes
    ident(id@node), and anything still taken gets -2, -3. Input order decides, so sorted input
    gives the same names every time."""
    taken: set[str] = set()
    pairs = []
    for inst in instances:
        sid = str(_get(inst, "id"))
        name = ident(sid)
        if name in taken:
            name = ident(f"{sid}@{_get(inst, 'node')}")
        base, n = name, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        taken.add(name)
        pairs.append((name, inst))
    return pairs


# RFC 3986's path characters less ' (it opens a quoted word in HAProxy's configuration) and ;
# (it ends a directive in NGINX's): a path with either broke the whole file of its proxy
_URL_PATH = re.compile(r"^/[A-Za-z0-9._~!*()@:+,=/%-]*\Z")


def is_hostname(value: Any) -> bool:
    """A Jinja test: a DNS host name (or *.wildcard), safe as a token in either proxy."""
    return isinstance(value, str) and valid_hostname(value.removeprefix("*."))


def is_url_path(value: Any) -> bool:
    """A Jinja test: an absolute URL path of unreserved characters, safe as a token in either proxy."""
    return isinstance(value, str) and bool(_URL_PATH.match(value))


def split_list(text: Any) -> list[str]:
    """A comma list from meta ("a.com, b.com") as its non-empty items."""
    return [part.strip() for part in str(text or "").split(",") if part.strip()]
