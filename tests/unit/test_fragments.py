"""`{% cache %}` blocks: kept while what they read is unchanged, and then exactly as if rendered."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from templater.catalog import Instance, Snapshot
from templater.deps import Catalog
from templater.errors import TemplateError
from templater.fragments import Fragments
from templater.render import compile_template, make_environment, render

LISTING = """{% for s in services() %}{% cache s.name %}
backend {{ s.name }}{% for i in service(s.name) %} {{ i.address }}:{{ i.port }}{% endfor %}
{% if not service(s.name) %}{{ warn("service " ~ s.name ~ " has no passing instance") }}{% endif %}
{% endcache %}{% endfor %}"""


class View:
    def __init__(self, snapshot: Snapshot | None, kv: dict[str, Any] | None = None) -> None:
        self.snapshot = snapshot
        self._kv = kv or {}

    def catalog(self, dc: str) -> Snapshot | None:
        return self.snapshot

    def kv(self, key: str) -> Any:
        return self._kv.get(key)


def inst(name: str, port: int, status: str = "passing") -> Instance:
    return Instance(f"{name}-{port}", name, "127.0.0.1", port, "n1", "127.0.0.1", status=status)


def snapshot(instances: dict[str, tuple[Instance, ...]]) -> Snapshot:
    return Snapshot({name: () for name in instances}, dict(instances))


def test_a_changed_service_renders_its_block_again_and_only_it():
    template = compile_template(make_environment(), "t.j2", LISTING)
    fragments = Fragments()
    data = {f"s{n}": (inst(f"s{n}", 1000 + n),) for n in range(50)}
    first = render(template, "t.j2", View(snapshot(data)), {}, {}, (), fragments)
    assert fragments.misses == 50 and fragments.hits == 0
    data["s7"] = (*data["s7"], inst("s7", 2000))  # a new tuple for the service that changed
    second = render(template, "t.j2", View(snapshot(data)), {}, {}, (), fragments)
    assert fragments.misses == 51 and fragments.hits == 49
    plain = render(template, "t.j2", View(snapshot(data)), {}, {})
    assert second.text == plain.text != first.text and "127.0.0.1:2000" in second.text
    assert second.used == plain.used and second.queries == plain.queries


def test_a_kept_block_replays_its_warnings_and_dependencies():
    template = compile_template(make_environment(), "t.j2", LISTING)
    fragments = Fragments()
    data = {"a": (inst("a", 1, "critical"),), "b": (inst("b", 2),)}
    render(template, "t.j2", View(snapshot(data)), {}, {}, (), fragments)
    again = render(template, "t.j2", View(snapshot(data)), {}, {}, (), fragments)
    assert fragments.hits == 2
    assert again.warnings == ["service a has no passing instance"]
    assert "health.service(a||passing|)" in again.queries and again.used == {Catalog()}


def test_blocks_that_read_missing_data_are_not_kept_and_unused_ones_are_dropped():
    template = compile_template(make_environment(), "t.j2", "{% cache 'k' %}{{ key('cfg/x') }}{% endcache %}")
    fragments = Fragments()
    pending = render(template, "t.j2", View(None), {}, {}, (), fragments)
    assert not pending.complete and fragments.entries == {}
    ready = View(None, {"kv.key(cfg/x)": [{"Value": "aGk="}]})
    assert render(template, "t.j2", ready, {}, {}, (), fragments).text == "hi"
    assert list(fragments.entries) == [("k",)]
    changed = View(None, {"kv.key(cfg/x)": [{"Value": "aG8="}]})
    assert render(template, "t.j2", changed, {}, {}, (), fragments).text == "ho"
    listing = compile_template(make_environment(), "l.j2", LISTING)
    kept = Fragments()
    render(listing, "l.j2", View(snapshot({"a": (inst("a", 1),), "b": (inst("b", 2),)})), {}, {}, (), kept)
    render(listing, "l.j2", View(snapshot({"a": (inst("a", 1),)})), {}, {}, (), kept)
    assert list(kept.entries) == [("a",)]  # b is gone, and so is its block


def test_an_inner_change_renders_the_outer_block_again():
    source = (
        "{% cache 'all' %}[{% for s in services() %}{% cache s.name %}{{ service(s.name) | length }}"
        "{% endcache %}{% endfor %}]{% endcache %}"
    )
    template = compile_template(make_environment(), "t.j2", source)
    fragments = Fragments()
    data = {"a": (inst("a", 1),), "b": (inst("b", 2),)}
    assert render(template, "t.j2", View(snapshot(data)), {}, {}, (), fragments).text == "[11]"
    data["b"] = (inst("b", 2), inst("b", 3))
    assert render(template, "t.j2", View(snapshot(data)), {}, {}, (), fragments).text == "[12]"


CHANGES = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 3), st.sampled_from(["passing", "critical"])),
    max_size=12,
)


@settings(max_examples=100, deadline=None)
@given(CHANGES)
def test_cached_output_equals_a_plain_render_after_any_changes(changes):
    template = compile_template(make_environment(), "t.j2", LISTING)
    fragments = Fragments()
    data: dict[str, tuple[Instance, ...]] = {"a": (inst("a", 1),)}
    for name, count, status in changes:
        if count == 0:
            data.pop(name, None)
        else:
            data[name] = tuple(replace(inst(name, p), status=status) for p in range(1, count + 1))
        view = View(snapshot(data))
        cached = render(template, "t.j2", view, {}, {}, (), fragments)
        plain = render(template, "t.j2", view, {}, {})
        assert (cached.text, cached.warnings, cached.used, cached.queries) == (
            plain.text,
            plain.warnings,
            plain.used,
            plain.queries,
        )
        assert set(fragments.entries) == {(name,) for name in data}  # a block no longer rendered is dropped


def test_a_kept_block_still_makes_its_side_files():
    source = """{% for s in services() %}{% cache s.name %}
{{ s.name }} {{ side_file("f-" ~ s.name, s.name ~ " users") }}
{% endcache %}{% endfor %}"""
    template = compile_template(make_environment(), "t.j2", source)
    fragments = Fragments()
    data = {"a": (inst("a", 1),), "b": (inst("b", 2),)}
    first = render(template, "t.j2", View(snapshot(data)), {}, {}, (), fragments, None, "/etc/p.cfg.d")
    again = render(template, "t.j2", View(snapshot(data)), {}, {}, (), fragments, None, "/etc/p.cfg.d")
    assert fragments.hits == 2 and again.text == first.text and "a /etc/p.cfg.d/f-a" in again.text
    assert again.files == first.files == {"f-a": "a users", "f-b": "b users"}
    bad = compile_template(make_environment(), "t.j2", '{{ side_file("../x", "y") }}')
    with pytest.raises(TemplateError, match="side_file"):
        render(bad, "t.j2", View(snapshot(data)), {}, {})
