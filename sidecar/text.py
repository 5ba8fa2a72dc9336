"""What may not appear in text the programs pass on: a name, tag or meta value for Consul, a
value in a proxy configuration."""

from __future__ import annotations

import re

# control characters (C0, DEL, C1), line and paragraph separators, and the invisible format
# characters that reorder or hide text (bidi overrides and isolates, zero-width ones, BOM)
UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]"
)


def unsafe(text: str) -> bool:
    return UNSAFE.search(text) is not None
