"""Defects a line-by-line review found (issue 9), each shown with the real programs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from templater.proxy import KINDS, Proxy
from tests.support import ROOT, ConsulAgent, TcpForwarder, free_port, health, wait_until
from tests.traffic import get

pytestmark = pytest.mark.integration

TEMPLATES = ROOT / "templates"

# a minimal HAProxy template that trusts meta as it is: what a user's own template may do
RAW_WEIGHT = """global
    master-worker
    stats socket {{ vars.dir }}/admin.sock mode 600 level admin expose-fd listeners
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    default-server inter 1s fall 2 rise 1
frontend f
    bind 127.0.0.1:{{ vars.port }}
    default_backend be
{% if vars.extra_port is defined and key_or_default("hard/extra", "") %}
frontend extra
    bind 127.0.0.1:{{ vars.extra_port }}
    default_backend be
{% endif %}
backend be
    http-request return status 200 content-type text/plain string "ok\\n" if { nbsrv(be) eq 0 }
{% for i in service("raw", state="any") %}
    server {{ i.id | ident }} {{ i.address }}:{{ i.port }} weight {{ i.meta.weight | default(1) }} check
{% endfor %}
"""


def register(consul: ConsulAgent, sid: str, name: str, port: int, **meta: str) -> None:
    consul.put(
        "/v1/agent/service/register",
        {"ID": sid, "Name": name, "Port": port, "Address": "127.0.0.1", "Meta": meta},
    )


def kv_put(consul: ConsulAgent, key: str, value: bytes) -> None:
    request = urllib.request.Request(f"{consul.url}/v1/kv/{key}", data=value, method="PUT")
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


def kv_delete(consul: ConsulAgent, key: str) -> None:
    request = urllib.request.Request(f"{consul.url}/v1/kv/{key}", method="DELETE")
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


def admin(sock: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode()


def kill_master(pid_file: Path) -> None:
    """Stop the HAProxy a test left running on purpose (ours, by the pid in its pid file).

    HAProxy empties its pid file while it reloads, so an empty file is read again; a master
    that is a zombie (its templater has not reaped it yet) is gone."""
    deadline = time.monotonic() + 2
    words: list[str] = []
    while not words and time.monotonic() < deadline:
        try:
            words = pid_file.read_text().split()
        except FileNotFoundError:
            return
        if not words:
            time.sleep(0.05)
    try:
        proc = psutil.Process(int(words[0]))
        proc.terminate()
        wait_until(lambda: _gone(proc), timeout=10, what=f"haproxy master {proc.pid} stopped")
    except (IndexError, ValueError, psutil.NoSuchProcess):
        pass


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def raw_haproxy(consul, templater, tmp_path):
    """templater --proxy haproxy on RAW_WEIGHT; (frontend port, templater, config path)."""
    port = free_port()
    src = tmp_path / "raw.j2"
    src.write_text(RAW_WEIGHT)
    dest = tmp_path / "raw.cfg"
    started = []

    def start(*extra: str):
        proc = templater(
            "--template", f"{src}:{dest}", "--proxy", "haproxy", "--stop-proxy",
            "--var", f"dir={tmp_path}", "--var", f"port={port}", *extra,
        )  # fmt: skip
        started.append(proc)
        wait_until(lambda: get(port, "x", "/")[0] == 200, timeout=15, what="haproxy serving")
        return port, proc, dest

    yield start
    for proc in started:  # first the templaters, so that no reload of theirs races the kill below
        proc.stop()
    kill_master(dest.with_name(dest.name + ".pid"))  # a master a templater left behind


def test_runtime_refusal_falls_back_to_the_checked_write(consul, raw_haproxy, tmp_path):
    """Point 1: HAProxy refuses `set weight 1000`; the templater must not write a file that
    `haproxy -c` refuses (the next start would fail) and says why."""
    register(consul, "r1", "raw", 9101, weight="1")
    _, proc, dest = raw_haproxy()
    wait_until(lambda: "weight 1 check" in dest.read_text(), what="first render")
    register(consul, "r1", "raw", 9101, weight="1000")
    wait_until(lambda: "haproxy refused" in proc.output(), timeout=10, what="refusal seen")
    wait_until(lambda: "check refused template" in proc.output(), timeout=10, what="checked write refused")
    assert "weight 1000" not in dest.read_text()
    check = subprocess.run(["haproxy", "-c", "-f", str(dest)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Absolute weight can only be between 0 and 256" in proc.output()


def test_added_server_gets_default_server_settings(consul, raw_haproxy, tmp_path):
    """Point 8: a server added at runtime checks with the defaults' rise 1 / fall 2, as one
    from the file does (HAProxy itself would use rise 2 / fall 3)."""
    register(consul, "d1", "raw", 9201)
    _, proc, _ = raw_haproxy()
    reloads = proc.output().count("proxy reloaded")
    register(consul, "d2", "raw", 9202)
    wait_until(lambda: "haproxy runtime added be/d2" in proc.output(), timeout=10, what="runtime add")
    assert proc.output().count("proxy reloaded") == reloads
    rows = [line.split(",") for line in admin(tmp_path / "admin.sock", "show stat -1 4 -1").splitlines()]
    header = rows[0]
    by_name = {row[1]: dict(zip(header, row, strict=False)) for row in rows[1:] if len(row) > 1}
    for name in ("d1", "d2"):
        assert (by_name[name]["check_rise"], by_name[name]["check_fall"]) == ("1", "2"), by_name[name]


def test_failed_reload_is_reported_as_failed(consul, raw_haproxy, tmp_path):
    """Point 8: a configuration that passes `haproxy -c` but cannot be loaded (its port is
    taken) leaves the old worker serving; that is a failed reload in the log and /health. Once
    the port is free, the reload is tried again from the file with no change of data (it used
    to wait for the next change, serving the old configuration until then)."""
    status = free_port()
    extra = free_port()
    register(consul, "f1", "raw", 9301)
    port, proc, dest = raw_haproxy("--var", f"extra_port={extra}", "--status-addr", f"127.0.0.1:{status}")
    wait_until(lambda: health(status)[0] == 200, timeout=10, what="healthy")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", extra))
        taken.listen()
        kv_put(consul, "hard/extra", b"on")
        wait_until(lambda: "frontend extra" in dest.read_text(), timeout=10, what="new config written")
        wait_until(lambda: "not taken: no new worker" in proc.output(), timeout=20, what="reload failure reported")
        code, body = health(status)
        assert code == 503 and any(k.startswith("reload:") for k in body["problems"]), body
        assert get(port, "x", "/")[0] == 200  # the old worker still serves
    wait_until(lambda: get(extra, "x", "/")[0] == 200, timeout=60, what=f"the new frontend {proc.output()[-3000:]}")
    assert "again from its file after a failed reload" in proc.output()
    wait_until(lambda: health(status)[0] == 200, timeout=20, what="healthy after the reload tried again")
    kv_delete(consul, "hard/extra")
    wait_until(
        lambda: health(status)[0] == 200, timeout=20, what=f"healthy after a good reload {proc.output()[-3000:]}"
    )


def test_acl_token_never_in_logs_or_health(tmp_path):
    """Point 3: the token went as ?token= in the URL, and requests quotes the URL in errors."""
    token = "b6a1c2d3-secret-token-0042"
    dead = free_port()  # nothing listens here: every request fails with the URL in the error
    status = free_port()
    src = tmp_path / "t.j2"
    src.write_text("{{ services() | length }}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "templater", "--consul", f"http://127.0.0.1:{dead}", "--token", token,
         "--template", f"{src}:{tmp_path / 'out'}", "--status-addr", f"127.0.0.1:{status}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        wait_until(lambda: health(status)[0] == 503, timeout=15, what="health reports consul down")
        time.sleep(1.0)
        body = json.dumps(health(status)[1])
        assert "Connection refused" in body or "refused" in body.lower(), body
        assert token not in body
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "consul unavailable" in out
    assert token not in out


def test_registrar_token_never_in_logs(consul, registrar):
    token = "a9b8c7d6-registrar-secret"
    dead = free_port()
    proc = registrar("--consul", f"http://127.0.0.1:{dead}", "--token", token, ready=False)
    wait_until(lambda: "waiting for consul" in proc.output() or "unavailable" in proc.output(), timeout=15)
    time.sleep(0.5)
    assert token not in proc.output()


def test_proxy_outlives_the_templater_and_is_adopted(consul, templater, tmp_path):
    """Point 4: stopping the templater must not stop HAProxy; a new templater adopts it."""
    port = free_port()
    src = tmp_path / "raw.j2"
    src.write_text(RAW_WEIGHT)
    dest = tmp_path / "raw.cfg"
    pid_file = dest.with_name(dest.name + ".pid")
    register(consul, "o1", "raw", 9401)
    args = ["--template", f"{src}:{dest}", "--proxy", "haproxy", "--var", f"dir={tmp_path}", "--var", f"port={port}"]
    try:
        # --once with --proxy starts HAProxy and leaves it serving
        once = subprocess.run([sys.executable, "-m", "templater", "--consul", consul.url, "--once", *args],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
        assert once.returncode == 0, once.stderr
        master = int(pid_file.read_text().split()[0])
        assert get(port, "x", "/")[0] == 200
        first = templater(*args)
        wait_until(lambda: "watching catalog(local)" in first.output(), what="templater up")
        time.sleep(0.5)
        assert first.stop() == 0
        assert psutil.pid_exists(master) and get(port, "x", "/")[0] == 200  # still serving
        second = templater(*args)
        register(consul, "o2", "raw", 9402)
        wait_until(lambda: "server o2 " in dest.read_text(), timeout=10, what="new config")
        wait_until(lambda: admin(tmp_path / "admin.sock", "show servers state be").count(" o2 ") == 1,
                   timeout=10, what="o2 in the running proxy")  # fmt: skip
        assert "proxy started" not in second.output()
        assert int(pid_file.read_text().split()[0]) == master
        second.stop()
        assert psutil.pid_exists(master)
        # --stop-proxy: the templater takes the proxy down with it (gracefully)
        third = templater(*args, "--stop-proxy")
        wait_until(lambda: "watching catalog(local)" in third.output(), what="templater up")
        time.sleep(0.5)
        third.stop()
        wait_until(lambda: not psutil.pid_exists(master) or psutil.Process(master).status() == "zombie",
                   timeout=10, what="haproxy stopped")  # fmt: skip
    finally:
        kill_master(pid_file)


def test_failed_render_and_dead_watch_show_in_health(consul, templater, tmp_path):
    """Point 9: /health reported only Consul reachability; a failed render is a problem too."""
    register(consul, "h1", "hotel", 3001)
    src = tmp_path / "t.j2"
    src.write_text("{% for i in service('hotel') %}{{ i.port }}\n{% endfor %}")
    dest = tmp_path / "h.conf"
    status = free_port()
    proc = templater("--template", f"{src}:{dest}", "--status-addr", f"127.0.0.1:{status}")
    wait_until(lambda: dest.exists() and dest.read_text() == "3001\n", what="render")
    assert health(status)[0] == 200
    src.write_text("{% for i in service('hotel') %}{{ i.port + nope }}\n{% endfor %}")
    wait_until(lambda: health(status)[0] == 503, timeout=10, what="render failure in health")
    problems = health(status)[1]["problems"]
    assert any(k.startswith("render:") and "nope" in v for k, v in problems.items()), problems
    assert dest.read_text() == "3001\n" and proc.alive()
    src.write_text("{% for i in service('hotel') %}{{ i.port }}!\n{% endfor %}")
    wait_until(lambda: health(status)[0] == 200, timeout=10, what="healthy after the fix")
    assert dest.read_text() == "3001!\n"


def test_missing_key_holds_the_render_until_it_exists(consul, tmp_path):
    """Point 11: key() on a missing key rendered "", as if the empty value were wanted."""
    src = tmp_path / "k.j2"
    src.write_text("limit={{ key('app/limit') }} mode={{ key_or_default('app/mode', 'fast') }}\n")
    dest = tmp_path / "k.conf"
    proc = subprocess.Popen(
        [sys.executable, "-m", "templater", "--consul", consul.url, "--once", "--template", f"{src}:{dest}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        time.sleep(2.0)
        assert not dest.exists() and proc.poll() is None  # waiting, as consul-template does
        kv_put(consul, "app/limit", b"100")
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
        kv_delete(consul, "app/limit")
    assert dest.read_text() == "limit=100 mode=fast\n"
    assert "waiting for kv.key(app/limit)" in out


def test_deregistration_lost_while_consul_unreachable_is_retried(consul, containers, registrar, hostname):
    """Point 5: a container that dies while Consul cannot be reached used to stay registered
    for ever: it was dropped from tracking first and the tick never cleaned up."""
    forwarder = TcpForwarder(consul.http_port)
    forwarder.start()
    try:
        registrar("--consul", forwarder.url)
        c = containers.run(labels={"SERVICE_NAME": "lost"})
        sid = f"{hostname}:{c.name}:8080"
        wait_until(lambda: sid in consul.services(), what="registered")
        forwarder.stop()
        c.kill()
        time.sleep(2.0)  # the die event is handled while every Consul call fails
        assert sid in consul.services()
        forwarder.start()
        wait_until(lambda: sid not in consul.services(), timeout=10, what="deregistered after Consul came back")
    finally:
        forwarder.stop()


def test_a_proxy_that_cannot_start_is_retried_with_backoff_and_said_once_per_attempt(consul, templater, tmp_path):
    """Its port is taken: each start attempt (0.5 s, 1 s, 2 s, ... apart) fails with one log line;
    the waits between them are in /health, not in the log (it said an ERROR twice a second)."""
    port = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    status = free_port()
    try:
        proc = templater(
            "--template", f"{TEMPLATES / 'haproxy.cfg.j2'}:{tmp_path / 'h.cfg'}", "--proxy", "haproxy",
            "--stop-proxy", "--var", f"runtime_dir={tmp_path}", "--var", f"http_port={port}",
            "--var", "bind_address=127.0.0.1", "--status-addr", f"127.0.0.1:{status}",
        )  # fmt: skip
        time.sleep(6)
        errors = [line for line in proc.output().splitlines() if " ERROR " in line]
        # attempts at about 0, 0.5, 1.5, 3.5 s: a handful of lines, never one per watchdog tick
        assert 2 <= len(errors) <= 6, errors
        assert not any("next start attempt" in line for line in errors), errors
        code, body = health(status)
        assert code == 503 and any(k.startswith(("proxy:", "reload:")) for k in body["problems"]), body
    finally:
        holder.close()
    wait_until(lambda: get(port, "x")[0] == 404, timeout=40, what="haproxy started once the port is free")


def test_reload_or_stop_right_after_a_reload_is_not_lost(tmp_path):
    """HAProxy's master executes itself again on every reload and drops a signal that reaches
    it before it has unblocked its signals: the second of two quick reloads and a stop right
    after a reload were lost 15 times in 15 (the reload then fails after 10 s, the stop ends
    in SIGKILL). The proxy driver waits until the master takes signals again."""
    config = tmp_path / "quick.cfg"
    config.write_text(
        f"global\n    stats socket {tmp_path}/quick.sock mode 600 level admin\n"
        "defaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n    timeout server 5s\n"
        f"frontend f\n    bind 127.0.0.1:{free_port()}\n    default_backend be\n"
        "backend be\n    server s1 127.0.0.1:9\n"
    )
    proxy = Proxy(KINDS["haproxy"], config)
    pid = proxy.ensure_running()
    try:
        for _ in range(5):
            started = time.monotonic()
            assert proxy.reload(), "a reload forked no worker"
            assert time.monotonic() - started < 2, "a reload signal was lost and waited for"
        started = time.monotonic()
        proxy.stop(timeout=5)
        assert time.monotonic() - started < 3 and proxy.child is not None and proxy.child.returncode == 0
    finally:
        kill_master(config.with_name(config.name + ".pid"))
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
