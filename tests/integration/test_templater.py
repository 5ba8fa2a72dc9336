"""The templater against a real Consul agent: render, swap, check, exec, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.support import ROOT, ConsulAgent, free_port, scrape, wait_until

pytestmark = pytest.mark.integration

LIST = """{% for s in services() if s.name != "consul" %}
{{ s.name }}{% for i in service(s.name) %} {{ i.address }}:{{ i.port }}{% endfor %}

{% endfor %}
"""


def register(consul: ConsulAgent, sid: str, name: str, port: int, **extra) -> None:
    consul.put("/v1/agent/service/register", {"ID": sid, "Name": name, "Port": port, "Address": "127.0.0.1", **extra})


def deregister(consul: ConsulAgent, sid: str) -> None:
    consul.put(f"/v1/agent/service/deregister/{sid}")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_once(consul: ConsulAgent, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "templater", "--consul", consul.url, "--once", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_once_renders_and_exits_zero(consul, tmp_path):
    register(consul, "a1", "alpha", 8001)
    register(consul, "a2", "alpha", 8002)
    src = write(tmp_path / "list.j2", LIST + "{{ vars.greeting }} {{ env('HOME') }}\n")
    dest = tmp_path / "out" / "list.conf"
    proc = run_once(consul, "--template", f"{src}:{dest}", "--var", "greeting=hi", "--env-allow", "HOME,LANG")
    assert proc.returncode == 0, proc.stderr
    assert dest.read_text() == f"alpha 127.0.0.1:8001 127.0.0.1:8002\nhi {os.environ['HOME']}\n"


def test_env_reads_only_what_env_allow_names(consul, tmp_path):
    """A template cannot read the process's token (or anything else) through env() unless the
    operator named the variable: the render fails and says which name and which flag."""
    src = write(tmp_path / "leak.j2", "{{ env('CONSUL_HTTP_TOKEN') }}\n")
    dest = tmp_path / "leak.conf"
    proc = subprocess.run(
        [sys.executable, "-m", "templater", "--consul", consul.url, "--once", "--template", f"{src}:{dest}",
         "--env-allow", "APP_*"],
        capture_output=True, text=True, timeout=30, cwd=ROOT, env={**os.environ, "CONSUL_HTTP_TOKEN": "s3cret-token"},
    )  # fmt: skip
    assert proc.returncode == 1
    assert "env('CONSUL_HTTP_TOKEN'): not allowed" in proc.stderr and "leak.j2" in proc.stderr
    assert "s3cret-token" not in proc.stderr + proc.stdout
    assert not dest.exists()


def test_another_dc_that_cannot_be_read_does_not_hold_the_render(consul, tmp_path):
    """service(name, dc=X) for a datacenter Consul cannot reach: the template renders as if X had
    no services, with a warning naming it, instead of waiting for it forever."""
    register(consul, "a1", "alpha", 8001)
    src = write(tmp_path / "dc.j2", LIST + "remote={{ service('alpha', dc='nowhere') | length }}\n")
    dest = tmp_path / "dc.conf"
    proc = run_once(consul, "--template", f"{src}:{dest}")
    assert proc.returncode == 0, proc.stderr
    assert dest.read_text() == "alpha 127.0.0.1:8001\nremote=0\n"
    assert "catalog(nowhere): cannot be read" in proc.stderr and "datacenter nowhere" in proc.stderr


def test_once_gives_up_on_a_consul_that_does_not_answer(tmp_path):
    """--once with no Consul: after --retry-attempts failed attempts with capped backoff it exits
    1 and says why (it used to wait forever, hanging init containers and deploy scripts)."""
    src = write(tmp_path / "t.j2", LIST)
    port = free_port()  # nothing listens there
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "templater", "--consul", f"http://127.0.0.1:{port}", "--once", "--retry-attempts", "4",
         "--retry-backoff", "100ms", "--retry-max-backoff", "400ms", "--template", f"{src}:{tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert "giving up after 4 failed attempts" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert took < 15, took  # 0.1 + 0.2 + 0.4 s of backoff, plus start-up


def test_once_with_template_error_exits_nonzero_and_names_line(consul, tmp_path):
    dest = write(tmp_path / "keep.conf", "old good\n")
    src = write(tmp_path / "bad.j2", "line one\n{{ service('x') | nosuchfilter }}\n")
    proc = run_once(consul, "--template", f"{src}:{dest}")
    assert proc.returncode == 1
    assert f"{src}:2" in proc.stderr and "nosuchfilter" in proc.stderr
    assert dest.read_text() == "old good\n"
    src2 = write(tmp_path / "bad2.j2", "a\nb\n{{ missing.attr }}\n")
    proc = run_once(consul, "--template", f"{src2}:{dest}")
    assert proc.returncode == 1 and f"{src2}:3" in proc.stderr and "missing" in proc.stderr
    assert dest.read_text() == "old good\n"


def test_dry_prints_and_touches_nothing(consul, tmp_path):
    register(consul, "d1", "delta", 9001)
    src = write(tmp_path / "list.j2", LIST)
    dest = tmp_path / "never.conf"
    proc = run_once(consul, "--dry", "--template", f"{src}:{dest}:touch {tmp_path}/ran")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"> {dest}\ndelta 127.0.0.1:9001\n"
    assert not dest.exists() and not (tmp_path / "ran").exists()


def test_failed_check_keeps_old_file(consul, tmp_path):
    register(consul, "c1", "charlie", 7001)
    src = write(tmp_path / "list.j2", LIST)
    dest = write(tmp_path / "c.conf", "previous\n")
    proc = run_once(consul, "--template", f"{src}:{dest}", "--check", "grep -q never-there {}")
    assert proc.returncode == 1
    assert "check refused template" in proc.stderr and str(src) in proc.stderr
    assert dest.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # staged file removed
    ok = run_once(consul, "--template", f"{src}:{dest}", "--check", "grep -q charlie {}")
    assert ok.returncode == 0 and dest.read_text() == "charlie 127.0.0.1:7001\n"


def test_daemon_follows_changes_reloads_only_on_new_bytes_and_batches(consul, templater, tmp_path):
    register(consul, "e1", "echo", 6001)
    counter = tmp_path / "count"
    src = write(tmp_path / "list.j2", LIST)
    # two templates share one command: one run per batch, not one each
    cmd = f"echo x >> {counter}"
    proc = templater(
        "--template",
        f"{src}:{tmp_path}/one.conf:{cmd}",
        "--template",
        f"{src}:{tmp_path}/two.conf:{cmd}",
        "--empty-grace",
        "0s",
    )
    wait_until(lambda: (tmp_path / "two.conf").exists() and counter.exists(), what="first render")
    assert counter.read_text().count("x") == 1
    t0 = time.monotonic()
    register(consul, "e2", "echo", 6002)
    wait_until(lambda: "6002" in (tmp_path / "one.conf").read_text(), what="instance added")
    assert time.monotonic() - t0 < 1.0
    wait_until(lambda: counter.read_text().count("x") == 2, what="one command for the batch")
    # a change that does not alter the output (a KV write nobody reads, a tag) causes no command
    consul.put("/v1/kv/unrelated", "v")
    register(consul, "e2", "echo", 6002, Tags=["extra"])
    time.sleep(1.0)
    assert counter.read_text().count("x") == 2
    deregister(consul, "e1")
    deregister(consul, "e2")
    wait_until(lambda: "echo" not in (tmp_path / "one.conf").read_text(), what="service gone")
    assert proc.alive()


def test_template_edit_rerenders_and_broken_edit_keeps_output(consul, templater, tmp_path):
    register(consul, "f1", "foxtrot", 5001)
    src = write(tmp_path / "t.j2", "v1 {{ service('foxtrot')|length }}\n")
    dest = tmp_path / "t.conf"
    proc = templater("--template", f"{src}:{dest}")
    wait_until(lambda: dest.exists() and dest.read_text() == "v1 1\n", what="first render")
    t0 = time.monotonic()
    write(src, "v2 {{ service('foxtrot')|length }}\n")
    wait_until(lambda: dest.read_text() == "v2 1\n", timeout=2, what="re-render after edit")
    assert time.monotonic() - t0 < 1.0
    write(src, "v3 {% for %}\n")
    wait_until(lambda: "syntax error" in proc.output(), timeout=2, what="error logged")
    assert f"{src}:1" in proc.output()
    assert dest.read_text() == "v2 1\n"
    register(consul, "f2", "foxtrot", 5002)  # data changes while the template is broken
    time.sleep(0.5)
    assert dest.read_text() == "v2 1\n" and proc.alive()
    write(src, "v4 {{ service('foxtrot')|length }}\n")
    wait_until(lambda: dest.read_text() == "v4 2\n", timeout=2, what="fixed template renders")


def test_exec_mode_real_child_reload_and_stop(consul, templater, tmp_path):
    register(consul, "g1", "golf", 4001)
    src = write(tmp_path / "t.j2", LIST)
    dest = tmp_path / "g.conf"
    log = tmp_path / "child.log"
    script = write(
        tmp_path / "child.sh",
        f"trap 'echo hup >> {log}' HUP\ntrap 'echo term >> {log}; exit 0' TERM\n"
        f"echo start $(cat {dest}) >> {log}\nwhile true; do sleep 0.1; done\n",
    )
    proc = templater("--template", f"{src}:{dest}", "--exec", f"sh {script}", "--reload-signal", "SIGHUP")
    wait_until(lambda: log.exists() and "start golf" in log.read_text(), what="child started after render")
    register(consul, "g2", "golf", 4002)
    wait_until(lambda: "hup" in log.read_text(), what="reload signal")
    os.kill(proc.proc.pid, signal.SIGUSR1)  # forwarded; the child does not trap it and ends
    wait_until(lambda: not proc.alive(), timeout=10, what="templater exits with its child")


def test_exec_mode_sigterm_stops_child(consul, templater, tmp_path):
    src = write(tmp_path / "t.j2", "x\n")
    log = tmp_path / "child.log"
    script = write(tmp_path / "child.sh", f"trap 'echo term >> {log}; exit 0' TERM\nwhile true; do sleep 0.1; done\n")
    proc = templater("--template", f"{src}:{tmp_path}/x.conf", "--exec", f"sh {script}")
    wait_until(lambda: any("child.sh" in " ".join(c.cmdline()) for c in psutil.Process(proc.proc.pid).children()))
    assert proc.stop() == 0
    assert log.read_text() == "term\n"


def test_consul_down_keeps_output_health_reports_and_recovers(consul, templater, tmp_path):
    register(consul, "h1", "hotel", 3001)
    src = write(tmp_path / "t.j2", LIST)
    dest = tmp_path / "h.conf"
    port = free_port()
    proc = templater("--template", f"{src}:{dest}", "--status-addr", f"127.0.0.1:{port}", "--empty-grace", "3s")
    wait_until(lambda: dest.exists() and "hotel" in dest.read_text(), what="render")
    assert _health(port)[0] == 200
    consul.stop()
    wait_until(lambda: _health(port)[0] == 503, timeout=10, what="health reports consul down")
    assert _health(port)[1]["consul"] == "down"
    time.sleep(1)
    assert dest.read_text() == "hotel 127.0.0.1:3001\n" and proc.alive()
    consul.start()  # a dev agent: it comes back empty
    register(consul, "h1", "hotel", 3001)
    register(consul, "h2", "hotel", 3002)
    wait_until(lambda: "3002" in dest.read_text(), timeout=10, what="recovered")
    # every watch reports up again within its backoff cap (2 s)
    wait_until(lambda: _health(port)[0] == 200, timeout=5, what="health ok again")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "templater_renders_total" in metrics and "templater_consul_up 1" in metrics
    assert proc.output().count("consul unavailable") == 1


def test_consul_state_loss_never_empties_a_backend(consul, templater, tmp_path):
    for n in (1, 2):
        register(consul, f"i{n}", "india", 2000 + n)
    src = write(tmp_path / "t.j2", LIST)
    dest = tmp_path / "i.conf"
    proc = templater("--template", f"{src}:{dest}", "--empty-grace", "5s")
    wait_until(lambda: dest.exists() and dest.read_text() == "india 127.0.0.1:2001 127.0.0.1:2002\n", what="render")
    seen: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(dest.read_text())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        consul.restart()  # loses every registration
        time.sleep(1.5)
        register(consul, "i1", "india", 2001)  # the registrar restores them
        register(consul, "i2", "india", 2002)
        time.sleep(1.0)
    finally:
        stop.set()
        sampler.join()
    assert all("2001" in text and "2002" in text for text in seen), set(seen)
    # the templater did see the emptied catalog, and the grace is what kept the backends
    assert "holding catalog(local) service=india" in proc.output()
    # a real removal is believed after the grace period
    deregister(consul, "i1")
    deregister(consul, "i2")
    t0 = time.monotonic()
    wait_until(lambda: "india" not in dest.read_text(), timeout=10, what="emptied after grace")
    assert time.monotonic() - t0 > 4


def test_untrusted_consul_data_left_out_rest_renders(consul, tmp_path):
    register(
        consul,
        "ok1",
        "juliet",
        1001,
        Tags=["good", "bad tag\nserver evil 6.6.6.6:80"],
        Meta={"http_host": "a.example.com", "x": "}\n"},
    )
    register(consul, "evil1", "juliet", 1002, Address="1.2.3.4\n    server x 9.9.9.9:1")
    src = write(
        tmp_path / "t.j2",
        "{% for i in service('juliet') %}{{ i.address }}:{{ i.port }} {{ i.tags|join(',') }} "
        "{{ i.meta|dictsort }}\n{% endfor %}",
    )
    dest = tmp_path / "j.conf"
    proc = run_once(consul, "--template", f"{src}:{dest}")
    assert proc.returncode == 0, proc.stderr
    assert dest.read_text() == "127.0.0.1:1001 good [('http_host', 'a.example.com')]\n"
    assert "left out tag" in proc.stderr and "left out instance" in proc.stderr and "left out meta" in proc.stderr


def test_many_services_few_connections(consul, templater, tmp_path):
    for n in range(300):
        register(consul, f"m{n}", f"svc{n}", 10000 + n)
    src = write(tmp_path / "t.j2", LIST)
    dest = tmp_path / "m.conf"
    proc = templater("--template", f"{src}:{dest}")
    wait_until(lambda: dest.exists() and "svc299" in dest.read_text(), timeout=20, what="render")
    conns = [
        c for c in psutil.Process(proc.proc.pid).net_connections("tcp") if c.raddr and c.raddr.port == consul.http_port
    ]
    assert 0 < len(conns) <= 20, conns
    t0 = time.monotonic()
    register(consul, "m300", "svc150", 20000)
    wait_until(lambda: "20000" in dest.read_text(), what="single change")
    assert time.monotonic() - t0 < 1.0
    for n in range(301):
        deregister(consul, f"m{n}")


def test_a_change_costs_its_node_and_its_service(consul, templater, tmp_path):
    """Each kind of change (a new instance with a check, one re-registered in place on a new
    port, one without checks, a removal) is seen by its node's watch and costs a handful of
    requests, however many other services the catalog holds; no safety read is needed."""
    ttl = {"Check": {"TTL": "10m", "Status": "passing"}}
    for n in range(150):  # the rest of the catalog, on other hosts: a change here must not cost it
        consul.put("/v1/catalog/register", {
            "Node": f"host{n % 3}", "Address": "127.0.0.1",
            "Service": {"ID": f"bulk{n}", "Service": f"bulk{n}", "Port": 9000 + n},
            "Check": {"CheckID": f"c{n}", "Name": "c", "Status": "passing", "ServiceID": f"bulk{n}"},
        })  # fmt: skip
    register(consul, "k1", "kilo", 7101, **ttl)
    register(consul, "k2", "kilo", 7102, **ttl)
    src = write(tmp_path / "t.j2", LIST)
    dest = tmp_path / "k.conf"
    status = free_port()
    proc = templater("--template", f"{src}:{dest}", "--status-addr", f"127.0.0.1:{status}")
    wait_until(lambda: dest.exists() and "7102" in dest.read_text() and "bulk149" in dest.read_text(), what="render")
    steps = [
        ("new instance with a check", lambda: register(consul, "k3", "kilo", 7103, **ttl), "7103", True),
        ("same id, new port", lambda: register(consul, "k2", "kilo", 7202, **ttl), "7202", True),
        ("no checks", lambda: register(consul, "k4", "kilo", 7104), "7104", True),
        ("removed", lambda: deregister(consul, "k1"), "7101", False),
    ]
    for what, act, token, present in steps:
        time.sleep(0.7)  # the counter is refreshed twice a second
        before = scrape(status)
        t0 = time.monotonic()
        act()
        wait_until(lambda token=token, present=present: (token in dest.read_text()) == present, timeout=5, what=what)
        elapsed = time.monotonic() - t0
        time.sleep(0.7)
        after = scrape(status)
        requests = after["templater_consul_requests_total"] - before["templater_consul_requests_total"]
        received = after["templater_consul_response_bytes_total"] - before["templater_consul_response_bytes_total"]
        assert elapsed < 1.0, (what, elapsed)
        # the node's answer, the checks' answer, the service read, and the queries sent again;
        # a read of the catalog would be 150 services and far more bytes
        assert requests <= 6, (what, requests)
        assert received < 20_000, (what, received)
    assert dest.read_text().splitlines()[-1] == "kilo 127.0.0.1:7202 127.0.0.1:7103 127.0.0.1:7104"  # by node, id
    assert "safety read found changes" not in proc.output()
    for sid in ("k2", "k3", "k4"):
        deregister(consul, sid)
    for n in range(3):
        consul.put("/v1/catalog/deregister", {"Node": f"host{n}"})


def _health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_kv_values_marked_secret_never_reach_logs_or_health(consul, templater, tmp_path):
    """key(path, secret=True) and `| secret`: a render error that quotes the value (here a
    password with a line break that haproxy_quote refuses) says where, never what."""
    password = "hunter2-secret\nmaxconn 1"
    request = urllib.request.Request(f"{consul.url}/v1/kv/app/db_password", data=password.encode(), method="PUT")
    urllib.request.urlopen(request, timeout=5).close()
    line = "    server db 10.0.0.1:5432 password {{ key('app/db_password', secret=True) | haproxy_quote }}\n"
    src = write(tmp_path / "s.j2", line)
    status = free_port()
    proc = templater("--template", f"{src}:{tmp_path / 'out.cfg'}", "--status-addr", f"127.0.0.1:{status}")
    wait_until(lambda: "haproxy_quote" in proc.output(), timeout=15, what="the render error in the log")
    with urllib.request.urlopen(f"http://127.0.0.1:{status}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{status}/health", timeout=5)
        health = ""
    except urllib.error.HTTPError as err:
        health = err.read().decode()
    assert "haproxy_quote" in health and "s.j2" in health
    for text in (proc.output(), health, metrics):
        assert "hunter2-secret" not in text, text[-2000:]
    assert not (tmp_path / "out.cfg").exists()


def test_reload_interval_writes_a_lone_change_at_once_and_spaces_a_burst(consul, templater, tmp_path):
    """--reload-interval 1s: the first change after a quiet spell is written at once; the changes
    right after it wait for the interval and go together in one write."""

    def put(value: str) -> None:
        request = urllib.request.Request(f"{consul.url}/v1/kv/ri/v", data=value.encode(), method="PUT")
        urllib.request.urlopen(request, timeout=5).close()

    put("0")
    src = write(tmp_path / "ri.j2", "{{ key('ri/v') }}\n")
    dest = tmp_path / "ri.txt"
    proc = templater("--template", f"{src}:{dest}", "--reload-interval", "1s")
    wait_until(lambda: dest.exists() and dest.read_text() == "0\n", timeout=15, what="first render")
    time.sleep(1.5)  # quiet spell
    started = time.monotonic()
    put("1")
    wait_until(lambda: dest.read_text() == "1\n", timeout=5, interval=0.01, what="the lone change")
    lone = time.monotonic() - started
    for value in ("2", "3", "4"):
        put(value)
        time.sleep(0.05)
    wait_until(lambda: dest.read_text() == "4\n", timeout=5, interval=0.01, what="the burst")
    burst = time.monotonic() - started
    assert lone < 0.5, lone
    assert burst >= 0.95, burst  # not before the interval since the lone change's write
    # the line of a write is logged just after the file is swapped in: wait for the burst's,
    # then count (a burst written in parts would have logged its earlier writes before it)
    wait_until(lambda: proc.output().count("rendered") >= 3, timeout=5, what="the burst's log line")
    assert proc.output().count("rendered") == 3, proc.output()[-2000:]  # first, lone change, burst
