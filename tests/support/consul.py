"""A Consul dev agent of the test's own, stopped by PID."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sidecar.signals import terminate
from tests.support.polling import free_ports, wait_until


class ConsulAgent:
    """`consul agent -dev` on free loopback ports; restart() loses all state, as a dev agent does."""

    def __init__(self, workdir: Path, extra: dict[str, Any] | None = None, https: bool = False) -> None:
        """extra: merged into the configuration (ACLs, TLS files); https: serve HTTPS too."""
        self.workdir = workdir
        http, dns, serf_lan, serf_wan, server, https_port = free_ports(6)  # all distinct
        self.https_port = https_port if https else None
        self.extra = extra or {}  # merged into the agent's configuration (ACLs, TLS)
        self.token: str | None = None  # sent by get() and put() when set
        self.http_port = http
        self.dns_port = dns  # Consul's DNS interface (TCP and UDP)
        self._ports = {"serf_lan": serf_lan, "serf_wan": serf_wan, "server": server}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "consul.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        config = {
            "ports": {
                "http": self.http_port,
                "dns": self.dns_port,
                "grpc": -1,
                "serf_lan": self._ports["serf_lan"],
                "serf_wan": self._ports["serf_wan"],
                "server": self._ports["server"],
                **({"https": self.https_port} if self.https_port else {}),
            },
            "enable_local_script_checks": True,
            "disable_update_check": True,  # no traffic off this machine
            **self.extra,
        }
        cfg = self.workdir / "consul.json"
        cfg.write_text(json.dumps(config))
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed on stop
        self.proc = subprocess.Popen(
            [
                "consul",
                "agent",
                "-dev",
                "-node",
                str(self.extra.get("node_name", "test-node")),
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
                "-config-file",
                str(cfg),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(self._leader, timeout=30, interval=0.1, what="consul leader")

    def _leader(self) -> bool:
        return bool(self.get("/v1/status/leader"))

    def stop(self) -> None:
        if self.proc:
            terminate(self.proc, signal.SIGTERM, 10, "consul")
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self.token} if self.token else {}

    def get(self, path: str) -> Any:
        request = urllib.request.Request(self.url + path, headers=self._headers())
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"null")

    def put(self, path: str, body: Any = None, method: str = "PUT") -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self._headers())
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"null")

    def kv_put(self, key: str, value: str) -> None:
        """A KV value as the text given (put() would send it as JSON, quotes and all)."""
        request = urllib.request.Request(
            f"{self.url}/v1/kv/{key}", data=value.encode(), method="PUT", headers=self._headers()
        )
        with urllib.request.urlopen(request, timeout=5):
            pass

    def services(self) -> dict[str, Any]:
        return dict(self.get("/v1/agent/services"))

    def checks(self) -> dict[str, Any]:
        return dict(self.get("/v1/agent/checks"))

    def health(self, name: str, passing: bool = False) -> list[Any]:
        return list(self.get(f"/v1/health/service/{name}" + ("?passing" if passing else "")))
