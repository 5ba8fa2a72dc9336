"""A program's /health and /metrics, read as the tests read them."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def health(port: int) -> tuple[int, dict[str, Any]]:
    """A program's /health on 127.0.0.1:port: the status code and the JSON body (503 included)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def scrape(port: int) -> dict[str, float]:
    """A program's /metrics on 127.0.0.1:port through prometheus_client's own parser: sample -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
