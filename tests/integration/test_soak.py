"""Three minutes of everything at once (issue 21, point 3); bench/soak_bench.py runs it for 30."""

from __future__ import annotations

import pytest

from tests.soak import PROGRAMS, soak

pytestmark = pytest.mark.integration

WARM_UP = 60.0


def test_a_three_minute_soak_drops_nothing_and_leaks_nothing(consul, containers, workdir, hostname):
    result = soak(consul, containers, workdir, hostname, seconds=180, consul_every=60, edit_every=45)
    assert result.consul_restarts == 2 and result.edits >= 3 and result.stopped >= 100, result
    assert result.requests > 1000
    assert result.failures == [], result.failures[:10]
    for program in PROGRAMS:
        # file descriptors and threads come back to what they were after the warm-up; memory
        # grows by less than a few MiB (a leak of a connection or thread per change would not)
        for metric, allowed in (("fds", 8), ("threads", 4), ("rss_mib", 12)):
            first, last = result.after(f"{program}_{metric}", WARM_UP)
            assert last - first <= allowed, (program, metric, first, last, result.samples)
