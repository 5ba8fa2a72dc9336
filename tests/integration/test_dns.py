"""DNS: discovery through Consul's DNS interface (dig against the agent), and the templater's
external DNS sync against a real BIND 9 with a dynamic zone and a TSIG key."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.dns_support import KEY_NAME, BindServer, dig, dig_output, dig_status
from tests.support import ROOT, free_port, health, scrape, wait_until

pytestmark = pytest.mark.integration

ZONE = "example.test"
FOREIGN = 'foreign.prod IN A 127.0.9.9\nforeign.prod IN TXT "someone else\'s"\nother IN A 127.0.9.8\n'


# -- 1. discovery through Consul DNS


def test_consul_dns_answers_a_and_srv_by_name_and_tag(consul, containers, registrar, hostname):
    registrar()
    blue = containers.run(labels={"SERVICE_NAME": "dnsweb", "SERVICE_TAGS": "blue"})
    green = containers.run(labels={"SERVICE_NAME": "dnsweb", "SERVICE_TAGS": "green"})
    ports = {containers.host_port(blue), containers.host_port(green)}
    wait_until(lambda: len(consul.health("dnsweb", passing=True)) == 2, what="both passing")

    assert dig(consul.dns_port, "dnsweb.service.consul") == ["127.0.0.1"]
    srv = [line.split() for line in dig(consul.dns_port, "dnsweb.service.consul", "SRV")]
    assert {int(r[2]) for r in srv} == ports  # priority weight port target
    # the target names the instance's address (Consul's <hex>.addr form for an explicit service
    # address, else <node>.node), and resolves to it; the node itself answers under .node
    assert all(dig(consul.dns_port, r[3]) == ["127.0.0.1"] for r in srv), srv
    assert dig(consul.dns_port, "test-node.node.consul") == ["127.0.0.1"]
    additional = dig_output(consul.dns_port, "dnsweb.service.consul", "SRV").split("ADDITIONAL SECTION:")[1]
    assert "test-node.node.dc1.consul." in additional  # the node the instances run on
    blue_srv = dig(consul.dns_port, "blue.dnsweb.service.consul", "SRV")
    assert [int(r.split()[2]) for r in blue_srv] == [containers.host_port(blue)]
    assert dig_status(consul.dns_port, "red.dnsweb.service.consul") == "NXDOMAIN"
    # the same over TCP, as resolvers fall back to for large answers
    assert len(dig(consul.dns_port, "dnsweb.service.consul", "SRV", tcp=True)) == 2


def test_consul_dns_leaves_out_failing_and_draining_instances(consul, containers, registrar, hostname):
    registrar()
    good = containers.run(labels={"SERVICE_NAME": "dnsheal", "SERVICE_CHECK_HTTP": "/", "SERVICE_CHECK_INTERVAL": "1s"})
    bad = containers.run(labels={"SERVICE_NAME": "dnsheal", "SERVICE_CHECK_HTTP": "/missing",
                                 "SERVICE_CHECK_INTERVAL": "1s"})  # fmt: skip
    # busybox sh as PID 1 ignores SIGTERM: docker stop waits out its timeout, draining meanwhile
    slow = containers.run(labels={"SERVICE_NAME": "dnsheal", "SERVICE_CHECK_HTTP": "/", "SERVICE_CHECK_INTERVAL": "1s"},
                          command="httpd -p 8080 -h /www; sleep 3600")  # fmt: skip
    good_port, bad_port, slow_port = (containers.host_port(c) for c in (good, bad, slow))
    wait_until(lambda: len(consul.health("dnsheal", passing=True)) == 2, timeout=15, what="two passing")

    def ports() -> set[int]:
        return {int(line.split()[2]) for line in dig(consul.dns_port, "dnsheal.service.consul", "SRV")}

    wait_until(lambda: ports() == {good_port, slow_port}, what=f"failing {bad_port} left out")
    with ThreadPoolExecutor(1) as pool:
        stopping = pool.submit(slow.stop, timeout=4)
        wait_until(lambda: ports() == {good_port}, timeout=2, what="draining instance left out")
        slow.reload()
        assert slow.status == "running"  # still in its stop timeout, no longer in DNS
        stopping.result()
    assert ports() == {good_port}


def test_consul_dns_udp_ports_under_their_udp_tag(consul, containers, registrar, hostname):
    registrar()
    c = containers.run(ports=("8080/tcp", "5353/udp"), labels={"SERVICE_NAME": "dnsudp"})
    udp_port = containers.host_port(c, "5353/udp")
    wait_until(lambda: len(consul.health("dnsudp")) == 2, what="both ports registered")
    udp = dig(consul.dns_port, "udp.dnsudp.service.consul", "SRV")
    assert [int(r.split()[2]) for r in udp] == [udp_port]
    assert len(dig(consul.dns_port, "dnsudp.service.consul", "SRV")) == 2


# -- 2. external DNS: the templater keeps a BIND zone in step


@pytest.fixture
def bind(tmp_path: Path) -> Iterator[BindServer]:
    server = BindServer(tmp_path / "bind", ZONE, FOREIGN)
    server.start()
    yield server
    server.stop()


def register(consul, service_id: str, name: str, address: str, port: int, meta: dict[str, str] | None = None,
             ttl_status: str | None = None) -> None:  # fmt: skip
    """A registration as another host's registrar (or templater, for `ingress`) makes it."""
    body: dict[str, object] = {"ID": service_id, "Name": name, "Address": address, "Port": port, "Meta": meta or {}}
    if ttl_status:
        body["Check"] = {"CheckID": f"service:{service_id}", "TTL": "60s", "Status": ttl_status}
    consul.put("/v1/agent/service/register", body)


def dns_templater(templater, bind: BindServer, *extra: str, key_file: Path | None = None):
    status = free_port()
    proc = templater(
        "--dns-zone", ZONE, "--dns-server", f"127.0.0.1:{bind.port}", "--dns-key-file", str(key_file or bind.key_file),
        "--dns-environment", "prod", "--dns-sync-interval", "1s", "--empty-grace", "1s",
        "--status-addr", f"127.0.0.1:{status}", *extra,
    )  # fmt: skip
    return proc, status


def timed(fn, what: str, timeout: float = 5.0) -> float:
    started = time.monotonic()
    wait_until(fn, timeout=timeout, interval=0.01, what=what)
    return time.monotonic() - started


def test_external_dns_follows_proxies_services_and_hand_edits(consul, templater, bind, tmp_path):
    foreign_before = {k: v for k, v in bind.names().items() if k.startswith(("foreign.", "other."))}
    register(consul, "ingress:host-a", "ingress", "127.0.2.1", 80, ttl_status="passing")
    register(consul, "shop-1", "shop", "127.0.0.1", 9001, {"http_host": "shop.example.test"})
    register(consul, "foreign-1", "foreign", "127.0.0.1", 9002, {"http_host": "foreign.example.test"})
    register(consul, "bad-1", "bad_name", "127.0.0.1", 9003, {"http_host": "bad.example.test"})
    register(consul, "internal-1", "internal", "127.0.0.1", 9004)  # not routed: no record
    proc, status = dns_templater(templater, bind)
    shop = f"shop.prod.{ZONE}"
    wait_until(lambda: dig(bind.port, shop) == ["127.0.2.1"], what="first sync")
    assert dig(bind.port, shop, "TXT") == ['"heritage=consul-sidecar,owner=default"']
    assert dig_status(bind.port, f"internal.prod.{ZONE}") == "NXDOMAIN"
    # idle periodic syncs (every 1 s here) ask the SOA serial, not for the whole zone
    transfers = scrape(status)["templater_dns_zone_transfers_total"]
    time.sleep(3.2)
    assert scrape(status)["templater_dns_zone_transfers_total"] == transfers
    updates_before = scrape(status)["templater_dns_updates_total"]

    # a proxy host added: its address within 1 s, in one UPDATE
    register(consul, "ingress:host-b", "ingress", "127.0.2.2", 80, ttl_status="passing")
    took = timed(lambda: dig(bind.port, shop) == ["127.0.2.1", "127.0.2.2"], "host b in the A record")
    assert took < 1.0, f"host b reached DNS after {took:.2f} s"
    assert scrape(status)["templater_dns_updates_total"] == updates_before + 1

    # its proxy check fails: the address leaves
    consul.put("/v1/agent/check/fail/service:ingress:host-b")
    took = timed(lambda: dig(bind.port, shop) == ["127.0.2.1"], "host b out of the A record")
    assert took < 1.0, f"failing host b left DNS after {took:.2f} s"

    # changed and deleted by hand: restored within one sync period (1 s here)
    assert bind.nsupdate(f"update delete {shop} A\nupdate add {shop} 30 A 127.0.9.7").returncode == 0
    assert dig(bind.port, shop) == ["127.0.9.7"]
    took = timed(lambda: dig(bind.port, shop) == ["127.0.2.1"], "hand-changed record restored")
    assert took < 2.0, f"restored after {took:.2f} s"
    assert bind.nsupdate(f"update delete {shop}").returncode == 0
    assert dig_status(bind.port, shop) == "NXDOMAIN"
    took = timed(lambda: dig(bind.port, shop) == ["127.0.2.1"], "hand-deleted name restored")
    assert took < 2.0, f"restored after {took:.2f} s"

    # the service goes: its record goes (after --empty-grace 1s)
    consul.put("/v1/agent/service/deregister/shop-1")
    wait_until(lambda: dig_status(bind.port, shop) == "NXDOMAIN", timeout=5, what="record removed with the service")

    # a foreign name it wanted, and names outside its suffix, are untouched; a bad name is said
    after = {k: v for k, v in bind.names().items() if k.startswith(("foreign.", "other."))}
    assert after == foreign_before
    log = proc.output()
    assert f"foreign.prod.{ZONE}. holds records this templater did not write" in log
    assert "service bad_name: name 'bad_name.prod.example.test' left out" in log
    assert log.count("bad_name.prod.example.test") == 1  # said once, not every sync
    owned = [k for k, v in bind.names().items() if "heritage=consul-sidecar" in " ".join(v)]
    assert owned == []


def test_wrong_tsig_key_is_said_clearly_and_changes_nothing(consul, templater, bind, tmp_path):
    wrong = tmp_path / "wrong.key"
    secret = "c2lkZWNhci10ZXN0LXdyb25nLXNlY3JldC0wMTIzNDU2Nzg5YWI="
    wrong.write_text(f'key "{KEY_NAME}" {{\n\talgorithm hmac-sha256;\n\tsecret "{secret}";\n}};\n')
    register(consul, "ingress:host-a", "ingress", "127.0.2.1", 80, ttl_status="passing")
    register(consul, "shop-1", "shop", "127.0.0.1", 9001, {"http_host": "shop.example.test"})
    before = bind.names()
    proc, status = dns_templater(templater, bind, key_file=wrong)
    wait_until(lambda: "rejected the signature" in proc.output(), what="the refusal in the log")
    wait_until(lambda: scrape(status)["templater_dns_failures_total"] >= 3, timeout=10, what="retries")
    assert bind.names() == before
    line = next(x for x in proc.output().splitlines() if "rejected the signature" in x)
    assert f"DNS server 127.0.0.1:{bind.port} zone {ZONE}." in line and f"TSIG key '{KEY_NAME}'" in line
    assert secret not in proc.output()
    assert proc.output().count("rejected the signature") == 1  # once per change of state
    code, body = health(status)
    assert code == 503
    assert body["status"] == "degraded" and "BADSIG" in str(body["problems"])
    assert proc.alive()


def test_dns_outages_never_delete_records(consul, templater, bind, tmp_path):
    """The DNS server down at start: retried until it answers. Consul down: records stay."""
    register(consul, "ingress:host-a", "ingress", "127.0.2.1", 80, ttl_status="passing")
    register(consul, "shop-1", "shop", "127.0.0.1", 9001, {"http_host": "shop.example.test"})
    bind.stop()
    proc, status = dns_templater(templater, bind, "--retry-max-backoff", "500ms")
    wait_until(lambda: "unreachable" in proc.output(), what="the DNS server said unreachable")
    bind.start()
    wait_until(lambda: dig(bind.port, f"shop.prod.{ZONE}") == ["127.0.2.1"], timeout=15, what="synced once up")
    assert "answers and takes updates again" in proc.output()

    consul.stop()
    time.sleep(3.5)  # three sync periods without Consul
    assert dig(bind.port, f"shop.prod.{ZONE}") == ["127.0.2.1"]
    assert health(status)[1]["consul"] == "down"


def test_dns_name_meta_publishes_instances_with_srv(consul, templater, bind, tmp_path):
    for n, port in ((1, 9101), (2, 9102)):
        register(consul, f"db-{n}", "db", f"127.0.3.{n}", port, {"dns_name": "pg", "container_name": f"db-{n}"},
                 ttl_status="passing")  # fmt: skip
    dry, _ = dns_templater(templater, bind, "--once", "--dry")
    assert dry.proc.wait(15) == 0, dry.output()
    assert f"> dns create pg.prod.{ZONE}. A=127.0.3.1,127.0.3.2 SRV=" in dry.output()
    assert dig_status(bind.port, f"pg.prod.{ZONE}") == "NXDOMAIN"  # --dry: printed, not sent
    proc, _ = dns_templater(templater, bind, "--once")
    assert proc.proc.wait(15) == 0, proc.output()
    assert dig(bind.port, f"pg.prod.{ZONE}") == ["127.0.3.1", "127.0.3.2"]
    assert dig(bind.port, f"pg.prod.{ZONE}", "SRV") == [
        f"1 1 9101 db-1.pg.prod.{ZONE}.",
        f"1 1 9102 db-2.pg.prod.{ZONE}.",
    ]
    assert dig(bind.port, f"db-2.pg.prod.{ZONE}") == ["127.0.3.2"]
    # read back, the zone is what was planned: a second run has nothing to send (SRV targets
    # came back relative to the zone once, and were "changed" at every sync)
    again, _ = dns_templater(templater, bind, "--once", "--dry")
    assert again.proc.wait(15) == 0, again.output()
    assert "> dns" not in again.output()


def test_templater_with_proxy_publishes_its_own_host(consul, templater, bind, tmp_path):
    """The proxy registers itself (ingress, with --register-address); the same templater syncs DNS."""
    register(consul, "shop-1", "shop", "127.0.0.1", 9001, {"http_host": "shop.example.test"})
    http = free_port()
    dns_templater(
        templater, bind, "--template", f"{ROOT / 'templates' / 'haproxy.cfg.j2'}:{tmp_path / 'haproxy.cfg'}",
        "--proxy", "haproxy", "--stop-proxy", "--register-address", "127.0.2.7", "--var", f"runtime_dir={tmp_path}",
        "--var", f"http_port={http}", "--var", "bind_address=127.0.0.1",
    )  # fmt: skip
    wait_until(lambda: dig(bind.port, f"shop.prod.{ZONE}") == ["127.0.2.7"], timeout=15, what="own host published")


def test_a_name_written_between_read_and_update_is_read_again_not_overwritten(bind, caplog):
    """Another writer (a second templater with the same owner, or a person) creates a name after
    our read: the UPDATE's prerequisite (name unused) fails, the zone is read again and the plan
    made anew, with no error state."""
    from sidecar.backoff import Backoff
    from templater.dns_records import Naming
    from templater.dns_server import DnsServer, read_key_file
    from templater.dns_sync import DnsSync
    from templater.status import Metrics

    naming = Naming(ZONE + ".", "prod")
    server = DnsServer("127.0.0.1", bind.port, naming, read_key_file(bind.key_file))
    sync = DnsSync(server, 30, 30.0, Metrics(), print, Backoff())
    shop = f"shop.prod.{ZONE}."
    want = {shop: {"A": frozenset({"127.0.2.1"}), "TXT": frozenset({naming.owner_txt})}}
    before_serial = server.serial()
    sync._copy = ({}, before_serial)  # our read: the name is free
    assert bind.nsupdate(f"update add {shop} 30 A 127.0.2.1\nupdate add {shop} 30 TXT {naming.owner_txt}"
                         ).returncode == 0  # fmt: skip
    sync._copy = ({}, server.serial())  # ... and the other write lands after our serial check
    with caplog.at_level("INFO"):
        result = sync.sync(want, full=False)
    assert "YXDOMAIN" in caplog.text and "reading the zone again" in caplog.text
    assert not result  # read again: the name is ours already, nothing to send
    assert dig(bind.port, shop) == ["127.0.2.1"]
    # a foreign name created meanwhile is never overwritten either
    other = f"other.prod.{ZONE}."
    assert bind.nsupdate(f"update add {other} 30 A 127.0.9.1").returncode == 0
    sync._copy = (dict(sync._copy[0]) if sync._copy else {}, server.serial())
    result = sync.sync({**want, other: {"A": frozenset({"127.0.2.1"}), "TXT": frozenset({naming.owner_txt})}},
                       full=False)  # fmt: skip
    assert result.foreign == [other] and dig(bind.port, other) == ["127.0.9.1"]
