"""Writer side of the crash test: forks processes that save A, B, A, B... until they are killed.

    python writer_server.py PATH {table|state}

Imports and builds both tables once, prints ``ready SAVE_S ENCODE_S`` (the time one save takes
here, and the part of it spent encoding JSON before the temporary file exists), then serves
commands on stdin, one per line:

* ``spawn FIRST``: fork a writer that saves A, B, A, B... (FIRST 0) or B, A, B, A... (FIRST 1) to
  PATH in a tight loop; print its pid. The parent of the test kills that pid with SIGKILL at a
  moment of its choosing.
* ``reap``: wait for the last writer to end; print ``reaped STATUS``.

Forking from a warm process makes a writer start in about a millisecond, where a fresh
interpreter takes a quarter of a second: the test can afford many more kills.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from crash_fixtures import import_without_plugin_registration, pair  # noqa: E402


def _save_forever(path: str, tables: tuple, first: int) -> None:
    turn = first
    while True:
        tables[turn % 2].save(path)
        turn += 1


def main() -> None:
    path, kind = sys.argv[1], sys.argv[2]
    import_without_plugin_registration()
    tables = pair(kind)
    probe = f"{path}.timing"
    start = time.perf_counter()
    tables[0].save(probe)
    save_s = time.perf_counter() - start
    os.unlink(probe)
    start = time.perf_counter()
    json.dumps(tables[0].to_json(), indent=2, ensure_ascii=False)
    encode_s = time.perf_counter() - start
    print(f"ready {save_s:.6f} {encode_s:.6f}", flush=True)
    child = None
    for line in sys.stdin:
        command, *args = line.split()
        if command == "spawn":
            child = os.fork()
            if child == 0:
                try:
                    _save_forever(path, tables, int(args[0]) if args else 0)
                finally:
                    os._exit(1)  # never return into the server's loop
            print(child, flush=True)
        elif command == "reap" and child is not None:
            _, status = os.waitpid(child, 0)
            child = None
            print(f"reaped {status}", flush=True)


if __name__ == "__main__":
    main()
