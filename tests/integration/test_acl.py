"""A locked-down Consul (issue 12): ACLs in default-deny mode, bootstrapped here, tokens made from
the policies shipped in deploy/consul-policies, handed over in files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support import ROOT, ConsulAgent, Process, free_port, wait_until
from tests.traffic import get, served_by, web

pytestmark = pytest.mark.integration

NODE = "acl-node"
POLICIES = ROOT / "deploy" / "consul-policies"


@pytest.fixture(scope="module")
def acl_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(
        tmp_path_factory.mktemp("acl"),
        extra={"node_name": NODE, "acl": {"enabled": True, "default_policy": "deny", "down_policy": "extend-cache"}},
    )
    agent.start()
    agent.token = agent.put("/v1/acl/bootstrap")["SecretID"]  # the management token
    # the agent's own token (its node and anti-entropy): infrastructure, not the sidecar's
    agent.put("/v1/agent/token/agent", {"Token": agent.token})
    yield agent
    agent.stop()


def policy(agent: ConsulAgent, name: str, file: str, **subst: str) -> str:
    rules = (POLICIES / file).read_text()
    for key, value in subst.items():
        rules = rules.replace(key, value)
    agent.put("/v1/acl/policy", {"Name": name, "Rules": rules})
    return name


def token(agent: ConsulAgent, *policies: str) -> dict[str, str]:
    made = agent.put("/v1/acl/token", {"Policies": [{"Name": p} for p in policies]})
    return {"secret": made["SecretID"], "accessor": made["AccessorID"]}


def token_file(path: Path, secret: str) -> Path:
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def tokens(acl_consul: ConsulAgent) -> dict[str, dict[str, str]]:
    registrar = policy(acl_consul, "registrar-" + NODE, "registrar.hcl", NODE=NODE)
    templater = policy(acl_consul, "templater", "templater.hcl", PREFIX="sidecar/")
    ingress = policy(acl_consul, "ingress-" + NODE, "ingress.hcl", INGRESS="ingress", NODE=NODE)
    return {"registrar": token(acl_consul, registrar), "templater": token(acl_consul, templater, ingress)}


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def everything_printed(procs: list[Process], urls: list[str]) -> str:
    """What the processes logged, served on their status addresses, and their command lines."""
    text = "".join(p.output() for p in procs)
    text += "".join(fetch(u)[1] for u in urls)
    text += "".join(" ".join(psutil.Process(p.proc.pid).cmdline()) for p in procs if p.alive())
    return text


def test_least_privilege_tokens_end_to_end(acl_consul, tokens, docker_engine, containers, tmp_path):
    """Registrar and templater with the shipped policies and nothing more, tokens in files: a new
    container becomes routable, and no token shows in logs, /metrics, /health, --dry output or
    the process list."""
    reg_file = token_file(tmp_path / "registrar.token", tokens["registrar"]["secret"])
    tpl_file = token_file(tmp_path / "templater.token", tokens["templater"]["secret"])
    reg_status, tpl_status, port = free_port(), free_port(), free_port()
    registrar = Process("registrar", ["--consul", acl_consul.url, "--token-file", str(reg_file), "--hostname", NODE,
                                      "--status-addr", f"127.0.0.1:{reg_status}", "--retry-interval", "500"],
                        tmp_path)  # fmt: skip
    templater = Process("templater", [
        "--consul", acl_consul.url, "--template", f"{ROOT / 'templates' / 'haproxy.cfg.j2'}:{tmp_path / 'haproxy.cfg'}",
        "--proxy", "haproxy", "--stop-proxy", "--var", f"runtime_dir={tmp_path}", "--var", f"http_port={port}",
        "--var", "bind_address=127.0.0.1", "--status-addr", f"127.0.0.1:{tpl_status}",
    ], tmp_path, env={"CONSUL_HTTP_TOKEN_FILE": str(tpl_file)})  # fmt: skip
    try:
        wait_until(lambda: get(port, "nothing.test")[0] == 404, timeout=20, what="haproxy serving")
        c = web(containers)
        wait_until(lambda: served_by(port, c.name), timeout=30, what="the container routable")
        wait_until(lambda: fetch(f"http://127.0.0.1:{tpl_status}/health")[0] == 200, timeout=15, what="healthy")
        assert fetch(f"http://127.0.0.1:{reg_status}/health")[0] == 200
        # the proxy registered itself with the ingress policy
        wait_until(lambda: len(acl_consul.get("/v1/health/service/ingress?passing")) == 1, timeout=15,
                   what="ingress passing")  # fmt: skip
        dry = subprocess.run(
            [sys.executable, "-m", "templater", "--consul", acl_consul.url, "--token-file", str(tpl_file), "--once",
             "--dry", "--template", f"{ROOT / 'templates' / 'haproxy.cfg.j2'}:/dev/null"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert dry.returncode == 0 and c.name in dry.stdout, dry.stderr[-2000:]
        printed = (
            everything_printed(
                [registrar, templater],
                [f"http://127.0.0.1:{s}/{p}" for s in (reg_status, tpl_status) for p in ("health", "metrics")],
            )
            + dry.stdout
            + dry.stderr
        )
        for t in tokens.values():
            assert t["secret"] not in printed
        # HAProxy's admin socket is the proxy's owner's alone: another user cannot even connect
        sock = tmp_path / "admin.sock"
        assert sock.stat().st_mode & 0o777 == 0o600
        other = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
             f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(sock)!r})"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert other.returncode != 0 and "PermissionError" in other.stderr, other.stderr
        assert get(port, "nothing.test")[0] == 404  # and the proxy serves on
    finally:
        templater.stop()
        registrar.stop()


def test_missing_permission_said_once_and_a_rewritten_token_file_resumes(acl_consul, tokens, docker_engine,
                                                                           containers, tmp_path):  # fmt: skip
    """The registrar starts with a token that may not write services: one log line naming the
    operation and the permission, /health 503, the process stays up; the file rewritten with
    the right token: the container is registered, with no restart. Then that token is revoked:
    what is registered stays, the denial is reported, and a new token in the file resumes."""
    reg_file = token_file(tmp_path / "registrar.token", tokens["templater"]["secret"])  # read-only token
    status = free_port()
    registrar = Process("registrar", ["--consul", acl_consul.url, "--token-file", str(reg_file), "--hostname", NODE,
                                      "--status-addr", f"127.0.0.1:{status}", "--retry-interval", "500",
                                      "--register-self", ""], tmp_path)  # fmt: skip
    try:
        wait_until(lambda: "docker events connected" in registrar.output(), timeout=20, what="registrar up")
        c = web(containers)
        refused = f'permission denied during register {NODE}:{c.name}:8080 (needs service:write on "web")'
        wait_until(lambda: refused in registrar.output(), timeout=15, what="the refusal in the log")
        code, body = fetch(f"http://127.0.0.1:{status}/health")
        assert code == 503 and "service:write" in body, body
        time.sleep(3)  # the tick retries every second: still one line
        assert registrar.output().count(refused) == 1, registrar.output()[-3000:]
        assert registrar.alive()

        def registered() -> bool:
            return any(c.name in sid for sid in services_of(acl_consul))

        assert not registered()
        token_file(reg_file, tokens["registrar"]["secret"])
        wait_until(registered, timeout=15, what="registered after the token file was rewritten")
        wait_until(lambda: fetch(f"http://127.0.0.1:{status}/health")[0] == 200, timeout=15, what="healthy again")

        # revoked while running
        acl_consul.put(f"/v1/acl/token/{tokens['registrar']['accessor']}", method="DELETE")
        c2 = web(containers)
        wait_until(lambda: "ACL not found" in registrar.output(), timeout=15, what="the revoked token refused")
        assert registered(), "a revoked token removed what was registered"
        wait_until(lambda: fetch(f"http://127.0.0.1:{status}/health")[0] == 503, timeout=15, what="denial in /health")
        fresh = token(acl_consul, "registrar-" + NODE)
        token_file(reg_file, fresh["secret"])
        wait_until(lambda: any(c2.name in sid for sid in services_of(acl_consul)), timeout=15,
                   what="registered with the new token")  # fmt: skip
        assert registered() and registrar.alive()
        tokens["registrar"] = fresh
    finally:
        registrar.stop()


def services_of(agent: ConsulAgent) -> list[str]:
    return list(agent.get("/v1/agent/services"))


def test_templater_with_a_revoked_token_keeps_its_output(acl_consul, tokens, tmp_path):
    """The templater's token revoked while it runs: it keeps the last output, says which read was
    refused and why in its log and /health, and a new token in the file resumes it."""
    acl_consul.put("/v1/agent/service/register", {"ID": "kept-1", "Name": "kept", "Port": 9001})
    own = token(acl_consul, "templater")
    tpl_file = token_file(tmp_path / "t.token", own["secret"])
    src = tmp_path / "t.j2"
    src.write_text("{% for i in service('kept') %}{{ i.id }}\n{% endfor %}")
    dest = tmp_path / "out.txt"
    status = free_port()
    templater = Process("templater", ["--consul", acl_consul.url, "--token-file", str(tpl_file), "--template",
                                      f"{src}:{dest}", "--status-addr", f"127.0.0.1:{status}"], tmp_path)  # fmt: skip
    try:
        wait_until(lambda: dest.exists() and dest.read_text() == "kept-1\n", timeout=15, what="first render")
        acl_consul.put(f"/v1/acl/token/{own['accessor']}", method="DELETE")
        # wakes the blocking queries, which were authorized when they began; the next ones are not
        acl_consul.put("/v1/agent/service/register", {"ID": "kept-2", "Name": "kept", "Port": 9002})
        wait_until(lambda: fetch(f"http://127.0.0.1:{status}/health")[0] == 503, timeout=30, what="503")
        body = json.loads(fetch(f"http://127.0.0.1:{status}/health")[1])
        assert "permission denied reading" in body["consul_error"], body
        acl_consul.put("/v1/agent/service/register", {"ID": "kept-3", "Name": "kept", "Port": 9003})
        time.sleep(2)
        assert dest.read_text().startswith("kept-1\n")  # nothing rendered was removed
        assert "kept-3" not in dest.read_text()  # and nothing read with the revoked token
        assert templater.alive()
        fresh = token(acl_consul, "templater")
        token_file(tpl_file, fresh["secret"])
        wait_until(lambda: dest.read_text() == "kept-1\nkept-2\nkept-3\n", timeout=30,
                   what="resumed with the new token")  # fmt: skip
        assert own["secret"] not in templater.output() and fresh["secret"] not in templater.output()
    finally:
        templater.stop()
        for sid in ("kept-1", "kept-2", "kept-3"):
            acl_consul.put(f"/v1/agent/service/deregister/{sid}")


def test_cleanup_never_touches_another_nodes_services(acl_consul, tokens, docker_engine, tmp_path):
    """Services of another node whose IDs have this host's prefix shape (as a wrong or anonymous
    token might see them in the catalog) stay: --cleanup acts on this agent's services only."""
    acl_consul.put("/v1/catalog/register", {
        "Node": "other-host", "Address": "127.0.0.9",
        "Service": {"ID": f"{NODE}:impostor:80", "Service": "impostor", "Port": 80, "Meta": {"registrar_host": NODE}},
    })  # fmt: skip
    reg_file = token_file(tmp_path / "registrar.token", tokens["registrar"]["secret"])
    common = ["--consul", acl_consul.url, "--hostname", NODE, "--cleanup", "--retry-interval", "500",
              "--register-self", ""]  # fmt: skip
    anonymous = Process("registrar", common, tmp_path)
    registrar = Process("registrar", [*common, "--token-file", str(reg_file)], tmp_path)
    try:
        for proc in (anonymous, registrar):
            wait_until(lambda proc=proc: "docker events connected" in proc.output() or not proc.alive(), timeout=20,
                       what="registrar up")  # fmt: skip
        time.sleep(3)  # a few reconcile ticks
        node = acl_consul.get("/v1/catalog/node/other-host")
        assert f"{NODE}:impostor:80" in node["Services"], node
        assert "impostor" not in registrar.output() and "impostor" not in anonymous.output()
    finally:
        registrar.stop()
        anonymous.stop()
        acl_consul.put("/v1/catalog/deregister", {"Node": "other-host"})
