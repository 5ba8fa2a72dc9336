"""The registrar's error types. Third-party errors are mapped to these at the adapters.

RegistrarError
 +-- LabelError          a container's SERVICE_* value is invalid; that container/port is skipped
 +-- BackendUnavailable  Consul or Docker did not answer; retried with backoff
      +-- ConsulUnavailable
      +-- DockerUnavailable
 +-- ConsulRejected      Consul answered but refused a request (bad definition, ACL)
"""

from __future__ import annotations

from sidecar.logs import kv


class RegistrarError(Exception):
    pass


class LabelError(RegistrarError):
    def __init__(self, container: str, label: str, value: str, reason: str) -> None:
        self.container = container
        self.label = label
        self.value = value
        self.reason = reason
        super().__init__(f"bad label {kv(container=container, label=label, value=value)}: {reason}")


class BackendUnavailable(RegistrarError):
    pass


class ConsulUnavailable(BackendUnavailable):
    pass


class DockerUnavailable(BackendUnavailable):
    pass


class ConsulRejected(RegistrarError):
    pass
