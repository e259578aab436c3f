"""The image's HEALTHCHECK: exit 0 when the process in this container answers /healthz.

The image has no curl; this runs with the image's Python and the standard library only.
    python healthcheck.py [PORT] [PATH]
PORT defaults to $HEALTHCHECK_PORT, else 9750 (`worker` and `run`); a separate
`history-consumer` serves on 9751 and the console on 8025. PATH defaults to /healthz.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    """Return 0 when http://127.0.0.1:PORT/PATH answers 200, else 1 (with the reason)."""
    port = argv[1] if len(argv) > 1 else os.environ.get("HEALTHCHECK_PORT", "9750")
    path = argv[2] if len(argv) > 2 else "/healthz"
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
