"""Neutral values between Docker and Consul: a service instance and its health checks."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"
STATUSES = (PASSING, WARNING, CRITICAL)


@dataclass(frozen=True)
class Check:
    """One Consul check on a service.

    kind is http, https, tcp, grpc, script, ttl or docker (a TTL check that follows the
    container's Docker HEALTHCHECK). target is the URL, host:port or script it runs.
    """

    kind: str
    target: str = ""
    interval: str = "10s"
    timeout: str | None = None
    ttl: str | None = None
    initial_status: str | None = None
    deregister_after: str | None = None
    tls_skip_verify: bool = False
    method: str = "GET"  # HTTP(S): registrator's SERVICE_CHECK_HTTP_METHOD
    name: str = ""  # shown in the Consul UI; a description of what runs when empty
    notes: str = ""
    args: tuple[str, ...] = ()  # cmd: registrator's `check-cmd CONTAINER PORT COMMAND`
    grpc_tls: bool = False  # grpc: SERVICE_CHECK_GRPC_USE_TLS

    @property
    def probeable(self) -> bool:
        """Whether the registrar can probe it itself for fast readiness."""
        return self.kind in ("http", "https", "tcp")

    def describe(self) -> str:
        """What a person reads in the Consul UI: what runs, against what, how often."""
        if self.kind in ("http", "https"):
            url = urllib.parse.urlsplit(self.target)
            local = url.hostname in ("127.0.0.1", "::1", "localhost") or not url.hostname
            where = (url.path or "/") + (f"?{url.query}" if url.query else "") if local else self.target
            return f"{self.kind.upper()} {self.method} {where} every {self.interval}"
        if self.kind == "tcp":
            return f"TCP connect {self.target} every {self.interval}"
        if self.kind == "grpc":
            return f"gRPC health {self.target} every {self.interval}"
        if self.kind == "script":
            return f"Script (SERVICE_CHECK_SCRIPT) every {self.interval}"
        if self.kind == "cmd":
            return f"check-cmd in the container (SERVICE_CHECK_CMD) every {self.interval}"
        if self.kind == "docker":
            return "Docker HEALTHCHECK (follows health_status)"
        return f"TTL {self.ttl} (the application reports its own status)"

    def definition(self, check_id: str, service_id: str | None, status: str | None) -> dict[str, Any]:
        """The check as Consul's agent API takes it.

        Inside a service registration (service_id None) the agent wants ``CheckID``; the
        stand-alone check register endpoint wants ``ID`` and ``ServiceID``. Consul 1.8 rejects
        unknown fields, so each gets exactly its own.
        """
        body: dict[str, Any] = {"Name": self.name or self.describe()}
        if self.notes:
            body["Notes"] = self.notes
        if service_id is None:
            body["CheckID"] = check_id
        else:
            body.update(ID=check_id, ServiceID=service_id)
        if self.kind in ("http", "https"):
            body.update(HTTP=self.target, Interval=self.interval)
            if self.tls_skip_verify:
                body["TLSSkipVerify"] = True
            if self.method != "GET":
                body["Method"] = self.method
        elif self.kind == "tcp":
            body.update(TCP=self.target, Interval=self.interval)
        elif self.kind == "grpc":
            body.update(GRPC=self.target, Interval=self.interval)
            if self.grpc_tls:
                body["GRPCUseTLS"] = True
        elif self.kind == "script":
            body.update(Args=["sh", "-c", self.target], Interval=self.interval)
        elif self.kind == "cmd":
            body.update(Args=list(self.args), Interval=self.interval)
        elif self.kind in ("ttl", "docker"):
            body["TTL"] = self.ttl or "10m"
        if self.timeout:
            body["Timeout"] = self.timeout
        if self.deregister_after:
            body["DeregisterCriticalServiceAfter"] = self.deregister_after
        if status:
            body["Status"] = status
        return body


@dataclass(frozen=True)
class Service:
    """One service instance: a container's port as Consul should know it."""

    id: str
    name: str
    port: int
    address: str
    container_id: str
    container_name: str
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict, hash=False)
    checks: tuple[Check, ...] = ()

    def check_id(self, index: int) -> str:
        check = self.checks[index]
        return f"service:{self.id}:docker" if check.kind == "docker" else f"service:{self.id}"

    def registration(self, statuses: dict[str, str] | None = None) -> dict[str, Any]:
        """The agent API payload; statuses maps check IDs to their initial status."""
        statuses = statuses or {}
        body: dict[str, Any] = {
            "ID": self.id,
            "Name": self.name,
            "Port": self.port,
            "Tags": list(self.tags),
            "Meta": dict(self.meta),
        }
        if self.address:
            body["Address"] = self.address
        checks = []
        for index, check in enumerate(self.checks):
            check_id = self.check_id(index)
            status = statuses.get(check_id, check.initial_status)
            checks.append(self.check(index).definition(check_id, None, status))
        if checks:
            body["Checks"] = checks
        return body

    def check(self, index: int) -> Check:
        """The check as registered: with notes that say which container it watches."""
        check = self.checks[index]
        if not check.notes and self.container_name:
            check = replace(check, notes=self.notes())
        return check

    def notes(self) -> str:
        host = self.meta.get("registrar_host", "")
        return f"Registered by the registrar on {host} for container {self.container_name}"

    def same_registration(self, held: Held) -> bool:
        """Whether the agent holds this service as we would register it."""
        return (
            held.name == self.name
            and held.port == self.port
            and held.address == self.address
            and held.tags == tuple(self.tags)
            and held.meta == dict(self.meta)
        )


@dataclass(frozen=True)
class Held:
    """A service as the local agent holds it (the adapter reads the agent's JSON into this)."""

    id: str
    name: str
    port: int = 0
    address: str = ""
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class AgentState:
    """What the local agent holds: its services, the status of each check (with its service),
    and the services in maintenance with the reason shown."""

    services: dict[str, Held] = field(default_factory=dict)
    checks: dict[str, tuple[str, str]] = field(default_factory=dict)  # check id -> (service id, status)
    maintenance: dict[str, str] = field(default_factory=dict)  # service id -> reason

    def statuses_of(self, service_id: str) -> dict[str, str]:
        return {cid: status for cid, (sid, status) in self.checks.items() if sid == service_id}


def now_text() -> str:
    """The time in maintenance reasons the Consul UI shows: 2026-11-30T05:00:00Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
