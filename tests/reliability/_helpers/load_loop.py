"""Reader process of the crash test: load the file in a loop and report what it saw, as JSON.

    python load_loop.py PATH {table|state} STOP_FILE

Loads until STOP_FILE exists (at most ten minutes), then prints its counts.

Every load must succeed and equal A or B; a partial or mixed file would show as an error or a
mismatch.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from crash_fixtures import import_without_plugin_registration, loader, pair  # noqa: E402


def main() -> None:
    path, kind, stop = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    import_without_plugin_registration()
    a, b = pair(kind)
    load = loader(kind)
    a_json, b_json = a.to_json(), b.to_json()
    stats = {"loads": 0, "saw_a": 0, "saw_b": 0, "errors": 0, "mismatches": 0, "first_error": None}
    print("ready", flush=True)
    end = time.monotonic() + 600
    while not stop.exists() and time.monotonic() < end:
        try:
            got = load(path).to_json()
        except Exception as err:  # counted, not raised: the parent asserts there are none
            stats["errors"] += 1
            stats["first_error"] = stats["first_error"] or f"{type(err).__name__}: {err}"[:300]
            continue
        stats["loads"] += 1
        if got == a_json:
            stats["saw_a"] += 1
        elif got == b_json:
            stats["saw_b"] += 1
        else:
            stats["mismatches"] += 1
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
