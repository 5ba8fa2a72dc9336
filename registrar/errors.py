"""The registrar's error types, on top of the shared tree in sidecar.errors.

SidecarError
 +-- LabelError          a container's SERVICE_* value is invalid; that container/port is skipped
 +-- Unavailable         Consul or Docker did not answer; retried with backoff
 |    +-- ConsulUnavailable
 |    +-- DockerUnavailable
 +-- ConsulRejected      Consul answered but refused a request (bad definition, ACL)
"""

from __future__ import annotations

from sidecar.errors import ConsulForbidden, ConsulRejected, ConsulUnavailable, SidecarError, Unavailable
from sidecar.logs import kv

__all__ = ["ConsulForbidden", "ConsulRejected", "ConsulUnavailable", "DockerUnavailable", "LabelError", "Unavailable"]


class LabelError(SidecarError):
    def __init__(self, container: str, label: str, value: str, reason: str) -> None:
        self.container = container
        self.label = label
        self.value = value
        self.reason = reason
        super().__init__(f"bad label {kv(container=container, label=label, value=value)}: {reason}")


class DockerUnavailable(Unavailable):
    pass
