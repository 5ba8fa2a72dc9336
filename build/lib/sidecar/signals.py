"""Signals by name or number, and the one "signal, wait, kill" helper."""

from __future__ import annotations

import logging
import signal
import subprocess

log = logging.getLogger("sidecar.signals")


def parse_signal(text: str | int | None) -> int | None:
    """A signal from "15", "SIGTERM", "term" or 15; None when empty or unknown."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    text = text.strip().upper()
    if text.isdigit():
        return int(text)
    name = text if text.startswith("SIG") else f"SIG{text}"
    value = getattr(signal.Signals, name, None)
    return int(value) if value is not None else None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def terminate(proc: subprocess.Popen[bytes], sig: int, timeout: float, what: str) -> int:
    """Send sig, wait up to timeout, then SIGKILL. The exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s pid=%d ignored %s for %.0f s: killing", what, proc.pid, signal_name(sig), timeout)
            proc.kill()
            proc.wait()
    return int(proc.returncode)
