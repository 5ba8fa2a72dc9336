"""SayOnce: a thing said once until it changes, its end once, at most cap keys."""

from __future__ import annotations

from sidecar.once import SayOnce


def test_said_once_until_it_changes_and_its_end_once():
    said = SayOnce()
    assert said.new("register web-1", "403 denied")
    assert not said.new("register web-1", "403 denied")  # the retry a second later
    assert said.new("register web-1", "500 no leader")  # changed: said again
    assert said.new("register web-2", "403 denied")  # another key
    assert said.over("register web-1")
    assert not said.over("register web-1")  # its end said once
    assert not said.over("never said")
    assert said.new("register web-1", "500 no leader")  # after its end, new again


def test_an_empty_text_counts_and_the_oldest_key_goes_past_the_cap():
    said = SayOnce(cap=2)
    assert said.new("stale")
    assert not said.new("stale")
    assert said.new("a") and said.new("b")  # "stale" was the oldest: forgotten
    assert "stale" not in said and "a" in said
    assert said.new("stale")
