"""The routes page (issue 26) in headless Chromium, and its JSON API, against the real registrar,
templater, HAProxy, Consul and containers. Screenshots go to test-artifacts/."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time

import pytest
from selenium.webdriver.support.ui import WebDriverWait

from tests.integration.test_ui_browser import ARTIFACTS, TEMPLATES, body
from tests.support import ROOT, free_port, wait_until
from tests.traffic import get

pytestmark = pytest.mark.integration

DEMO = {"SERVICE_NAME": "demo", "SERVICE_HTTP_HOST": "demo.localhost", "SERVICE_CHECK_HTTP": "/index.html"}


def api(port: int, path: str = "/api/routes", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    return api_full(port, path, headers)[:2]  # type: ignore[return-value]


def api_full(port: int, path: str = "/api/routes", headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data, response.getheader("ETag") or ""


def shot(browser, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"routes-page-{name}.png"))


def route_text(browser, service: str) -> str:
    """The text of a service's route as shown now (read in one script: the page redraws)."""
    script = "const e = document.querySelector(`[data-route='${arguments[0]}']`); return e ? e.innerText : '';"
    return str(browser.execute_script(script, service))


def test_the_routes_page_shows_routes_live_draining_and_contests(
    consul,
    containers,
    registrar,
    templater,
    tmp_path,
    browser,
):
    registrar()
    port, status = free_port(), free_port()
    proc = templater(
        "--template", f"{TEMPLATES / 'haproxy.cfg.j2'}:{tmp_path / 'haproxy.cfg'}", "--proxy", "haproxy",
        "--stop-proxy", "--var", f"runtime_dir={tmp_path}", "--var", f"http_port={port}",
        "--var", "bind_address=127.0.0.1", "--status-addr", f"127.0.0.1:{status}",
    )  # fmt: skip
    demo = [containers.run(labels=DEMO) for _ in range(3)]
    wait_until(lambda: len(consul.health("demo", passing=True)) == 3, timeout=20, what="3 demo instances passing")
    wait_until(lambda: get(port, "demo.localhost", "/index.html")[0] == 200, timeout=15, what="demo routed")

    browser.get(f"http://127.0.0.1:{status}/routes")
    WebDriverWait(browser, 20).until(lambda b: all(c.name in route_text(b, "demo") for c in demo))
    text = route_text(browser, "demo")
    assert "demo.localhost/ \u2192 demo" in text and text.count("passing") >= 3, text
    assert "haproxy 2.6" in body(browser) and "Consul up" in body(browser)
    shot(browser, "demo")

    # the JSON API parses and agrees with the catalog
    code, data = api(status)
    assert code == 200
    doc = json.loads(data)
    (route,) = [r for r in doc["routes"] if r["service"] == "demo"]
    in_consul = {e["Service"]["ID"] for e in consul.health("demo")}
    assert {i["id"] for i in route["instances"]} == in_consul
    assert all(i["routed"] and i["weight"] == 1 and i["state"] == "passing" for i in route["instances"])
    assert doc["proxy"]["kind"] == "haproxy" and doc["proxy"]["pid"]
    assert doc["history"]["renders"] and doc["history"]["last_apply"]
    assert any(f["page"] == f"http://127.0.0.1:{status}/routes" for f in doc["fleet"])

    # a container started now shows up without a reload of the page
    fourth = containers.run(labels=DEMO)
    started = time.monotonic()
    registered: list[float] = []

    def in_consul() -> None:  # when Consul first lists it: from then on it is the page's to show
        wait_until(lambda: len(consul.health("demo")) == 4, timeout=15, interval=0.01, what="fourth registered")
        registered.append(time.monotonic())

    watcher = threading.Thread(target=in_consul)
    watcher.start()
    WebDriverWait(browser, 10, poll_frequency=0.02).until(lambda b: fourth.name in route_text(b, "demo"))
    shown = time.monotonic()
    watcher.join()
    print(f"a new container on the page {shown - started:.2f} s after docker run returned, "
          f"{shown - registered[0]:.2f} s after Consul listed it")  # fmt: skip
    shot(browser, "a-new-container")

    # an instance drained by sidecar-stop shows as draining, while it drains
    target = demo[0]
    stopper = threading.Thread(
        target=subprocess.run,
        args=([sys.executable, "-m", "registrar.drain", "--consul", consul.url, "--drain", "4s", target.name],),
        kwargs={"capture_output": True, "timeout": 60, "cwd": ROOT},
    )
    stopper.start()
    try:
        WebDriverWait(browser, 4, poll_frequency=0.05).until(lambda b: "draining" in row_text(b, target.name))
        shot(browser, "draining")
    finally:
        stopper.join()

    # a contested host: the service that lost it shows the warning beside its name
    consul.put("/v1/agent/service/register", {"ID": "zzz-1", "Name": "zzz-contest", "Port": 9, "Address": "127.0.0.1",
                                              "Meta": {"http_host": "demo.localhost"}})  # fmt: skip
    try:
        script = "const e = document.querySelector('[data-left=\"zzz-contest\"]'); return e ? e.innerText : '';"
        WebDriverWait(browser, 10).until(lambda b: b.execute_script(script))
        lost = str(browser.execute_script(script))
        assert "zzz-contest" in lost and "is routed to demo already" in lost, lost
        shot(browser, "contested")
    finally:
        consul.put("/v1/agent/service/deregister/zzz-1")
    assert "Traceback" not in proc.output()
    # the page's own part of "within 1 s": it asks every quarter second, the templater's watch
    # hears of a registration within milliseconds
    assert shown - registered[0] < 1.0, (shown - started, shown - registered[0])


def row_text(browser, container: str) -> str:
    script = (
        "for (const r of document.querySelectorAll('[data-instance]')) "
        "{ if (r.innerText.includes(arguments[0])) return r.innerText; } return '';"
    )
    return str(browser.execute_script(script, container))


def test_a_status_address_that_is_not_loopback_needs_the_token(consul, templater, tmp_path):
    status = free_port()
    token = tmp_path / "token"
    token.write_text("a-long-enough-token-for-the-page\n")
    proc = templater(
        "--template", f"{TEMPLATES / 'haproxy.cfg.j2'}:{tmp_path / 'out.cfg'}", "--var", f"runtime_dir={tmp_path}",
        "--status-addr", f"0.0.0.0:{status}", "--status-token-file", str(token),
    )  # fmt: skip
    wait_until(lambda: api(status, "/health")[0] in (200, 503), timeout=15, what="status up")
    code, data = api(status)
    assert code == 401 and b"token" in data
    assert api(status, "/routes")[0] == 401
    assert api(status, headers={"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
    bearer = {"Authorization": "Bearer a-long-enough-token-for-the-page"}
    code, data, etag = api_full(status, headers=bearer)
    assert code == 200 and json.loads(data)["catalog"] in (True, False) and etag
    # nothing changed (once the first render is done): 304, an open page costs a version only

    def unchanged() -> bool:
        now = api_full(status, headers=bearer)[2]
        return api_full(status, headers={**bearer, "If-None-Match": now})[0] == 304

    wait_until(unchanged, timeout=15, what="a 304 while nothing changes")
    assert api(status, headers={"If-None-Match": etag})[0] == 401
    assert b"a-long-enough-token" not in data
    assert api(status, "/health")[0] in (200, 503)  # /health and /metrics stay as they were
    assert "a-long-enough-token" not in proc.output()
