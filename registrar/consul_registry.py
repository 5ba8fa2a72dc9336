"""The local Consul agent as a service registry: register, deregister, maintenance, list."""

from __future__ import annotations

import urllib.parse
from typing import Any, Protocol

from registrar.errors import ConsulRejected
from registrar.model import AgentState, Check, Held, Service
from sidecar.consul_conn import ConsulSettings
from sidecar.consul_http import Answer, ConsulHTTP, Params

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
    def agent_state(self, services: bool = True, checks: bool = True) -> AgentState: ...
    def ping(self) -> None: ...
    def node_in_catalog(self) -> tuple[set[str], dict[str, str], bool]: ...


class ConsulRegistry:
    """Agent API calls through the shared HTTP layer; every failure comes out as
    ConsulUnavailable or ConsulRejected (ConsulForbidden naming the permission).

    One connection per thread: the registrar's sync loop and probes call concurrently.
    """

    def __init__(self, settings: ConsulSettings, timeout: float = 5.0) -> None:
        self._http = ConsulHTTP(settings, timeout)
        self._node = ""

    def _put(self, what: str, path: str, body: Any = None, params: Params = (), needs: str = "") -> None:
        self._http.put(path, body, params, doing=f"during {what}", needs=needs)

    def _get(self, what: str, path: str, params: Params = (), needs: str = "") -> Answer:
        return self._http.get(path, params, doing=f"during {what}", needs=needs)

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
        params = [("enable", "true" if enable else "false")]
        if enable:
            params.append(("reason", reason or f"Draining {MAINTENANCE_MARK}"))
        self._put(f"maintenance {service_id}", f"/v1/agent/service/maintenance/{service_id}", params=params,
                  needs="service:write on its name")  # fmt: skip

    def agent_state(self, services: bool = True, checks: bool = True) -> AgentState:
        """The agent's services and checks, as neutral values; one request for each asked for."""
        listed = self._get("list services", "/v1/agent/services", needs="service:read").mapping() if services else {}
        held = self._get("list checks", "/v1/agent/checks", needs="service:read, node:read").mapping() if checks else {}
        return agent_state_from(listed, held)

    def ping(self) -> None:
        self._get("ping", "/v1/agent/self", needs="agent:read on this node")

    def node_in_catalog(self) -> tuple[set[str], dict[str, str], bool]:
        """This agent's node as the catalog has it, read stale (any server answers, with or
        without a leader): its service IDs, the status of each of its checks, and whether the
        answering server knows a leader (without one, nothing can be written yet)."""
        if not self._node:
            me = self._get("agent self", "/v1/agent/self", needs="agent:read on this node").mapping()
            self._node = str((me.get("Config") or {}).get("NodeName") or "")
        path = urllib.parse.quote(self._node, safe="")
        stale = [("stale", "")]
        services_raw = self._get("catalog node", f"/v1/catalog/node/{path}", stale, needs="node:read on this node")
        checks_raw = self._get("health node", f"/v1/health/node/{path}", stale, needs="node:read on this node")
        services = set(((services_raw.data or {}).get("Services") or {}).keys())
        statuses = {str(c["CheckID"]): str(c["Status"]) for c in checks_raw.data or [] if isinstance(c, dict)}
        return services, statuses, services_raw.known_leader and checks_raw.known_leader


def agent_state_from(services: dict[str, Any], checks: dict[str, Any]) -> AgentState:
    """The agent's /v1/agent/services and /v1/agent/checks answers as an AgentState. Pure."""
    held = {
        str(sid): Held(
            id=str(sid),
            name=str(view.get("Service") or ""),
            port=int(view.get("Port") or 0),
            address=str(view.get("Address") or ""),
            tags=tuple(str(t) for t in view.get("Tags") or []),
            meta={str(k): str(v) for k, v in (view.get("Meta") or {}).items()},
        )
        for sid, view in services.items()
        if isinstance(view, dict)
    }
    statuses: dict[str, tuple[str, str]] = {}
    maintenance: dict[str, str] = {}
    for cid, check in checks.items():
        if not isinstance(check, dict):
            continue
        if str(cid).startswith(_MAINTENANCE_PREFIX):
            maintenance[str(cid)[len(_MAINTENANCE_PREFIX) :]] = str(check.get("Notes") or "")
        elif check.get("Status"):
            statuses[str(cid)] = (str(check.get("ServiceID") or ""), str(check["Status"]))
    return AgentState(held, statuses, maintenance)


_MAINTENANCE_PREFIX = "_service_maintenance:"  # the check ID Consul gives a service's maintenance
