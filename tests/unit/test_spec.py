"""Pure label parsing: container inspect data -> services, errors."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from registrar.spec import ORIGIN_META, SpecSettings, docker_health_status, services_for

SETTINGS = SpecSettings(hostname="h1")


def inspect(
    labels: dict[str, str] | None = None,
    env: list[str] | None = None,
    ports: dict[str, list[dict[str, str]] | None] | None = None,
    name: str = "web-1",
    healthcheck: dict[str, Any] | None = None,
    network_mode: str = "bridge",
) -> dict[str, Any]:
    if ports is None:
        ports = {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "32768"}]}
    config: dict[str, Any] = {
        "Image": "registry.example.com/team/app:1.2",
        "Labels": labels or {},
        "Env": env or [],
        "ExposedPorts": {p: {} for p in ports},
    }
    if healthcheck:
        config["Healthcheck"] = healthcheck
    return {
        "Id": "c0ffee" * 10,
        "Name": f"/{name}",
        "Config": config,
        "HostConfig": {"NetworkMode": network_mode},
        "NetworkSettings": {"Ports": ports, "IPAddress": "172.17.0.5", "Networks": {}},
        "State": {"Running": True},
    }


def user_meta(svc) -> dict:
    return {k: v for k, v in svc.meta.items() if k not in ORIGIN_META}


def test_defaults_follow_registrator():
    result = services_for(inspect(), SETTINGS)
    assert result.errors == []
    [svc] = result.services
    assert svc.id == "h1:web-1:8080"
    assert svc.name == "app"
    assert svc.port == 32768
    assert svc.address == "127.0.0.1"
    assert svc.tags == ()
    # where it comes from, for the Consul UI; registrar_host also says which registrar owns it
    assert svc.meta == {"container_name": "web-1", "container_id": "c0ffeec0ffee",
                        "image": "registry.example.com/team/app:1.2", "registrar_host": "h1"}  # fmt: skip


def test_labels_override_env_and_meta_lowercased():
    result = services_for(
        inspect(
            labels={"SERVICE_NAME": "api", "SERVICE_HTTP_HOST": "a.example.com"},
            env=["SERVICE_NAME=fromenv", "SERVICE_TAGS=a,b", "PATH=/bin"],
        ),
        SETTINGS,
    )
    [svc] = result.services
    assert svc.name == "api"
    assert svc.tags == ("a", "b")
    assert user_meta(svc) == {"http_host": "a.example.com"}


def test_several_ports_grouped_names_udp_and_per_port():
    ports = {
        "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "1000"}],
        "9090/tcp": [{"HostIp": "0.0.0.0", "HostPort": "1001"}],
        "53/udp": [{"HostIp": "0.0.0.0", "HostPort": "1002"}],
        "7000/tcp": None,  # exposed, not published: skipped unless --internal
    }
    result = services_for(inspect(ports=ports, labels={"SERVICE_9090_NAME": "metrics"}), SETTINGS)
    by_id = {s.id: s for s in result.services}
    assert set(by_id) == {"h1:web-1:53:udp", "h1:web-1:8080", "h1:web-1:9090"}
    assert by_id["h1:web-1:8080"].name == "app-8080"
    assert by_id["h1:web-1:9090"].name == "metrics"
    assert "udp" in by_id["h1:web-1:53:udp"].tags
    assert by_id["h1:web-1:8080"].address == ""  # bound to all addresses: the agent's address


def test_internal_uses_container_ip_and_exposed_port():
    result = services_for(inspect(), SpecSettings(hostname="h1", internal=True))
    [svc] = result.services
    assert (svc.address, svc.port) == ("172.17.0.5", 8080)


def test_ip_flag_and_forced_tags_and_explicit():
    settings = SpecSettings(hostname="h1", ip="10.0.0.9", force_tags=("dc1",))
    [svc] = services_for(inspect(labels={"SERVICE_TAGS": "x"}), settings).services
    assert svc.address == "10.0.0.9"
    assert svc.tags == ("x", "dc1")
    explicit = SpecSettings(hostname="h1", explicit=True)
    assert services_for(inspect(), explicit).services == []
    assert len(services_for(inspect(labels={"SERVICE_NAME": "n"}), explicit).services) == 1


def test_ignore():
    result = services_for(inspect(labels={"SERVICE_IGNORE": "true"}), SETTINGS)
    assert result.services == [] and result.errors == [] and result.skipped


def test_http_check_with_interval_and_initial_status():
    labels = {
        "SERVICE_CHECK_HTTP": "/health",
        "SERVICE_CHECK_INTERVAL": "5s",
        "SERVICE_CHECK_TIMEOUT": "1s",
        "SERVICE_CHECK_INITIAL_STATUS": "passing",
        "SERVICE_CHECK_DEREGISTER_AFTER": "10m",
    }
    [svc] = services_for(inspect(labels=labels), SETTINGS).services
    [check] = svc.checks
    assert (check.kind, check.target, check.interval, check.timeout) == (
        "http",
        "http://127.0.0.1:32768/health",
        "5s",
        "1s",
    )
    assert check.initial_status == "passing"
    definition = svc.registration({})["Checks"][0]
    assert definition["CheckID"] == "service:h1:web-1:8080"
    assert definition["HTTP"] == "http://127.0.0.1:32768/health"
    assert definition["DeregisterCriticalServiceAfter"] == "10m"
    assert user_meta(svc) == {"check_http": "/health"}  # for proxies that check actively


def test_docker_healthcheck_becomes_ttl_check():
    hc = {"Test": ["CMD-SHELL", "true"], "Interval": 1_000_000_000}
    [svc] = services_for(inspect(healthcheck=hc), SETTINGS).services
    [check] = svc.checks
    assert check.kind == "docker"
    assert svc.check_id(0) == "service:h1:web-1:8080:docker"
    state = {"State": {"Health": {"Status": "healthy"}}}
    assert docker_health_status(state) == "passing"


@pytest.mark.parametrize(
    ("labels", "label", "value"),
    [
        ({"SERVICE_9999_NAME": "x"}, "SERVICE_9999_NAME", "x"),
        ({"SERVICE_CHECK_TCP": "true", "SERVICE_CHECK_INTERVAL": "banana"}, "SERVICE_CHECK_INTERVAL", "banana"),
        ({"SERVICE_CHECK_HTTP": "/a b"}, "SERVICE_CHECK_HTTP", "/a b"),
        ({"SERVICE_NAME": "not_a_dns label"}, "SERVICE_NAME", "not_a_dns label"),
        ({"SERVICE_NAME": "-bad"}, "SERVICE_NAME", "-bad"),
        ({"SERVICE_TAGS": "ok,evil\nserver x 1.2.3.4:80"}, "SERVICE_TAGS", "ok,evil\nserver x 1.2.3.4:80"),
        ({"SERVICE_HTTP_HOST": "a.com\r\nx"}, "SERVICE_HTTP_HOST", "a.com\r\nx"),
        # unknown check settings no longer pass silently (the instance would count passing at once)
        ({"SERVICE_CHECK_HTPP": "/health"}, "SERVICE_CHECK_HTPP", "/health"),
        ({"SERVICE_CHECK_CMD": "/bin/check"}, "SERVICE_CHECK_CMD", "/bin/check"),
        ({"SERVICE_CHECK_HTTP": "/h", "SERVICE_CHECK_TCP": "true"}, "SERVICE_CHECK_TCP", "true"),
        ({"SERVICE_CHECK_SCRIPT": "curl x"}, "SERVICE_CHECK_SCRIPT", "curl x"),  # without --allow-script-checks
        ({"SERVICE_REGISTRAR_HOST": "other"}, "SERVICE_REGISTRAR_HOST", "other"),
        (
            {"SERVICE_CHECK_INITIAL_STATUS": "maybe", "SERVICE_CHECK_TCP": "true"},
            "SERVICE_CHECK_INITIAL_STATUS",
            "maybe",
        ),
    ],
)
def test_bad_labels_name_container_label_and_value(labels, label, value):
    result = services_for(inspect(labels=labels), SETTINGS)
    assert result.services == []
    [error] = result.errors
    assert (error.container, error.label, error.value) == ("web-1", label, value)
    text = str(error)
    assert "container=web-1" in text and label in text


def test_bad_per_port_label_skips_only_that_port():
    ports = {
        "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "1000"}],
        "9090/tcp": [{"HostIp": "0.0.0.0", "HostPort": "1001"}],
    }
    result = services_for(inspect(ports=ports, labels={"SERVICE_9090_CHECK_HTTP": "bad url"}), SETTINGS)
    assert [s.id for s in result.services] == ["h1:web-1:8080"]
    assert [e.label for e in result.errors] == ["SERVICE_9090_CHECK_HTTP"]


def test_script_check_only_behind_the_flag():
    labels = {"SERVICE_CHECK_SCRIPT": "test -f /tmp/ok"}
    assert services_for(inspect(labels=labels), SETTINGS).services == []
    allowed = replace(SETTINGS, allow_script_checks=True)
    [svc] = services_for(inspect(labels=labels), allowed).services
    assert svc.checks[0].kind == "script"


def test_own_registration_meta_passes_the_templaters_sanitizer():
    """The registrar's own meta said docker='default socket': every templater warned about it."""
    from registrar.__main__ import own_service
    from registrar.settings import parse
    from templater.catalog import clean_meta

    service = own_service(parse(["--hostname", "h1"]), "default socket")
    assert service is not None
    warnings: list[str] = []
    assert dict(clean_meta(dict(service.meta), "own", warnings.append)) == dict(service.meta)
    assert warnings == [] and dict(service.meta)["docker"] == "default-socket"


def test_sidecar_stop_helpers():
    from registrar.consul_registry import agent_state_from
    from registrar.drain import services_of, stop_timeout

    services = {  # the agent's answer, through the adapter
        "h:a:80": {"Service": "a", "Meta": {"container_id": "abcdef123456"}},
        "h:a:81": {"Service": "a", "Meta": {"container_id": "abcdef123456"}},
        "h:b:80": {"Service": "b", "Meta": {"container_id": "999999999999"}},
        "other": {"Service": "other", "Meta": None},
    }
    assert services_of(agent_state_from(services, {}).services, "abcdef1234567890") == ["h:a:80", "h:a:81"]
    assert stop_timeout({"Config": {"StopTimeout": 30}}, None) == 30
    assert stop_timeout({"Config": {}}, None) == 10
    assert stop_timeout({"Config": {"StopTimeout": 30}}, 3) == 3


def test_require_label_registers_only_containers_labelled_service_register_true():
    strict = replace(SETTINGS, require_label=True)
    assert services_for(inspect(), strict).services == []
    assert "SERVICE_REGISTER" in services_for(inspect(), strict).skipped[0]
    [svc] = services_for(inspect(labels={"SERVICE_REGISTER": "true"}), strict).services
    assert "register" not in svc.meta  # the switch is not a meta value
    assert len(services_for(inspect(), SETTINGS).services) == 1  # without the flag: as before


def test_check_http_method_as_registrator_reads_it():
    [svc] = services_for(inspect(labels={"SERVICE_CHECK_HTTP": "/ping", "SERVICE_CHECK_HTTP_METHOD": "head"}),
                         SETTINGS).services  # fmt: skip
    [check] = svc.checks
    assert check.method == "HEAD" and check.describe() == "HTTP HEAD /ping every 10s"
    assert check.definition("c", None, None)["Method"] == "HEAD"
    plain = services_for(inspect(labels={"SERVICE_CHECK_HTTP": "/ping"}), SETTINGS).services[0].checks[0]
    assert "Method" not in plain.definition("c", None, None)  # GET: as before, nothing sent
    bad_method = {"SERVICE_CHECK_HTTP": "/p", "SERVICE_CHECK_HTTP_METHOD": "GET /x"}
    wrong_kind = {"SERVICE_CHECK_TCP": "true", "SERVICE_CHECK_HTTP_METHOD": "HEAD"}
    for labels, reason in ((bad_method, "HTTP method"), (wrong_kind, "SERVICE_CHECK_TCP")):
        result = services_for(inspect(labels=labels), SETTINGS)
        assert result.services == [] and reason in str(result.errors[0]), result.errors


def test_service_names_consul_accepts_are_registered_as_registrator_does():
    """`billing.api_v2` is a name Consul and registrator take; Consul DNS cannot find it: said."""
    result = services_for(inspect(labels={"SERVICE_NAME": "billing.api_v2"}), SETTINGS)
    assert [s.name for s in result.services] == ["billing.api_v2"]
    assert "not a DNS label" in result.warnings[0] and "billing.api_v2" in result.warnings[0]
    assert services_for(inspect(labels={"SERVICE_NAME": "web"}), SETTINGS).warnings == []
    for bad in ("a b", "a/b", "-a", "x" * 256):
        assert services_for(inspect(labels={"SERVICE_NAME": bad}), SETTINGS).errors, bad


def on_two_networks(labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A container on two user-defined networks (no default bridge), as the engine reports it."""
    data = inspect(labels=labels, ports={"8080/tcp": None}, network_mode="front")
    data["NetworkSettings"] = {
        "Ports": {"8080/tcp": None},
        "IPAddress": "",
        "Networks": {"front": {"IPAddress": "10.1.0.5"}, "back": {"IPAddress": "10.2.0.5"}},
    }
    return data


def test_the_network_choice_label_and_flag_with_internal():
    internal = replace(SETTINGS, internal=True)
    [first] = services_for(on_two_networks(), internal).services
    assert first.address == "10.2.0.5"  # no choice: the first network by name, as the engine lists them
    [chosen] = services_for(on_two_networks({"SERVICE_NETWORK": "front"}), internal).services
    assert chosen.address == "10.1.0.5" and "network" not in chosen.meta
    [flag] = services_for(on_two_networks(), replace(internal, network="front")).services
    assert flag.address == "10.1.0.5"
    [label_wins] = services_for(
        on_two_networks({"SERVICE_NETWORK": "back"}), replace(internal, network="front")
    ).services
    assert label_wins.address == "10.2.0.5"
    [elsewhere] = services_for(inspect(ports={"8080/tcp": None}), replace(internal, network="front")).services
    assert elsewhere.address == "172.17.0.5"  # the flag is a preference: not on it, the default bridge
    bad = services_for(on_two_networks({"SERVICE_NETWORK": "nope"}), internal)
    assert bad.services == [] and len(bad.errors) == 1
    assert str(bad.errors[0]) == ("bad label container=web-1 label=SERVICE_NETWORK value=nope: not one of the "
                                  "container's networks (back, front)")  # fmt: skip


def test_registrators_check_cmd_and_grpc_tls():
    """SERVICE_CHECK_CMD as registrator registers it (the agent's check-cmd helper runs the
    command in the container), behind --allow-script-checks; SERVICE_CHECK_GRPC_USE_TLS."""
    allowed = replace(SETTINGS, allow_script_checks=True)
    [svc] = services_for(inspect(labels={"SERVICE_CHECK_CMD": "/bin/healthcheck --quick"}), allowed).services
    body = svc.check(0).definition("c1", None, None)
    assert body["Args"] == ["check-cmd", ("c0ffee" * 10)[:12], "8080", "/bin/healthcheck --quick"]
    assert body["Interval"] == "10s" and "SERVICE_CHECK_CMD" in body["Name"]
    [grpc] = services_for(inspect(labels={"SERVICE_CHECK_GRPC": "true", "SERVICE_CHECK_GRPC_USE_TLS": "true"}),
                          SETTINGS).services  # fmt: skip
    assert grpc.check(0).definition("c1", None, None)["GRPCUseTLS"] is True
    [plain] = services_for(inspect(labels={"SERVICE_CHECK_GRPC": "true"}), SETTINGS).services
    assert "GRPCUseTLS" not in plain.check(0).definition("c1", None, None)
    wrong = services_for(inspect(labels={"SERVICE_CHECK_TCP": "true", "SERVICE_CHECK_GRPC_USE_TLS": "true"}), SETTINGS)
    assert wrong.services == [] and wrong.errors[0].label == "SERVICE_CHECK_GRPC_USE_TLS"


def test_a_container_in_anothers_network_namespace_gets_its_address():
    """`docker run --net container:X`: no address of its own; registered with X's (registrator)."""
    from registrar.spec import network_owner, with_network_of

    sidecar = inspect(ports={"9090/tcp": None}, network_mode="container:abc123")
    sidecar["NetworkSettings"] = {"Ports": {}, "IPAddress": "", "Networks": {}}
    owner = on_two_networks()
    assert network_owner(sidecar) == "abc123" and network_owner(owner) is None
    joined = with_network_of(sidecar, owner)
    assert joined["Config"] is sidecar["Config"] and sidecar["NetworkSettings"]["IPAddress"] == ""
    [svc] = services_for(joined, replace(SETTINGS, internal=True, network="front")).services
    assert (svc.address, svc.port) == ("10.1.0.5", 9090)
