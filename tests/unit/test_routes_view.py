"""The routes page's pure parts: the document, the history it shows, who may read it."""

from __future__ import annotations

import base64

from templater.catalog import Snapshot
from templater.history import History, diff_text, per_minute
from templater.routes import RouteMemo
from templater.routes_page import authorized, is_loopback
from templater.routes_view import document, instance_state, warning_service
from tests.unit.test_routes import inst


def table_of(snapshot: Snapshot):
    memo = RouteMemo()
    return memo.table(memo.names(snapshot.services, {}), snapshot.instances, {})


def snapshot_of(*instances) -> Snapshot:
    by_name: dict = {}
    for i in instances:
        by_name.setdefault(i.name, []).append(i)
    return Snapshot(services={n: () for n in by_name}, instances={n: tuple(v) for n, v in by_name.items()})


def test_every_instance_of_a_route_with_its_state_weight_and_server():
    snap = snapshot_of(
        inst("w1", "web", 8001, http_host="app.test", weight="3", container_name="web-1"),
        inst("w2", "web", 8002, http_host="app.test"),
        inst("w3", "web", 8003, status="maintenance", http_host="app.test"),
        inst("w4", "web", 8004, status="critical", http_host="app.test"),
        inst("ing", "ingress", 80, proxy="haproxy", proxy_version="2.6", routes_page="http://10.0.0.5:9200/routes"),
    )
    doc = document(snap, table_of(snap), [], "dc1", "ingress", {"proxy": None})
    (route,) = doc["routes"]
    assert route["service"] == "web" and route["hosts"] == ["app.test"] and route["path"] == "/"
    states = {i["id"]: (i["state"], i["routed"], i["weight"]) for i in route["instances"]}
    assert states == {
        "w1": ("passing", True, 3),
        "w2": ("passing", True, 1),
        "w3": ("draining", False, 0),
        "w4": ("critical", False, 0),
    }
    assert [i["id"] for i in route["instances"]][:2] == ["w1", "w2"]  # the routed ones first
    assert route["instances"][0]["container"] == "web-1" and route["passing"] == 2
    assert doc["fleet"] == [{"node": "n1", "address": "10.0.0.1", "port": 80, "status": "passing",
                             "proxy": "haproxy", "version": "2.6",
                             "page": "http://10.0.0.5:9200/routes"}]  # fmt: skip
    assert doc["proxy"] is None and doc["datacenter"] == "dc1"


def test_a_contested_host_is_shown_with_the_service_that_lost_it():
    snap = snapshot_of(
        inst("a1", "alpha", 8001, http_host="shared.test"),
        inst("b1", "beta", 8002, http_host="shared.test,own.test"),
        inst("c1", "gamma", 8003, http_host="x!y"),
    )
    doc = document(snap, table_of(snap), [], "dc1", "", {})
    routes = {r["service"]: r for r in doc["routes"]}
    assert routes["alpha"]["warnings"] == [] and routes["alpha"]["hosts"] == ["shared.test"]
    assert routes["beta"]["hosts"] == ["own.test"]
    assert any("shared.test" in w and "alpha" in w for w in routes["beta"]["warnings"])
    assert [x["service"] for x in doc["left_out"]] == ["gamma"]  # nothing of it is routed
    assert "x!y" in doc["left_out"][0]["warnings"][0]


def test_held_and_no_catalog():
    snap = snapshot_of(inst("w1", "web", 8001, http_host="app.test"))
    doc = document(snap, table_of(snap), ["web"], "dc1", "", {})
    assert doc["routes"][0]["held"] and doc["routes"][0]["instances"][0]["state"] == "held"
    empty = document(None, None, [], "dc1", "ingress", {})
    assert empty["catalog"] is False and empty["routes"] == [] and empty["fleet"] == []


def test_states_and_warning_names():
    i = inst("w", "web", status="warning")
    assert instance_state(i, False, False) == "warning"
    assert warning_service("service web-2: http_host x is not a host name: left out") == "web-2"
    assert warning_service("something else") == ""


def test_the_history_diffs_lazily_redacts_and_buckets_per_minute():
    now = [1000.0 * 60]
    history = History(clock=lambda: now[0])
    history.rendered("haproxy.cfg", b"a\nb\nsecret-1\n", "a\nb\nc\n")
    history.change(0.02)
    history.applied("runtime API", 0.004)
    now[0] += 61
    history.applied("reload", 0.2)
    history.failed("reload:haproxy", "exit 1")
    history.warned("service x: weight 'secret-1' is not a number")
    out = history.export(lambda text: text.replace("secret-1", "<redacted>"))
    (render,) = out["renders"]
    assert render["added"] == 1 and render["removed"] == 1
    assert "-<redacted>" in render["diff"] and "+c" in render["diff"] and "secret-1" not in render["diff"]
    assert [b["count"] for b in out["applies"]] == [{"runtime API": 1}, {"reload": 1}]
    assert out["changes"][0]["p50"] == 0.02
    assert out["last_apply"]["how"] == "reload" and out["last_failure"]["message"] == "exit 1"
    assert out["warnings"][0]["text"] == "service x: weight '<redacted>' is not a number"
    now[0] += 3601
    assert history.export(str)["applies"] == []  # out of the hour


def test_a_long_diff_is_cut_and_per_minute_leaves_empty_minutes_out():
    text, added, removed = diff_text("", "\n".join(f"line {n}" for n in range(1000)), "x")
    assert added == 1000 and removed == 0 and text.endswith("more lines")
    assert per_minute([(120.0, "a", 1.0), (130.0, "a", 3.0), (300.0, "b", 2.0)], 400.0) == [
        {"minute": 120, "count": {"a": 2}, "p50": 3.0, "max": 3.0},
        {"minute": 300, "count": {"b": 1}, "p50": 2.0, "max": 2.0},
    ]


def test_who_may_read_the_page():
    token = "s3cr3t-t0ken-0123456789"
    basic = base64.b64encode(f"anyone:{token}".encode()).decode()
    assert authorized(f"Basic {basic}", token) and authorized(f"Bearer {token}", token)
    assert not authorized(None, token) and not authorized("Bearer nope", token)
    assert not authorized("Basic !!!", token) and not authorized(f"Digest {token}", token)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("myhost")


def test_meta_is_never_copied_into_markup():
    snap = snapshot_of(inst("w1", "web", 8001, http_host="app.test", container_name="<script>x</script>"))
    doc = document(snap, table_of(snap), [], "dc1", "", {})
    # the document carries the text as it is; the page sets it with textContent (never innerHTML)
    assert doc["routes"][0]["instances"][0]["container"] == "<script>x</script>"
    from templater.page_html import PAGE

    assert "innerHTML" not in PAGE and "createTextNode" in PAGE


def test_renders_waiting_for_their_diff_share_one_text():
    history = History()
    history.rendered("t", b"a\n", "b\n")
    history.rendered("t", b"b\n", "c\n")
    history.rendered("u", b"x\n", "y\n")
    records = list(history._renders)
    assert records[1].old is records[0].new  # the file before is the last render, kept once
    assert records[2].old == b"x\n"  # another template's
    diffs = [r["diff"] for r in history.export(str)["renders"]]
    assert ["-x" in diffs[0] and "+y" in diffs[0], "-b" in diffs[1] and "+c" in diffs[1],
            "-a" in diffs[2] and "+b" in diffs[2]] == [True, True, True]  # fmt: skip
    history.rendered("t", b"c\n", "d\n")  # after the page read them: from the file again
    assert list(history._renders)[-1].old == b"c\n"


def test_a_tcp_route_is_shown_with_its_port():
    snap = snapshot_of(inst("d1", "db", 5432, tcp_port="15432", sni_host="db.test"),
                       inst("w1", "web", 8001, http_host="app.test"))  # fmt: skip
    routes = {r["service"]: r for r in document(snap, table_of(snap), [], "dc1", "", {})["routes"]}
    assert (routes["db"]["tcp_port"], routes["db"]["http"], routes["db"]["sni_hosts"]) == (15432, False, ["db.test"])
    assert (routes["web"]["tcp_port"], routes["web"]["http"]) == (0, True)
    assert [i["id"] for i in routes["db"]["instances"] if i["routed"]] == ["d1"]
