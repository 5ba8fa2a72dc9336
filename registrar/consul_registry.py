"""The local Consul agent as a service registry: register, deregister, maintenance, list."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import consul
import requests

from registrar.errors import ConsulRejected, ConsulUnavailable
from registrar.model import Check, Service
from sidecar.consul_conn import ClientPerThread, ConsulSettings

T = TypeVar("T")

MAINTENANCE_MARK = "[registrar]"  # ends the reason of every maintenance the registrar sets
_OLD_REASON = "registrar: container stopping or paused"  # what earlier versions set


def is_ours(notes: str) -> bool:
    """Whether a maintenance reason is one the registrar set (an operator's is never lifted)."""
    return notes.endswith(MAINTENANCE_MARK) or notes == _OLD_REASON


class Registry(Protocol):
    def register(self, service: Service, statuses: dict[str, str]) -> None: ...
    def deregister(self, service_id: str) -> None: ...
    def set_check_status(self, service: Service, index: int, status: str) -> None: ...
    def ttl_update(self, check_id: str, status: str, note: str) -> None: ...
    def maintenance(self, service_id: str, enable: bool, reason: str | None = None) -> None: ...
    def services(self) -> dict[str, dict[str, Any]]: ...
    def checks(self) -> dict[str, dict[str, Any]]: ...
    def ping(self) -> None: ...


class ConsulRegistry:
    """Agent API calls; every failure comes out as ConsulUnavailable or ConsulRejected.

    One py-consul client per thread: the registrar's sync loop and probes call concurrently.
    """

    def __init__(self, settings: ConsulSettings, timeout: float = 5.0) -> None:
        self._settings = settings
        self._clients = ClientPerThread(settings, timeout)

    def _call(self, what: str, fn: Callable[[consul.Consul], T]) -> T:
        scrub = self._settings.scrub
        try:
            return fn(self._clients.get())
        except (requests.RequestException, consul.Timeout, OSError) as err:
            raise ConsulUnavailable(scrub(f"consul {self._settings.url} unreachable during {what}: {err}")) from None
        except consul.ConsulException as err:
            text = scrub(str(err))
            if text.startswith("500") and ("connection refused" in text or "No cluster leader" in text):
                raise ConsulUnavailable(f"consul not ready during {what}: {text}") from None
            raise ConsulRejected(f"consul refused {what}: {text}") from None

    def _put(self, what: str, path: str, body: Any = None, params: list[Any] | None = None) -> None:
        def run(client: consul.Consul) -> None:
            headers = client.prepare_headers()
            data = json.dumps(body) if body is not None else ""
            client.http.put(consul.callback.CB.boolean(), path, params=params or [], data=data, headers=headers)

        self._call(what, run)

    def register(self, service: Service, statuses: dict[str, str]) -> None:
        self._put(f"register {service.id}", "/v1/agent/service/register", service.registration(statuses))

    def deregister(self, service_id: str) -> None:
        try:
            self._put(f"deregister {service_id}", f"/v1/agent/service/deregister/{service_id}")
        except ConsulRejected as err:
            if "404" not in str(err) and "Unknown service" not in str(err):
                raise

    def set_check_status(self, service: Service, index: int, status: str) -> None:
        """Give a running check a new status. The agent keeps a check's status across service
        re-registration, so the check itself is replaced."""
        check: Check = service.check(index)
        check_id = service.check_id(index)
        self._put(f"check deregister {check_id}", f"/v1/agent/check/deregister/{check_id}")
        self._put(
            f"check register {check_id}",
            "/v1/agent/check/register",
            check.definition(check_id, service.id, status),
        )

    def ttl_update(self, check_id: str, status: str, note: str) -> None:
        body = {"Status": status, "Output": note}
        self._put(f"check update {check_id}", f"/v1/agent/check/update/{check_id}", body)

    def maintenance(self, service_id: str, enable: bool, reason: str | None = None) -> None:
        params: list[Any] = [("enable", "true" if enable else "false")]
        if enable:
            params.append(("reason", reason or f"Draining {MAINTENANCE_MARK}"))
        self._put(f"maintenance {service_id}", f"/v1/agent/service/maintenance/{service_id}", params=params)

    def services(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = self._call("list services", lambda c: c.agent.services())
        return result

    def checks(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = self._call("list checks", lambda c: c.agent.checks())
        return result

    def ping(self) -> None:
        self._call("ping", lambda c: c.agent.self())
