"""A fleet on one machine, every part on its own loopback address (issue 11).

- a Consul cluster of 3 servers (NET.11-13), real data dirs, `retry_join`, raft_multiplier 1;
- one server of a second datacenter `dc2` (NET.31), WAN-joined to the first;
- hosts A and B (NET.21, NET.22), each with a Consul client agent, its own Docker engine (own
  socket, data root, exec root, pid file and bridge, `--ip` so published ports bind to the
  host's address), a registrar with `--ip`, and a templater with its proxy (A: HAProxy,
  B: NGINX by default) listening on the host's address.

`scripts/fleet.sh up|down|status|kill-host|start-host` and the tests use this module. Every
process started is recorded in STATE/pids.json with its start time and is signalled only while
that very process still runs; containers carry the fleet's label and only those are removed.
Nothing listens beyond 127.0.0.0/8 and the engines' own bridges.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import psutil

from devtools.demo_image import ensure_image
from templater.proxy import KINDS, find_master

ROOT = Path(__file__).resolve().parents[1]
FLEET_LABEL = "consul-devtools.fleet"
HTTP_PORT = 8080
# a busybox backend that finishes in-flight requests on SIGTERM (docker stop)
SERVE = "trap 'sleep 1; kill $pid; exit 0' TERM; httpd -f -p 8080 -h /www & pid=$!; wait"
TEMPLATES = {"haproxy": "haproxy.cfg.j2", "nginx": "nginx.conf.j2"}


class FleetError(Exception):
    """A part of the fleet did not come up; the message names it and its log."""


@dataclass(frozen=True)
class Host:
    name: str  # "a"
    ip: str
    proxy: str  # "haproxy" | "nginx"
    index: int
    secure: bool = False

    @property
    def node(self) -> str:
        return f"host-{self.name}"

    @property
    def consul_url(self) -> str:
        """What the host's registrar and templater use: HTTPS with client certificates when the
        fleet is secure."""
        return f"https://{self.ip}:8501" if self.secure else f"http://{self.ip}:8500"

    @property
    def http_url(self) -> str:
        """The agent's plain HTTP port on loopback, for this harness (status, with a token)."""
        return f"http://{self.ip}:8500"

    @property
    def proxy_port(self) -> int:
        return HTTP_PORT


@dataclass(frozen=True)
class Layout:
    """Addresses and paths; pure. `net` is the first three octets of the loopback range used."""

    state: Path
    net: str = "127.0.0"
    proxies: tuple[str, str] = ("haproxy", "nginx")
    # ACLs in default-deny mode and TLS (verify incoming and outgoing, server host names) on
    # every agent; the registrars and templaters use HTTPS with client certificates and
    # least-privilege tokens from files. No dc2 then (WAN federation with ACLs needs replication).
    secure: bool = False

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def octet(self) -> int:
        return int(self.net.split(".")[2])

    @property
    def servers(self) -> list[tuple[str, str]]:
        return [(f"server-{i}", f"{self.net}.{10 + i}") for i in (1, 2, 3)]

    @property
    def dc2_server(self) -> tuple[str, str]:
        return ("dc2-server-1", f"{self.net}.31")

    @property
    def hosts(self) -> list[Host]:
        return [Host(n, f"{self.net}.{21 + i}", self.proxies[i], i, self.secure) for i, n in enumerate(("a", "b"))]

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise FleetError(f"no host {name!r} in the fleet (hosts: a, b)")

    def host_dir(self, host: Host) -> Path:
        return self.state / f"host-{host.name}"

    def engine_socket(self, host: Host) -> Path:
        return self.host_dir(host) / "docker.sock"

    def engine_url(self, host: Host) -> str:
        return f"unix://{self.engine_socket(host)}"

    def exec_root(self, host: Host) -> Path:
        # short: containerd's socket path must stay under 108 bytes
        return Path(f"/run/csf-{self.octet}-{host.name}")

    def bridge(self, host: Host) -> tuple[str, str]:
        """Name and gateway/prefix of the host's container bridge (its engine's own network)."""
        return f"csf{self.octet}{host.name}", f"172.30.{(self.octet * 4 + host.index) % 256}.1/24"

    @property
    def label(self) -> str:
        return f"{FLEET_LABEL}={self.net}"


def consul_config(
    layout: Layout, role: str, name: str, ip: str, data_dir: Path, management: str = ""
) -> dict[str, Any]:
    """A Consul agent's configuration: role "server", "dc2" or "client"; management: the ACL
    management token of a secure fleet (also each agent's own token). Pure."""
    servers = [s_ip for _, s_ip in layout.servers]
    config: dict[str, Any] = {
        "datacenter": "dc2" if role == "dc2" else "dc1",
        "node_name": name,
        "bind_addr": ip,
        "client_addr": ip,
        "data_dir": str(data_dir),
        "disable_update_check": True,  # no traffic off this machine
        "ports": {"grpc": -1},
        "log_level": "INFO",
        # the production recommendation (Consul's default of 5 is for small dev machines)
        "performance": {"raft_multiplier": 1},
        "retry_interval": "1s",
        # cumulative counters at /v1/agent/metrics?format=prometheus (bench/fleet_bench.py)
        "telemetry": {"prometheus_retention_time": "10m", "disable_hostname": True},
    }
    if role == "server":
        config.update(
            server=True,
            bootstrap_expect=3,
            ui=True,
            retry_join=[s for s in servers if s != ip],
        )
    elif role == "dc2":
        config.update(server=True, bootstrap_expect=1, ui=True, retry_join_wan=servers, retry_interval_wan="1s")
    else:
        config.update(server=False, retry_join=servers)
    if layout.secure:
        pki = layout.pki
        config.update(
            primary_datacenter="dc1",
            ca_file=str(pki / "consul-agent-ca.pem"),
            cert_file=str(pki / f"{name}.pem"),
            key_file=str(pki / f"{name}-key.pem"),
            verify_incoming_rpc=True,
            verify_incoming_https=True,
            verify_outgoing=True,
            verify_server_hostname=True,
            acl={
                "enabled": True,
                "default_policy": "deny",
                "enable_token_persistence": True,
                "tokens": {"master": management, "agent": management},
            },
        )
        config["ports"] = {**config["ports"], "https": 8501}
    return config


class Processes:
    """The fleet's processes by name, recorded with their start times in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # the children this process started, reaped when they end (another `fleet.sh` run
        # finds the others by PID; init reaps those)
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def _load(self) -> dict[str, dict[str, float]]:
        try:
            return dict(json.loads(self.path.read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    def _save(self, table: dict[str, dict[str, float]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def record(self, name: str, pid: int) -> None:
        table = self._load()
        table[name] = {"pid": pid, "created": psutil.Process(pid).create_time()}
        self._save(table)

    def names(self) -> list[str]:
        return sorted(self._load())

    def process(self, name: str) -> psutil.Process | None:
        """The recorded process while it is that very process (not a recycled PID)."""
        entry = self._load().get(name)
        if not entry:
            return None
        try:
            proc = psutil.Process(int(entry["pid"]))
            if abs(proc.create_time() - entry["created"]) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def spawn(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # outlives `fleet.sh up`; stopped by `down`
                cwd=ROOT,
            )
        self.record(name, proc.pid)
        self._children[name] = proc
        return proc.pid

    def signal(self, name: str, sig: int) -> bool:
        proc = self.process(name)
        if proc is None:
            return False
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
        return True

    def stop(self, *names: str, timeout: float = 30.0) -> None:
        """SIGTERM to all of them at once, SIGKILL to what still runs after timeout."""
        procs = [p for p in (self.process(n) for n in names) if p is not None]
        terminate(procs, timeout)
        for name in names:
            self.forget(name)

    def forget(self, name: str) -> None:
        child = self._children.pop(name, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)
        table = self._load()
        table.pop(name, None)
        self._save(table)


def _gone(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)  # ended; its parent reaps it
    except psutil.NoSuchProcess:
        return True


def terminate(procs: list[psutil.Process], timeout: float = 30.0, sig: int = signal.SIGTERM) -> None:
    """Signal every process, wait until all have ended, SIGKILL the rest after timeout."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(p) for p in procs):
        time.sleep(0.05)
    for proc in procs:
        if not _gone(proc):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _get(url: str, timeout: float = 2.0, token: str = "") -> Any:
    request = urllib.request.Request(url, headers={"X-Consul-Token": token} if token else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def _put(url: str, body: Any, token: str) -> Any:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="PUT", headers={"X-Consul-Token": token})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read() or b"null")


def _wait(what: str, check: Callable[[], Any], timeout: float, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception as err:  # not up yet
            last = err
        else:
            if value:
                return value
            last = value
        time.sleep(0.1)
    where = f"; its log: {log}" if log else ""
    raise FleetError(f"{what} not ready after {timeout:.0f} s (last: {last!r}){where}")


class Fleet:
    def __init__(self, layout: Layout, python: str = sys.executable) -> None:
        self.layout = layout
        self.python = python
        layout.state.mkdir(parents=True, exist_ok=True)
        self.procs = Processes(layout.state / "pids.json")
        self.logs = layout.state / "logs"

    # ---- Consul ----

    @property
    def management_token(self) -> str:
        """A secure fleet's management token (made once, kept 0600 in its PKI directory)."""
        if not self.layout.secure:
            return ""
        path = self.layout.pki / "management.token"
        if not path.exists():
            self.layout.pki.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(str(uuid.uuid4()))
        return path.read_text().strip()

    def _make_pki(self) -> None:
        """A CA, and a certificate for every agent (servers: server.dc1.consul) holding its own
        loopback address, made with `consul tls` once."""
        pki = self.layout.pki
        pki.mkdir(parents=True, exist_ok=True)
        if not (pki / "consul-agent-ca.pem").exists():
            subprocess.run(["consul", "tls", "ca", "create"], cwd=pki, check=True, capture_output=True)
        wanted = [(n, ip, "-server") for n, ip in self.layout.servers]
        wanted += [(h.node, h.ip, "-client") for h in self.layout.hosts]
        for name, ip, kind in wanted:
            if (pki / f"{name}.pem").exists():
                continue
            subprocess.run(["consul", "tls", "cert", "create", kind, "-dc", "dc1", "-additional-ipaddress", ip],
                           cwd=pki, check=True, capture_output=True)  # fmt: skip
            made = next(p for p in pki.glob("dc1-*-consul-*.pem") if not p.name.endswith("-key.pem"))
            made.rename(pki / f"{name}.pem")
            made.with_name(made.name[: -len(".pem")] + "-key.pem").rename(pki / f"{name}-key.pem")

    def _make_tokens(self) -> None:
        """Least-privilege tokens from deploy/consul-policies for each host's registrar and
        templater, in files (0600) beside them."""
        server = f"http://{self.layout.servers[0][1]}:8500"
        token = self.management_token
        policies = ROOT / "deploy" / "consul-policies"

        existing = {p["Name"] for p in _get(f"{server}/v1/acl/policies", token=token)}

        def policy(name: str, file: str, **subst: str) -> str:
            rules = (policies / file).read_text()
            for key, value in subst.items():
                rules = rules.replace(key, value)
            if name not in existing:
                _put(f"{server}/v1/acl/policy", {"Name": name, "Rules": rules}, token)
                existing.add(name)
            return name

        templater = policy("templater", "templater.hcl", PREFIX="sidecar/")
        for host in self.layout.hosts:
            d = self.layout.host_dir(host)
            d.mkdir(parents=True, exist_ok=True)
            registrar = policy(f"registrar-{host.node}", "registrar.hcl", NODE=host.node)
            ingress = policy(f"ingress-{host.node}", "ingress.hcl", INGRESS="ingress", NODE=host.node)
            for part, names in (("registrar", [registrar]), ("templater", [templater, ingress])):
                path = d / f"{part}.token"
                if path.exists():
                    continue
                made = _put(f"{server}/v1/acl/token", {"Policies": [{"Name": n} for n in names]}, token)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(made["SecretID"] + "\n")

    def _client_args(self, host: Host, part: str) -> list[str]:
        """A secure fleet's TLS files and token file for the host's registrar or templater."""
        if not self.layout.secure:
            return []
        pki = self.layout.pki
        return [
            "--ca-file", str(pki / "consul-agent-ca.pem"), "--cert-file", str(pki / f"{host.node}.pem"),
            "--key-file", str(pki / f"{host.node}-key.pem"),
            "--token-file", str(self.layout.host_dir(host) / f"{part}.token"),
        ]  # fmt: skip

    def _start_consul(self, role: str, name: str, ip: str) -> None:
        data = self.layout.state / "consul" / name
        data.mkdir(parents=True, exist_ok=True)
        cfg = data.with_suffix(".json")
        config = consul_config(self.layout, role, name, ip, data, self.management_token)
        cfg.write_text(json.dumps(config, indent=1))
        cfg.chmod(0o600)  # a secure fleet's management token is in it
        self.procs.spawn(name, ["consul", "agent", "-config-file", str(cfg)], self.logs / f"{name}.log")

    def start_server(self, name: str) -> None:
        ip = dict(self.layout.servers)[name]
        self._start_consul("server", name, ip)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> bool:
        """Stop one recorded process (a server, an agent, a registrar ...) with this signal and
        wait until it has ended (SIGKILL after 30 s). False when it was not running."""
        proc = self.procs.process(name)
        if proc is None:
            return False
        terminate([proc], timeout=30, sig=sig)
        self.procs.forget(name)
        return True

    def leader(self, via: str | None = None) -> str:
        """The leader's server name ("" when there is none), asked of a live server."""
        ips = {ip: name for name, ip in self.layout.servers}
        for name, ip in self.layout.servers:
            if via and name != via:
                continue
            if self.procs.process(name) is None:
                continue
            try:
                addr = str(_get(f"http://{ip}:8500/v1/status/leader", timeout=1))
            except (OSError, ValueError):
                continue
            return ips.get(addr.rsplit(":", 1)[0], "")
        return ""

    def wait_leader(self, timeout: float = 60.0) -> str:
        return str(_wait("a Consul leader in dc1", self.leader, timeout, self.logs / "server-1.log"))

    def _all_members(self) -> bool:
        members = _get(f"http://{self.layout.servers[0][1]}:8500/v1/agent/members", token=self.management_token)
        alive = {m["Name"] for m in members if m["Status"] == 1}
        return {h.node for h in self.layout.hosts} <= alive

    # ---- hosts ----

    def _bridge_up(self, host: Host) -> None:
        name, cidr = self.layout.bridge(host)
        if subprocess.run(["ip", "link", "show", name], capture_output=True).returncode != 0:
            subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
            subprocess.run(["ip", "addr", "add", cidr, "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)

    def _bridge_down(self, host: Host) -> None:
        name, _ = self.layout.bridge(host)
        subprocess.run(["ip", "link", "del", name], capture_output=True)

    def start_engine(self, host: Host) -> None:
        d = self.layout.host_dir(host)
        d.mkdir(parents=True, exist_ok=True)
        self._bridge_up(host)
        # its settings file, where the host's drain plugin adds itself while it runs (empty at
        # each start: a plugin killed with the host may have left itself in)
        self.engine_config(host).write_text("{}\n")
        argv = [
            "dockerd",
            "--config-file",
            str(self.engine_config(host)),
            "--host",
            self.layout.engine_url(host),
            "--data-root",
            str(d / "docker-data"),
            "--exec-root",
            str(self.layout.exec_root(host)),
            "--pidfile",
            str(self.layout.exec_root(host) / "docker.pid"),
            "--bridge",
            self.layout.bridge(host)[0],
            "--ip",
            host.ip,
            # the machine's engine owns iptables; published ports here go through docker-proxy
            "--iptables=false",
        ]
        self.procs.spawn(f"dockerd-{host.name}", argv, self.logs / f"dockerd-{host.name}.log")
        _wait(f"host {host.name}'s Docker engine", lambda: self._engine_answers(host), 60,
              self.logs / f"dockerd-{host.name}.log")  # fmt: skip

    def engine_config(self, host: Host) -> Path:
        return self.layout.host_dir(host) / "daemon.json"

    def drain_plugin_name(self, host: Host) -> str:
        """Unique on this machine: every engine finds plugins in the one /run/docker/plugins."""
        return f"consul-sidecar-drain-{self.layout.net.replace('.', '-')}-{host.name}"

    def start_drain(self, host: Host) -> None:
        """The host's drain plugin (sidecar-drain) in its engine: plain docker stop drains first."""
        dockerd = self.procs.process(f"dockerd-{host.name}")
        assert dockerd is not None, f"host {host.name}'s engine is not running"
        argv = [
            self.python, "-m", "registrar.drain_guard", "--consul", host.consul_url,
            "--socket", f"/run/docker/plugins/{self.drain_plugin_name(host)}.sock",
            "--engine-config", str(self.engine_config(host)), "--engine-pid", str(dockerd.pid),
            "--docker", self.layout.engine_url(host), *self._client_args(host, "registrar"),
        ]  # fmt: skip
        self.procs.spawn(f"drain-{host.name}", argv, self.logs / f"drain-{host.name}.log",
                         env={"PYTHONUNBUFFERED": "1"})  # fmt: skip
        name = self.drain_plugin_name(host)
        _wait(f"host {host.name}'s drain plugin", lambda: name in self.engine_config(host).read_text(), 30,
              self.logs / f"drain-{host.name}.log")  # fmt: skip

    def _engine_answers(self, host: Host) -> bool:
        # docker-py asks for the API version when the client is made and leaks that socket if
        # nothing answers: knock first
        with socket.socket(socket.AF_UNIX) as knock:
            try:
                knock.connect(str(self.layout.engine_socket(host)))
            except OSError:
                return False
        client = self.docker(host)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def docker(self, host: Host) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.layout.engine_url(host), timeout=60)

    def start_host(self, name: str, agent: bool = True, wait: bool = True) -> None:
        """Engine, agent, registrar, templater+proxy of one host (what is not running yet)."""
        host = self.layout.host(name)
        if self.procs.process(f"dockerd-{host.name}") is None:
            self.start_engine(host)
        client = self.docker(host)
        ensure_image(client)
        client.close()
        if agent and self.procs.process(host.node) is None:
            self._start_consul("client", host.node, host.ip)
        if self.procs.process(f"drain-{host.name}") is None:
            self.start_drain(host)
        if self.procs.process(f"registrar-{host.name}") is None:
            self.start_registrar(host)
        if self.procs.process(f"templater-{host.name}") is None:
            self.start_templater(host)
        if wait:
            self.wait_host(host)

    def wait_host(self, host: Host, timeout: float = 60.0) -> None:
        _wait(f"host {host.name}'s agent", lambda: _get(f"{host.http_url}/v1/status/leader"), timeout,
              self.logs / f"{host.node}.log")  # fmt: skip
        _wait(f"host {host.name}'s proxy", lambda: self.proxy_answers(host), timeout,
              self.logs / f"templater-{host.name}.log")  # fmt: skip

    def proxy_answers(self, host: Host) -> bool:
        """The proxy answers (404 for a host nothing routes)."""
        request = urllib.request.Request(f"http://{host.ip}:{host.proxy_port}/", headers={"Host": "nothing.invalid"})
        try:
            urllib.request.urlopen(request, timeout=1)
        except urllib.error.HTTPError as err:
            return err.code == 404
        except OSError:
            return False
        return False

    def start_registrar(self, host: Host, *extra: str) -> None:
        argv = [
            self.python, "-m", "registrar", "--consul", host.consul_url, "--docker", self.layout.engine_url(host),
            "--hostname", host.node, "--ip", host.ip, "--status-addr", f"{host.ip}:9201",
            *self._client_args(host, "registrar"), *extra,
        ]  # fmt: skip
        self.procs.spawn(f"registrar-{host.name}", argv, self.logs / f"registrar-{host.name}.log",
                         env={"PYTHONUNBUFFERED": "1"})  # fmt: skip

    def templater_argv(self, host: Host, *extra: str) -> list[str]:
        d = self.layout.host_dir(host)
        run = d / "run"
        run.mkdir(parents=True, exist_ok=True)
        template = ROOT / "templates" / TEMPLATES[host.proxy]
        return [
            self.python, "-m", "templater", "--consul", host.consul_url, "--proxy", host.proxy,
            "--template", f"{template}:{self.proxy_config(host)}", "--proxy-pid-file", str(d / "proxy.pid"),
            "--var", f"runtime_dir={run}", "--var", f"http_port={host.proxy_port}", "--var", f"bind_address={host.ip}",
            "--status-addr", f"{host.ip}:9200", "--register-address", host.ip, "--wait", "50ms:500ms",
            *self._client_args(host, "templater"), *extra,
        ]  # fmt: skip

    def start_templater(self, host: Host, *extra: str) -> None:
        self.procs.spawn(f"templater-{host.name}", self.templater_argv(host, *extra),
                         self.logs / f"templater-{host.name}.log", env={"PYTHONUNBUFFERED": "1"})  # fmt: skip

    def proxy_config(self, host: Host) -> Path:
        return self.layout.host_dir(host) / f"{host.proxy}.cfg"

    def proxy_process(self, host: Host) -> psutil.Process | None:
        """The proxy master serving the host's configuration, found as the templater finds it."""
        pid = find_master(KINDS[host.proxy], self.proxy_config(host), self.layout.host_dir(host) / "proxy.pid")
        try:
            return psutil.Process(pid) if pid else None
        except psutil.Error:
            return None

    def _engine_processes(self, host: Host) -> list[psutil.Process]:
        """The host's dockerd, its containerd and docker-proxy children, its shims and their
        containers: everything that dies with the host."""
        found: list[psutil.Process] = []
        dockerd = self.procs.process(f"dockerd-{host.name}")
        if dockerd is not None:
            found += [dockerd, *dockerd.children(recursive=True)]
        marker = str(self.layout.exec_root(host))
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if (
                    proc.info["cmdline"]
                    and "containerd-shim" in proc.info["cmdline"][0]
                    and any(marker in arg for arg in proc.info["cmdline"])
                ):
                    found += [proc, *proc.children(recursive=True)]
        return found

    def kill_host(self, name: str) -> None:
        """The host dies at once: SIGKILL to its agent, registrar, templater, proxy, containers
        and engine, as a power cut would stop them."""
        host = self.layout.host(name)
        victims = self._engine_processes(host)
        proxy = self.proxy_process(host)
        if proxy is not None:
            victims += [proxy, *proxy.children(recursive=True)]
        for part in (host.node, f"registrar-{host.name}", f"templater-{host.name}", f"drain-{host.name}"):
            proc = self.procs.process(part)
            if proc is not None:
                victims += [proc, *proc.children(recursive=True)]
        terminate(victims, timeout=10, sig=signal.SIGKILL)
        # a reboot empties /run, where the engine keeps its pid files and runtime state (a
        # dead engine's pid files would keep the next one from starting)
        self._clear_exec_root(host)
        for part in (host.node, f"registrar-{host.name}", f"templater-{host.name}", f"dockerd-{host.name}",
                     f"drain-{host.name}"):  # fmt: skip
            self.procs.forget(part)

    def stop_hosts(self, hosts: list[Host]) -> None:
        """Templaters and registrars, then proxies and the fleet's containers, then engines and
        agents: each step for all hosts at once."""
        # the drain plugins first: each takes itself out of its engine, which still runs
        self.procs.stop(*(f"{part}-{h.name}" for h in hosts for part in ("drain", "templater", "registrar")))
        terminate([p for p in (self.proxy_process(h) for h in hosts) if p is not None])
        for host in hosts:
            if self.procs.process(f"dockerd-{host.name}") is None:
                continue
            client = self.docker(host)
            with contextlib.suppress(docker.errors.DockerException):
                for c in client.containers.list(all=True, filters={"label": self.layout.label}):
                    c.remove(force=True)
            client.close()
        self.procs.stop(*(f"dockerd-{h.name}" for h in hosts), *(h.node for h in hosts))
        for host in hosts:
            self._clear_exec_root(host)
            self._bridge_down(host)

    def _clear_exec_root(self, host: Host) -> None:
        exec_root = self.layout.exec_root(host)
        self._unmount(exec_root, self.layout.host_dir(host))
        shutil.rmtree(exec_root, ignore_errors=True)

    @staticmethod
    def _unmount(*roots: Path) -> None:
        """What a killed engine left mounted under its roots (a stopped one leaves nothing)."""
        with open("/proc/mounts") as f:
            points = [line.split()[1] for line in f]
        for point in sorted(points, key=len, reverse=True):
            if any(point.startswith(str(root) + "/") for root in roots):
                subprocess.run(["umount", "-l", point], capture_output=True)

    # ---- containers ----

    def run_web(
        self, host_name: str, service: str = "demo", http_host: str = "demo.fleet.test", restart: bool = False,
        **labels: str,
    ) -> Any:  # fmt: skip
        """A busybox web backend on that host's engine, its port published on the host's address."""
        host = self.layout.host(host_name)
        client = self.docker(host)
        try:
            return client.containers.run(
                ensure_image(client),
                ["sh", "-c", SERVE],
                labels={
                    FLEET_LABEL: self.layout.net,
                    "SERVICE_NAME": service,
                    "SERVICE_HTTP_HOST": http_host,
                    "SERVICE_CHECK_HTTP": "/index.html",
                    "SERVICE_CHECK_INTERVAL": "2s",
                    **labels,
                },
                ports={"8080/tcp": (host.ip, None)},
                detach=True,
                stop_signal="SIGTERM",
                restart_policy={"Name": "unless-stopped"} if restart else None,
            )
        finally:
            client.close()

    # ---- the whole fleet ----

    def up(self, demo: bool = True) -> None:
        if self.layout.secure:
            self._make_pki()
        for name, ip in self.layout.servers:
            if self.procs.process(name) is None:
                self._start_consul("server", name, ip)
        dc2_name, dc2_ip = self.layout.dc2_server
        if not self.layout.secure and self.procs.process(dc2_name) is None:
            self._start_consul("dc2", dc2_name, dc2_ip)
        self.wait_leader()
        if self.layout.secure:
            _wait("ACLs ready", self._acl_ready, 60, self.logs / "server-1.log")
            self._make_tokens()
        for host in self.layout.hosts:
            self.start_host(host.name, wait=False)
        for host in self.layout.hosts:
            self.wait_host(host)
        _wait("both hosts' agents in the cluster", self._all_members, 60)
        if not self.layout.secure:
            _wait("dc2 WAN-joined",
                  lambda: "dc2" in _get(f"http://{self.layout.servers[0][1]}:8500/v1/catalog/datacenters"),
                  60, self.logs / f"{dc2_name}.log")  # fmt: skip
        if demo and not self._demo_running():
            for host in self.layout.hosts:
                for _ in range(2):
                    self.run_web(host.name, restart=True)

    def _acl_ready(self) -> bool:
        """The leader has initialised ACLs: the management token reads the policy list."""
        try:
            _get(f"http://{self.layout.servers[0][1]}:8500/v1/acl/policies", token=self.management_token)
        except OSError:
            return False
        return True

    def _demo_running(self) -> bool:
        client = self.docker(self.layout.hosts[0])
        try:
            return bool(client.containers.list(filters={"label": self.layout.label}))
        finally:
            client.close()

    def down(self) -> None:
        self.stop_hosts(self.layout.hosts)
        self.procs.stop(self.layout.dc2_server[0], *(n for n, _ in self.layout.servers))
        self.procs.stop(*self.procs.names())  # anything else recorded

    def status(self) -> list[str]:
        lines = []
        for name in self.procs.names():
            proc = self.procs.process(name)
            lines.append(f"{name:16} {'running pid ' + str(proc.pid) if proc else 'not running'}")
        leader = self.leader()
        server_ip = dict(self.layout.servers)
        lines.append(f"leader: {leader or 'none'}")
        ui_ip = server_ip.get(leader) or self.layout.servers[0][1]
        lines.append(f"Consul UI: http://{ui_ip}:8500/ui/dc1/services")
        for host in self.layout.hosts:
            proxy = "answers" if self.proxy_answers(host) else "not answering"
            lines.append(
                f"host {host.name}: proxy {host.proxy} http://{host.ip}:{host.proxy_port} ({proxy}), "
                f"agent {host.consul_url}, engine DOCKER_HOST={self.layout.engine_url(host)}, "
                f"templater http://{host.ip}:9200/health, registrar http://{host.ip}:9201/health"
            )
        lines.append(f"demo: curl -H 'Host: demo.fleet.test' http://{self.layout.hosts[0].ip}:{HTTP_PORT}/cgi-bin/slow")
        return lines


def layout_from_env() -> Layout:
    return Layout(
        state=Path(os.environ.get("FLEET_STATE", "/var/tmp/consul-sidecar-fleet")),
        net=os.environ.get("FLEET_NET", "127.0.0"),
        proxies=(os.environ.get("FLEET_PROXY_A", "haproxy"), os.environ.get("FLEET_PROXY_B", "nginx")),
        secure=os.environ.get("FLEET_SECURE", "").lower() in ("1", "true", "yes"),
    )


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status", "kill-host", "start-host", "kill-leader"))
    parser.add_argument("host", nargs="?", default="b", help="for kill-host / start-host: a or b")
    args = parser.parse_args(list(argv) if argv is not None else None)
    fleet = Fleet(layout_from_env())
    try:
        if args.command == "up":
            fleet.up()
        elif args.command == "down":
            fleet.down()
            print("fleet stopped")
            return 0
        elif args.command == "kill-host":
            fleet.kill_host(args.host)
        elif args.command == "start-host":
            fleet.start_host(args.host)
        elif args.command == "kill-leader":
            leader = fleet.leader()
            fleet.kill(leader)
            print(f"killed {leader}; start it again with: fleet.sh up")
    except FleetError as err:
        print(f"fleet: {err}", file=sys.stderr)
        return 1
    print("\n".join(fleet.status()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
