"""NGINX with backends that keep connections alive and close idle ones when they stop (issue 14)."""

from __future__ import annotations

import subprocess
import time

import pytest

from sidecar.demo_image import ensure_keepalive_image
from tests.support import ROOT, wait_until
from tests.traffic import Load, served_by, serving_web, web, web_keepalive

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def keepalive_image(docker_engine) -> str:
    base = subprocess.run([str(ROOT / "scripts" / "base-image.sh")], capture_output=True, text=True, timeout=900)
    if base.returncode != 0:
        pytest.fail(f"the Debian base image for the keep-alive backend could not be made:\n{base.stderr[-2000:]}")
    return ensure_keepalive_image(docker_engine, base.stdout.strip())


def rolling_replacement(port: int, containers, image: str | None) -> Load:
    """Replace 3 backends one by one (start, wait until it serves, docker stop) under load."""

    def serving(c) -> bool:  # NGINX's X-Served-By is the upstream address
        return served_by(port, f"127.0.0.1:{containers.host_port(c)}")

    old = serving_web(containers, 3, serving, timeout=30, image=image)
    with Load(port, "app.test") as load:
        time.sleep(1)
        for c in old:
            new = web(containers) if image is None else web_keepalive(containers, image)
            wait_until(lambda new=new: serving(new), timeout=15, what="replacement serving")
            c.stop(timeout=5)
        time.sleep(1)
    return load


@pytest.mark.parametrize("backend", ["keepalive", "busybox"])
def test_nginx_rolling_replacement_no_failed_request(consul, containers, proxy_stack, keepalive_image, backend):
    port, proc = proxy_stack("nginx", "--wait", "50ms:500ms")
    load = rolling_replacement(port, containers, keepalive_image if backend == "keepalive" else None)
    print(f"{backend}: ok={load.ok} failures={len(load.failures)}")
    assert load.ok > 100
    assert load.failures == [], (load.failures[:10], proc.output()[-3000:])
