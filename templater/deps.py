"""What a template can depend on, one frozen value per kind of Consul data.

A render records the values it used; the runner starts a source per value and compares what
renders used. Each has a stable `key` (`catalog(dc2)`, `kv.tree(app/cfg)`): the name in logs,
in /health, and of the data in the store. Nothing is parsed back out of a key.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Catalog:
    """A datacenter's catalog: services, instances with health, nodes. "" is the agent's own."""

    dc: str = ""

    def __hash__(self) -> int:  # cheap: a render's blocks add the same one to a set thousands of times
        return hash(self.dc)

    @property
    def key(self) -> str:
        return f"catalog({self.dc or 'local'})"


@dataclass(frozen=True, order=True)
class Checks:
    """Each instance's health checks in a dc (consul-template's `.Checks`): kept by that dc's
    catalog source, which reads every check once, only while a template reads them."""

    dc: str = ""

    @property
    def key(self) -> str:
        return f"{catalog_key(self.dc)}.checks"

    @property
    def catalog(self) -> Catalog:
        return catalog(self.dc)


@dataclass(frozen=True, order=True)
class KV:
    """A KV key, or with recurse a prefix (`tree`, `ls`), in a datacenter ("" the agent's)."""

    path: str  # as in the URL: "app/cfg" for a key, "app/cfg/" for a prefix ("" for the root)
    recurse: bool = False
    dc: str = ""

    @property
    def key(self) -> str:
        kind = "kv.tree" if self.recurse else "kv.key"
        return f"{kind}({self.path.strip('/')}{'@' + self.dc if self.dc else ''})"


@dataclass(frozen=True, order=True)
class Datacenters:
    """The datacenters Consul knows (consul-template's `datacenters`): polled, not blocking."""

    @property
    def key(self) -> str:
        return "catalog.datacenters"


@dataclass(frozen=True, order=True)
class AgentNode:
    """The name of the agent's own node (consul-template's `node` without a name): polled."""

    @property
    def key(self) -> str:
        return "agent.node"


Dependency = Catalog | Checks | KV | Datacenters | AgentNode
DATACENTERS = Datacenters()
AGENT_NODE = AgentNode()


def kv(path: str, recurse: bool, dc: str | None) -> KV:
    """The dependency of `key()` (recurse False) or `tree()`/`ls()` (True) on path."""
    stripped = path.strip("/")
    return KV(stripped + ("/" if recurse and stripped else ""), recurse, dc or "")


_CATALOGS: dict[str, Catalog] = {}


def catalog(dc: str | None) -> Catalog:
    """The dependency on a dc's catalog, one object per dc (a render names it once per read)."""
    found = _CATALOGS.get(dc or "")
    if found is None:
        found = _CATALOGS[dc or ""] = Catalog(dc or "")
    return found


def catalog_key(dc: str | None) -> str:
    return catalog(dc).key
