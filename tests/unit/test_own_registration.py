"""The own registration both programs share, with a fake agent behind the HTTP layer's put."""

from __future__ import annotations

from typing import Any

import pytest

import sidecar.own_registration as own
from sidecar.errors import ConsulRejected, ConsulUnavailable
from sidecar.own_registration import OwnRegistration, OwnService

SERVICE = OwnService("ingress:h1", "ingress", 80, "10.0.0.5", ("sidecar", "haproxy"), (("proxy", "haproxy"),),
                     "Proxy haproxy serves the rendered configuration", "notes")  # fmt: skip


class Agent:
    """Records the puts; `fail` raises for the next put, `lose` makes check updates unknown."""

    def __init__(self) -> None:
        self.puts: list[tuple[str, Any]] = []
        self.fail: Exception | None = None
        self.registered: set[str] = set()

    def put(self, path: str, body: Any = None, params: Any = (), *, doing: str = "", needs: str = "") -> None:
        if self.fail is not None:
            err, self.fail = self.fail, None
            raise err
        self.puts.append((path, body))
        if path == "/v1/agent/service/register":
            self.registered.add(body["ID"])
        elif path.startswith("/v1/agent/check/update/") and path.split("service:")[1] not in self.registered:
            raise ConsulRejected("consul refused during check update: 404 Unknown check")
        elif path.startswith("/v1/agent/service/deregister/"):
            self.registered.discard(path.rsplit("/", 1)[1])


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(own.time, "monotonic", lambda: now[0])
    return now


def paths(agent: Agent) -> list[str]:
    return [p for p, _ in agent.puts]


def test_registered_once_then_the_state_when_it_changes_or_the_heartbeat_is_due(clock: list[float]) -> None:
    agent = Agent()
    reg = OwnRegistration(agent, heartbeat=10)  # type: ignore[arg-type]
    reg.update(SERVICE, "passing", "ok")
    assert paths(agent) == ["/v1/agent/service/register", "/v1/agent/check/update/service:ingress:h1"]
    assert agent.puts[0][1]["Check"] == {"CheckID": "service:ingress:h1", "Name": SERVICE.check_name,
                                         "Notes": "notes", "TTL": "30s", "Status": "passing"}  # fmt: skip
    assert reg.settled("passing", "ok") and not reg.settled("warning", "draining")
    reg.update(SERVICE, "passing", "ok")
    assert len(agent.puts) == 2  # nothing new, no heartbeat due
    reg.update(SERVICE, "warning", "draining 1")
    assert paths(agent)[2:] == ["/v1/agent/check/update/service:ingress:h1"]
    clock[0] += 10
    reg.update(SERVICE, "warning", "draining 1")  # the heartbeat
    assert len(agent.puts) == 4 and agent.puts[3][1] == {"Status": "warning", "Output": "draining 1"}


def test_lost_by_the_agent_failed_or_changed_it_is_registered_again(clock: list[float]) -> None:
    agent = Agent()
    reg = OwnRegistration(agent, heartbeat=10)  # type: ignore[arg-type]
    reg.update(SERVICE, "passing", "ok")
    agent.registered.clear()  # an agent restart lost it
    reg.update(SERVICE, "critical", "proxy down")  # the update is refused: registered again
    assert paths(agent)[-2:] == ["/v1/agent/service/register", "/v1/agent/check/update/service:ingress:h1"]
    agent.fail = ConsulUnavailable("consul down")
    with pytest.raises(ConsulUnavailable):
        reg.update(SERVICE, "passing", "ok")
    assert reg.registered is None
    reg.update(SERVICE, "passing", "ok")
    assert paths(agent)[-2] == "/v1/agent/service/register"
    moved = OwnService(**{**SERVICE.__dict__, "port": 8080})
    before = len(agent.puts)
    reg.update(moved, "passing", "ok")  # a new port: registered again, though the state is the same
    assert paths(agent)[before:] == ["/v1/agent/service/register", "/v1/agent/check/update/service:ingress:h1"]
    reg.lost()
    reg.update(moved, "passing", "ok")
    assert paths(agent)[-2] == "/v1/agent/service/register"


def test_a_clean_stop_deregisters_what_was_registered_once(clock: list[float]) -> None:
    agent = Agent()
    reg = OwnRegistration(agent)  # type: ignore[arg-type]
    reg.deregister()
    assert agent.puts == []  # never registered: nothing to take away
    reg.update(SERVICE, "passing", "ok")
    agent.fail = ConsulUnavailable("consul down")
    with pytest.raises(ConsulUnavailable):
        reg.update(SERVICE, "critical", "x")
    reg.deregister()  # the last one registered goes, even after a failed update
    assert paths(agent)[-1] == "/v1/agent/service/deregister/ingress:h1"
    count = len(agent.puts)
    reg.deregister()
    assert len(agent.puts) == count
