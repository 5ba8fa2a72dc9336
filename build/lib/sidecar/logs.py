"""One logging format for both daemons: 'level name message key=value ...'."""

from __future__ import annotations

import logging
import sys


def setup(level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def kv(**facts: object) -> str:
    """Render facts as key=value pairs, quoting values that contain spaces or are empty."""
    parts = []
    for key, value in facts.items():
        text = str(value)
        if not text or any(c.isspace() or c in "\"'=" for c in text) or not text.isprintable():
            text = repr(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)
