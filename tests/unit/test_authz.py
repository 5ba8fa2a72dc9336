"""The drain plugin's pure parts: which Docker calls stop a container, whose services they are,
and the engine configuration it edits."""

from __future__ import annotations

import time

import pytest

from registrar.authz import DRAIN_MARK, Stopping, names_self, own_container_id, reason, services_of, stopping
from registrar.drain_plugin import bounded
from registrar.engine_config import find_dockerd, with_plugin
from registrar.model import Held
from sidecar.errors import SidecarError


@pytest.mark.parametrize(
    ("method", "uri", "expected"),
    [
        ("POST", "/v1.41/containers/web1/stop?t=10", Stopping("web1", "stop")),
        ("POST", "/containers/0123abcd/stop", Stopping("0123abcd", "stop")),
        ("POST", "/v1.50/containers/web1/restart?t=3", Stopping("web1", "restart")),
        ("POST", "/v1.41/containers/web1/kill", Stopping("web1", "kill")),  # docker kill: KILL
        ("POST", "/v1.41/containers/web1/kill?signal=SIGTERM", Stopping("web1", "kill")),
        ("POST", "/v1.41/containers/web1/kill?signal=15", Stopping("web1", "kill")),
        ("POST", "/v1.41/containers/web1/kill?signal=int", Stopping("web1", "kill")),
        ("POST", "/v1.41/containers/web1/kill?signal=HUP", None),  # a reload, not a stop
        ("POST", "/v1.41/containers/web1/kill?signal=SIGUSR1", None),
        ("DELETE", "/v1.41/containers/web1?force=1&v=1", Stopping("web1", "remove")),
        ("DELETE", "/v1.41/containers/web1?force=true", Stopping("web1", "remove")),
        ("DELETE", "/v1.41/containers/web1", None),  # refused by Docker while it runs
        ("DELETE", "/v1.41/containers/web1?force=0", None),
        ("POST", "/v1.41/containers/my%20odd/stop", Stopping("my odd", "stop")),
        ("GET", "/v1.41/containers/json", None),
        ("GET", "/v1.41/containers/web1/json", None),
        ("POST", "/v1.41/containers/create?name=x", None),
        ("POST", "/v1.41/containers/web1/start", None),
        ("POST", "/v1.41/containers/web1/pause", None),
        ("POST", "/v1.41/containers/prune", None),
        ("GET", "/_ping", None),
        ("POST", "/v1.41/containers/web1/stop/extra", None),
    ],
)
def test_which_calls_stop_a_container(method, uri, expected):
    assert stopping(method, uri) == expected


def held(sid: str, name: str, cid: str) -> Held:
    meta = {"container_name": name, "container_id": cid} if cid else {}
    return Held(id=sid, name="web", port=1, address="", tags=(), meta=meta)


SERVICES = {
    "h:web1:8080": held("h:web1:8080", "web1", "0123456789ab"),
    "h:web1:9090": held("h:web1:9090", "web1", "0123456789ab"),
    "h:web2:8080": held("h:web2:8080", "web2", "0199999999cd"),
    "h:0123:8080": held("h:0123:8080", "0123", "fedcba987654"),  # named like an ID prefix
    "other": held("other", "web1", ""),  # not the registrar's: no container_id
}


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("web1", ["h:web1:8080", "h:web1:9090"]),
        ("web2", ["h:web2:8080"]),
        ("0123456789ab", ["h:web1:8080", "h:web1:9090"]),
        ("0123456789ab" + "c" * 52, ["h:web1:8080", "h:web1:9090"]),  # the full ID
        ("0123456", ["h:web1:8080", "h:web1:9090"]),
        ("01", ["h:web1:8080", "h:web1:9090", "h:web2:8080"]),  # Docker would refuse it as ambiguous
        ("0123", ["h:0123:8080"]),  # a name wins over an ID prefix, as in Docker
        ("FEDCBA", ["h:0123:8080"]),
        ("nothing", []),
        ("web", []),
    ],
)
def test_the_services_of_the_container_a_client_names(ref, expected):
    assert services_of(ref, SERVICES) == expected


def test_the_reason_is_marked_as_the_plugins():
    text = reason(Stopping("web1", "stop"), "2026-12-01T20:00:00Z")
    assert text == f"Draining: docker stop of web1 at 2026-12-01T20:00:00Z {DRAIN_MARK}"
    assert not text.endswith("[registrar]")  # the registrar's periodic check must not lift it


def test_the_engine_config_with_and_without_the_plugin():
    assert with_plugin({}, "drain", True) == {"authorization-plugins": ["drain"]}
    config = {"authorization-plugins": ["opa", "drain"], "log-level": "info"}
    assert with_plugin(config, "drain", True) == {"authorization-plugins": ["opa", "drain"], "log-level": "info"}
    assert with_plugin(config, "drain", False) == {"authorization-plugins": ["opa"], "log-level": "info"}
    assert with_plugin({"authorization-plugins": "bad"}, "drain", False) == {"authorization-plugins": []}
    assert config["authorization-plugins"] == ["opa", "drain"]  # not changed in place


def test_a_bounded_call_gives_up_and_passes_errors_on():
    assert bounded(lambda: 7, 1.0) == 7
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"within 0\.1 s"):
        bounded(lambda: time.sleep(1), 0.1)
    assert time.monotonic() - started < 0.9
    with pytest.raises(ValueError, match="boom"):
        bounded(lambda: (_ for _ in ()).throw(ValueError("boom")), 1.0)


OWN = "0f852449f630ac2dabfb1e97901a093fd54b8bfe75ee245ca99cf7bc722eadf9"
MOUNTINFO = f"""22 27 0:21 / /proc rw,relatime - proc proc rw
336 319 254:0 /var/lib/docker/containers/{OWN}/resolv.conf /etc/resolv.conf rw,relatime - ext4 /dev/vda rw
"""


def test_the_plugins_own_container_and_references_to_it():
    own = own_container_id(MOUNTINFO)
    assert own == OWN
    assert own_container_id("22 27 0:21 / /proc rw,relatime - proc proc rw\n") is None
    assert names_self("sidecar-drain-1", own, "sidecar-drain-1")
    assert names_self("0f852449f630", own, "")
    assert names_self("0F85", own, "")
    assert not names_self("0f9", own, "x")
    assert not names_self("web1", own, "sidecar-drain-1")
    assert not names_self("", own, "")


def test_the_one_dockerd_process_is_found_by_its_name(tmp_path):
    for pid, comm in ((1, "tini"), (40, "dockerd"), (41, "containerd")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
    (tmp_path / "self").mkdir()
    assert find_dockerd(tmp_path) == 40
    (tmp_path / "50").mkdir()
    (tmp_path / "50" / "comm").write_text("dockerd\n")
    with pytest.raises(SidecarError, match="2 dockerd processes found"):
        find_dockerd(tmp_path)
