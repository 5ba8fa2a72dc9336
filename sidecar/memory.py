"""Give freed heap memory back to the system.

A large read (a datacenter's catalog decoded from tens of megabytes of JSON) frees most of what
it allocated, but glibc keeps the freed pages in its heap: the templater at 10,000 services x 3
stayed at 238 MiB of RSS that it no longer used, and 154 MiB after `malloc_trim` (0.3-1.2 ms a
call there). Elsewhere than glibc, nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import threading
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def give_back() -> bool:
    """Return the free memory at the top and inside the heap to the system; whether it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class _Pause:
    """The collector paused while any caller is inside (counted); resumed as it was found."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._was_enabled = True

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._inside += 1

    def __exit__(self, *_exc: object) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0 and self._was_enabled:
                gc.enable()


# No cyclic collection while a block runs (in any thread), for work that builds a large heap of
# objects without cycles: decoding a node's answer of tens of megabytes and building the catalog
# from it, or a render. The collector's full passes are triggered by the number of objects that
# survive, so while a heap of half a million objects is being built each pass walks all of it
# again: at 10,000 services x 3, a third of the first read and of the index built from it.
# Nested and concurrent pauses are counted; the last one out resumes the collector.
gc_paused = _Pause()
