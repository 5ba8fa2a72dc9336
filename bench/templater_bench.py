"""Templater figures: one template over 1,000 services x 3 instances on a real Consul agent.

Prints: full render time, change-to-file latency (p50, p90, max) for single instances added and
removed, open connections to Consul, CPU used while nothing changes, RSS.
Run: .venv/bin/python bench/templater_bench.py [--services 1000] [--instances 3] [--changes 100]
     [--bundled: the bundled HAProxy template with --proxy haproxy, services routed by http_host]
     [--nginx: the bundled NGINX template with --proxy nginx (reload time and workers' memory)]
     [--cached: the listing template with a {% cache %} block per service]
     [--checks: every instance with a TTL check, as the registrar registers SERVICE_CHECK_* containers]
     [--consul URL: an agent already holding the bench services]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.figures import percentile
from templater.errors import ProxyError
from templater.haproxy_runtime import AdminSocket
from tests.support import ConsulAgent, Process, free_port, scrape, tempdir

BUNDLED = Path(__file__).resolve().parents[1] / "templates" / "haproxy.cfg.j2"
BUNDLED_NGINX = BUNDLED.with_name("nginx.conf.j2")

TEMPLATE = """{% for s in services() if s.name != "consul" %}
backend {{ s.name }}
{% for i in service(s.name) %}
    server {{ i.id }} {{ i.address }}:{{ i.port }}
{% endfor %}
{% endfor %}
"""


CACHED = """{% for s in services() if s.name != "consul" %}{% cache s.name %}
backend {{ s.name }}
{% for i in service(s.name) %}
    server {{ i.id }} {{ i.address }}:{{ i.port }}
{% endfor %}
{% endcache %}{% endfor %}
"""


# the listing template in consul-template's syntax (--go: a .ctmpl, Go's text/template)
GO_TEMPLATE = """{{ range services }}{{ if ne .Name "consul" }}
backend {{ .Name }}
{{ range service .Name }}    server {{ .ID }} {{ .Address }}:{{ .Port }}
{{ end }}{{ end }}{{ end }}
"""
# the same with each instance's checks (consul-template's .Checks: every check is kept)
GO_CHECKS = GO_TEMPLATE.replace("{{ .Port }}", "{{ .Port }} #{{ range .Checks }} {{ .CheckID }}={{ .Status }}{{ end }}")


def put(url: str, path: str, body: object) -> None:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method="PUT")
    urllib.request.urlopen(request, timeout=30).read()


def wait_for(dest: Path, token: str, present: bool = True) -> None:
    """Poll the file's mtime every millisecond and read it only when it changed, so the poll
    does not take a core from Consul and the templater on a small machine."""
    seen = -1
    while True:
        mtime = dest.stat().st_mtime_ns
        if mtime != seen:
            seen = mtime
            if (token in dest.read_text()) == present:
                return
        time.sleep(0.001)


def runtime_ready(sock: Path, backend: str, port: int, present: bool = True) -> bool:
    """Whether HAProxy's running state has the server on `port` taking traffic (present) or
    not taking new traffic any more (drained, in maintenance or gone)."""
    try:
        state = AdminSocket(str(sock), timeout=2).send(f"show servers state {backend}")
    except ProxyError:
        return False
    lines = [line.split() for line in state.splitlines() if line.strip()]
    header = next((line[1:] for line in lines if line[0] == "#"), [])
    if not header:
        return not present
    port_at, admin_at = header.index("srv_port"), header.index("srv_admin_state")
    ready = any(len(f) > port_at and f[port_at] == str(port) and f[admin_at] == "0" for f in lines if f[0] != "#")
    return ready == present


class Listeners:
    """Accept-and-close TCP listeners on the instances' ports, so that HAProxy's checks pass (the
    idle figures are those of a proxy whose backends answer)."""

    def __init__(self, ports: list[int]) -> None:
        self._socks = []
        for port in ports:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(1024)
            self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    @staticmethod
    def _serve(sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        for sock in self._socks:
            sock.close()


def proxy_cpu(pid: int) -> float:
    """CPU seconds of the HAProxy master and its workers."""
    try:
        master = psutil.Process(pid)
        procs = [master, *master.children()]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def py_spy(pid: int, out: str) -> subprocess.Popen[bytes]:
    """py-spy recording every thread of pid (cProfile sees only the main one) into out."""
    argv = [str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw", "--rate", "200", "-o", out]
    return subprocess.Popen([*argv, "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def nginx_report(templater: psutil.Process, status_port: int) -> None:
    """NGINX's reloads as the templater timed them, and its processes' memory."""
    metrics = scrape(status_port)
    count = metrics.get("templater_reload_seconds_count", 0)
    total = metrics.get("templater_reload_seconds_sum", 0.0)
    if count:
        print(f"nginx reloads                  {count:.0f}, mean {total / count * 1000:.0f} ms (signal -> new worker)")
    master = next((c for c in templater.children() if "nginx" in c.name()), None)
    if master is not None:
        workers = master.children()
        rss = [w.memory_info().rss for w in workers]
        print(f"nginx master RSS / workers     {master.memory_info().rss / 2**20:.1f} MiB / "
              f"{len(workers)} x {max(rss, default=0) / 2**20:.1f} MiB")  # fmt: skip


def wait_runtime(sock: Path, backend: str, port: int, present: bool = True) -> None:
    while not runtime_ready(sock, backend, port, present):
        time.sleep(0.001)


CHECK = {"Check": {"TTL": "30m", "Status": "passing"}}  # --checks: as the registrar's SERVICE_CHECK_* instances


BULK_NODE = "bench-host"  # the catalog's instances live here; the changes go through the agent


def register_all(url: str, services: int, instances: int, checks: bool) -> None:
    """Every instance through `/v1/catalog/register` on a node of its own: the agent API costs
    the agent an anti-entropy pass over all its services per registration (an hour at 30,000)."""
    t0 = time.monotonic()
    regs = [
        {"Node": BULK_NODE, "Address": "127.0.0.1", "SkipNodeUpdate": True,
         "Service": {"ID": f"s{s}-{i}", "Service": f"s{s}", "Port": 20000 + i, "Address": "127.0.0.1",
                     "Meta": {"http_host": f"s{s}.example.com"}},
         **({"Check": {"CheckID": f"service:s{s}-{i}", "Name": "ttl", "Status": "passing", "ServiceID": f"s{s}-{i}"}}
            if checks else {})}
        for s in range(services)
        for i in range(instances)
    ]  # fmt: skip
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda r: put(url, "/v1/catalog/register", r), regs))
    print(f"registered {len(regs)} instances in {time.monotonic() - t0:.1f} s")


def measure(url: str, http_port: int, work: Path, args: argparse.Namespace) -> None:
    src = work / ("t.ctmpl" if args.go or args.go_checks else "t.j2")
    src.write_text(GO_CHECKS if args.go_checks else GO_TEMPLATE if args.go else CACHED if args.cached else TEMPLATE)
    out_dir = work / "out"  # apart from the template: writes there are no template events
    out_dir.mkdir()
    dest = out_dir / "out.cfg"
    started = time.monotonic()
    argv = ["--consul", url, "--template", f"{src}:{dest}"]
    end = " #" if args.go_checks else "\n"  # what follows an instance's address in the output
    status_port = free_port()
    if args.nginx:
        argv = ["--consul", url, "--template", f"{BUNDLED_NGINX}:{dest}", "--proxy", "nginx", "--stop-proxy",
                "--var", f"runtime_dir={out_dir}", "--var", f"http_port={free_port()}",
                "--var", "bind_address=127.0.0.1", "--status-addr", f"127.0.0.1:{status_port}"]  # fmt: skip
        end = " weight"
    elif args.bundled:
        argv = ["--consul", url, "--template", f"{BUNDLED}:{dest}", "--proxy", "haproxy", "--stop-proxy",
                "--var", f"runtime_dir={out_dir}", "--var", f"http_port={free_port()}",
                "--var", "bind_address=127.0.0.1"]  # fmt: skip
        end = " weight"
    if not args.nginx:
        argv += ["--status-addr", f"127.0.0.1:{status_port}"]
    listeners = Listeners([20000 + i for i in range(args.instances)]) if args.bundled else None
    proc = Process("templater", argv, work)
    haproxy_idle = None
    haproxy_window = 10.0
    try:
        while not dest.exists():
            time.sleep(0.005)
        first = time.monotonic() - started
        ps = psutil.Process(proc.proc.pid)
        time.sleep(1.0)
        spy = None
        if args.py_spy:  # samples every thread (cProfile sees only the main one)
            spy = py_spy(proc.proc.pid, args.py_spy)
            time.sleep(1.0)
        time.sleep(0.6)  # the templater's counters are refreshed twice a second
        counters0 = scrape(status_port)
        added, removed, runtime_added, runtime_removed = [], [], [], []
        sock = out_dir / "admin.sock"
        for n in range(args.changes):
            service = f"s{(n * 37) % args.services}"
            port = 40000 + n
            t = time.monotonic()
            put(
                url,
                "/v1/agent/service/register",
                {"ID": f"x{n}", "Name": service, "Port": port, "Address": "127.0.0.1",
                 "Meta": {"http_host": f"{service}.example.com"}, **(CHECK if args.checks else {})},
            )  # fmt: skip
            if args.bundled:
                wait_runtime(sock, f"be_{service}", port)
                runtime_added.append((time.monotonic() - t) * 1000)
            wait_for(dest, f"127.0.0.1:{port}{end}")
            added.append((time.monotonic() - t) * 1000)
            time.sleep(args.gap)
        for n in range(args.changes):
            t = time.monotonic()
            put(url, f"/v1/agent/service/deregister/x{n}", None)
            if args.bundled:
                wait_runtime(sock, f"be_s{(n * 37) % args.services}", 40000 + n, present=False)
                runtime_removed.append((time.monotonic() - t) * 1000)
            wait_for(dest, f"127.0.0.1:{40000 + n}{end}", present=False)
            removed.append((time.monotonic() - t) * 1000)
            time.sleep(args.gap)
        time.sleep(0.6)
        counters1 = scrape(status_port)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        conns = [c for c in ps.net_connections("tcp") if c.raddr and c.raddr.port == http_port]
        time.sleep(5.0)  # past the last change
        idle_spy = None
        if args.py_spy_idle:
            idle_spy = py_spy(proc.proc.pid, args.py_spy_idle)
        cpu0 = ps.cpu_times()
        haproxy_pid = next((c.pid for c in ps.children() if "haproxy" in c.name()), None)
        h0 = proxy_cpu(haproxy_pid) if haproxy_pid else 0.0
        time.sleep(10.0)
        cpu1 = ps.cpu_times()
        if haproxy_pid:
            # HAProxy spreads a backend's checks over its interval: with few servers a backend,
            # they come in bursts, and a window shorter than the interval can see none of them
            inter = re.search(r"default-server inter (\d+)ms", dest.read_text())
            haproxy_window = max(10.0, int(inter.group(1)) / 1000 + 1.0) if inter else 10.0
            time.sleep(haproxy_window - 10.0)
            haproxy_idle = proxy_cpu(haproxy_pid) - h0
        if idle_spy is not None:
            idle_spy.send_signal(signal.SIGINT)
            idle_spy.wait(30)
        idle_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        rss = ps.memory_info().rss
        if args.nginx:
            nginx_report(ps, status_port)
        output = proc.output()
        if args.keep_log:
            Path(args.keep_log).write_text(output)
    finally:
        proc.stop()
        if listeners is not None:
            listeners.close()
    render_ms = [float(m) for m in re.findall(r"render_ms=([0-9.]+)", output)]
    missed = len(re.findall(r"safety read found changes", output))
    checks = " (TTL check each)" if args.checks else ""
    print(f"services x instances           {args.services} x {args.instances}{checks}")
    print(f"templater start -> first file  {first * 1000:.0f} ms (fetch + render)")
    print(f"full render (jinja) median     {statistics.median(render_ms):.1f} ms over {len(render_ms)} renders")
    for what, values in (("add", added), ("remove", removed)):
        print(f"{what:6} -> file p50             {statistics.median(values):.1f} ms")
        print(f"{what:6} -> file p90 / max       {percentile(values, 90):.1f} / {max(values):.1f} ms (n={len(values)})")
    for what, values in (("add", runtime_added), ("remove", runtime_removed)):
        if values:
            print(f"{what:6} -> haproxy runtime p50 {statistics.median(values):.1f} ms, "
                  f"p90 / max {percentile(values, 90):.1f} / {max(values):.1f} ms (n={len(values)})")  # fmt: skip
    both = added + removed
    print(
        f"any change -> file p50 / p90   {statistics.median(both):.1f} / {percentile(both, 90):.1f} ms (n={len(both)})"
    )
    changes = 2 * args.changes
    requests = counters1["templater_consul_requests_total"] - counters0["templater_consul_requests_total"]
    received = counters1["templater_consul_response_bytes_total"] - counters0["templater_consul_response_bytes_total"]
    print(f"consul per change              {requests / changes:.1f} requests, {received / changes / 1024:.1f} KiB")
    print(f"changes only a safety read saw {missed}")
    print(f"open connections to consul     {len(conns)}")
    print(f"CPU while idle (10 s)          {idle_cpu * 1000:.0f} ms")
    print(f"templater RSS                  {rss / 2**20:.1f} MiB")
    if haproxy_idle is not None:
        share = haproxy_idle / haproxy_window * 100
        spent = f"{haproxy_idle * 1000:.0f} ms in {haproxy_window:.0f} s"
        print(f"HAProxy CPU while idle         {spent} ({share:.2f}% of a core;")
        print("                               master and workers, backends answering)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--bundled", action="store_true", help="templates/haproxy.cfg.j2 with --proxy haproxy")
    parser.add_argument("--py-spy-idle", metavar="FILE", help="py-spy's collapsed stacks over the idle window")
    parser.add_argument("--keep-log", metavar="FILE", help="the templater's log, kept")
    parser.add_argument("--gap", type=float, default=0.1, help="seconds between changes (NGINX: 0.6)")
    parser.add_argument("--nginx", action="store_true", help="templates/nginx.conf.j2 with --proxy nginx")
    parser.add_argument("--cached", action="store_true", help="the listing template with {%% cache s.name %%}")
    parser.add_argument("--go", action="store_true", help="the listing template as a .ctmpl (Go text/template)")
    parser.add_argument("--go-checks", action="store_true", help="--go, listing each instance's .Checks too")
    parser.add_argument("--checks", action="store_true", help="every instance with a TTL check (passing)")
    parser.add_argument("--py-spy", metavar="FILE", help="py-spy's collapsed stacks of the templater over the changes")
    parser.add_argument("--consul", help="an agent already holding the bench services (skips registering)")
    args = parser.parse_args()
    with tempdir() as work:
        if args.consul:
            measure(args.consul, int(args.consul.rsplit(":", 1)[1]), work, args)
            return 0
        agent = ConsulAgent(work)
        agent.start()
        try:
            register_all(agent.url, args.services, args.instances, args.checks)
            measure(agent.url, agent.http_port, work, args)
            return 0
        finally:
            agent.stop()


if __name__ == "__main__":
    raise SystemExit(main())
