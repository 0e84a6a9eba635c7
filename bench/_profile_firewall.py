"""``l7proxy firewall`` with cProfile switched on and off by signals.

    python -m bench._profile_firewall OUT.prof firewall --listen ... --policy ...

SIGUSR1 starts profiling, SIGUSR2 stops it and writes OUT.prof, so the
profile covers the load only, not imports and start-up. The proxy itself is
the shipped command line, unchanged.

Times are the process's CPU time (``time.process_time``, user and system), not
the wall clock: on a shared machine the proxy is often waiting for a core, and
a wall-clock profile charges that wait to whatever it was doing.
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
import time


def main(argv: list[str]) -> int:
    out, rest = argv[0], argv[1:]
    prof = cProfile.Profile(time.process_time)

    def start(*_):
        prof.enable()

    def stop(*_):
        prof.disable()
        prof.dump_stats(out + ".tmp")
        os.replace(out + ".tmp", out)  # appears whole, or not at all

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from l7proxy.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
