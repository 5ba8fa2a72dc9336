"""Go-style durations ("10s", "1m30s", "250ms") as Consul and consul-template use them."""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)"
_FULL = re.compile(rf"^(?:{_PART})+$")


def is_duration(text: str) -> bool:
    return bool(_FULL.match(text))


def parse_duration(text: str) -> float:
    """Seconds in a Go duration; a bare number counts as seconds. Raises ValueError."""
    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    if not _FULL.match(text):
        raise ValueError(f"not a duration: {text!r} (expected e.g. 10s, 500ms, 1m30s)")
    return sum(float(n) * _UNITS[u] for n, u in re.findall(_PART, text))
