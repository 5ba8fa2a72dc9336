"""Templater pieces with their I/O behind small interfaces: HAProxy runtime parse/diff, the
output swap on a real filesystem, BlockingLoop and the catalog source with an in-memory
fetcher, the Store's grace and wake-ups."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from templater.catalog import Instance, Snapshot
from templater.consul_source import CatalogSource
from templater.deps import Catalog
from templater.errors import CheckFailed, ConsulUnavailable
from templater.haproxy_runtime import add_command, diff, parse, reparse, session_counts
from templater.output import FileOptions, owner_ids, swap
from templater.store import Store
from templater.watch import BlockingLoop, Response, WatchSettings

CONFIG = """global
    stats socket /run/x/admin.sock mode 600 level admin
    server-state-file /run/x/state
defaults
    mode http
    default-server inter 1s fall 2 rise 1
backend be_web
    default-server maxconn 50
    server a 10.0.0.1:80 weight 1 check
    server b 10.0.0.2:80 weight 1 check
backend be_api
    server c 10.0.0.3:80 weight 1
"""


def test_parse_finds_servers_socket_state_and_default_server():
    parsed = parse(CONFIG)
    assert parsed.servers == {
        "be_web": {"a": "10.0.0.1:80 weight 1 check", "b": "10.0.0.2:80 weight 1 check"},
        "be_api": {"c": "10.0.0.3:80 weight 1"},
    }
    assert parsed.socket_path == "/run/x/admin.sock" and parsed.state_file == "/run/x/state"
    assert parsed.default_server == {"be_web": "inter 1s fall 2 rise 1 maxconn 50", "be_api": "inter 1s fall 2 rise 1"}
    assert not any(line.strip().startswith("server ") for line in parsed.structure)


def test_reparse_equals_a_fresh_parse_and_keeps_the_sections_that_did_not_change():
    first = parse(CONFIG)
    edits = [
        CONFIG.replace("server c 10.0.0.3:80 weight 1", "server c 10.0.0.3:81 weight 2"),
        CONFIG.replace("    default-server inter 1s fall 2 rise 1\n", "    default-server inter 9s\n"),
        CONFIG + "backend be_new\n    server n 10.0.0.9:80\n",
        CONFIG.replace("backend be_api\n", ""),
        CONFIG.replace("backend be_api", "xbackend be_api"),
        CONFIG.replace("backend be_api", "backend_api"),
        CONFIG,
        "",
    ]
    for edited in edits:
        change = reparse(CONFIG, first, edited)
        assert change.parsed == parse(edited), edited
    # two changes far apart, the section between them kept only where it inherits the same defaults
    old = "defaults\n    default-server inter 1s\n" + "".join(
        f"backend be_{b}\n    server {b} 1.1.1.{n}:1\n" for n, b in enumerate("xy")
    )
    for new in (old.replace("1.1.1.1:1", "1.1.1.1:2").replace("default-server inter 1s", "mode tcp"),
                old.replace("1.1.1.1:1", "1.1.1.1:2").replace("defaults\n", "defaults\n    mode tcp\n")):  # fmt: skip
        kept = reparse(old, parse(old), new)
        assert kept.parsed == parse(new) and len(kept.old) == 3
    moved = reparse(CONFIG, first, CONFIG.replace("10.0.0.3:80", "10.0.0.3:99"))
    assert moved.parsed.servers["be_web"] is first.servers["be_web"]  # that section was not parsed again
    assert [p.servers for p in moved.old] == [{"be_api": {"c": "10.0.0.3:80 weight 1"}}]
    assert diff(first, moved.parsed, set(), moved) is None  # moved to another port: a reload


def test_a_server_draining_outside_the_changed_sections_is_revived_when_listed_again():
    old = CONFIG.replace("    server b 10.0.0.2:80 weight 1 check\n", "")
    new = old.replace("server c 10.0.0.3:80 weight 1", "server c 10.0.0.3:80 weight 3")
    change = reparse(old, parse(old), new)
    ops = diff(parse(old), change.parsed, {("be_web", "a")}, change)
    assert ops is not None and ops.revive == [("be_web", "a")] and ops.weight == [("be_api", "c", "3")]


SECTIONS = st.sampled_from([
    "global\n    stats socket /run/a.sock\n",
    "defaults\n    default-server inter 1s\n",
    "defaults\n    mode tcp\n",
    "frontend f\n    bind :80\n",
    "# a comment\n",
    *(f"backend be_{b}\n    default-server maxconn {b}\n" for b in "xyz"),
    *(f"    server {n} 10.0.0.{i}:80 weight {i} check\n" for i, n in enumerate("abcd")),
    "backend", "\n", " ", "ulist", "userlist u\n",
])  # fmt: skip
EDITS = st.lists(
    st.tuples(st.integers(0, 12), st.integers(0, 3), st.lists(SECTIONS, max_size=3)), min_size=1, max_size=3
)
DRAINING = st.sets(st.tuples(st.sampled_from(["be_x", "be_y", "be_z"]), st.sampled_from("abcd")), max_size=3)


def _ops(ops: Any) -> Any:
    return None if ops is None else [sorted(ops.add), sorted(ops.drain), sorted(ops.weight), sorted(ops.revive)]


@settings(max_examples=500, deadline=None)
@given(st.lists(SECTIONS, max_size=14), EDITS, DRAINING)
def test_reparse_of_any_edit_equals_a_fresh_parse(old_parts, edits, draining):
    """Whatever is inserted or removed wherever, in one place or several (even half a keyword,
    or a line break before one), reparsing from the old parse gives what a fresh parse gives, and
    the same runtime diff (servers still draining included, wherever they are)."""
    new_parts = list(old_parts)
    for at, removed, inserted in edits:
        new_parts[at : at + removed] = inserted
    old, new = "".join(old_parts), "".join(new_parts)
    change = reparse(old, parse(old), new)
    assert change.parsed == parse(new)
    assert _ops(diff(parse(old), change.parsed, draining, change)) == _ops(diff(parse(old), parse(new), draining))


def test_add_command_repeats_default_server_before_the_servers_own_settings():
    command = add_command("be_web", "n", "10.0.0.9:80 weight 3 check", "inter 1s fall 2 rise 1")
    assert command == "add server be_web/n 10.0.0.9:80 inter 1s fall 2 rise 1 weight 3 check"
    # init-addr is for servers read from the file: HAProxy refuses it for one added at runtime
    command = add_command("be_web", "n", "10.0.0.9:80 check", "inter 1s init-addr last,libc,none observe layer4")
    assert command == "add server be_web/n 10.0.0.9:80 inter 1s observe layer4 check"


def test_diff_add_drain_weight_and_what_needs_a_reload():
    old = parse(CONFIG)
    new = parse(
        CONFIG.replace("    server b 10.0.0.2:80 weight 1 check\n", "    server d 10.0.0.4:80 weight 1 check\n")
    )
    ops = diff(old, new, set())
    assert ops is not None
    assert ops.add == [("be_web", "d", "10.0.0.4:80 weight 1 check")] and ops.drain == [("be_web", "b")]
    reweighted = diff(old, parse(CONFIG.replace("10.0.0.3:80 weight 1", "10.0.0.3:80 weight 7")), set())
    assert reweighted is not None and reweighted.weight == [("be_api", "c", "7")]
    assert diff(old, parse(CONFIG.replace("mode http", "mode tcp")), set()) is None  # structure
    assert diff(old, parse(CONFIG.replace("10.0.0.3:80 weight 1", "10.0.0.5:80 weight 1")), set()) is None  # moved
    assert diff(old, parse(CONFIG + "backend be_new\n    server z 1.1.1.1:1\n"), set()) is None  # new backend
    sticky = CONFIG.replace("    server a 10.0.0.1", "    server n 9.9.9.9:1 cookie n\n    server a 10.0.0.1")
    assert diff(old, parse(sticky), set()) is None  # cookie cannot be set on a dynamic server
    # a server still draining that is wanted again is revived, not added twice
    revive = diff(parse(CONFIG), parse(CONFIG), {("be_web", "a")})
    assert revive is not None and revive.revive == [("be_web", "a")]


def test_session_counts_reads_show_stat_csv():
    table = "# pxname,svname,qcur,qmax,scur,smax\nbe_web,a,0,0,3,9\nbe_web,BACKEND,0,0,3,9\nbe_api,c,0,0,,0\n"
    assert session_counts(table) == {("be_web", "a"): 3, ("be_web", "BACKEND"): 3}
    assert session_counts("Unknown command\n") == {}


def test_swap_writes_atomically_keeps_mode_and_refuses_on_failed_check(tmp_path: Path):
    dest = tmp_path / "out.cfg"
    assert swap(dest, b"one\n", None, "t") is True
    dest.chmod(0o640)
    assert swap(dest, b"one\n", b"one\n", "t") is False  # same bytes: nothing written
    assert swap(dest, b"two\n", b"one\n", "t", check="grep -q two {}", options=FileOptions(backup=True)) is True
    assert dest.read_bytes() == b"two\n" and oct(dest.stat().st_mode & 0o777) == "0o640"
    assert (tmp_path / "out.cfg.bak").read_bytes() == b"one\n"
    with pytest.raises(CheckFailed, match="exit 1"):
        swap(dest, b"three\n", b"two\n", "t", check="grep -q nothing {}")
    assert dest.read_bytes() == b"two\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # staged file removed


def test_a_templates_own_mode_owner_and_directories_apply_to_each_write(tmp_path: Path):
    """consul-template's perms, user, group and create_dest_dirs, per template."""
    import os
    import pwd

    dest = tmp_path / "new" / "out.cfg"
    with pytest.raises(FileNotFoundError, match="create_dest_dirs = false"):
        swap(dest, b"one\n", None, "t", options=FileOptions(make_dirs=False))
    assert not dest.parent.exists()
    assert swap(dest, b"one\n", None, "t", options=FileOptions(mode=0o600)) is True
    assert oct(dest.stat().st_mode & 0o777) == "0o600"
    dest.chmod(0o644)
    assert swap(dest, b"two\n", b"one\n", "t", options=FileOptions(mode=0o600)) is True  # perms win over the file's
    assert oct(dest.stat().st_mode & 0o777) == "0o600"
    assert owner_ids(None, None) is None and owner_ids("0", None) == (0, -1)
    with pytest.raises(KeyError):
        owner_ids("no-such-user-here", None)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        swap(dest, b"three\n", b"two\n", "t", options=FileOptions(owner=owner_ids("nobody", str(nobody.pw_gid))))
        assert (dest.stat().st_uid, dest.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)


class Fake:
    """An in-memory Consul for the fetcher interface: answers per path, can fail or block."""

    def __init__(self) -> None:
        self.answers: dict[str, Response] = {}
        self.errors: dict[str, Exception] = {}
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Condition()

    def set(self, path: str, index: int, data: Any) -> None:
        with self.lock:
            self.answers[path] = Response(index, data)
            self.lock.notify_all()

    def get(self, path: str, params: dict[str, str]) -> Response:
        with self.lock:
            self.calls.append((path, dict(params)))
            if path in self.errors:
                raise self.errors[path]
            answer = self.answers.get(path, Response(1, None))
            if "index" in params and int(params["index"]) >= answer.index:
                self.lock.wait(0.2)  # a blocking query: nothing new yet
                answer = self.answers.get(path, Response(1, None))
            return answer


def test_blocking_loop_index_rules_and_backoff_on_errors():
    fake = Fake()
    fake.set("/v1/x", 5, {"a": 1})
    seen: list[Any] = []
    states: list[tuple[bool, str]] = []
    settings = WatchSettings(wait="1s", backoff_base=0.01, backoff_cap=0.05)
    loop = BlockingLoop(
        "x", "/v1/x", {}, fake, lambda d, i: seen.append((d, i)), lambda k, u, e: states.append((u, e)), settings
    )
    loop.start()
    try:
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        fake.set("/v1/x", 7, {"a": 1})  # the index moved, the data did not: skipped
        fake.set("/v1/x", 9, {"a": 2})
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [({"a": 1}, 5), ({"a": 2}, 9)]
        fake.set("/v1/x", 3, {"a": 3})  # backwards: the agent lost its state; reset and take it
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen[-1] == ({"a": 3}, 3)
        fake.errors["/v1/x"] = ConsulUnavailable("consul down")
        while not any(not up for up, _ in states) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (False, "consul down") in states
        del fake.errors["/v1/x"]
        fake.set("/v1/x", 4, {"a": 4})
        while seen[-1][0] != {"a": 4} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen[-1] == ({"a": 4}, 4) and states[-1] == (True, "")
        blocking = [p for _, p in fake.calls if "index" in p]
        assert blocking and all(int(p["index"]) >= 1 and p["wait"] == "1s" for p in blocking)
    finally:
        loop.stop()


def test_catalog_source_follows_a_node_and_survives_a_bug_in_its_reads(monkeypatch: pytest.MonkeyPatch):
    """A node's answer names the service to read; a bug in applying a read restarts the read
    thread (reported for /health) and the next change still goes through."""
    from sidecar.threads import Supervisor
    from templater.catalog_index import CatalogIndex

    fake = Fake()
    fake.set("/v1/catalog/nodes", 2, [{"Node": "n1", "Address": "127.0.0.1"}])
    w1 = {"ID": "w1", "Service": "web", "Port": 80, "ModifyIndex": 2}
    node = {"Node": {"Address": "127.0.0.1"}, "Services": [w1]}
    fake.set("/v1/catalog/node-services/n1", 2, node)
    fake.set("/v1/health/state/critical", 2, [])
    fake.set("/v1/health/state/warning", 2, [])

    def move(port: int, index: int) -> None:
        entry = {
            "Node": {"Node": "n1", "Address": "127.0.0.1"},
            "Service": {"ID": "w1", "Service": "web", "Port": port, "ModifyIndex": index},
            "Checks": [],
        }
        fake.set("/v1/health/service/web", index, [entry])
        services = [{"ID": "w1", "Service": "web", "Port": port, "ModifyIndex": index}]
        fake.set("/v1/catalog/node-services/n1", index, {"Node": node["Node"], "Services": services})

    published: list[Snapshot] = []
    supervisor = Supervisor(backoff_base=0.01, backoff_cap=0.05)
    source = CatalogSource(
        Catalog(), fake, lambda k, s: published.append(s), lambda *a: None, WatchSettings(), print, supervisor
    )
    real = CatalogIndex.service_answer
    calls = {"n": 0}

    def flaky(self: CatalogIndex, *args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("a bug")
        return real(self, *args)

    monkeypatch.setattr(CatalogIndex, "service_answer", flaky)
    source.start()
    try:
        deadline = time.monotonic() + 5
        while not published and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [i.port for i in published[-1].instances["web"]] == [80]
        assert published[-1].changed is None  # the first snapshot: everything
        move(81, 3)  # w1 re-registered in place on a new port
        while "reads catalog(local)" not in supervisor.problems() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "reads catalog(local)" in supervisor.problems()
        move(82, 4)  # the next move
        while time.monotonic() < deadline and [i.port for i in published[-1].instances.get("web", ())] != [82]:
            time.sleep(0.01)
        assert [i.port for i in published[-1].instances["web"]] == [82]
        assert published[-1].changed == {"web"}
        reads = [p for p, _ in fake.calls if p.startswith("/v1/health/service/")]
        assert set(reads) == {"/v1/health/service/web"}
    finally:
        source.stop()


def test_a_check_moving_from_warning_to_critical_is_never_read_as_passing():
    """The two watches of checks that are not passing answer apart: a check that moved from
    warning to critical may be in neither for a moment. It is not taken as passing then: its
    service is read again, and that read's status stands until the critical watch lists it."""
    fake = Fake()
    fake.set("/v1/catalog/nodes", 2, [{"Node": "n1", "Address": "127.0.0.1"}])
    w1 = {"ID": "w1", "Service": "web", "Port": 80, "ModifyIndex": 2}
    node = {"Node": {"Address": "127.0.0.1"}, "Services": [w1]}
    fake.set("/v1/catalog/node-services/n1", 2, node)

    def check(status: str) -> dict[str, Any]:
        return {"Node": "n1", "CheckID": "service:w1", "ServiceID": "w1", "ServiceName": "web", "Status": status}

    def service(status: str, index: int) -> None:
        entry = {
            "Node": {"Node": "n1", "Address": "127.0.0.1"},
            "Service": {"ID": "w1", "Service": "web", "Port": 80, "ModifyIndex": 2},
            "Checks": [check(status)],
        }
        fake.set("/v1/health/service/web", index, [entry])

    fake.set("/v1/health/state/critical", 2, [])
    fake.set("/v1/health/state/warning", 2, [check("warning")])
    service("warning", 2)
    published: list[Snapshot] = []
    source = CatalogSource(Catalog(), fake, lambda k, s: published.append(s), lambda *a: None, WatchSettings(), print)

    def statuses() -> list[str]:
        return [i.status for s in list(published) for i in s.instances.get("web", ())]

    def wait_for(what: Any) -> None:
        deadline = time.monotonic() + 5
        while not what() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert what(), statuses()

    source.start()
    try:
        wait_for(lambda: statuses() == ["warning"])
        service("critical", 3)  # the truth: it moved
        fake.set("/v1/health/state/warning", 3, [])  # this watch answers first
        wait_for(lambda: statuses()[-1:] == ["critical"])  # from the read of its service
        fake.set("/v1/health/state/critical", 4, [check("critical")])
        time.sleep(0.3)
        assert "passing" not in statuses() and statuses()[-1] == "critical"
        assert ("/v1/health/service/web", {}) in [(p, {}) for p, _ in fake.calls]
    finally:
        source.stop()


def test_store_holds_an_emptied_service_then_believes_it_and_wakes_the_runner():
    store = Store(grace_seconds=0.3)
    inst = Instance("w1", "web", "127.0.0.1", 80, "n1", "127.0.0.1")
    store.publish_catalog("catalog(local)", Snapshot({"web": ()}, {"web": (inst,)}))
    assert store.wait(0.1) == {"catalog(local)"}
    store.publish_catalog("catalog(local)", Snapshot({}, {}))  # every instance gone at once
    assert store.wait(0.1) == {"catalog(local)"}
    assert store.view().catalog("").instances["web"] == (inst,)  # held
    assert store.held() == ["web"]
    t0 = time.monotonic()
    assert store.wait(2.0) == {"catalog(local)"}  # woken when the grace runs out
    assert 0.1 < time.monotonic() - t0 < 1.0
    assert "web" not in store.view().catalog("").instances
    store.touch("template:x")
    assert store.wait(0) == {"template:x"}


def test_haproxy_state_file_is_written_for_its_owner_only(tmp_path):
    """The server-state file (addresses and states of every server) is 0600 whatever the umask,
    also over a file an older version left world-readable."""
    from templater.haproxy_runtime import write_private

    target = tmp_path / "server-state"
    target.write_text("old")
    target.chmod(0o644)
    old_umask = os.umask(0)
    try:
        write_private(target, "1\n# be_x 1 srv 127.0.0.1 2\n")
    finally:
        os.umask(old_umask)
    assert target.read_text().startswith("1\n")
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["server-state"]  # no temp file left


def test_server_state_drops_servers_that_moved():
    """A server whose address:port the new configuration changes starts from the configuration,
    not from the saved state (HAProxy would restore its old, dead port by name)."""
    from templater.haproxy_runtime import keep_state_of_unmoved, parse

    config = "backend be_x\n    server a 127.0.0.1:9001 check\n    server b 127.0.0.1:9102 check\n"
    state = (
        "1\n"
        "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight "
        "srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state "
        "srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord\n"
        "3 be_x 1 a 127.0.0.1 2 0 1 1 5 6 3 4 6 0 0 0 - 9001 -\n"
        "3 be_x 2 b 127.0.0.1 0 0 1 1 5 6 3 4 6 0 0 0 - 9002 -\n"
        "3 be_x 3 gone 127.0.0.1 2 0 1 1 5 6 3 4 6 0 0 0 - 9003 -"
    )
    kept = keep_state_of_unmoved(state, parse(config)).splitlines()
    assert kept[0] == "1" and kept[1].startswith("# be_id")
    assert [line.split()[3] for line in kept[2:]] == ["a"]  # b moved to 9102, gone is gone


def test_remembered_warnings_stay_bounded(caplog: pytest.LogCaptureFixture):
    """Runner.warned said each warning once but kept all of them (issue 9, point 9)."""
    from sidecar.consul_conn import ConsulSettings
    from templater.runner import WARNED_MAX, Runner
    from templater.settings import Settings

    runner = Runner(Settings(consul=ConsulSettings(), templates=()))
    for n in range(WARNED_MAX + 5):
        runner._warn(f"warning {n}")
    assert len(runner.warned) == WARNED_MAX
    assert "warning 0" not in runner.warned and f"warning {WARNED_MAX + 4}" in runner.warned
    caplog.clear()
    runner._warn("warning 0")  # forgotten, so said again; a remembered one is not
    runner._warn(f"warning {WARNED_MAX + 4}")
    assert [r.getMessage() for r in caplog.records] == ["warning 0"]


def test_side_files_take_the_destinations_mode_and_stale_ones_go(tmp_path: Path):
    from templater.output import FileOptions, remove_stale_side_files, side_dir, write_side_files

    dest = tmp_path / "nginx.cfg"
    dest.write_text("x")
    dest.chmod(0o640)
    assert write_side_files(dest, {"users-a": "a:h\n", "users-b": "b:h\n"}, "t", FileOptions())
    assert side_dir(dest) == tmp_path / "nginx.cfg.d"
    assert (side_dir(dest) / "users-a").read_text() == "a:h\n"
    assert (side_dir(dest) / "users-a").stat().st_mode & 0o777 == 0o640
    assert not write_side_files(dest, {"users-a": "a:h\n"}, "t", FileOptions())  # the same text: untouched
    remove_stale_side_files(dest, ["users-a"])
    assert sorted(p.name for p in side_dir(dest).iterdir()) == ["users-a"]
