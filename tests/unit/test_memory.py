"""give_back(): freed heap memory goes back to the system (glibc's malloc_trim)."""

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
