"""consul-template's own templates (Go text/template, .ctmpl) against a real Consul: HAProxy and
NGINX configurations written in its style for these tests, accepted by `haproxy -c` and
`nginx -t`, following services added and removed as the Jinja path does (issue 23)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, Process, free_port, wait_until

HAPROXY = """global
    stats timeout 10s
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend http
    bind 127.0.0.1:{{ keyOrDefault "ct-test/port" "18080" }}
{{- range services }}{{ $name := .Name }}{{ if $name | regexMatch "^ctg" }}{{ range service $name }}
{{- with index .ServiceMeta "http_host" }}
    acl host_{{ $name }}_{{ .| replaceAll "." "_" }} hdr(host) -i {{ . }}{{ end }}{{ end }}{{ end }}{{ end }}
{{- range services }}{{ if .Tags | contains "routed" }}
    use_backend be_{{ .Name }} if host_{{ .Name }}_{{ .Name }}_test{{ end }}{{ end }}
    default_backend be_none
backend be_none
    http-request return status 404
{{ range services }}{{ if .Name | regexMatch "^ctg" }}
# {{ .Name }}: {{ len (service .Name) }} passing{{ if .Tags }}, tags {{ join "," .Tags }}{{ end }}
backend be_{{ .Name }}
    balance roundrobin
{{- range $i, $s := service .Name }}
    server {{ .ID | replaceAll ":" "_" }} {{ .Address }}:{{ .Port }} check weight {{ add 1 $i }}
{{- end }}
{{ end }}{{ end -}}
"""

NGINX = """pid {dir}/nginx.pid;
error_log stderr;
events {{}}
http {{
    access_log off;
{{{{- range services }}}}{{{{ if and (.Name | regexMatch "^ctg") (service .Name) }}}}
    upstream {{{{ .Name }}}} {{{{ "{{" }}}}{{{{ range service .Name }}}}
        server {{{{ .Address }}}}:{{{{ .Port }}}};{{{{ end }}}}
    }}{{{{ end }}}}{{{{ end }}}}
    server {{
        listen 127.0.0.1:{{{{ keyOrDefault "ct-test/port" "18081" }}}};
{{{{- range services }}}}{{{{ if and (.Name | regexMatch "^ctg") (service .Name) }}}}
        location /{{{{ .Name }}}}/ {{{{ "{{" }}}} proxy_pass http://{{{{ .Name }}}}; }}{{{{ end }}}}{{{{ end }}}}
    }}
}}
"""


def _register(consul, sid: str, name: str, port: int, tags: list[str], **meta: str) -> None:
    consul.put("/v1/agent/service/register",
               {"ID": sid, "Name": name, "Port": port, "Address": "127.0.0.1", "Tags": tags, "Meta": meta})  # fmt: skip


@pytest.mark.parametrize(("kind", "check"), [("haproxy", "haproxy -c -f {}"), ("nginx", "nginx -t -q -c {}")])
def test_consul_template_style_templates_follow_the_catalog(consul, tmp_path: Path, kind: str, check: str):
    source = tmp_path / f"{kind}.ctmpl"
    source.write_text(HAPROXY if kind == "haproxy" else NGINX.format(dir=tmp_path))
    dest = tmp_path / f"{kind}.cfg"
    _register(consul, "ctg-web-1", "ctgweb", 19001, ["routed"], http_host="ctgweb.test")
    _register(consul, "ctg-web-2", "ctgweb", 19002, ["routed"], http_host="ctgweb.test")
    _register(consul, "ctg-api-1", "ctgapi", 19003, [])
    try:
        # --once first, as people try a template: complete, checked, exit 0
        once = subprocess.run(
            [sys.executable, "-m", "templater", "--consul", consul.url, "--template", f"{source}:{dest}",
             "--check", check, "--once"], capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert once.returncode == 0, once.stderr[-2000:]
        text = dest.read_text()
        assert "127.0.0.1:19001" in text and "127.0.0.1:19002" in text and "127.0.0.1:19003" in text
        if kind == "haproxy":
            assert "server ctg-web-1 127.0.0.1:19001 check weight 1" in text
            assert "server ctg-web-2 127.0.0.1:19002 check weight 2" in text
            assert "acl host_ctgweb_ctgweb_test hdr(host) -i ctgweb.test" in text
            assert "use_backend be_ctgweb if host_ctgweb_ctgweb_test" in text and "be_ctgapi if" not in text
            assert "# ctgweb: 2 passing, tags routed" in text
        # then as a daemon: an instance added, one removed, and a whole service gone
        proc = Process("templater", ["--consul", consul.url, "--template", f"{source}:{dest}", "--check", check,
                                     "--empty-grace", "1s", "--status-addr", f"127.0.0.1:{free_port()}"],
                       tmp_path)  # fmt: skip
        try:
            _register(consul, "ctg-web-3", "ctgweb", 19004, ["routed"], http_host="ctgweb.test")
            wait_until(lambda: "127.0.0.1:19004" in dest.read_text(), 10, what="the added instance")
            consul.put("/v1/agent/service/deregister/ctg-web-1")
            wait_until(lambda: "127.0.0.1:19001" not in dest.read_text(), 10, what="the removed instance")
            consul.put("/v1/agent/service/deregister/ctg-api-1")
            wait_until(lambda: "19003" not in dest.read_text(), 10, what="the service gone (after the empty grace)")
            assert "127.0.0.1:19002" in dest.read_text() and "127.0.0.1:19004" in dest.read_text()
            assert "check refused" not in proc.output() and proc.alive()
            assert "catalog(local).checks" not in proc.output()  # no template reads .Checks: none kept
        finally:
            proc.stop()
    finally:
        for sid in ("ctg-web-1", "ctg-web-2", "ctg-web-3", "ctg-api-1"):
            consul.put(f"/v1/agent/service/deregister/{sid}")


def test_datacenters_and_the_agents_node(consul, tmp_path: Path):
    source, dest = tmp_path / "dcs.ctmpl", tmp_path / "dcs.txt"
    source.write_text("{{ range datacenters }}[{{ . }}]{{ end }} {{ with node }}{{ .Node.Node }}{{ end }}")
    done = subprocess.run([sys.executable, "-m", "templater", "--consul", consul.url, "--template", f"{source}:{dest}",
                           "--once"], capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    agent = consul.get("/v1/agent/self")["Config"]["NodeName"]  # `node` without a name: the agent's own
    assert dest.read_text() == "".join(f"[{dc}]" for dc in consul.get("/v1/catalog/datacenters")) + f" {agent}"


def test_a_broken_go_template_keeps_the_good_file_and_says_where(consul, tmp_path: Path):
    source, dest = tmp_path / "t.ctmpl", tmp_path / "out"
    source.write_text('{{ range service "consul" }}{{ .Address }}{{ end }}\n')
    proc = Process("templater", ["--consul", consul.url, "--template", f"{source}:{dest}"], tmp_path)
    try:
        wait_until(lambda: dest.exists() and dest.read_text().strip(), 10, what="the first file")
        good = dest.read_text()
        source.write_text('{{ range service "consul" }}{{ .Adress }}{{ end }}\n')  # a typo
        wait_until(lambda: "can't evaluate field Adress" in proc.output(), 10, what="the error")
        assert f"template: {source}:1:" in proc.output() and dest.read_text() == good
        source.write_text("{{ if }}\n")
        wait_until(lambda: "missing value for if" in proc.output(), 10, what="the parse error")
        assert dest.read_text() == good and proc.alive()
    finally:
        proc.stop()


RUNTIME = """global
    master-worker
    stats socket {dir}/admin.sock mode 600 level admin expose-fd listeners
    stats timeout 10s
    server-state-file {dir}/server-state
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    load-server-state-from-file global
frontend http
    bind 127.0.0.1:{port}
    default_backend be_ctgrt
backend be_ctgrt
    balance roundrobin
    http-response set-header X-Served-By %[srv_name]
{{{{- range service "ctgrt" }}}}
    server {{{{ .ID }}}} {{{{ .Address }}}}:{{{{ .Port }}}} check
{{{{- end }}}}
"""


def test_a_go_template_with_the_haproxy_runtime_api(consul, tmp_path: Path):
    """--proxy haproxy with a consul-template style template: an added instance goes in through
    HAProxy's runtime API (no reload), as with the bundled Jinja template."""
    import http.client
    import http.server
    import threading

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler) for _ in "ab"]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    source, dest = tmp_path / "haproxy.ctmpl", tmp_path / "haproxy.cfg"
    source.write_text(RUNTIME.format(dir=tmp_path, port=port))

    def served_by() -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            return response.getheader("X-Served-By") or ""
        finally:
            conn.close()

    _register(consul, "ctgrt-1", "ctgrt", servers[0].server_address[1], [])
    proc = Process("templater", ["--consul", consul.url, "--template", f"{source}:{dest}", "--proxy", "haproxy",
                                 "--stop-proxy", "--register-service", ""], tmp_path)  # fmt: skip
    try:
        wait_until(lambda: served_by() == "ctgrt-1", 15, what="the first instance served through HAProxy")
        _register(consul, "ctgrt-2", "ctgrt", servers[1].server_address[1], [])
        wait_until(lambda: {served_by() for _ in range(4)} == {"ctgrt-1", "ctgrt-2"}, 10, what="both served")
        assert "haproxy runtime added" in proc.output() and "proxy reloaded" not in proc.output()
    finally:
        proc.stop()
        for sid in ("ctgrt-1", "ctgrt-2"):
            consul.put(f"/v1/agent/service/deregister/{sid}")
        for server in servers:
            server.shutdown()
            server.server_close()


CHECKS = """{{ range service "ctgchk|any" }}{{ .ID }} {{ .Status }} {{ .Checks.AggregatedStatus }}
{{ range .Checks }}  {{ .CheckID }} [{{ .Name }}] {{ .Status }} {{ .Output }}
{{ end }}{{ end }}"""


def test_checks_lists_each_instances_checks_and_follows_them(consul, tmp_path: Path):
    """`.Checks`: the instance's node's checks and its own, with name, status and output, read
    once when a template first uses them and kept up to date by the watches from then on."""
    source, dest = tmp_path / "checks.ctmpl", tmp_path / "checks.txt"
    source.write_text(CHECKS)
    ttl = [{"CheckID": f"ctgchk-{c}", "Name": f"ttl {c}", "TTL": "600s", "Status": "passing"} for c in "ab"]
    consul.put("/v1/agent/service/register",
               {"ID": "ctgchk-1", "Name": "ctgchk", "Port": 19010, "Address": "127.0.0.1", "Checks": ttl})  # fmt: skip
    try:
        # (the agent sends a changed output alone to the catalog only every few minutes: a status
        # change goes at once, with its output)
        consul.put("/v1/agent/check/warn/ctgchk-a?note=warming%20up")
        once = subprocess.run([sys.executable, "-m", "templater", "--consul", consul.url, "--template",
                               f"{source}:{dest}", "--once"],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
        assert once.returncode == 0, once.stderr[-2000:]
        assert dest.read_text() == (
            "ctgchk-1 warning warning\n"
            "  serfHealth [Serf Health Status] passing Agent alive and reachable\n"
            "  ctgchk-a [ttl a] warning warming up\n"
            "  ctgchk-b [ttl b] passing \n"
        ), dest.read_text()
        proc = Process("templater", ["--consul", consul.url, "--template", f"{source}:{dest}",
                                     "--status-addr", f"127.0.0.1:{free_port()}"], tmp_path)  # fmt: skip
        try:
            wait_until(lambda: "watching catalog(local).checks" in proc.output(), 10, what="the checks kept")
            wait_until(lambda: "ctgchk-a [ttl a] warning warming up\n" in dest.read_text(), 10, what="the first file")
            # better: with the service's read, as its status
            consul.put("/v1/agent/check/pass/ctgchk-a?note=ready")
            wait_until(lambda: dest.read_text().startswith("ctgchk-1 passing passing\n"), 10, what="passing")
            assert "ctgchk-a [ttl a] passing ready\n" in dest.read_text()
            # worse: at once, from the watch of the checks that are not passing; its output with it
            consul.put("/v1/agent/check/warn/ctgchk-b?note=slow%0Adisk")
            wait_until(lambda: "ctgchk-b [ttl b] warning slow disk\n" in dest.read_text(), 10, what="the warning")
            assert dest.read_text().startswith("ctgchk-1 warning warning\n")
            consul.put("/v1/agent/check/fail/ctgchk-a?note=down")
            wait_until(lambda: "ctgchk-a [ttl a] critical down\n" in dest.read_text(), 10, what="critical")
            assert dest.read_text().startswith("ctgchk-1 critical critical\n")
            # better: with the service's read, as its status
            consul.put("/v1/agent/check/pass/ctgchk-a?note=up")
            consul.put("/v1/agent/check/pass/ctgchk-b?note=fast")
            wait_until(lambda: dest.read_text().startswith("ctgchk-1 passing passing\n"), 10, what="passing again")
            assert "ctgchk-a [ttl a] passing up\n" in dest.read_text()
            assert "ctgchk-b [ttl b] passing fast\n" in dest.read_text()
            # in maintenance: Consul's own check comes in with it
            consul.put("/v1/agent/service/maintenance/ctgchk-1?enable=true&reason=deploy")
            wait_until(lambda: "_service_maintenance:ctgchk-1 [Service Maintenance Mode] critical" in dest.read_text(),
                       10, what="the maintenance check")  # fmt: skip
            assert dest.read_text().startswith("ctgchk-1 maintenance maintenance\n")
            assert proc.alive()
        finally:
            proc.stop()
    finally:
        consul.put("/v1/agent/service/deregister/ctgchk-1")
