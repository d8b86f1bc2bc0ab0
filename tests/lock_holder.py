"""A separate process for tests/test_lock.py.

    lock_holder.py hold TARGET [--file] [--fork]   lock TARGET, print "held", sleep until killed
                                                   (--fork: first fork a child that sleeps too and
                                                   print its pid as "child PID")
    lock_holder.py try TARGET [--file]             try to lock TARGET: print "ok" (exit 0) or the
                                                   refusal (exit 3)
    lock_holder.py race TARGET AT [--file]         at time.time() AT, try; hold a winning lock until
                                                   stdin closes
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeclr import lock  # noqa: E402


def main() -> int:
    action, target, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    mode = "file" if "--file" in flags else "auto"
    if action == "race":
        time.sleep(max(0.0, float(flags[0]) - time.time()))
    try:
        held = lock.hold(target, "the test output", mode=mode).acquire()
    except lock.LockedError as e:
        print(f"locked: {e}", flush=True)
        return 3
    if action in ("try", "race"):
        print(f"ok {held.kind}", flush=True)
        if action == "race":
            sys.stdin.read()
        held.release()
        return 0
    if "--fork" in flags:
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print(f"child {child}", flush=True)
    print(f"held {held.kind}", flush=True)
    time.sleep(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
