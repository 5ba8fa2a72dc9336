"""The installed version of the project (both programs' --version, and their registrations)."""

from __future__ import annotations

import importlib.metadata


def version() -> str:
    try:
        return importlib.metadata.version("consul-sidecar")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
