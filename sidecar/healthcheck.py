"""`sidecar-healthcheck`: the image's HEALTHCHECK. Exit 0 when the program in this container
says it is healthy on its status address, 1 otherwise.

One image runs either program: the templater's address (TEMPLATER_STATUS_ADDR) is asked first,
then the registrar's (REGISTRAR_STATUS_ADDR); the first that answers decides.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    for var in ("TEMPLATER_STATUS_ADDR", "REGISTRAR_STATUS_ADDR"):
        addr = os.environ.get(var)
        if not addr:
            continue
        try:
            with urllib.request.urlopen(f"http://{addr}/health", timeout=2) as response:
                print(response.read().decode(errors="replace")[:500])
                return 0
        except urllib.error.HTTPError as err:
            with err:
                print(err.read().decode(errors="replace")[:500])
            return 1
        except OSError:
            continue
    print("no status address answers (TEMPLATER_STATUS_ADDR, REGISTRAR_STATUS_ADDR)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
