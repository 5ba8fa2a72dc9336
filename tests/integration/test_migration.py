"""Drop-in for registrator and consul-template users (issue 22): their command lines, unchanged,
on the real Docker engine and Consul agent."""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support import HTTPD, IMAGE, ROOT, TEST_LABEL, ConsulAgent, Process, free_port, wait_until
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
    refused = subprocess.run([sys.executable, "-m", "templater", "-vault-addr", "https://127.0.0.1:8200", "-once"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "-vault-addr is not supported" in refused.stderr
    consul.put("/v1/agent/service/deregister/ct1")


CONFIG = """
consul {
  address = "%(address)s"
  retry {
    attempts    = 0
    backoff     = "100ms"
    max_backoff = "1s"
  }
}
log_level = "info"
reload_signal = "SIGHUP"
wait {
  min = "0s"
  max = "0s"
}
"""

WEB = """
template {
  source      = "%(src)s"
  destination = "%(out)s/web.conf"
  command     = "touch %(out)s/web.ran"
  command_timeout = "10s"
  perms       = 0600
  backup      = true
}
"""


def test_a_consul_template_config_directory_and_sighup(consul, tmp_path):
    """-config DIR written after consul-template's documented examples, HCL and JSON: the agent,
    retry and wait from the files; per template perms, backup, command, inline contents and its
    own wait. SIGHUP reads the files again: a template added, one changed, one removed take
    effect; a broken file keeps the running configuration and says why."""
    consul.put("/v1/agent/service/register", {"ID": "cf1", "Name": "cfweb", "Port": 9711, "Address": "127.0.0.1"})
    consul.kv_put("cf/motd", "hello")
    conf, out = tmp_path / "ct.d", tmp_path / "out"
    conf.mkdir()
    out.mkdir()
    src = tmp_path / "web.ctmpl"  # consul-template's own syntax (Go), as its users have them
    src.write_text('{{ range service "cfweb" }}server {{ .Address }}:{{ .Port }}\n{{ end }}')
    jinja = tmp_path / "jinja.j2"
    jinja.write_text("{% for i in service('cfweb') %}{{ i.port }} {% endfor %}")
    (conf / "10-consul.hcl").write_text(CONFIG % {"address": consul.url.removeprefix("http://")})
    (conf / "20-web.hcl").write_text(WEB % {"src": src, "out": out})
    own_wait = {"min": "1500ms", "max": "4s"}
    motd = {"template": [{"contents": '[[ key "cf/motd" ]]', "destination": f"{out}/motd.txt",
                          "left_delimiter": "[[", "right_delimiter": "]]", "wait": own_wait},
                         {"source": str(jinja), "destination": f"{out}/jinja.txt", "syntax": "jinja"}]}  # fmt: skip
    (conf / "30-motd.json").write_text(json.dumps(motd))
    proc = Process("templater", ["-config", str(conf), "--status-addr", f"127.0.0.1:{free_port()}"], tmp_path)
    try:
        web, motd_file = out / "web.conf", out / "motd.txt"
        wait_until(lambda: web.exists() and motd_file.exists(), 15, what="first files")
        assert web.read_text() == "server 127.0.0.1:9711\n" and motd_file.read_text() == "hello"
        wait_until(lambda: (out / "jinja.txt").exists(), 5, what="the Jinja template marked syntax = jinja")
        assert (out / "jinja.txt").read_text() == "9711 "
        wait_until(lambda: (out / "web.ran").exists(), 5, what="web's command")  # it runs after the writes
        assert oct(web.stat().st_mode & 0o777) == "0o600"
        # the inline template's own wait: the change is held about 1.5 s; web's arrives at once
        consul.kv_put("cf/motd", "hi")
        consul.put("/v1/agent/service/register", {"ID": "cf2", "Name": "cfweb", "Port": 9712, "Address": "127.0.0.1"})
        changed = time.monotonic()
        wait_until(lambda: "9712" in web.read_text(), 5, what="web's change")
        assert motd_file.read_text() == "hello", "the wait of motd's template did not hold its change"
        wait_until(lambda: motd_file.read_text() == "hi", 6, what="motd's change after its wait")
        assert 1.3 < time.monotonic() - changed < 4.5
        assert (out / "web.conf.bak").read_text() == "server 127.0.0.1:9711\n"
        # SIGHUP: web's template changed (a new destination), motd's removed, a new one added
        (conf / "20-web.hcl").write_text((WEB % {"src": src, "out": out}).replace("web.conf", "web2.conf"))
        (conf / "30-motd.json").unlink()
        (conf / "40-new.hcl").write_text(
            f'template {{\n  contents = "n={{{{ key \\"cf/motd\\" }}}}"\n  destination = "{out}/new.txt"\n}}\n'
        )
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: (out / "web2.conf").exists() and (out / "new.txt").exists(), 10, what="the reloaded templates"
        )
        assert (out / "new.txt").read_text() == "n=hi"
        wait_until(lambda: "configuration reloaded: 2 templates" in proc.output(), 5, what="the reload's log line")
        consul.kv_put("cf/motd", "gone")
        wait_until(lambda: (out / "new.txt").read_text() == "n=gone", 5, what="the new template follows its key")
        assert motd_file.read_text() == "hi"  # removed: no longer written
        # a broken file: the running configuration stays, and the log says why
        (conf / "50-broken.hcl").write_text('template {\n  source = "/x"\n  destination = "/y"\n  perm = 0600\n}\n')
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "configuration not reloaded" in proc.output(), 5, what="the refusal")
        assert f"{conf / '50-broken.hcl'}:4: unknown key template.perm" in proc.output()
        consul.put("/v1/agent/service/register", {"ID": "cf3", "Name": "cfweb", "Port": 9713, "Address": "127.0.0.1"})
        wait_until(lambda: "9713" in (out / "web2.conf").read_text(), 5, what="a change after the refused reload")
        assert proc.alive()
    finally:
        proc.stop()
        for sid in ("cf1", "cf2", "cf3"):
            consul.put(f"/v1/agent/service/deregister/{sid}")


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
