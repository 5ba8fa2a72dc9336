"""One logging format for both daemons: 'level name message key=value ...'."""

from __future__ import annotations

import logging
import sys


class Redactor(logging.Filter):
    """Takes registered secrets (KV values a template marked secret) out of every log line."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()

    def add(self, value: str) -> None:
        if len(value) >= 4:  # shorter values would redact ordinary words
            self._secrets.add(value)

    def text(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            # as written, and as repr() shows it inside an error message
            for form in {secret, repr(secret)[1:-1]}:
                text = text.replace(form, "<redacted>")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            record.msg = self.text(record.getMessage())
            record.args = None
        return True


REDACTOR = Redactor()


def setup(level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(REDACTOR)


def kv(**facts: object) -> str:
    """Render facts as key=value pairs, quoting values that contain spaces or are empty."""
    parts = []
    for key, value in facts.items():
        text = str(value)
        if not text or any(c.isspace() or c in "\"'=" for c in text) or not text.isprintable():
            text = repr(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)
