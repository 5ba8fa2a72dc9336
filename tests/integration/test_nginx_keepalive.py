"""NGINX with backends that keep connections alive and close idle ones when they stop (issue 14)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support import ROOT, wait_until
from tests.traffic import Load, served_by, serving_web, web, web_keepalive

pytestmark = pytest.mark.integration


def upstream_address(c, internal: bool, containers) -> str:
    """What NGINX's X-Served-By shows for a backend: its published port, or with --internal its
    container address."""
    if internal:
        c.reload()
        return f"{c.attrs['NetworkSettings']['IPAddress']}:8080"
    return f"127.0.0.1:{containers.host_port(c)}"


def rolling_replacement(port: int, containers, image: str | None, internal: bool = False, stop=None,
                        serving=None) -> Load:  # fmt: skip
    """Replace 3 backends one by one (start, wait until it serves, docker stop, or `stop`) under load."""

    def served(c) -> bool:
        return served_by(port, upstream_address(c, internal, containers))

    serving = serving or served

    old = serving_web(containers, 3, serving, timeout=30, image=image)
    with Load(port, "app.test") as load:
        time.sleep(1)
        for c in old:
            new = web(containers) if image is None else web_keepalive(containers, image)
            wait_until(lambda new=new: serving(new), timeout=15, what="replacement serving")
            if stop is None:
                c.stop(timeout=5)
            else:
                stop(c)
        time.sleep(1)
    return load


def test_nginx_rolling_replacement_no_failed_request(consul, containers, proxy_stack, tmp_path):
    """The default (no upstream keep-alive), backends that keep serving a moment after SIGTERM:
    zero failures, GET or POST."""
    port, proc = proxy_stack("nginx", "--wait", "50ms:500ms")
    load = rolling_replacement(port, containers, None)
    assert "keepalive " not in (tmp_path / "nginx.cfg").read_text()
    assert load.ok > 100
    assert load.failures == [], (load.failures[:10], proc.output()[-3000:])


def test_nginx_keepalive_backends_that_stop_at_once(consul, containers, proxy_stack, keepalive_image, tmp_path):
    """Keep-alive backends that stop accepting and close idle connections the moment they get
    SIGTERM, registered by container address (--internal): no pooled connection is ever
    reused (the cause of the POSTs that failed before), and a refused connection is resent,
    so no GET fails. A connection still in the backend's accept queue when it closes its
    listener is reset with the request on it, which no proxy may resend for a POST: those are
    counted and printed (bench/README.md has the figures), not hidden."""
    port, proc = proxy_stack("nginx", "--wait", "50ms:500ms", registrar_args=("--internal",))
    load = rolling_replacement(port, containers, keepalive_image, internal=True)
    assert "keepalive " not in (tmp_path / "nginx.cfg").read_text()
    assert load.ok > 100
    assert load.get_failures == 0, (load.failures[:10], proc.output()[-3000:])
    print(f"nginx, keep-alive backends: {len(load.failures)} POST(s) failed of about {load.ok // 4}")


def test_haproxy_rolling_replacement_keepalive_backends_no_failed_request(consul, containers, proxy_stack,
                                                                          keepalive_image):  # fmt: skip
    port, _ = proxy_stack("haproxy", "--drain-timeout", "10s", registrar_args=("--internal",))
    old = serving_web(containers, 3, lambda c: served_by(port, c.name), timeout=30, image=keepalive_image)
    with Load(port, "app.test") as load:
        time.sleep(1)
        for c in old:
            new = web_keepalive(containers, keepalive_image)
            wait_until(lambda new=new: served_by(port, new.name), timeout=15, what="replacement serving")
            c.stop(timeout=5)
        time.sleep(1)
    assert load.ok > 100
    assert load.get_failures == 0, load.failures[:10]
    print(f"haproxy, keep-alive backends: {len(load.failures)} POST(s) failed of about {load.ok // 4}")


def test_nginx_kills_drop_no_get_with_keepalive_backends(consul, containers, proxy_stack, keepalive_image):
    port, _ = proxy_stack("nginx", "--wait", "50ms:500ms", registrar_args=("--internal",))
    backends = serving_web(containers, 3, lambda c: served_by(port, upstream_address(c, True, containers)),
                           timeout=30, image=keepalive_image)  # fmt: skip
    with Load(port, "app.test") as load:
        time.sleep(1)
        for c in backends[:2]:
            c.kill()
            time.sleep(1.5)
    assert load.ok > 100
    assert load.get_failures == 0, load.failures[:10]


def test_nginx_upstream_keepalive_when_asked_retries_every_get(
    consul, containers, proxy_stack, keepalive_image, tmp_path
):
    """upstream_keepalive=16: pooled connections, as documented: a GET that meets a connection the
    stopping backend just closed is resent to another instance, so no GET fails."""
    port, _ = proxy_stack("nginx", "--wait", "50ms:500ms", "--var", "upstream_keepalive=16")
    load = rolling_replacement(port, containers, keepalive_image)
    assert "keepalive 16;" in (tmp_path / "nginx.cfg").read_text()
    assert load.ok > 100
    assert load.get_failures == 0, load.failures[:10]
    posts = len(load.failures) - load.get_failures
    print(f"upstream keep-alive on: {posts} POST(s) failed of about {load.ok // 4}")


def sidecar_stop(consul, c) -> None:
    """The rolling step with the drain first: sidecar-stop, as an operator runs it."""
    done = subprocess.run([sys.executable, "-m", "registrar.drain", "--consul", consul.url, "--drain", "1s",
                           "-t", "5", c.name], capture_output=True, text=True, timeout=30, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0 and "1 service(s) drained for 1 s" in done.stdout, (done.stdout, done.stderr)


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_sidecar_stop_drains_first_so_backends_that_stop_at_once_fail_nothing(
    consul, containers, proxy_stack, keepalive_image, kind
):
    """Backends that close their listener the moment they get SIGTERM, registered by published
    port (behind Docker's userland proxy, the worst case): with plain docker stop a POST sent in
    the moment before the proxy drops the backend fails (bench/README.md: a failed POST in 3 of 5
    NGINX runs and 2 of 5 HAProxy runs). sidecar-stop drains first: zero failures, GET or POST."""
    extra = ("--drain-timeout", "10s") if kind == "haproxy" else ()
    port, proc = proxy_stack(kind, *extra)
    if kind == "haproxy":  # X-Served-By is the server name, which holds the container name
        load = rolling_replacement(port, containers, keepalive_image, stop=lambda c: sidecar_stop(consul, c),
                                   serving=lambda c: served_by(port, c.name))  # fmt: skip
    else:
        load = rolling_replacement(port, containers, keepalive_image, stop=lambda c: sidecar_stop(consul, c))
    assert load.ok > 100
    assert load.failures == [], (load.failures[:10], proc.output()[-3000:])
