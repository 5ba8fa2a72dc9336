"""Say a thing once until it changes, and its end once.

A daemon retries every second; its log should say a failure when it starts or changes, and
that it is over when it is, not a line per retry. One `SayOnce` remembers per key the last text
said (not thread-safe: the caller's lock, where threads share it).
"""

from __future__ import annotations

_NOTHING = object()


class SayOnce:
    def __init__(self, cap: int = 10_000) -> None:
        """cap: keys remembered at most (the oldest said is forgotten first)."""
        self._said: dict[str, str] = {}
        self._cap = cap

    def new(self, key: str, text: str = "") -> bool:
        """True the first time text comes for key, then again only once it changed."""
        if self._said.get(key, _NOTHING) == text:
            return False
        self._said.pop(key, None)
        self._said[key] = text
        if len(self._said) > self._cap:
            del self._said[next(iter(self._said))]
        return True

    def over(self, key: str) -> bool:
        """Forget key; True when something had been said for it (so its end is said once)."""
        return self._said.pop(key, _NOTHING) is not _NOTHING

    def __contains__(self, key: str) -> bool:
        return key in self._said

    def __len__(self) -> int:
        return len(self._said)
