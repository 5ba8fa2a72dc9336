"""give_back(): freed heap memory goes back to the system (glibc's malloc_trim); gc_paused."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import psutil
from sidecar.memory import give_back
rss = lambda: psutil.Process().memory_info().rss >> 20
chunks = [bytes(1500) + bytes([i % 256]) for i in range(150_000)]  # ~225 MiB through malloc
keep = chunks[-1]  # the top of the heap stays in use: only a trim inside the heap frees the rest
del chunks
before = rss()
assert give_back()
print(before, rss())
"""


def test_freed_memory_is_returned_after_give_back():
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True).stdout
    before, after = map(int, out.split())
    assert before > 150, f"the freed chunks were already returned ({before} MiB): the test shows nothing"
    assert after < before - 150, f"RSS {before} MiB -> {after} MiB after give_back()"


def test_the_collector_is_paused_while_any_caller_is_inside_and_resumed_as_found():
    import gc
    import threading

    from sidecar.memory import gc_paused

    assert gc.isenabled()
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with gc_paused:
            inside.set()
            leave.wait(5)

    thread = threading.Thread(target=other)
    with gc_paused:
        assert not gc.isenabled()
        with gc_paused:  # nested
            assert not gc.isenabled()
        assert not gc.isenabled()
        thread.start()
        assert inside.wait(5)
    assert not gc.isenabled(), "resumed while another thread was still inside"
    leave.set()
    thread.join(5)
    assert gc.isenabled()
    gc.disable()  # a caller that turned the collector off keeps it off
    try:
        with gc_paused:
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
