"""Drop-in for registrator and consul-template users (issue 22): their command lines, unchanged,
on the real Docker engine and Consul agent."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys

import pytest

from tests.support import HTTPD, IMAGE, ROOT, TEST_LABEL, ConsulAgent, Process, wait_until
from tests.traffic import SERVE

pytestmark = pytest.mark.integration


def test_registrators_documented_command_line(consul, containers, workdir):
    """registrator's run documentation, as it is in people's unit files: single dashes, Go
    booleans, the registry URI last. The -ttl flags are accepted and said to do nothing."""
    address = consul.url.removeprefix("http://")
    line = ("-ip 127.0.0.1 -internal=false -resync 30 -ttl 30 -ttl-refresh 15 -cleanup=true -deregister on-success "
            f"-retry-attempts -1 -retry-interval=1000 -tags mig consul://{address}")  # fmt: skip
    proc = Process("registrar", shlex.split(line), workdir, env={"PYTHONUNBUFFERED": "1"})
    try:
        wait_until(lambda: "docker events connected" in proc.output() or not proc.alive(), what="registrar up")
        assert proc.alive(), proc.output()
        ok, failing = (containers.run(labels={"SERVICE_NAME": "migrated"}, command=SERVE) for _ in range(2))
        sids = [f"{socket.gethostname()}:{c.name}:8080" for c in (ok, failing)]
        wait_until(lambda: set(sids) <= set(consul.services()), what="registered under registrator's IDs")
        service = consul.services()[sids[0]]
        assert service["Address"] == "127.0.0.1" and "mig" in service["Tags"]
        assert "registrator flag -ttl: with Consul it does nothing here" in proc.output()
        ok.stop(timeout=5)  # exits 0 on SIGTERM
        failing.kill()  # exit 137
        wait_until(lambda: sids[0] not in consul.services(), what="deregistered: it exited 0")
        # -deregister on-success keeps one that failed (until a listing finds it gone)
        wait_until(lambda: f"kept container={failing.name} exit_code=137" in proc.output(), what="kept")
    finally:
        proc.stop()


def test_registrators_labels_as_it_reads_them(consul, containers, registrar, hostname):
    """A dotted, underscored name (Consul takes it; Consul DNS cannot find it: said once), and an
    HTTP check with its method."""
    proc = registrar()
    c = containers.run(labels={"SERVICE_NAME": "billing.api_v2", "SERVICE_CHECK_HTTP": "/index.html",
                               "SERVICE_CHECK_HTTP_METHOD": "HEAD"})  # fmt: skip
    sid = f"{hostname}:{c.name}:8080"
    wait_until(lambda: len(consul.health("billing.api_v2", passing=True)) == 1, timeout=15, what="passing")
    assert consul.services()[sid]["Service"] == "billing.api_v2"
    [check] = [ch for ch in consul.get("/v1/agent/checks").values() if ch["ServiceID"] == sid]
    assert check["Name"] == "HTTP HEAD /index.html every 10s" and check["Status"] == "passing"
    assert "billing.api_v2: not a DNS label" in proc.output()


def test_consul_templates_command_line(consul, tmp_path):
    """`consul-template -consul-addr ... -template in:out:cmd -once`, as people run it."""
    consul.put("/v1/agent/service/register", {"ID": "ct1", "Name": "ctweb", "Port": 9701, "Address": "127.0.0.1"})
    src, out, marker = tmp_path / "in.tmpl.j2", tmp_path / "out.txt", tmp_path / "ran"
    src.write_text("{% for i in service('ctweb') %}{{ i.address }}:{{ i.port }}\n{% endfor %}")
    address = consul.url.removeprefix("http://")
    argv = ["-consul-addr", address, "-template", f"{src}:{out}:touch {marker}", "-once", "-log-level", "info",
            "-wait", "0s", "-consul-retry-attempts", "3", "-pid-file", str(tmp_path / "ct.pid")]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "templater", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_text() == "127.0.0.1:9701\n" and marker.exists()
    assert not (tmp_path / "ct.pid").exists()  # there while it ran, gone once it stopped
    refused = subprocess.run([sys.executable, "-m", "templater", "-config", str(tmp_path), "-once"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "-config is not supported" in refused.stderr
    consul.put("/v1/agent/service/deregister/ct1")


def test_tags_and_meta_reach_templates_as_consul_holds_them(consul, tmp_path):
    """fabio's and Traefik's tags and a meta description with spaces reach a template as they
    are stored; a value with a line break is still left out, with a warning naming it."""
    tags = ["urlprefix-/api strip=/api", "traefik.http.routers.api.rule=Host(`a.test`)", "bad\nserver evil 1.2.3.4:80"]
    meta = {"description": "the billing API, v2", "note": "x\ny"}
    registration = {"ID": "as1", "Name": "asis", "Port": 9702, "Address": "127.0.0.1", "Tags": tags, "Meta": meta}
    consul.put("/v1/agent/service/register", registration)
    src, out = tmp_path / "t.j2", tmp_path / "out.txt"
    src.write_text("{% for i in service('asis') %}{{ i.tags | join('|') }}\n{{ i.meta | dictsort }}\n{% endfor %}")
    done = subprocess.run([sys.executable, "-m", "templater", "--consul", consul.url, "--template", f"{src}:{out}",
                           "--once"], cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    consul.put("/v1/agent/service/deregister/as1")
    assert done.returncode == 0, done.stderr
    assert out.read_text() == (
        "urlprefix-/api strip=/api|traefik.http.routers.api.rule=Host(`a.test`)\n"
        "[('description', 'the billing API, v2')]\n"
    )
    assert "left out tag" in done.stderr and "left out meta" in done.stderr and "line break" in done.stderr


def test_the_network_choice_for_a_container_on_two_networks(consul, containers, registrar, hostname):
    """registrator #498: with -internal, a container on two networks got the first one's
    address. A SERVICE_NETWORK label chooses per container, --network for all that are on it."""
    client = containers.client
    nets = [client.networks.create(f"t{containers.session}-{n}", labels={TEST_LABEL: containers.session})
            for n in ("front", "back")]  # fmt: skip
    front, back = nets
    try:
        # back sorts first: what a container on both gets without a choice
        registrar("--internal", "--network", front.name)
        made = []
        for labels in ({"SERVICE_NAME": "twonet", "SERVICE_NETWORK": back.name}, {"SERVICE_NAME": "twonet"}):
            containers.count += 1
            c = client.containers.create(
                IMAGE, ["sh", "-c", HTTPD], name=f"t{containers.session}-{containers.count}",
                labels={TEST_LABEL: containers.session, **labels}, network=front.name, stop_signal="SIGTERM",
                ports={"8080/tcp": ("127.0.0.1", None)},
            )  # fmt: skip
            back.connect(c)
            c.start()
            made.append(c)
        addresses = {}
        for c in made:
            c.reload()
            addresses[c.name] = {n: v["IPAddress"] for n, v in c.attrs["NetworkSettings"]["Networks"].items()}
        sids = {c.name: f"{hostname}:{c.name}:8080" for c in made}
        wait_until(lambda: set(sids.values()) <= set(consul.services()), timeout=15, what="both registered")
        services = consul.services()
        labelled, flagged = made
        assert services[sids[labelled.name]]["Address"] == addresses[labelled.name][back.name]  # the label wins
        assert services[sids[flagged.name]]["Address"] == addresses[flagged.name][front.name]  # the flag
        assert addresses[flagged.name][front.name] != addresses[flagged.name][back.name]
    finally:
        for c in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={containers.session}"}):
            c.remove(force=True)
        for net in nets:
            net.remove()


def test_registrators_check_cmd_behind_the_script_flag(containers, hostname, tmp_path):
    """SERVICE_CHECK_CMD registers as registrator registers it: a script check running
    `check-cmd CONTAINER PORT COMMAND` on the agent (registrator's Consul image ships that helper,
    which runs the command in the container), only with --allow-script-checks, and only where the
    agent takes script checks over its API (`enable_script_checks`)."""
    agent = ConsulAgent(tmp_path, extra={"enable_script_checks": True})
    agent.start()
    proc = Process("registrar", ["--consul", agent.url, "--hostname", hostname, "--allow-script-checks"], tmp_path,
                   env={"PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        wait_until(lambda: "docker events connected" in proc.output(), what="registrar up")
        c = containers.run(labels={"SERVICE_NAME": "cmdcheck", "SERVICE_CHECK_CMD": "/bin/true"})
        sid = f"{hostname}:{c.name}:8080"

        def check() -> dict | None:
            return next((ch for ch in agent.get("/v1/agent/checks").values() if ch["ServiceID"] == sid), None)

        assert wait_until(check, timeout=15, what="the check registered")["Name"] == (
            "check-cmd in the container (SERVICE_CHECK_CMD) every 10s"
        )
        # this agent has no check-cmd helper (registrator's Consul image has one): it ran it, found none
        assert "check-cmd" in wait_until(lambda: (check() or {}).get("Output"), timeout=15, what="the agent ran it")
    finally:
        proc.stop()
        agent.stop()


def test_a_container_in_anothers_network_namespace(consul, containers, registrar, hostname):
    """`docker run --net container:X` (a sidecar in a pod, say): registered with X's address, as
    registrator does, where it used to get none. Docker refuses exposing a port in that mode:
    the port comes from the image's EXPOSE."""
    client = containers.client
    base = client.containers.create(IMAGE, ["true"], labels={TEST_LABEL: containers.session})
    image = base.commit("consul-sidecar-test", f"expose9090-{containers.session}", changes=["EXPOSE 9090"])
    base.remove()
    try:
        registrar("--internal")
        owner = containers.run(labels={"SERVICE_IGNORE": "true"}, command="sleep 600", ports=())
        containers.count += 1
        pod = client.containers.run(
            image.id, ["sh", "-c", "httpd -f -p 9090 -h /www"], name=f"t{containers.session}-{containers.count}",
            labels={TEST_LABEL: containers.session, "SERVICE_NAME": "inpod"}, network_mode=f"container:{owner.id}",
            detach=True,
        )  # fmt: skip
        owner.reload()
        address = owner.attrs["NetworkSettings"]["IPAddress"]
        sid = f"{hostname}:{pod.name}:9090"
        wait_until(lambda: sid in consul.services(), timeout=15, what="registered")
        service = consul.services()[sid]
        assert address and (service["Address"], service["Port"]) == (address, 9090)
    finally:
        for c in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={containers.session}"}):
            c.remove(force=True)
        client.images.remove(image.id, force=True)
