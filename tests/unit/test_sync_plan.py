"""The pure reconcile plan and the Docker event -> intent mapping."""

from __future__ import annotations

import signal

from registrar.agent_book import plan
from registrar.intents import Died, Health, Paused, Stopping, Up, from_event, parse_signal
from registrar.model import Held, Service


def svc(sid: str, name: str = "web", port: int = 1000) -> Service:
    return Service(id=sid, name=name, port=port, address="127.0.0.1", container_id="c", container_name="n")


def agent_view(s: Service, meta: dict[str, str] | None = None) -> Held:
    return Held(s.id, s.name, s.port, s.address, (), meta or {})


def owned(sid: str, view: Held) -> bool:
    return sid.startswith("h1:") or view.meta.get("registrar_host") == "h1"


def test_registers_missing_and_changed_only():
    a, b, c = svc("h1:a:1"), svc("h1:b:1"), svc("h1:c:1")
    changed = svc("h1:c:1", port=2000)
    result = plan({s.id: s for s in (a, b, changed)}, set(), {a.id: agent_view(a), c.id: agent_view(c)}, set(), owned)
    assert [s.id for s in result.register] == ["h1:b:1", "h1:c:1"]
    assert result.deregister == []


def test_dangling_services_of_this_host_always_removed_others_never():
    a = svc("h1:a:1")
    custom = agent_view(svc("custom-id"), {"registrar_host": "h1"})  # SERVICE_ID, ours by meta
    agent = {
        "h1:gone:1": agent_view(svc("h1:gone:1")),
        "h2:other:1": agent_view(svc("h2:other:1")),
        "custom-id": custom,
        "consul": Held("consul", "consul"),
    }
    result = plan({a.id: a}, set(), agent, set(), owned)
    assert result.deregister == ["custom-id", "h1:gone:1"]


def test_maintenance_restored_after_agent_loss_and_lifted_when_wanted():
    a, b = svc("h1:a:1"), svc("h1:b:1")
    # the agent lost a: it is registered again and put back in maintenance
    result = plan({a.id: a, b.id: b}, {a.id}, {b.id: agent_view(b)}, {a.id, b.id}, owned)
    assert result.maintenance_on == ["h1:a:1"]
    assert result.maintenance_off == ["h1:b:1"]


def test_event_mapping():
    running = {"Id": "x", "State": {"Running": True}}
    start = {"Action": "start", "Actor": {"ID": "x", "Attributes": {}}, "timeNano": 5}
    assert isinstance(from_event(start, running), Up)
    assert from_event(start, {"State": {"Running": False}}) is None
    kill = {"Action": "kill", "Actor": {"ID": "x", "Attributes": {"signal": "15"}}}
    assert from_event(kill, None) == Stopping("x", signal.SIGTERM)
    assert isinstance(from_event({"Action": "pause", "Actor": {"ID": "x"}}, None), Paused)
    assert from_event({"Action": "die", "Actor": {"ID": "x", "Attributes": {"exitCode": "137"}}}, None) == Died(
        "x", 137
    )
    assert from_event({"Action": "health_status: healthy", "Actor": {"ID": "x"}}, None) == Health("x", "passing")
    assert from_event({"Action": "health_status: unhealthy", "Actor": {"ID": "x"}}, None) == Health("x", "critical")
    assert from_event({"Action": "exec_create", "Actor": {"ID": "x"}}, None) is None


def test_parse_signal():
    assert parse_signal("SIGTERM") == signal.SIGTERM
    assert parse_signal("term") == signal.SIGTERM
    assert parse_signal("9") == 9
    assert parse_signal("NOPE") is None
    assert parse_signal(None) is None


def test_the_adapter_reads_the_agents_answers_into_neutral_values():
    from registrar.consul_registry import agent_state_from

    services = {
        "h1:web:80": {"ID": "h1:web:80", "Service": "web", "Port": 80, "Address": "10.0.0.5", "Tags": ["a"],
                      "Meta": {"registrar_host": "h1"}},
        "consul": {"ID": "consul", "Service": "consul", "Port": 8300, "Address": "", "Tags": [], "Meta": {}},
    }  # fmt: skip
    checks = {
        "service:h1:web:80": {"ServiceID": "h1:web:80", "Status": "passing", "Notes": ""},
        "_service_maintenance:h1:web:80": {"ServiceID": "h1:web:80", "Status": "critical",
                                           "Notes": "Draining: docker stop [registrar]"},
        "serfHealth": {"ServiceID": "", "Status": "passing"},
    }  # fmt: skip
    state = agent_state_from(services, checks)
    assert state.services["h1:web:80"] == Held("h1:web:80", "web", 80, "10.0.0.5", ("a",), {"registrar_host": "h1"})
    assert state.maintenance == {"h1:web:80": "Draining: docker stop [registrar]"}
    assert state.statuses_of("h1:web:80") == {"service:h1:web:80": "passing"}
    assert "_service_maintenance:h1:web:80" not in state.checks and state.checks["serfHealth"] == ("", "passing")
    web = Service(id="h1:web:80", name="web", port=80, address="10.0.0.5", container_id="c", container_name="n",
                  tags=("a",), meta={"registrar_host": "h1"})  # fmt: skip
    assert web.same_registration(state.services["h1:web:80"])
