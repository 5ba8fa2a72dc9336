"""Go-style durations ("10s", "1m30s", "250ms") as Consul and consul-template use them."""

from __future__ import annotations

import re

from consul.std import parse_duration as consul_duration

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
    return float(consul_duration(text))  # validated above; py-consul's parser does the arithmetic
