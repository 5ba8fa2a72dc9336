"""Consul over TLS (issue 12): an agent that serves only HTTPS to clients with a certificate of
its CA (verify_incoming); certificates made with `consul tls` in the test."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, ConsulAgent, Process, wait_until
from tests.traffic import web

pytestmark = pytest.mark.integration


def make_ca(where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["consul", "tls", "ca", "create"], cwd=where, check=True, capture_output=True)
    return where


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = make_ca(tmp_path_factory.mktemp("pki"))
    for kind in ("-server", "-client"):
        subprocess.run(["consul", "tls", "cert", "create", kind, "-dc", "dc1"], cwd=d, check=True,
                       capture_output=True)  # fmt: skip
    make_ca(d / "other")  # a CA the agent's certificate is not from
    return d


@pytest.fixture(scope="module")
def tls_consul(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[tuple[ConsulAgent, str]]:
    agent = ConsulAgent(
        tmp_path_factory.mktemp("tls"),
        extra={
            "ca_file": str(pki / "consul-agent-ca.pem"),
            "cert_file": str(pki / "dc1-server-consul-0.pem"),
            "key_file": str(pki / "dc1-server-consul-0-key.pem"),
            "verify_incoming_https": True,
        },
        https=True,
    )
    agent.start()
    yield agent, f"https://127.0.0.1:{agent.https_port}"
    agent.stop()


def client_args(pki: Path, ca: Path | None = None) -> list[str]:
    return ["--ca-file", str(ca or pki / "consul-agent-ca.pem"), "--cert-file", str(pki / "dc1-client-consul-0.pem"),
            "--key-file", str(pki / "dc1-client-consul-0-key.pem")]  # fmt: skip


def once(url: str, template: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "templater", "--consul", url, "--once", "--dry", "--retry-attempts", "2",
         "--retry-backoff", "100ms", "--template", f"{template}:/dev/null", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip


def test_tls_with_client_certificates(tls_consul, pki, docker_engine, containers, tmp_path):
    """The registrar (flags) and the templater (CONSUL_CACERT / _CLIENT_CERT / _CLIENT_KEY) work
    over verified TLS with client certificates; a wrong CA or no client certificate is refused
    with an error that says so, and nothing falls back to plain HTTP or unverified TLS."""
    agent, url = tls_consul
    args = ["--consul", url, *client_args(pki), "--hostname", "tls-node", "--retry-interval", "500"]
    registrar = Process("registrar", args, tmp_path)
    try:
        wait_until(lambda: "docker events connected" in registrar.output(), timeout=20, what="registrar up")
        c = web(containers)
        wait_until(lambda: any(c.name in sid for sid in agent.services()), timeout=15, what="registered over TLS")
    finally:
        registrar.stop()

    template = tmp_path / "t.j2"
    template.write_text("{% for i in service('web', state='any') %}{{ i.id }}\n{% endfor %}")
    env = {**os.environ, "CONSUL_CACERT": str(pki / "consul-agent-ca.pem"),
           "CONSUL_CLIENT_CERT": str(pki / "dc1-client-consul-0.pem"),
           "CONSUL_CLIENT_KEY": str(pki / "dc1-client-consul-0-key.pem")}  # fmt: skip
    good = once(url, template, env=env)
    assert good.returncode == 0 and c.name in good.stdout, good.stderr[-2000:]

    wrong_ca = once(url, template, *client_args(pki, pki / "other" / "consul-agent-ca.pem"))
    assert wrong_ca.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.stderr or "certificate verify failed" in wrong_ca.stderr
    assert c.name not in wrong_ca.stdout

    no_client_cert = once(url, template, "--ca-file", str(pki / "consul-agent-ca.pem"))
    assert no_client_cert.returncode == 1
    assert "certificate" in no_client_cert.stderr.lower(), no_client_cert.stderr[-1500:]

    no_ca = once(url, template)  # the system's CAs do not know this one: refused, not unverified
    assert no_ca.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in no_ca.stderr

    bad = Process("registrar", ["--consul", url, *client_args(pki, pki / "other" / "consul-agent-ca.pem"),
                                "--retry-attempts", "1", "--retry-interval", "100"], tmp_path)  # fmt: skip
    bad.proc.wait(30)
    assert bad.stop() == 1
    assert "CERTIFICATE_VERIFY_FAILED" in bad.output() or "certificate verify failed" in bad.output()
