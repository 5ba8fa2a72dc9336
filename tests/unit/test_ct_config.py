"""consul-template's configuration files: the HCL 1 / JSON reader and what the files set."""

from __future__ import annotations

from pathlib import Path

import pytest

from templater.hcl import Body, HCLError, parse
from templater.settings import SettingsError, settings_from

# after consul-template's documented configuration (docs/configuration.md), as users keep it
MAIN = """
# the agent on this host
consul {
  address = "127.0.0.1:8500"
  token   = "file-token"

  retry {
    enabled     = true
    attempts    = 5
    backoff     = "100ms"
    max_backoff = "1m"
  }
}

reload_signal = "SIGHUP"
kill_signal   = "SIGINT"
max_stale     = "10m"
log_level     = "warn"
pid_file      = "/tmp/ct-test.pid"

wait {
  min = "5s"
  max = "10s"
}
"""

TEMPLATES = """
template {
  source      = "/etc/haproxy/haproxy.cfg.j2"
  destination = "/etc/haproxy/haproxy.cfg"
  command     = "systemctl reload haproxy"
  command_timeout = "60s"
  perms       = 0600
  backup      = true
  wait {
    min = "2s"
    max = "10s"
  }
}

/* a second template, inline */
template {
  contents = "{{ key \\"service/redis/maxconns\\" }} ${HOME} %{ if x }"
  destination = "/tmp/redis.conf"
  left_delimiter  = "[["
  right_delimiter = "]]"
  error_on_missing_key = false
  create_dest_dirs = false
  user = "nobody"
  group = "nogroup"
  command = ["touch", "/tmp/a file"]
}
"""

JSON = """{
  "template": [
    {"source": "/srv/a.j2", "destination": "/srv/a.conf", "perms": "0640"},
    {"source": "/srv/b.j2", "destination": "/srv/b.conf", "wait": "1s:3s"}
  ],
  "log_level": "debug"
}
"""


def _write(directory: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return directory


def test_a_config_directory_after_consul_templates_examples(tmp_path: Path):
    conf = _write(tmp_path / "ct.d", {"10-main.hcl": MAIN, "20-templates.hcl": TEMPLATES})
    settings = settings_from(["-config", str(conf)])
    assert settings.consul.url == "http://127.0.0.1:8500" and settings.consul.token == "file-token"
    assert (settings.retry_attempts, settings.retry_backoff, settings.retry_max_backoff) == (5, 0.1, 60.0)
    assert (settings.wait_min, settings.wait_max, settings.max_stale_ms) == (5.0, 10.0, 600_000)
    assert settings.log_level == "WARNING" and settings.pid_file == Path("/tmp/ct-test.pid")
    haproxy, redis = settings.templates
    assert haproxy.source == Path("/etc/haproxy/haproxy.cfg.j2") and haproxy.dest == Path("/etc/haproxy/haproxy.cfg")
    assert haproxy.command == "systemctl reload haproxy" and haproxy.command_timeout == 60.0
    assert haproxy.perms == 0o600 and haproxy.backup is True and haproxy.wait == (2.0, 10.0)
    assert redis.contents == '{{ key "service/redis/maxconns" }} ${HOME} %{ if x }'
    assert redis.delimiters == ("[[", "]]") and redis.strict is False and redis.create_dest_dirs is False
    assert (redis.user, redis.group, redis.command) == ("nobody", "nogroup", "touch '/tmp/a file'")
    assert redis.command_timeout == 30.0 and redis.perms is None and redis.backup is None
    assert str(redis.source) == f"{conf / '20-templates.hcl'}:16"  # its name: the file and line of the block
    assert any("reload_signal" in note for note in settings.notes)
    syslog = _write(tmp_path / "more", {"s.hcl": 'syslog {\n  enabled = true\n  facility = "LOCAL5"\n}\n'})
    noted = settings_from(["-config", str(syslog), "-template", "a:b"]).notes
    assert noted == (f"{syslog / 's.hcl'}:1: syslog: ignored: the templater logs to stderr; the service manager "
                     "collects it (journald, docker logs)",)  # fmt: skip


def test_files_merge_in_order_and_the_command_line_wins(tmp_path: Path):
    conf = _write(tmp_path / "ct.d", {"a.hcl": MAIN, "sub/b.json": JSON, "c.hcl": 'log_level = "err"\n'})
    settings = settings_from(["-config", str(conf)])
    assert settings.log_level == "DEBUG"  # a.hcl, c.hcl, then sub/b.json: Go's filepath.Walk order
    assert [t.dest.name for t in settings.templates] == ["a.conf", "b.conf"]
    assert settings.templates[0].perms == 0o640 and settings.templates[1].wait == (1.0, 3.0)
    more = _write(
        tmp_path / "more", {"x.hcl": 'max_stale = "1s"\ntemplate {\n source = "/x"\n destination = "/y"\n}\n'}
    )
    settings = settings_from(
        ["-config", str(conf), "-config", str(more / "x.hcl"), "-log-level=info", "-template", "/in:/out", "-wait=1s"]
    )
    assert settings.log_level == "INFO" and settings.max_stale_ms == 1000 and settings.wait_min == 1.0
    assert [str(t.dest) for t in settings.templates] == ["/srv/a.conf", "/srv/b.conf", "/y", "/out"]


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('consul {\n  adress = "x"\n}\n', ":2: unknown key consul.adress"),
        ('template {\n  source = "a"\n  destination = "b"\n  perm = 0600\n}\n', ":4: unknown key template.perm"),
        ('vault {\n  address = "https://v:8200"\n}\n', ":1: vault is not supported: Vault is not supported"),
        ('exec {\n  command = "x"\n  env {\n    pristine = true\n  }\n}\n', ":3: exec.env is not supported"),
        ("consul {\n  ssl {\n    verify = false\n  }\n}\n", ":3: verify = false is not supported"),
        ('template {\n  destination = "b"\n}\n', ":1: template 1: give either source or contents"),
        ('template {\n  source = "a"\n  destination = "b"\n  perms = "rw"\n}\n', ":4: perms 'rw': not an octal"),
        ("wait = 5\n", ":1: wait: expected a block"),
        ('template {\n  source = "a"\n  destination = "b"\n  backup = "yes"\n}\n', ":4: backup: expected bool"),
        ('consul {\n  address = "127.0.0.1:8500"\n', ":3:1: expected a key, found the end of the file"),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_line_and_key(tmp_path: Path, text: str, said: str):
    path = tmp_path / "bad.hcl"
    path.write_text(text)
    with pytest.raises(SettingsError) as err:
        settings_from(["-config", str(path)])
    assert f"{path}{said}" in str(err.value)


def test_the_reader_takes_what_hcl_1_takes():
    body = parse(
        'a = 0600\nb = 0x1F\nc = -1.5e2\nd = [1, "two", { e = true },]\n'
        'f = "${x("y")} \\u00e9\\t"\ng "h" "i" { j = 1 }\n'
        "k = <<EOF\none\n  two\nEOF\nl = <<-EOT\n    three\n      four\n    EOT\n// end\n",
        "t.hcl",
    )
    values = {item.key: item.value for item in body.items}
    assert (values["a"], values["b"], values["c"]) == (384, 31, -150.0)
    assert values["d"][:2] == [1, "two"] and isinstance(values["d"][2], Body)
    assert values["f"] == '${x("y")} \u00e9\t'
    g = values["g"]
    assert isinstance(g, Body) and g.items[0].key == "h" and isinstance(g.items[0].value, Body)
    assert values["k"] == "one\n  two\n" and values["l"] == "three\n  four\n"
    assert [item.line for item in body.items] == [1, 2, 3, 4, 5, 6, 7, 11]


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('a = "x\ny"', "t.hcl:1:5: string not terminated"),
        ("a = 08", "t.hcl:1:5: illegal number '08'"),
        ('a = "\\q"', "t.hcl:1:6: unknown escape \\q"),
        ("a = [1 2]", "t.hcl:1:8: expected ']'"),
        ('a = "${x"', "t.hcl:1:5: '${' not closed"),
        ("/* a", "t.hcl:1:1: comment not terminated"),
    ],
)
def test_the_reader_names_where_a_file_goes_wrong(text: str, said: str):
    with pytest.raises(HCLError) as err:
        parse(text, "t.hcl")
    assert said in str(err.value)


def test_a_templates_own_wait_holds_its_changes_until_quiet_or_max():
    from templater.quiesce import TemplateWaits

    waits = TemplateWaits()
    assert not waits.ready(0, (1.0, 3.0), False, 10.0) and waits.next_due() is None  # nothing pending
    assert not waits.ready(0, (1.0, 3.0), True, 10.0) and waits.next_due() == 11.0
    assert not waits.ready(0, (1.0, 3.0), True, 10.8)  # more changes push it on...
    assert not waits.ready(0, (1.0, 3.0), True, 11.6) and waits.next_due() == 12.6
    assert not waits.ready(0, (1.0, 3.0), True, 12.4) and waits.next_due() == 13.0  # ...up to max after the first
    assert waits.ready(0, (1.0, 3.0), False, 13.0) and waits.next_due() is None
    assert not waits.ready(1, (0.5, 2.0), True, 20.0) and waits.ready(1, (0.5, 2.0), False, 20.5)


def test_the_wait_before_a_cycle_settles_edits_spaces_bursts_and_waits_for_quiet():
    import threading
    import time

    from templater.quiesce import EDIT_SETTLE, Pace, gather

    asked: list[float] = []

    def scripted(*answers: set[str]):
        queue = list(answers)

        def wait(seconds: float) -> set[str]:
            asked.append(seconds)
            if queue:
                return queue.pop(0)
            time.sleep(seconds)
            return set()

        return wait

    stop = threading.Event()
    none = Pace(0.0, 0.0, 0.0)
    # a template being written: its events are gathered until a settle period passes quiet
    got = gather({"template:/t"}, scripted({"template:/t"}, {"kv"}), none, 0.0, stop)
    assert got == {"template:/t", "kv"} and asked == [EDIT_SETTLE] * 3
    asked.clear()
    assert gather({"kv"}, scripted(), none, 0.0, stop) == {"kv"} and asked == []  # nothing to wait for
    # --reload-interval: a change soon after a write waits for the rest of the interval, and takes what came
    started = time.monotonic()
    got = gather({"a"}, scripted({"b"}), Pace(0.0, 0.0, 0.2), started, stop)
    assert got == {"a", "b"} and time.monotonic() - started >= 0.2
    assert gather({"a"}, scripted(), Pace(0.0, 0.0, 0.2), started - 1.0, stop) == {"a"}  # a quiet spell: at once
    # --wait min:max: until nothing changed for min, or max after the first change
    started = time.monotonic()
    got = gather({"a"}, scripted({"b"}, {"c"}), Pace(0.1, 5.0, 0.0), 0.0, stop)
    assert got == {"a", "b", "c"} and 0.1 <= time.monotonic() - started < 1.0
    stop.set()  # stopping ends every wait at once
    assert gather({"a"}, scripted(), Pace(10.0, 20.0, 10.0), time.monotonic(), stop) == {"a"}


def test_a_reload_keeps_unchanged_templates_and_says_what_needs_a_restart(tmp_path: Path):
    from templater.reload import reloaded
    from templater.writer import TemplateState

    one = tmp_path / "one.hcl"
    one.write_text(
        'template {\n source = "/a"\n destination = "/a.out"\n}\n'
        'template {\n source = "/b"\n destination = "/b.out"\n}\n'
    )
    running = settings_from(["-config", str(one), "--consul", "http://127.0.0.1:8500"])
    states = [TemplateState(spec) for spec in running.templates]
    states[0].done = True
    one.write_text(
        'log_level = "debug"\nwait = "2s"\ntemplate {\n source = "/a"\n destination = "/a.out"\n}\n'
        'template {\n source = "/c"\n destination = "/c.out"\n perms = 0600\n}\n'
    )
    fresh = settings_from(["-config", str(one), "--consul", "http://127.0.0.1:9500"])
    done = reloaded(running, states, fresh)
    assert done.templates[0] is states[0] and done.templates[0].done  # unchanged: its state kept
    assert done.templates[1].spec.perms == 0o600 and not done.templates[1].done
    assert (done.added, done.removed, done.changed) == (["/c"], ["/b"], [])
    assert done.settings.log_level == "DEBUG" and done.settings.wait_min == 2.0
    assert done.restart == ["consul"] and done.settings.consul == running.consul
