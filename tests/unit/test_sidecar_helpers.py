from __future__ import annotations

import pytest

from sidecar.backoff import Backoff
from sidecar.durations import is_duration, parse_duration


def test_parse_duration():
    assert parse_duration("10s") == 10
    assert parse_duration("1m30s") == 90
    assert parse_duration("250ms") == pytest.approx(0.25)
    assert parse_duration("2") == 2
    assert is_duration("5s") and not is_duration("banana") and not is_duration("5")
    with pytest.raises(ValueError, match="banana"):
        parse_duration("banana")


def test_backoff_doubles_to_cap_and_resets():
    b = Backoff(base=0.1, cap=1.0, jitter=0.0)
    assert [b.next_delay() for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    b.reset()
    assert b.next_delay() == pytest.approx(0.1)
    jittered = Backoff(base=1.0, cap=1.0, jitter=0.2)
    assert all(0.8 <= jittered.next_delay() <= 1.2 for _ in range(50))
