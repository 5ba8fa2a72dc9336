"""registrator's and consul-template's command lines, as their users write them (issue 22)."""

from __future__ import annotations

import shlex

import pytest

from registrar import settings as registrar_settings
from sidecar.goflags import Flag, FlagError, Peer, translate
from templater.settings import SettingsError, settings_from

PEER = Peer("peer", {"a": Flag("--a"), "b": Flag("--b", boolean=True), "n": Flag("", note="does nothing")},
            unsupported={"x": "use --y"})  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["-a", "1"], ["--a=1"]),
        (["-a=1"], ["--a=1"]),
        (["--a", "1"], ["--a=1"]),  # Go reads two dashes too
        (["-a", "-1"], ["--a=-1"]),  # a negative value stays a value
        (["-a=x=y"], ["--a=x=y"]),
        (["-b"], ["--b"]),
        (["-b=true", "-b=1", "-b=T"], ["--b", "--b", "--b"]),
        (["-b=false"], []),
        (["-n", "5"], []),
        (["consul://h:1", "-a", "1"], ["consul://h:1", "--a=1"]),  # positionals where they are
        (["--ours", "-z"], ["--ours", "-z"]),  # not the peer's: for argparse to judge
        (["-a", "1", "--", "-b"], ["--a=1", "--", "-b"]),
    ],
)
def test_go_flag_syntax_becomes_ours(argv, want):
    assert translate(argv, PEER, {"--ours"}).argv == want


def test_notes_and_errors_name_the_flag():
    assert translate(["-n", "5"], PEER, set()).notes == ["-n: does nothing"]
    with pytest.raises(FlagError, match=r"peer's -x is not supported: use --y"):
        translate(["-x"], PEER, set())
    with pytest.raises(FlagError, match=r"-b: 'maybe' is not a boolean"):
        translate(["-b=maybe"], PEER, set())
    with pytest.raises(FlagError, match=r"-a needs a value"):
        translate(["-a"], PEER, set())


def test_registrators_documented_command_line_runs_with_its_meaning():
    """The issue's line, as registrator's run documentation writes it."""
    line = shlex.split(
        "-ip 127.0.0.1 -internal=false -resync 30 -ttl 30 -ttl-refresh 15 -cleanup=true "
        "-deregister on-success -retry-attempts -1 -retry-interval=1000 -tags mig consul://127.0.0.1:8510"
    )
    settings = registrar_settings.parse(line)
    assert settings.consul.url == "http://127.0.0.1:8510"
    assert settings.sync.spec.ip == "127.0.0.1" and not settings.sync.spec.internal
    assert settings.resync == 30 and settings.sync.cleanup and settings.sync.deregister == "on-success"
    assert settings.retry_attempts == -1 and settings.sync.retry_interval == 1.0
    assert settings.sync.spec.force_tags == ("mig",)
    assert [n.split(":")[0] for n in settings.notes] == ["-ttl", "-ttl-refresh"]
    # the registry URI first, Go booleans alone, and registrator's camel-case flag
    first = registrar_settings.parse(["consul-tls://c.example.com:8501", "-internal", "-useIpFromLabel", "IP",
                                      "-explicit", "-require-label"])  # fmt: skip
    assert first.consul.url == "https://c.example.com:8501" and first.sync.spec.internal
    assert first.sync.spec.use_ip_from_label == "IP" and first.sync.spec.explicit and first.sync.spec.require_label
    # our own spellings keep working
    ours = registrar_settings.parse(["--consul", "http://127.0.0.1:8511", "--internal", "--ip", "10.0.0.1"])
    assert ours.consul.url == "http://127.0.0.1:8511" and ours.sync.spec.ip == "10.0.0.1"


def test_consul_templates_command_line_runs_with_its_meaning(tmp_path):
    src = tmp_path / "in.ctmpl"
    line = ["-consul-addr", "127.0.0.1:8510", "-template", f"{src}:{tmp_path / 'out'}:true", "-once", "-dry",
            "-wait=2s:5s", "-max-stale", "10s", "-log-level", "warn", "-consul-retry-attempts", "3",
            "-consul-retry-backoff", "100ms", "-consul-retry-max-backoff", "1s", "-exec", "sleep 9",
            "-exec-reload-signal", "SIGHUP", "-exec-kill-signal", "SIGINT", "-exec-kill-timeout", "5s",
            "-consul-ssl", "-consul-ssl-ca-cert", "/ca.pem", "-consul-ssl-cert", "/c.pem", "-consul-ssl-key", "/k.pem",
            "-pid-file", str(tmp_path / "ct.pid"), "-kill-signal", "SIGINT", "-consul-ssl-verify"]  # fmt: skip
    settings = settings_from(line)
    assert settings.consul.url == "https://127.0.0.1:8510"  # -consul-ssl: https to the same address
    assert settings.consul.ca_file == "/ca.pem" and settings.consul.cert_file == "/c.pem"
    assert [(t.source, t.command) for t in settings.templates] == [(src, "true")]
    assert settings.once and settings.dry and (settings.wait_min, settings.wait_max) == (2.0, 5.0)
    assert settings.max_stale_ms == 10_000 and settings.log_level == "WARNING" and settings.retry_attempts == 3
    assert settings.exec_command == "sleep 9" and settings.kill_timeout == 5.0
    assert settings.pid_file == tmp_path / "ct.pid" and settings.notes == (
        "-kill-signal: accepted: the templater stops on SIGINT and SIGTERM",
    )
    with pytest.raises(SettingsError, match="-vault-addr is not supported: Vault is not supported"):
        settings_from(["-vault-addr", "https://127.0.0.1:8200", "-template", "a:b"])
    with pytest.raises(SettingsError, match="-config /no/such/dir: no such file or directory"):
        settings_from(["-config", "/no/such/dir", "-once"])
    with pytest.raises(SettingsError, match="-consul-ssl-verify=false is not supported"):
        settings_from(["-consul-ssl-verify=false", "-template", "a:b"])


def test_docker_socket_default_follows_registrators_mount():
    from registrar.docker_events import default_docker_url

    assert default_docker_url({"DOCKER_HOST": "tcp://h:2375"}, lambda p: True) == "tcp://h:2375"
    assert default_docker_url({}, lambda p: True) == "unix:///var/run/docker.sock"
    assert default_docker_url({}, lambda p: p == "/tmp/docker.sock") == "unix:///tmp/docker.sock"
    assert default_docker_url({}, lambda p: False) is None
