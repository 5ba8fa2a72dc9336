"""The local Consul agent as a service registry: register, deregister, maintenance, list."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any, Protocol

import consul

from registrar.errors import ConsulRejected
from registrar.model import Check, Service
from sidecar.consul_conn import AgentAPI, ConsulSettings, agent_self

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
    def node_in_catalog(self) -> tuple[set[str], dict[str, str], bool]: ...


class ConsulRegistry:
    """Agent API calls; every failure comes out as ConsulUnavailable or ConsulRejected.

    One py-consul client per thread: the registrar's sync loop and probes call concurrently.
    """

    def __init__(self, settings: ConsulSettings, timeout: float = 5.0) -> None:
        api = AgentAPI(settings, timeout)
        self._call, self._put = api.call, api.put
        self._node = ""

    def register(self, service: Service, statuses: dict[str, str]) -> None:
        self._put(f"register {service.id}", "/v1/agent/service/register", service.registration(statuses),
                  needs=f'service:write on "{service.name}"')  # fmt: skip

    def deregister(self, service_id: str) -> None:
        try:
            self._put(f"deregister {service_id}", f"/v1/agent/service/deregister/{service_id}",
                      needs="service:write on its name")  # fmt: skip
        except ConsulRejected as err:
            if "404" not in str(err) and "Unknown service" not in str(err):
                raise

    def set_check_status(self, service: Service, index: int, status: str) -> None:
        """Give a running check a new status. The agent keeps a check's status across service
        re-registration, so the check itself is replaced."""
        check: Check = service.check(index)
        check_id = service.check_id(index)
        self._put(f"check deregister {check_id}", f"/v1/agent/check/deregister/{check_id}",
                  needs=f'service:write on "{service.name}"')  # fmt: skip
        self._put(
            f"check register {check_id}",
            "/v1/agent/check/register",
            check.definition(check_id, service.id, status),
        )

    def ttl_update(self, check_id: str, status: str, note: str) -> None:
        body = {"Status": status, "Output": note}
        self._put(f"check update {check_id}", f"/v1/agent/check/update/{check_id}", body,
                  needs="service:write on its service")  # fmt: skip

    def maintenance(self, service_id: str, enable: bool, reason: str | None = None) -> None:
        params: list[Any] = [("enable", "true" if enable else "false")]
        if enable:
            params.append(("reason", reason or f"Draining {MAINTENANCE_MARK}"))
        self._put(f"maintenance {service_id}", f"/v1/agent/service/maintenance/{service_id}", params=params,
                  needs="service:write on its name")  # fmt: skip

    def services(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = self._call("list services", lambda c: c.agent.services(),
                                                       needs="service:read")  # fmt: skip
        return result

    def checks(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = self._call("list checks", lambda c: c.agent.checks(),
                                                       needs="service:read, node:read")  # fmt: skip
        return result

    def ping(self) -> None:
        self._call("ping", agent_self, needs="agent:read on this node")

    def node_in_catalog(self) -> tuple[set[str], dict[str, str], bool]:
        """This agent's node as the catalog has it, read stale (any server answers, with or
        without a leader): its service IDs, the status of each of its checks, and whether the
        answering server knows a leader (without one, nothing can be written yet)."""
        if not self._node:
            me = self._call("agent self", agent_self, needs="agent:read on this node")
            self._node = str(me["Config"]["NodeName"])
        path = urllib.parse.quote(self._node, safe="")
        services_raw = self._call("catalog node", lambda c: _stale_get(c, f"/v1/catalog/node/{path}"),
                                  needs="node:read on this node")  # fmt: skip
        checks_raw = self._call("health node", lambda c: _stale_get(c, f"/v1/health/node/{path}"),
                                needs="node:read on this node")  # fmt: skip
        services = set(((services_raw[0] or {}).get("Services") or {}).keys())
        statuses = {str(c["CheckID"]): str(c["Status"]) for c in checks_raw[0] or []}
        return services, statuses, services_raw[1] and checks_raw[1]


def _stale_get(client: consul.Consul, path: str) -> tuple[Any, bool]:
    """GET path with ?stale: the JSON body and X-Consul-KnownLeader."""

    def answer(response: Any) -> tuple[Any, bool]:
        consul.callback.CB._status(response)
        known = str(response.headers.get("X-Consul-KnownLeader", "true")).lower() == "true"
        return (json.loads(response.body) if response.body else None), known

    result: tuple[Any, bool] = client.http.get(answer, path, params=[("stale", "")], headers=client.prepare_headers())
    return result
