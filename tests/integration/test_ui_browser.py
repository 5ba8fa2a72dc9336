"""The Consul UI in a real browser (Debian's Chromium, driven by selenium through chromedriver):
what a user sees of a running sidecar. A screenshot of each page is kept in test-artifacts/."""

from __future__ import annotations

import time
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.support import ROOT, free_port, wait_until
from tests.traffic import get

pytestmark = pytest.mark.integration

ARTIFACTS = ROOT / "test-artifacts"
TEMPLATES = ROOT / "templates"


def body(browser: Any) -> str:
    return str(browser.find_element(By.TAG_NAME, "body").text)


def show(browser: Any, url: str, *texts: str) -> str:
    """Open url and wait until every text is on the page; keep a screenshot."""
    browser.get(url)
    WebDriverWait(browser, 30).until(lambda b: all(t in body(b) for t in texts))
    ARTIFACTS.mkdir(exist_ok=True)
    name = url.split("/ui/", 1)[1].replace("/", "_").replace(":", "-")
    browser.save_screenshot(str(ARTIFACTS / f"consul-ui-{name}.png"))
    return body(browser)


def test_consul_ui_shows_the_sidecar_and_its_demo(consul, containers, registrar, templater, tmp_path, browser):
    registrar()
    port = free_port()
    templater(
        "--template", f"{TEMPLATES / 'haproxy.cfg.j2'}:{tmp_path / 'haproxy.cfg'}", "--proxy", "haproxy",
        "--stop-proxy", "--var", f"runtime_dir={tmp_path}", "--var", f"http_port={port}",
        "--var", "bind_address=127.0.0.1",
    )  # fmt: skip
    labels = {"SERVICE_NAME": "demo", "SERVICE_HTTP_HOST": "demo.localhost", "SERVICE_CHECK_HTTP": "/index.html"}
    demo = [containers.run(labels=labels) for _ in range(3)]
    wait_until(lambda: len(consul.health("demo", passing=True)) == 3, timeout=20, what="3 demo instances passing")
    wait_until(lambda: consul.health("ingress", passing=True), timeout=15, what="ingress passing")
    assert get(port, "demo.localhost", "/index.html")[0] == 200
    ui = f"{consul.url}/ui/dc1/services"
    text = show(browser, ui, "demo", "ingress", "registrar")
    assert "3 Instances" in text
    text = show(browser, f"{ui}/demo/instances", *(c.name for c in demo))
    assert text.count("All service checks passing") == 3
    first = consul.health("demo")[0]
    node, sid = first["Node"]["Node"], first["Service"]["ID"]
    show(browser, f"{ui}/demo/instances/{node}/{sid}", "HTTP GET /index.html every 10s")
    browser.find_element(By.XPATH, "//*[normalize-space(text())='Tags & Meta']").click()
    WebDriverWait(browser, 15).until(lambda b: "container_name" in body(b))
    time.sleep(0.3)
    browser.save_screenshot(str(ARTIFACTS / "consul-ui-demo-instance-meta.png"))
    assert first["Service"]["Meta"]["container_name"] in body(browser)
    text = show(browser, f"{ui}/ingress/instances", "All service checks passing")
    assert "ingress:" in text
